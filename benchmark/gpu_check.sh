#!/usr/bin/env bash
# GPU check of the moe_lb_kernels hot path: one command from the repo root, < 6 minutes.
#
#   bash benchmark/gpu_check.sh              # on a CUDA box (python3 with torch + triton)
#   bash benchmark/gpu_check.sh --dry-run    # anywhere: tiny shapes, CPU via TRITON_INTERPRET=1
#
# Needs no install: PYTHONPATH=python:sgl-kernel/python. sglang is optional (upstream comparison).
# Writes under $OUT (default ./out), six files, all self-explanatory:
#   summary.txt   what ran, pass/fail of each step, the goal line, where the numbers are
#   env.txt       card, driver, versions
#   pytest.log    test/kernels on the device (the CPU CI tests, run on CUDA)
#   bench.log     the benchmark's progress log (errors with tracebacks)
#   results.md    tables: exactness, CUDA graphs, latency per layer, Waterfill (paste into docs/benchmarks.md)
#   results.json  every number
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
export PYTHONPATH="python:sgl-kernel/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HYPOTHESIS_PROFILE=dev
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

say "moe_lb_kernels GPU check ($( [ $DRY = 1 ] && echo 'DRY RUN, tiny shapes' || echo 'full' )), $(date -u +%FT%TZ)"
{
  echo "== nvidia-smi"; (nvidia-smi 2>&1 || echo "nvidia-smi not available") | head -20
  echo "== python"; "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("card", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30, 1))
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton missing", e)
for m in ("sglang", "highspy", "hypothesis", "pytest", "xdist"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "present"))
    except Exception as e: print(m, "absent", type(e).__name__)
EOF
} > "$OUT/env.txt" 2>&1
say "env: $(grep -m1 '^card' "$OUT/env.txt" || echo 'no CUDA card') | $(grep -m1 '^triton' "$OUT/env.txt")"

if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1
  PYTEST_ARGS=(test/kernels/test_count.py test/kernels/test_plan.py -q -x -k "edge or single or 0-")
  PYTEST_LIMIT=240
  BENCH_BUDGET=240
else
  PYTEST_ARGS=(test/kernels -q)
  if "$PY" -c "import xdist" >/dev/null 2>&1; then
    NW=$("$PY" -c "import os; print(max(1, min(12, (os.cpu_count() or 2) - 2)))")
    PYTEST_ARGS+=(-n "$NW")
  fi
  PYTEST_LIMIT=110
fi

# 1) exactness at benchmark shapes, CUDA graphs, latency: one process per section, so that a
#    sticky CUDA error in one cannot take the others down; each has its own time budget.
PART="$(mktemp -d)"
: > "$OUT/bench.log"
for SEC in checks graph lplb waterfill; do
  case $SEC in checks) B=${BUDGET_CHECKS:-35};; graph) B=${BUDGET_GRAPH:-30};; lplb) B=${BUDGET_LPLB:-90};; waterfill) B=${BUDGET_WF:-25};; esac
  [ $DRY = 1 ] && B=120
  say "[$(elapsed)s] benchmark section $SEC (budget ${B}s)"
  ARGS=(--out "$OUT" --section "$SEC" --partial-dir "$PART" --budget-s "$B")
  [ $DRY = 1 ] && ARGS+=(--dry-run)
  echo "===== section $SEC" >> "$OUT/bench.log"
  timeout -k 10 $((B + 40)) "$PY" benchmark/bench_kernels.py "${ARGS[@]}" >> "$OUT/bench.log" 2>&1
  RC=$?
  [ $RC = 0 ] || say "[$(elapsed)s]   section $SEC ended rc=$RC (124/137 = killed at its time limit; see bench.log)"
done
RARGS=(--out "$OUT" --partial-dir "$PART" --report)
[ $DRY = 1 ] && RARGS+=(--dry-run)
"$PY" benchmark/bench_kernels.py "${RARGS[@]}" >> "$OUT/bench.log" 2>&1
RC=$?
rm -rf "$PART"
if [ $RC = 0 ]; then BT="PASS (all exactness and graph checks)"; else BT="CHECK FAILURES or missing sections rc=$RC (see results.md / bench.log)"; fi
say "[$(elapsed)s] benchmark: $BT"
# 2) the kernel tests on the device (each test compares against the torch reference on the CPU)
say "[$(elapsed)s] pytest ${PYTEST_ARGS[*]} (limit ${PYTEST_LIMIT}s)"
timeout -k 10 "$PYTEST_LIMIT" "$PY" -m pytest "${PYTEST_ARGS[@]}" -p no:cacheprovider > "$OUT/pytest.log" 2>&1
RC=$?
if [ $RC = 0 ]; then PT="PASS"; elif [ $RC = 124 ] || [ $RC = 137 ]; then PT="TIMEOUT (partial, see pytest.log)"; else PT="FAIL rc=$RC"; fi
say "[$(elapsed)s] pytest: $PT — $(tail -n 1 "$OUT/pytest.log")"

if [ -f "$OUT/results.md" ]; then
  say "$(grep -m1 '^\*\*Goal' "$OUT/results.md" || echo 'goal: not measured')"
  say "Tables: results.md (copy into docs/benchmarks.md with the card name); raw numbers: results.json"
fi
say "total $(elapsed)s"
echo "----- results.md -----"
cat "$OUT/results.md" 2>/dev/null | head -80
