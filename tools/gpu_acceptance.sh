#!/usr/bin/env bash
# Everything a GPU acceptance run needs, from a bare GPU machine, in two steps that each fit a
# 10-minute call (the second reuses the first one's builds under build/ and .ft/):
#   tools/gpu_acceptance.sh tests   build fastattn and fast-transformers, every test (CUDA ones
#                                   included, the slow >2**31-element case too), compute-sanitizer
#   tools/gpu_acceptance.sh forward build fastattn, a one-call smoke run of the forward (bounded
#                                   time, so a hung kernel shows), the bf16 probe (every forward
#                                   kernel vs Flex), the forward's phase trace (tools/fwd_trace.py)
#                                   and the local attention CUDA tests
#   tools/gpu_acceptance.sh backward build fastattn, a one-call smoke run of the backward (bounded
#                                   time), the bf16 probe (forward+backward of both backward
#                                   kernels vs Flex), the backward's per-kernel times and the
#                                   local attention CUDA tests
# Probe options: VARIANTS="" leaves out the older kernels, PROBE_ARGS adds any (--no-flex,
# --switch LABEL=VAR, ...).
#   tools/gpu_acceptance.sh bench   two default benchmark runs compared by the gate (A/A), the x1.2
#                                   and truncated-file checks, history; table + chart of the run
#   tools/gpu_acceptance.sh wheel   the wheel (issue 16): build it for this machine's torch (default
#                                   arch list, timed), install it into a venv that sees this
#                                   python's torch but not the checkout, and run the CUDA tests
#                                   from a copy of tests/ against it with FASTATTN_NO_JIT=1
# Logs and results go to $OUT (default results/gpu); a short summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/gpu}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # the wheel step runs its tests from another folder
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
export FASTATTN_BUILD_DIR="${FASTATTN_BUILD_DIR:-$PWD/build/ext}"
export FASTATTN_COMMIT="${FASTATTN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
PYTHON="${PYTHON:-python3}"
summary=()
step() {  # step <name> <command...>: run, log to $OUT/<name>.log, remember the outcome
  local name="$1" rc=0 start=$SECONDS
  shift
  "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  summary+=("$(printf '%-14s rc=%-3s %4ss' "$name" "$rc" $((SECONDS - start)))")
  return $rc
}

gpu_info() {  # the card and its clocks at the start, beside the logs
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv >"$OUT/gpu.txt" 2>&1
}

case "${1:-}" in
  tests)
    gpu_info
    # The two builds are independent: run them side by side, then record their outcomes.
    ("$PYTHON" -m fastattn.build >"$OUT/build.log" 2>&1; echo $? >/tmp/fastattn-build.rc) &
    (make --no-print-directory fast-transformers PYTHON="$PYTHON" >"$OUT/ft-build.log" 2>&1
     echo $? >/tmp/ft-build.rc) &
    wait
    summary+=("build          rc=$(cat /tmp/fastattn-build.rc)" "ft-build       rc=$(cat /tmp/ft-build.rc)")
    step tests "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda -rfEs
    step sanitize tools/sanitize.sh
    tail -n 3 "$OUT/tests.log"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize.log"
    ;;
  forward|backward)
    gpu_info
    step build "$PYTHON" -m fastattn.build || { tail -n 30 "$OUT/build.log"; exit 1; }
    step smoke timeout 120 "$PYTHON" -c "import torch, fastattn
from fastattn.reference import local_attention_reference
for d in (64, 128):
    q, k, v = (torch.randn(2, 4, 3000, d, device='cuda', dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = fastattn.local_attention(q, k, v, (700, 300)); g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g); torch.cuda.synchronize()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = local_attention_reference(*leaves, (700, 300))
    refs = torch.autograd.grad(ref, leaves, g.double())
    errs = [((a.double() - r).norm() / r.norm()).item() for a, r in zip((out, *grads), (ref, *refs))]
    print('smoke D', d, 'rel err out dq dk dv', ' '.join(f'{e:.2e}' for e in errs))"
    cat "$OUT/smoke.log"
    # The measurements first, the tests last: a hung variant costs its step's time, not the call.
    variants=--variants
    [ "$1" = backward ] && variants=--bwd-variants
    variants="${VARIANTS-$variants}"  # VARIANTS="" leaves the older kernels out
    step probe timeout 220 "$PYTHON" tools/local_probe.py $variants --dtype bf16 --no-check ${PROBE_ARGS:-} \
      --samples 15 --json "$OUT/probe.json"
    if [ "$1" = backward ]; then
      step breakdown timeout 120 "$PYTHON" tools/bwd_breakdown.py
    else
      step trace timeout 90 "$PYTHON" tools/fwd_trace.py
    fi
    # The issue-14 kernels' tests first: until they pass on a GPU their gate stays.
    step tests timeout 420 "$PYTHON" -m pytest -q -p no:cacheprovider -m "cuda and not slow" -rfE \
      tests/test_local_features_cuda.py tests/test_local_cuda.py
    tail -n 12 "$OUT/tests.log"
    tail -n 40 "$OUT/probe.log"
    if [ "$1" = backward ]; then tail -n 12 "$OUT/breakdown.log"; fi
    ;;
  bench)
    step gate make --no-print-directory gate-gpu-check PYTHON="$PYTHON" RESULTS=results
    run=results/gate-gpu-check
    cp "$run/second/table.md" "$run/second/chart.png" "$OUT/" 2>/dev/null
    cp "$run/second.json" "$OUT/bench.json" 2>/dev/null
    cp "$run/aa.md" "$OUT/gate-aa.md" 2>/dev/null
    cp "$run/history/history.md" "$OUT/history.md" 2>/dev/null
    tail -n 12 "$OUT/gate.log"
    ;;
  wheel)
    gpu_info
    wheel="$OUT/wheel"
    rm -rf "$wheel" build/lib* build/temp*
    step wheel-build "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$wheel/dist" . ||
      { tail -n 30 "$OUT/wheel-build.log"; exit 1; }
    # This machine reaches no package index: the venv takes torch from $PYTHON's packages.
    "$PYTHON" -m venv --system-site-packages "$wheel/venv"
    "$wheel/venv/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"/dist/*.whl
    mkdir -p "$wheel/suite" && cp -r tests bench conftest.py pyproject.toml "$wheel/suite/"
    step wheel-tests env -u PYTHONPATH FASTATTN_NO_JIT=1 bash -c "cd '$wheel/suite' &&
      '$wheel/venv/bin/python' -m fastattn.build --info &&
      '$wheel/venv/bin/python' -m pytest -q -p no:cacheprovider -m 'cuda and not source_tree' -rfEs tests"
    head -n 1 "$OUT/wheel-tests.log"
    tail -n 3 "$OUT/wheel-tests.log"
    ;;
  *)
    echo "usage: $0 tests|forward|backward|bench|wheel" >&2
    exit 2
    ;;
esac
printf '%s\n' "${summary[@]}"
