"""Build fast-transformers 0.4.0 (a benchmark peer) from its sdist for the torch at hand.

Its setup.py passes ``-arch=compute_50``, which nvcc 13 rejects, so this script builds each
C++/CUDA extension file on its own with torch.utils.cpp_extension.load (in parallel, for the
arches of TORCH_CUDA_ARCH_LIST or the visible GPUs) and lays out an importable package:

    python tools/build_fast_transformers.py     # sdist from .ft/, output under .ft/torch<ver>/
    PYTHONPATH=.ft/torch<ver>/site python -c "import fast_transformers"

The benchmark suite puts that folder on sys.path by itself (bench/conftest.py). Fetch the sdist
first: ``pip download --no-deps --no-build-isolation pytorch-fast-transformers==0.4.0 -d .ft/``.
CUDA extensions are built where torch is a CUDA build and nvcc is found (``--no-cuda`` skips
them, ``--cuda`` insists on them).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FT_DIR = REPO / ".ft"


def default_out(root: Path = FT_DIR) -> Path:
    """Per torch version: extensions built for one torch do not load in another."""
    import torch

    return root / f"torch{torch.__version__.replace('+', '_')}"


def find_sdist(folder: Path) -> Path:
    found = sorted(folder.glob("pytorch-fast-transformers-*.tar.gz"))
    if not found:
        raise SystemExit(
            f"no pytorch-fast-transformers sdist in {folder}; fetch it with\n  pip download "
            f"--no-deps --no-build-isolation pytorch-fast-transformers==0.4.0 -d {folder}")
    return found[-1]


def unpack(sdist: Path, dest: Path) -> Path:
    """The sdist's ``fast_transformers`` package folder, unpacked under ``dest``."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/fast_transformers/" in m.name]
        tar.extractall(dest, members=members, filter="data")
    (package,) = {p.parent for p in dest.glob("*/fast_transformers/__init__.py")}
    return package


def _build_one(args) -> tuple[str, str, float]:
    """Compile one extension source; returns (module name, .so path, seconds)."""
    source, build_root, with_cuda = args
    from torch.utils import cpp_extension

    name = Path(source).stem
    folder = Path(build_root) / name
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cpp_extension.load(
        name=name,
        sources=[source],
        extra_cflags=["-O3", "-fopenmp", "-ffast-math"],
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3"] if with_cuda else None,
        build_directory=str(folder),
        with_cuda=with_cuda,
        is_python_module=True,
        verbose=False,
    )
    return name, str(folder / f"{name}.so"), time.perf_counter() - start


def _want_cuda(flag: bool | None) -> bool:
    import torch
    from torch.utils import cpp_extension

    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag and not available:
        raise SystemExit("--cuda needs a CUDA build of torch and nvcc (set CUDA_HOME)")
    return available if flag is None else flag


def build(out: Path, sdist: Path, jobs: int, cuda: bool | None) -> Path:
    import torch

    with_cuda = _want_cuda(cuda)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        caps = ({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
                if torch.cuda.is_available() else {(9, 0)})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in sorted(caps))
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    package = unpack(sdist, work / "src")
    sources = sorted(package.rglob("*_cpu.cpp"))
    if with_cuda:
        sources += sorted(package.rglob("*.cu"))
    print(f"building {len(sources)} fast-transformers extensions ({'CPU + CUDA' if with_cuda else 'CPU'}, "
          f"{jobs} at a time, torch {torch.__version__})", flush=True)
    site = out / "site"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(package, site / "fast_transformers",
                    ignore=shutil.ignore_patterns("*.cpp", "*.cu", "*.h", "__pycache__"))
    tasks = [(str(s), str(work / "build"), s.suffix == ".cu") for s in sources]
    # spawn: the parent may have initialised CUDA (to read the GPUs' arches), forked children must not inherit it
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for (name, so, seconds), source in zip(pool.map(_build_one, tasks), sources, strict=True):
            target = site / "fast_transformers" / source.parent.relative_to(package) / f"{name}.so"
            shutil.copy2(so, target)
            print(f"  {name}: {seconds:.0f} s", flush=True)
    _smoke_import(site, with_cuda)
    return site


def _smoke_import(site: Path, with_cuda: bool) -> None:
    check = ("import torch, fast_transformers.local_product as lp, "
             "fast_transformers.attention as att; "
             f"assert {not with_cuda} or lp.local_dot_product_cuda is not None, 'no CUDA kernels'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", check], check=True, env=env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="the sdist (default: the one in .ft/)")
    parser.add_argument("--out", type=Path, help="output folder (default .ft/torch<ver>)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    cuda = parser.add_mutually_exclusive_group()
    cuda.add_argument("--cuda", dest="cuda", action="store_true", default=None)
    cuda.add_argument("--no-cuda", dest="cuda", action="store_false")
    args = parser.parse_args(argv)
    out = args.out or default_out()
    site = build(out.resolve(), args.sdist or find_sdist(FT_DIR), max(1, args.jobs), args.cuda)
    print(f"fast_transformers is importable with PYTHONPATH={site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
