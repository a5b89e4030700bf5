#!/usr/bin/env bash
# Nsight Compute on one call of the Hopper backward's main kernel (bf16): speed of light, warp
# stall reasons, scheduler issue rate. Clocks are left as they are (--clock-control none).
#   tools/ncu_backward.sh B H L D LEFT RIGHT      e.g. tools/ncu_backward.sh 2 16 16384 128 512 512
# Kernel switches in the environment (FASTATTN_WS_BWD_*) pick the schedule, as at any launch.
set -euo pipefail
cd "$(dirname "$0")/.."
NCU="${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}"
"$NCU" --clock-control none --kernel-name regex:local_bwd_ws_kernel --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  "${PYTHON:-python3}" - "$@" <<'PY'
import sys

import torch

import fastattn

b, h, n, d, left, right = map(int, sys.argv[1:7])
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
out = fastattn.local_attention(q, k, v, (left, right))
out.backward(torch.randn_like(out))
torch.cuda.synchronize()
PY
