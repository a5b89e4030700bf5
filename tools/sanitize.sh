#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck and synccheck over small forward and backward calls of the CUDA
# local attention kernels (tools/sanitize_cases.py). Exits non-zero on any report.
# Usage (on a machine with a GPU, from the repository root): tools/sanitize.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}"
# Without the caching allocator every tensor is its own allocation, so an out-of-bounds
# access cannot hide inside a cached block.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
PYTHON="${PYTHON:-python3}"
SANITIZER="${SANITIZER:-compute-sanitizer}"
"$PYTHON" -m fastattn.build >/dev/null  # compile outside the sanitizer
status=0
for tool in memcheck racecheck synccheck; do
  echo "== compute-sanitizer --tool $tool"
  if ! "$SANITIZER" --tool "$tool" --error-exitcode 1 --kernel-name kns=local_ \
      "$PYTHON" tools/sanitize_cases.py; then
    echo "compute-sanitizer $tool reported errors" >&2
    status=1
  fi
done
exit $status
