"""Ahead-of-time build of fastattn's extension: ``pip install --no-build-isolation .``.

The library is compiled against the torch of this environment (its C++ ABI is that torch's:
one wheel per torch version), from the sources and with the compiler flags of the JIT build
(fastattn/_build.py), and ships in the wheel beside ``prebuilt.json``, which says what it
was built for (fastattn/_library.py reads it). It uses no Python API, so the wheel is abi3:
one file for every CPython >= 3.10.

CUDA kernels are built when this torch has CUDA and nvcc is found (CUDA_HOME, else
/usr/local/cuda), for TORCH_CUDA_ARCH_LIST (default: DEFAULT_ARCH_LIST); FASTATTN_BUILD_CUDA=0
builds CPU kernels only, FASTATTN_BUILD_CUDA=1 fails where CUDA kernels cannot be built.
MAX_JOBS sets the compile jobs. Editable installs (``pip install -e .``) compile nothing:
a source checkout uses the JIT build.
"""

import json
import os
import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
# sm_80 (A100, and every 8.x GPU) with PTX that the driver compiles for newer GPUs, and sm_90a,
# whose wgmma/TMA kernels run on H100/H200 only (they are dispatched on 9.0 devices only).
DEFAULT_ARCH_LIST = "8.0+PTX;9.0a"
NAME = "fastattn.fastattn_ops"
LIMITED_API = "cp310"

try:
    import torch
except ImportError:  # pip's isolated build environment: build_ext says what to do
    torch = None

if torch is None:
    from setuptools.command.build_ext import build_ext as _BuildExt
else:
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension as _BuildExt

    sys.path.insert(0, str(ROOT))  # this checkout's fastattn, not an installed one
    from fastattn import _build, _library


def cuda_choice() -> tuple[str, str | None]:
    """(TORCH_CUDA_ARCH_LIST, why there are no CUDA kernels): the list is "" without them."""
    mode = os.environ.get("FASTATTN_BUILD_CUDA", "")
    if mode not in ("", "0", "1"):
        sys.exit(f"FASTATTN_BUILD_CUDA={mode!r}: set 1 (CUDA kernels required), 0 (CPU "
                 "kernels only), or leave it unset (CUDA kernels where nvcc is found)")
    reason = "built with FASTATTN_BUILD_CUDA=0" if mode == "0" else _build.why_no_cuda(False)
    if mode == "1" and reason:
        sys.exit(f"FASTATTN_BUILD_CUDA=1, but {reason}")
    if reason:
        return "", reason
    arches = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    try:
        _build.parse_arch_list(arches)
    except _build.BuildError as exc:
        sys.exit(str(exc))
    return arches, None


def extension() -> Extension:
    if torch is None:
        return Extension(NAME, sources=[])
    arches, _ = cuda_choice()
    with_cuda = bool(arches)
    if with_cuda:
        # cpp_extension caches its guess of CUDA_HOME at import; make it agree with ours.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = _build.cuda_home()
    args = _build.compile_args(with_cuda, arches)
    args["cxx"].append("-DPy_LIMITED_API=0x030A0000")  # holds the abi3 tag to its word
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    return kind(NAME, sources=[str(p.relative_to(ROOT)) for p in _build.sources(with_cuda)],
                include_dirs=[str(_build.CSRC)], extra_compile_args=args, py_limited_api=True)


class build_ext(_BuildExt):
    def run(self):
        if getattr(self, "editable_mode", False) or self.inplace:
            print("fastattn: an editable install compiles nothing; the first op call builds "
                  "csrc/ (JIT), or run `python -m fastattn.build`")
            return
        if torch is None:
            sys.exit("fastattn's extension is compiled against the torch it will run with, and "
                     "this build environment has none. Install torch, then `pip install "
                     "--no-build-isolation .` (an isolated build would bring a torch of its own, "
                     "whose C++ ABI need not match yours).")
        super().run()
        library = Path(self.get_ext_fullpath(NAME))
        arches, reason = cuda_choice()
        info = {"library": library.name, "torch": torch.__version__,
                "cuda": torch.version.cuda if arches else None, "arch_list": arches,
                "no_cuda_reason": reason}
        (library.parent / _library.PREBUILT_INFO).write_text(json.dumps(info, indent=1) + "\n")


setup(ext_modules=[extension()], cmdclass={"build_ext": build_ext},
      options={"bdist_wheel": {"py_limited_api": LIMITED_API}})
