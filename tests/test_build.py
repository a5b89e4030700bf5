"""The JIT build: import never compiles, a missing toolchain or a broken source is reported."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# The JIT build of a checkout's csrc/ (an installed wheel has no sources to build).
pytestmark = pytest.mark.source_tree

ROOT = Path(__file__).resolve().parent.parent


def run_python(code, tmp_path, path_env):
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env.update(PATH=path_env, PYTHONPATH=str(ROOT), FASTATTN_BUILD_DIR=str(tmp_path / "ext"))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_import_and_helpful_error_without_compiler(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_python(
        """
        import torch, fastattn
        q = torch.randn(1, 1, 4, 8)
        try:
            fastattn.local_attention(q, q, q, (1, 1))
        except fastattn.BuildError as exc:
            print("BUILD-ERROR:", exc)
        """,
        tmp_path, str(empty))
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "BUILD-ERROR:" in message
    assert "C++ compiler" in message and "install g++ or set CXX" in message
    assert "python -m fastattn.build" in message


def test_build_command_reports_compiler_error(tmp_path):
    broken = tmp_path / "csrc"
    broken.mkdir()
    (broken / "ops.cpp").write_text("#include <torch/library.h>\nthis is not C++;\n")
    result = run_python(
        f"""
        import sys
        from fastattn import _build, build
        _build.CSRC = __import__("pathlib").Path({str(broken)!r})
        sys.exit(build.main([]))
        """,
        tmp_path, os.environ["PATH"])
    assert result.returncode == 1
    assert "fastattn build failed" in result.stderr
    assert "this is not C++" in result.stderr or "error" in result.stderr


def test_import_does_not_build(tmp_path):
    result = run_python("import fastattn, sys; sys.exit(0)", tmp_path, os.environ["PATH"])
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "ext").exists()
