"""Which compiled library fastattn loads: the one its wheel ships, else the JIT build.

A wheel (setup.py) puts the library and ``prebuilt.json`` (what it was built for) beside
this module. That library is loaded when it was built for the running torch: its C++ ABI is
torch's, so one wheel serves one torch version (docs/install.md says why the stable ABI does
not serve us yet). Otherwise the JIT build compiles csrc/ (fastattn/_build.py), unless
FASTATTN_NO_JIT=1 makes that an error. Before a CUDA op runs, ``check_device`` makes sure
the library holds kernels for that GPU, so a missing arch is a message, not a CUDA error.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from fastattn import _build
from fastattn._build import BuildError

PACKAGE = Path(__file__).resolve().parent
PREBUILT_INFO = "prebuilt.json"
NO_JIT = "FASTATTN_NO_JIT"
REBUILD_HINT = ("TORCH_CUDA_ARCH_LIST={arch} pip install --no-build-isolation . in a fastattn "
                "checkout (or, for the JIT build of a checkout, TORCH_CUDA_ARCH_LIST={arch} "
                "python -m fastattn.build --cuda)")


@dataclass(frozen=True)
class Library:
    path: Path
    prebuilt: bool
    arch_list: str  # TORCH_CUDA_ARCH_LIST of its CUDA kernels; "" when it has none
    no_cuda_reason: str | None = None  # why it has none

    @property
    def kind(self) -> str:
        return "prebuilt library" if self.prebuilt else "JIT build"

    def describe(self) -> str:
        if self.arch_list:
            kernels = "CUDA kernels for " + ", ".join(_build.parse_arch_list(self.arch_list))
        else:
            kernels = f"CPU kernels only: {self.no_cuda_reason or 'built without CUDA'}"
        return f"fastattn: {self.kind} {self.path} (torch {torch.__version__}; {kernels})"


def jit_disabled() -> bool:
    return os.environ.get(NO_JIT, "") not in ("", "0")


def prebuilt(package: Path | None = None) -> tuple[Library | None, str]:
    """The shipped library if it suits this torch, else (None, why not)."""
    package = package or PACKAGE
    info_path = package / PREBUILT_INFO
    if not info_path.is_file():
        return None, "no prebuilt library is installed"
    info = json.loads(info_path.read_text())
    if info["torch"] != torch.__version__:
        return None, (f"the prebuilt library was built for torch {info['torch']}, "
                      f"this is torch {torch.__version__}")
    path = package / info["library"]
    if not path.is_file():
        return None, f"the prebuilt library {path} named by {info_path} is missing"
    return Library(path, True, info["arch_list"], info.get("no_cuda_reason")), ""


def load(package: Path | None = None) -> Library:
    """Load the prebuilt library, else (unless FASTATTN_NO_JIT is set) the JIT build."""
    package = package or PACKAGE
    library, why_not = prebuilt(package)
    if library is not None:
        try:
            torch.ops.load_library(str(library.path))
        except OSError as exc:
            raise BuildError(f"loading fastattn's prebuilt library {library.path} failed: "
                             f"{exc}. Reinstall fastattn for torch {torch.__version__}.") from exc
        return library
    if jit_disabled():
        raise BuildError(
            f"{NO_JIT}=1 and {why_not}: install a fastattn wheel built for torch "
            f"{torch.__version__} (`pip install --no-build-isolation .` in a checkout), or "
            f"unset {NO_JIT} to compile the sources on first use"
        )
    shipped = (package / PREBUILT_INFO).is_file()
    if shipped:
        warnings.warn(f"{why_not}; compiling fastattn's sources instead (JIT)", stacklevel=3)
    try:
        path = _build.build()
    except BuildError as exc:
        if shipped:
            raise BuildError(f"{why_not}, and the JIT build cannot replace it: {exc}") from exc
        raise
    with_cuda, arches = _build.jit_config()
    return Library(path, False, arches, None if with_cuda else _build.why_no_cuda(True))


def runs_on(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``arch_list`` runs on a GPU of this compute capability."""
    for arch in _build.parse_arch_list(arch_list):
        target = arch.removesuffix("+PTX")
        built = tuple(int(x) for x in target.rstrip("a").split("."))
        # Arch-specific code ('a', and 9.0, which the build turns into sm_90a) runs on that arch
        # only; other cubins run on later minor versions; PTX is compiled for any later GPU.
        if target.endswith("a") or built == (9, 0):
            if capability == built:
                return True
        elif (capability[0] == built[0] and capability[1] >= built[1]) or (
                arch.endswith("+PTX") and capability >= built):
            return True
    return False


def check_device(library: Library, device: torch.device) -> None:
    """Raise a BuildError that says how to build for it when no kernel runs on ``device``."""
    if device.type != "cuda":
        return
    if not library.arch_list:
        raise BuildError(
            f"fastattn got a CUDA tensor ({device}), but its {library.kind} {library.path} has "
            f"no CUDA kernels ({library.no_cuda_reason or 'built without CUDA'}). Build them "
            "where nvcc is: " + REBUILD_HINT.format(arch=_capability_arch(device))
        )
    capability = torch.cuda.get_device_capability(device)
    if not runs_on(library.arch_list, capability):
        arch = _capability_arch(device)
        raise BuildError(
            f"fastattn's {library.kind} {library.path} has CUDA kernels for "
            f"{library.arch_list!r} (TORCH_CUDA_ARCH_LIST), none of which runs on {device} "
            f"({torch.cuda.get_device_name(device)}, compute capability {arch}, sm_"
            f"{arch.replace('.', '')}). Build for it: " + REBUILD_HINT.format(arch=arch)
        )


def _capability_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"
