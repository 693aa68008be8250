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
  PYTEST_LIMIT=150
  BENCH_BUDGET=170
fi

# 1) the kernel tests on the device (each test compares against the torch reference on the CPU)
say "[$(elapsed)s] pytest ${PYTEST_ARGS[*]} (limit ${PYTEST_LIMIT}s)"
timeout -k 10 "$PYTEST_LIMIT" "$PY" -m pytest "${PYTEST_ARGS[@]}" -p no:cacheprovider > "$OUT/pytest.log" 2>&1
RC=$?
if [ $RC = 0 ]; then PT="PASS"; elif [ $RC = 124 ] || [ $RC = 137 ]; then PT="TIMEOUT (partial, see pytest.log)"; else PT="FAIL rc=$RC"; fi
say "[$(elapsed)s] pytest: $PT — $(tail -n 1 "$OUT/pytest.log")"

# 2) exactness at benchmark shapes, CUDA graphs, latency (own internal budget)
say "[$(elapsed)s] benchmark (budget ${BENCH_BUDGET}s)"
BENCH_ARGS=(--out "$OUT" --budget-s "$BENCH_BUDGET")
[ $DRY = 1 ] && BENCH_ARGS+=(--dry-run)
timeout -k 10 $((BENCH_BUDGET + 60)) "$PY" benchmark/bench_kernels.py "${BENCH_ARGS[@]}" > "$OUT/bench.log" 2>&1
RC=$?
if [ $RC = 0 ]; then BT="PASS (all exactness and graph checks)"; elif [ $RC = 124 ] || [ $RC = 137 ]; then BT="TIMEOUT (partial results kept)"; else BT="CHECK FAILURES or error rc=$RC (see bench.log / results.md)"; fi
say "[$(elapsed)s] benchmark: $BT"
if [ -f "$OUT/results.md" ]; then
  say "$(grep -m1 '^\*\*Goal' "$OUT/results.md" || echo 'goal: not measured')"
  say ""
  say "Tables: results.md (copy into docs/benchmarks.md with the card name); raw numbers: results.json"
fi
say "total $(elapsed)s"
echo "----- results.md -----"
cat "$OUT/results.md" 2>/dev/null | head -80
