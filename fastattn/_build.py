"""Compile ``csrc/`` on first use with torch.utils.cpp_extension and ninja.

The source list and compiler flags here are also those of the ahead-of-time build
(setup.py), so a wheel and a JIT build compile the same thing. The compiled library only
registers ops with the dispatcher (``TORCH_LIBRARY``); it has no Python module of its own.
Whether a prebuilt library or this build is loaded is fastattn/_library.py's choice. Builds
are cached in a folder keyed by everything that changes the binary: the sources, the torch
version, the CUDA arch list, whether the CUDA sources are included and the compiler flags.
``import fastattn`` never calls into this module's build path.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
LIBRARY_NAME = "fastattn_ops"


class BuildError(RuntimeError):
    """The C++/CUDA extension could not be compiled or loaded."""


def sources(with_cuda: bool) -> list[Path]:
    if not CSRC.is_dir():
        raise BuildError(
            f"fastattn's C++ sources were not found at {CSRC}; install fastattn from a "
            "source checkout with `pip install -e .` (the sources are compiled on first use)"
        )
    # Everything under csrc/cuda/ (.cu and its .cpp glue) is CUDA-only; the rest is common.
    cuda_dir = CSRC / "cuda"
    common = [p for p in sorted(CSRC.rglob("*.cpp")) if cuda_dir not in p.parents]
    if not with_cuda:
        return common
    return common + sorted(p for ext in ("*.cpp", "*.cu") for p in cuda_dir.rglob(ext))


def _headers() -> list[Path]:
    return sorted(p for ext in ("*.h", "*.cuh") for p in CSRC.rglob(ext))


def cuda_home() -> str | None:
    """nvcc's toolkit root: CUDA_HOME / CUDA_PATH, else /usr/local/cuda, if nvcc is there."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    return None


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST if set, else the visible GPUs' capabilities, else Hopper."""
    explicit = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if explicit:
        return explicit
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return "9.0"


def _build_key(with_cuda: bool, arches: str) -> str:
    digest = hashlib.sha256()
    for path in sources(with_cuda) + _headers():
        digest.update(str(path.relative_to(CSRC)).encode())
        digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(f"cuda={with_cuda};arch={arches};{compile_args(with_cuda, arches)}".encode())
    return digest.hexdigest()[:16]


def build_dir(key: str) -> Path:
    root = os.environ.get("FASTATTN_BUILD_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "fastattn"
    return base / f"torch{torch.__version__.replace('+', '_')}-{key}"


def _check_toolchain(with_cuda: bool) -> None:
    missing = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler (`{compiler}` is not on PATH; install g++ or set CXX)")
    if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists():
        missing.append("ninja (`pip install ninja`)")
    if with_cuda and cuda_home() is None:
        missing.append("nvcc (set CUDA_HOME to the CUDA toolkit, e.g. /usr/local/cuda)")
    if missing:
        raise BuildError(
            "fastattn compiles its kernels on first use and needs " + "; ".join(missing)
            + ". Then call the op again, or build ahead with `python -m fastattn.build`."
        )


def cuda_arch_flags(arches: str) -> list[str]:
    """nvcc's -gencode flags (and -DFASTATTN_SM90A) for a TORCH_CUDA_ARCH_LIST value.

    Entries are "X.Y", "X.Ya" or either with "+PTX" (also embed PTX, which the driver
    compiles for newer GPUs), separated by ";" or spaces.
    """
    flags: list[str] = []
    for arch in parse_arch_list(arches):
        number = arch.removesuffix("+PTX").replace(".", "")
        if number in ("90", "90a"):
            # Hopper builds the 'a' target: its wgmma instructions carry the forward's fast path
            # (csrc/cuda/local_fwd.cuh); sm_90a code runs on every compute-capability-9.0 GPU.
            number = "90a"
            flags.append("-DFASTATTN_SM90A")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return list(dict.fromkeys(flags))  # "9.0;9.0a" is one target


_ARCH = re.compile(r"\d+\.\d+a?(\+PTX)?")


def parse_arch_list(arches: str) -> list[str]:
    """The entries of a TORCH_CUDA_ARCH_LIST value; a malformed one raises BuildError."""
    entries = [a for a in arches.replace(" ", ";").split(";") if a.strip()]
    bad = [a for a in entries if not _ARCH.fullmatch(a.strip())]
    if bad:
        raise BuildError(
            f"TORCH_CUDA_ARCH_LIST={arches!r}: cannot read {', '.join(map(repr, bad))}; "
            "write compute capabilities such as '8.0;9.0a' or '8.0+PTX'"
        )
    return [a.strip() for a in entries]


def compile_args(with_cuda: bool, arches: str) -> dict[str, list[str]]:
    """Compiler flags of the extension, for the JIT build and setup.py alike."""
    defines = ["-DFASTATTN_WITH_CUDA"] if with_cuda else []
    args = {"cxx": ["-O3", *defines]}
    if with_cuda:
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        # Half/bfloat16 operators are used explicitly in the kernels; torch's defaults disable them.
        nvcc += ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                 "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
        args["nvcc"] = nvcc + cuda_arch_flags(arches) + defines
    return args


def why_no_cuda(require_gpu: bool) -> str | None:
    """Why a build here would leave out the CUDA kernels; None when it includes them."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if cuda_home() is None:
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    if require_gpu and not torch.cuda.is_available():
        return "no GPU was visible (`python -m fastattn.build --cuda` compiles them anyway)"
    return None


def jit_config(force_cuda: bool = False) -> tuple[bool, str]:
    """(with CUDA kernels, TORCH_CUDA_ARCH_LIST) of the JIT build in this process."""
    if force_cuda and torch.version.cuda is None:
        raise BuildError("--cuda needs a CUDA build of torch; this torch is CPU-only "
                         f"({torch.__version__})")
    with_cuda = force_cuda or why_no_cuda(require_gpu=True) is None
    return with_cuda, arch_list() if with_cuda else ""


def build(force_cuda: bool = False, verbose: bool = False) -> Path:
    """Compile (or reuse) the extension and load it into the process. Returns the .so path."""
    with_cuda, arches = jit_config(force_cuda)
    key = _build_key(with_cuda, arches)
    directory = build_dir(key)
    library = directory / f"{LIBRARY_NAME}.so"
    if library.exists():  # the key covers sources, torch and arches: no compiler needed
        torch.ops.load_library(str(library))
        return library
    _check_toolchain(with_cuda)
    if with_cuda:
        os.environ.setdefault("CUDA_HOME", cuda_home() or "")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arches
    from torch.utils import cpp_extension

    if with_cuda:
        # cpp_extension caches its guess of CUDA_HOME at import; make it agree with ours.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    directory.mkdir(parents=True, exist_ok=True)
    args = compile_args(with_cuda, arches)
    try:
        cpp_extension.load(
            name=LIBRARY_NAME,
            sources=[str(p) for p in sources(with_cuda)],
            extra_cflags=args["cxx"],
            extra_cuda_cflags=args.get("nvcc"),
            extra_include_paths=[str(CSRC)],
            build_directory=str(directory),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # the compiler's own message is in exc
        raise BuildError(f"building fastattn's extension in {directory} failed:\n{exc}") from exc
    return library
