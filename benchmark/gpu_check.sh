#!/usr/bin/env bash
# GPU check of the hot-path kernels (v1.1), the plan's gather and the cost-model calibration: ONE device call.
#
# The device call (the `run` tool), from a session whose task has a GPU:
#   command:   bash benchmark/gpu_check.sh
#   carry:     [".whl"]          (optional wheels, e.g. highspy; the script runs without them)
#   timeout_s: 480               (the script ends itself by ~440 s; a rerun fits the 15-minute lease:
#                                 use `bash benchmark/gpu_check.sh --quick` (~4 min) for it)
# Then follow docs/gpu/README.md (copy latest.json, results.md, calibration.json; record the run in
# moe_lb_kernels/seam.py VERIFIED_ON).
#
# Here, without a GPU:  bash benchmark/gpu_check.sh --dry-run   (same steps, tiny shapes, CPU interpreter)
#
# Optional wheels (python 3.12 x86-64; the device has no registry):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl highspy
#
# Writes 8 files under $OUT (default ./out):
#   summary.txt       each step's verdict, the latency line, where the numbers are
#   env.txt           card, driver, versions, optional packages
#   bench.log         every section's progress log (tracebacks of failures)
#   results.md        tables: latency, plan gather overhead, small-m GEMM, launch floor, counting atomics,
#                     CUDA graphs per mode
#   results.json      every number and check; plan_gather_overhead_us {T: µs} (plan gather - static gather)
#   latest.json       the outside check's keys (device, date, kernels_version, graph_capture_all_modes,
#                     latency_us{goal, ep256_512, decode_128, decode_2048}); nulls on a dry run
#   calibration.json  the cost model fit (sglang_moe_lb.cost.CALIBRATION_FORMAT) and raw points; the
#                     small-m sweep (time vs active experts, 1-256 tokens per expert) under "small_m"
#   pytest.log        test/kernels on the device (time-limited, partial is fine)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
DRY=0
QUICK=0
for a in "$@"; do
  case "$a" in --dry-run) DRY=1;; --quick) QUICK=1;; *) echo "unknown argument: $a (use --dry-run or --quick)"; exit 2;; esac
done
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
T0=$(date +%s)
LIMIT=440
[ $QUICK = 1 ] && LIMIT=240
[ $DRY = 1 ] && LIMIT=900
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( LIMIT - $(date +%s) + T0 )); }
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

if [ $DRY = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="python:sgl-kernel/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HYPOTHESIS_PROFILE=dev
[ $DRY = 1 ] && export TRITON_INTERPRET=1
DRYARG=()
[ $DRY = 1 ] && DRYARG=(--dry-run)

say "hot-path kernels GPU check ($( [ $DRY = 1 ] && echo 'DRY RUN: tiny shapes, CPU interpreter' || echo full)$( [ $QUICK = 1 ] && echo ', quick'))  $(date -u +%FT%TZ)"
{
  echo "== nvidia-smi"; (nvidia-smi 2>&1 || echo "nvidia-smi not available") | head -15
  echo "== python"; "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("card", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30, 1))
import triton; print("triton", triton.__version__)
for m in ("highspy", "sglang", "hypothesis", "pytest", "xdist"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "present"))
    except Exception as e: print(m, "absent", type(e).__name__)
EOF
} > "$OUT/env.txt" 2>&1
say "env: $(grep -m1 '^card' "$OUT/env.txt" || echo 'no CUDA card') | $(grep -m1 '^triton' "$OUT/env.txt")"

PART="$(mktemp -d)"
: > "$OUT/bench.log"
# section:nominal budget (s), in order of importance; each is capped by the time left minus
# what pytest keeps (60 s). calib = the cost-model calibration sweep, smallm = its small-m sweep
# (calibrate_cost_model.py, after calib: it adds to calib's file); the rest are bench_kernels.py's.
if [ $QUICK = 1 ]; then SECS="warm:80 latency:50 graphs:50 gather:15"
else SECS="warm:90 latency:50 graphs:55 gather:15 calib:45 smallm:55 floor:10 count:10"; fi
for ITEM in $SECS; do
  SEC=${ITEM%%:*}; B=${ITEM##*:}
  [ $DRY = 1 ] && B=150
  L=$(( $(left) - 60 ))
  [ $QUICK = 1 ] && L=$(( $(left) - 20 ))
  [ $L -lt $B ] && B=$L
  if [ $B -lt 8 ]; then say "[$(elapsed)s] section $SEC skipped (time)"; continue; fi
  say "[$(elapsed)s] section $SEC (budget ${B}s)"
  echo "===== section $SEC" >> "$OUT/bench.log"
  if [ "$SEC" = calib ] || [ "$SEC" = smallm ]; then
    SM=""; PAT='^bf16'
    [ "$SEC" = smallm ] && SM="--small-m" && PAT='^small-m bf16'
    timeout -k 5 $((B + 15)) "$PY" benchmark/calibrate_cost_model.py $SM --out "$OUT/calibration.json" \
      --budget-s "$B" "${DRYARG[@]}" >> "$OUT/bench.log" 2>&1
    RC=$?
    say "[$(elapsed)s]   $SEC rc=$RC: $(grep -E "$PAT" "$OUT/bench.log" | tail -1 | cut -c1-170)"
    continue
  fi
  timeout -k 5 $((B + 15)) "$PY" benchmark/bench_kernels.py --section "$SEC" --out "$OUT" --partial-dir "$PART" \
    --budget-s "$B" "${DRYARG[@]}" >> "$OUT/bench.log" 2>&1
  RC=$?
  [ $RC = 0 ] || say "[$(elapsed)s]   section $SEC ended rc=$RC (124/137: killed at its limit; see bench.log)"
done
"$PY" benchmark/bench_kernels.py --report --out "$OUT" --partial-dir "$PART" "${DRYARG[@]}" >> "$OUT/bench.log" 2>&1
RC=$?
rm -rf "$PART"
if [ $RC = 0 ]; then BT="PASS (every measured variant and plan gather exact, every graph replay equal to the reference)"
else BT="CHECK FAILURES rc=$RC (results.md / bench.log)"; fi
say "[$(elapsed)s] benchmark: $BT"

if [ $QUICK = 0 ]; then
  if [ $DRY = 1 ]; then
    PT=(test/kernels/test_count.py test/kernels/test_calibration.py -q -x)
    PL=240
  else
    PT=(test/kernels -q)
    if "$PY" -c "import xdist" >/dev/null 2>&1; then
      PT+=(-n "$("$PY" -c "import os; print(max(1, min(12, (os.cpu_count() or 2) - 2)))")")
    fi
    PL=$(( $(left) - 8 )); [ $PL -gt 110 ] && PL=110
  fi
  if [ $PL -ge 20 ]; then
    say "[$(elapsed)s] pytest ${PT[*]} (limit ${PL}s)"
    timeout -k 5 "$PL" "$PY" -m pytest "${PT[@]}" -p no:cacheprovider > "$OUT/pytest.log" 2>&1
    RC=$?
    if [ $RC = 0 ]; then V="PASS"; elif [ $RC = 124 ] || [ $RC = 137 ]; then V="TIMEOUT (partial, see pytest.log)"; else V="FAIL rc=$RC"; fi
    say "[$(elapsed)s] pytest: $V — $(tail -n 1 "$OUT/pytest.log")"
  fi
fi

say "latest.json: $(cat "$OUT/latest.json" 2>/dev/null || echo missing)"
if [ $DRY = 0 ] && [ -f "$OUT/latest.json" ]; then
  cp "$OUT/latest.json" docs/gpu/latest.json   # on the device's copy; the session copies $OUT/latest.json back
fi
say "total $(elapsed)s"
echo "----- results.md (head) -----"
head -40 "$OUT/results.md" 2>/dev/null
