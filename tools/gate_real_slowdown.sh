#!/usr/bin/env bash
# The gate against a real slowdown, on a GPU: a run of the current kernels, a second one (A/A),
# and a third with the Hopper backward switched off (FASTATTN_DISABLE_WS_BWD=1: the mma.sync
# backward, 1.2-1.8x slower forward+backward, same forward). Compared with the gate's defaults,
# the A/A must exit 0 and the third run must exit 1 with exactly the forward+backward cases of
# the 16-bit D = 64 / 128 kernels flagged (the forward cases unchanged).
# Environment: PY (python3), OUT (results/gate-real-slowdown), SHAPES (default), SELECT (-k,
# default the bf16 local cases), IMPLS (default fastattn: the switch changes only ours).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
OUT="${OUT:-results/gate-real-slowdown}"
mkdir -p "$OUT"
bench() {  # bench <name> [env assignments...]: one run of the selected cases in a fresh process
  local name="$1"
  shift
  env "$@" "$PY" -m pytest bench --benchmark-only -q -p no:cacheprovider --shapes "${SHAPES:-default}" \
    -k "${SELECT:-local and bf16}" --impl "${IMPLS:-fastattn}" --benchmark-save-data \
    --benchmark-json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
}
bench first && bench second && bench slow FASTATTN_DISABLE_WS_BWD=1 || { tail -n 20 "$OUT"/*.log; exit 2; }
status=0
"$PY" -m fastattn.perf compare "$OUT/first.json" "$OUT/second.json" --markdown "$OUT/aa.md" >/dev/null
aa=$?
"$PY" -m fastattn.perf compare "$OUT/first.json" "$OUT/slow.json" --markdown "$OUT/slow.md" >/dev/null
slow=$?
echo "A/A: exit $aa (want 0); mma.sync backward: exit $slow (want 1)"
grep -E "^\| " "$OUT/slow.md" | cut -d'|' -f2-6
[ "$aa" -eq 0 ] && [ "$slow" -eq 1 ] || status=1
exit $status
