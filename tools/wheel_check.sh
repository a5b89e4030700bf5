#!/usr/bin/env bash
# The wheel's acceptance on this machine (`make wheel-check`, issue 16): install the wheel that
# `make wheel` built into a fresh virtual environment, outside the checkout, then
#   1. say which library fastattn loads there (it must be the wheel's prebuilt one),
#   2. run a CPU op with no compiler on PATH and the JIT build disabled,
#   3. run the CPU tests from a copy of tests/ against the installed package, JIT disabled, so a
#      missing or unusable library fails instead of compiling.
# Inputs: PYTHON (makes the venv), BUILD_PY (the python that built the wheel: its torch version
# is installed), OUT (the wheel is in $OUT/dist; the venv and the test copy go beside it), and
# FASTATTN_BUILD_CUDA=1 to require CUDA kernels in the wheel.
set -euo pipefail
: "${PYTHON:?}" "${BUILD_PY:?}" "${OUT:?}"
torch_version=$("$BUILD_PY" -c 'import torch; print(torch.__version__.split("+")[0])')
unset PYTHONPATH  # the Makefile puts the checkout there; this run must not see it
export FASTATTN_NO_JIT=1
OUT=$(cd "$OUT" && pwd)
shopt -s nullglob
wheels=("$OUT"/dist/fastattn-*.whl)
[ "${#wheels[@]}" -eq 1 ] || { echo "expected one wheel in $OUT/dist, found ${#wheels[@]}" >&2; exit 1; }

venv="$OUT/venv"
rm -rf "$venv" "$OUT/suite"
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q "torch==$torch_version" pytest pytest-benchmark scipy numpy matplotlib
"$venv/bin/python" -m pip install -q "${wheels[0]}"

mkdir "$OUT/suite"
cp -r tests bench conftest.py pyproject.toml "$OUT/suite/"
cd "$OUT/suite"

info=$("$venv/bin/python" -m fastattn.build --info)
echo "$info"
case "$info" in
  "fastattn: prebuilt library $venv/"*) ;;
  *) echo "wheel check: the installed package did not load its prebuilt library" >&2; exit 1 ;;
esac
if [ "${FASTATTN_BUILD_CUDA:-}" = 1 ] && [[ "$info" != *"CUDA kernels for"* ]]; then
  echo "wheel check: FASTATTN_BUILD_CUDA=1 but the wheel has no CUDA kernels" >&2; exit 1
fi

# A user's machine without a compiler: PATH holds the venv only, so no c++, nvcc or ninja.
env -i PATH="$venv/bin" HOME="$OUT" FASTATTN_NO_JIT=1 "$venv/bin/python" -c '
import shutil, torch, fastattn
assert shutil.which("c++") is None and shutil.which("g++") is None, "a compiler is on PATH"
q = torch.randn(1, 2, 33, 16)
out = fastattn.local_attention(q, q, q, (4, 0))
from fastattn.reference import local_attention_reference
ref = local_attention_reference(q.double(), q.double(), q.double(), (4, 0))
assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()
print("wheel check: a CPU op ran from", fastattn.__file__, "with no compiler on PATH")
'

"$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not source_tree" tests
