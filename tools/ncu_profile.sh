#!/usr/bin/env bash
# Nsight Compute on one call of a Hopper kernel (bf16): the forward's or the backward's main
# kernel, or (fa4) FlashAttention 4's forward on the same case, to compare with ours (its
# package importable: docs/benchmarks.md). Clocks are left as they are (--clock-control none).
#   tools/ncu_profile.sh fwd|bwd|fa4 B H L D LEFT RIGHT    e.g. tools/ncu_profile.sh bwd 2 16 16384 128 512 512
# Default: speed of light, warp stall reasons, scheduler issue rate, printed. With NCU_REPORT=DIR:
# the full set (per-instruction stall samples included) saved as DIR/<fwd|bwd>.ncu-rep, with its
# details page and the per-SASS-instruction source page (CSV) printed beside it, so the profile
# can be read where ncu is not installed.
# Kernel switches in the environment (FASTATTN_WS_*) pick the variant, as at any launch.
set -euo pipefail
cd "$(dirname "$0")/.."
NCU="${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}"
which="$1"
shift
case "$which" in
  fwd) kernel=local_fwd_ws_kernel ;;
  bwd) kernel=local_bwd_ws_kernel ;;
  fa4) kernel="[Ff]lash|cutlass" ;;  # CuTe DSL kernels carry the class name
  *) echo "usage: $0 fwd|bwd|fa4 B H L D LEFT RIGHT" >&2; exit 2 ;;
esac
script=$(mktemp --suffix=.py)
trap 'rm -f "$script"' EXIT
cat >"$script" <<'PY'
import sys

import torch

import fastattn

which = sys.argv[1]
b, h, n, d, left, right = map(int, sys.argv[2:8])
if which == "fa4":
    from flash_attn.cute import flash_attn_func

    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flash_attn_func(q, k, v, window_size=(left, right))
    torch.cuda.synchronize()
    sys.exit(0)
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
out = fastattn.local_attention(q, k, v, (left, right))
if which == "bwd":
    out.backward(torch.randn_like(out))
torch.cuda.synchronize()
PY
run=("${PYTHON:-python3}" "$script" "$which" "$@")
if [ -z "${NCU_REPORT:-}" ]; then
  "$NCU" --clock-control none --kernel-name "regex:$kernel" --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis "${run[@]}"
  exit
fi
mkdir -p "$NCU_REPORT"
rep="$NCU_REPORT/$which"
"$NCU" --clock-control none --kernel-name "regex:$kernel" --launch-count 1 --set full \
  --import-source no -f -o "$rep" "${run[@]}"
"$NCU" -i "$rep.ncu-rep" --page details >"$rep-details.txt"
"$NCU" -i "$rep.ncu-rep" --page source --csv --print-source sass >"$rep-sass.csv"
