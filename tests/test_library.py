"""Which library is loaded (prebuilt or JIT), and the error for a GPU it has no kernel for.

No GPU is needed: CUDA inputs are fake tensors and the device's compute capability is mocked.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastattn
from fastattn import _build, _library, _ops
from fastattn._library import Library


@pytest.mark.parametrize("arches, expected", [
    ("8.0+PTX;9.0a", ["-gencode=arch=compute_80,code=sm_80",
                      "-gencode=arch=compute_80,code=compute_80",
                      "-DFASTATTN_SM90A", "-gencode=arch=compute_90a,code=sm_90a"]),
    # 9.0 is built as sm_90a (the wgmma kernels need it); naming both gives one target
    ("9.0 9.0a", ["-DFASTATTN_SM90A", "-gencode=arch=compute_90a,code=sm_90a"]),
    ("8.6", ["-gencode=arch=compute_86,code=sm_86"]),
], ids=["default", "hopper-twice", "ampere"])
def test_arch_list_to_nvcc_flags(arches, expected):
    assert _build.cuda_arch_flags(arches) == expected


def test_malformed_arch_list_names_the_variable_and_entry():
    with pytest.raises(_build.BuildError, match=r"TORCH_CUDA_ARCH_LIST='8\.0;sm_90'.*'sm_90'"):
        _build.cuda_arch_flags("8.0;sm_90")


@pytest.mark.parametrize("arches, capability, runs", [
    ("9.0a", (9, 0), True),
    ("9.0", (9, 0), True),
    ("9.0a", (10, 0), False),     # arch-specific code runs on its own arch only
    ("9.0a+PTX", (10, 0), False),  # and so does its PTX
    ("9.0", (8, 0), False),
    ("8.0", (8, 6), True),        # a cubin runs on later minor versions of its major
    ("8.0", (9, 0), False),
    ("8.6", (8, 0), False),
    ("8.0+PTX", (12, 0), True),   # PTX is compiled by the driver for any later GPU
    ("8.0+PTX", (7, 5), False),
    ("8.0+PTX;9.0a", (9, 0), True),
])
def test_which_builds_run_on_which_gpus(arches, capability, runs):
    assert _library.runs_on(arches, capability) is runs


def fake_cuda_qkv():
    with FakeTensorMode():
        return tuple(torch.empty(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
                     for _ in range(3))


CALLS = {
    "local": lambda q, k, v: fastattn.local_attention(q, k, v, (4, 0)),
    "clustered": lambda q, k, v: fastattn.clustered_attention(q, k, v, clusters=4),
}


@pytest.fixture
def gpu(monkeypatch):
    """Pretends cuda:0 is a GPU of the capability the test sets; fastattn's ops are loaded."""
    _ops.load()
    monkeypatch.setattr(_ops, "_checked_devices", set())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mock GPU")

    def use(library, capability):
        monkeypatch.setattr(_ops, "library", library)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return use


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_cuda_tensor_on_a_build_without_cuda_kernels(gpu, call):
    gpu(Library(Path("/site/fastattn/fastattn_ops.abi3.so"), True, "",
                "built with FASTATTN_BUILD_CUDA=0"), (9, 0))
    with pytest.raises(fastattn.BuildError) as info:
        call(*fake_cuda_qkv())
    message = str(info.value)
    assert "CUDA tensor (cuda:0)" in message and "has no CUDA kernels" in message
    assert "prebuilt library /site/fastattn/fastattn_ops.abi3.so" in message
    assert "FASTATTN_BUILD_CUDA=0" in message and "TORCH_CUDA_ARCH_LIST=9.0 pip install" in message


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_gpu_arch_without_a_kernel_names_it_and_how_to_build(gpu, call):
    gpu(Library(Path("/site/fastattn/fastattn_ops.abi3.so"), True, "9.0a"), (8, 6))
    with pytest.raises(fastattn.BuildError) as info:
        call(*fake_cuda_qkv())
    message = str(info.value)
    assert "CUDA kernels for '9.0a'" in message
    assert "Mock GPU, compute capability 8.6, sm_86" in message
    assert "TORCH_CUDA_ARCH_LIST=8.6 pip install --no-build-isolation ." in message


def test_a_gpu_the_ptx_covers_passes_the_check(gpu):
    gpu(Library(Path("/site/fastattn/fastattn_ops.abi3.so"), True, "8.0+PTX;9.0a"), (12, 0))
    q, k, v = fake_cuda_qkv()
    out = fastattn.local_attention(q, k, v, (4, 0))  # the op's fake kernel: no GPU runs
    assert out.shape == q.shape and out.device == q.device


def write_prebuilt(package: Path, library: Path, torch_version: str) -> None:
    package.mkdir()
    shutil.copy(library, package / library.name)
    (package / _library.PREBUILT_INFO).write_text(json.dumps(
        {"library": library.name, "torch": torch_version, "cuda": None, "arch_list": "",
         "no_cuda_reason": "this torch is CPU-only"}))


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)


def test_prebuilt_library_is_loaded_without_compiling(tmp_path):
    # The JIT build's library in a wheel's layout: with the JIT off it must load and run.
    package = tmp_path / "site"
    write_prebuilt(package, _ops.load().path, torch.__version__)
    result = run_python(f"""
        import torch, fastattn
        from pathlib import Path
        from fastattn import _library, _ops
        _library.PACKAGE = Path({str(package)!r})
        q = torch.randn(1, 2, 9, 8)
        out = fastattn.local_attention(q, q, q, (2, 0))
        assert out.shape == q.shape and torch.isfinite(out).all()
        print(_ops.library.describe())
        """, FASTATTN_NO_JIT="1", FASTATTN_BUILD_DIR=str(tmp_path / "no-jit-here"))
    assert result.returncode == 0, result.stderr
    assert f"fastattn: prebuilt library {package}" in result.stdout
    assert "CPU kernels only: this torch is CPU-only" in result.stdout
    assert not (tmp_path / "no-jit-here").exists()


def test_prebuilt_for_another_torch_is_refused(tmp_path, monkeypatch):
    package = tmp_path / "site"
    write_prebuilt(package, Path(__file__), "2.0.0")  # any file: it must not be loaded
    monkeypatch.setenv("FASTATTN_NO_JIT", "1")
    with pytest.raises(fastattn.BuildError) as info:
        _library.load(package)
    message = str(info.value)
    assert f"built for torch 2.0.0, this is torch {torch.__version__}" in message
    assert "FASTATTN_NO_JIT=1" in message and "pip install --no-build-isolation ." in message


@pytest.mark.source_tree  # the JIT build's cached library
def test_prebuilt_for_another_torch_falls_back_to_the_jit_build(tmp_path, monkeypatch):
    package = tmp_path / "site"
    write_prebuilt(package, Path(__file__), "2.0.0")
    monkeypatch.delenv("FASTATTN_NO_JIT", raising=False)
    jit = _ops.load().path
    monkeypatch.setattr(_build, "build", lambda: jit)  # the JIT build is cached: no compile
    with pytest.warns(UserWarning, match="built for torch 2.0.0.*compiling fastattn's sources"):
        library = _library.load(package)
    assert not library.prebuilt and library.path == jit


def test_no_jit_without_a_prebuilt_library_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTATTN_NO_JIT", "1")
    monkeypatch.setattr(_build, "build", lambda: pytest.fail("FASTATTN_NO_JIT=1 compiled"))
    with pytest.raises(fastattn.BuildError, match="FASTATTN_NO_JIT=1 and no prebuilt library is "
                                                  "installed: install a fastattn wheel"):
        _library.load(tmp_path)
