#!/usr/bin/env bash
# The full loop on this CPU, with the real SGLang 0.5.23 server (TEST AND DEMO harness, not a
# deployment; see docs/cpu-demo.md):
#   1. serve the tiny DeepSeek-V3 (dummy weights) with --moe-lb lplb (the server default,
#      lplb/plan/local/tokens/gate: dispatch plans per batch-size level), EP=2, EPLB, recorder on;
#      show the plugin's ready line and the plans it installed at start-up (its log line)
#   2. warm-up traffic until SGLang's EPLB has rebalanced; show the plans our plugin solved for
#      the new placement and installed at the next forward-pass boundary (its log line)
#   3. reset the expert-distribution recorder and drive the server with sglang.bench_serving
#   4. dump the recorder (the bench's forward passes)
#   5. replay that dump through SGLang's dispatch modes and ours (the plan modes included):
#      sglang-moe-lb replay -> table
# The server is stopped by PID at the end, on error and on Ctrl-C.
#
# Usage: bash scripts/demo_server.sh [OUT_DIR]        (default OUT_DIR: out/demo)
# Knobs (environment): DEMO_PROMPTS (32), DEMO_INPUT_LEN (64), DEMO_OUTPUT_LEN (16),
#   DEMO_MOE_LB ("--moe-lb lplb": the server defaults; e.g. "--moe-lb lplb --moe-lb-placement decode",
#               "--moe-lb lplb --moe-lb-lplb-schedule per-batch", or "" for off)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
py="$root/.venv/bin/python"
out=$(mkdir -p "${1:-$root/out/demo}" && cd "${1:-$root/out/demo}" && pwd)
prompts=${DEMO_PROMPTS:-32}
input_len=${DEMO_INPUT_LEN:-64}
output_len=${DEMO_OUTPUT_LEN:-16}
# The server defaults: plans solved at start-up, at every EPLB rebalance and refreshed between
# rebalances (every 40 / 4 = 10 passes here); the gate keeps a model this small on the plans.
moe_lb=${DEMO_MOE_LB---moe-lb lplb}

t_start=$(date +%s)
say() { printf '[demo %4ss] %s\n' "$(($(date +%s) - t_start))" "$*"; }
die() { say "ERROR: $*" >&2; exit 1; }

[ -x "$py" ] || die "no $py: run 'bash scripts/setup_env.sh' first"
cd "$root"
rm -rf "$out/expert_distribution" "$out/server.json" "$out"/*.log "$out"/*.jsonl "$out"/replay.*

serve_pid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null; then
    say "stopping the server (wrapper pid $serve_pid; it stops every server process by PID) ..."
    kill -TERM "$serve_pid" 2>/dev/null || true
    for _ in $(seq 120); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$serve_pid" 2>/dev/null; then
      say "wrapper still running after 60 s: SIGKILL $serve_pid"
      kill -KILL "$serve_pid" 2>/dev/null || true
    fi
    wait "$serve_pid" 2>/dev/null || true
  fi
  if [ -f "$out/server.json" ]; then  # last resort: listed server processes still alive (PID + start time)
    "$py" -m sglang_moe_lb.testing.cpu_serving.serve --kill-leftovers "$out/server.json" | sed 's/^/[demo] /'
  fi
  if [ "$rc" -eq 0 ]; then say "done in $(($(date +%s) - t_start)) s; files in $out"; else say "exited with status $rc (logs in $out)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM

{ read -r ep_line; read -r port; read -r model_dir; } < <("$py" -c '
from sglang_moe_lb.testing.cpu_serving import EP2_EPLB_ARGS, prepare_model_dir
from sglang_moe_lb.testing.cpu_serving.server import free_port
print(" ".join(EP2_EPLB_ARGS)); print(free_port()); print(prepare_model_dir())')
read -r -a ep_args <<<"$ep_line"
read -r -a lb_args <<<"$moe_lb"
[ -n "$port" ] && [ -n "$model_dir" ] || die "could not import the CPU serving harness (sglang_moe_lb.testing.cpu_serving)"

# --------------------------------------------------------------------------------------- 1
# EPLB every 40 passes: the recorder's buffer (= the rebalance interval) then holds the whole
# bench below, which runs right after a rebalance (EPLB's own dump resets the buffer).
rebalance_every=40
say "1/5 starting SGLang on 127.0.0.1:$port: tiny DeepSeek-V3 (dummy weights, float32), EP=2, EPLB every $rebalance_every passes, recorder, ${moe_lb:-plugin off}"
say "    server log: $out/server.log"
"$py" -m sglang_moe_lb.testing.cpu_serving.serve --port "$port" --out-dir "$out" --ep 2 -- \
  "${ep_args[@]}" --eplb-rebalance-num-iterations "$rebalance_every" --dtype float32 "${lb_args[@]}" \
  >"$out/serve_wrapper.log" 2>&1 &
serve_pid=$!
t1=$(date +%s)
until [ -f "$out/server.json" ]; do
  if ! kill -0 "$serve_pid" 2>/dev/null; then
    wrapper_rc=0
    wait "$serve_pid" || wrapper_rc=$?
    serve_pid=""
    if [ "$wrapper_rc" -eq 130 ]; then say "interrupted during server start-up (server stopped)"; exit 130; fi
    tail -n 40 "$out/serve_wrapper.log" >&2
    die "the server did not start (see above and $out/server.log)"
  fi
  [ $(($(date +%s) - t1)) -lt 330 ] || die "the server was not healthy after 330 s"
  sleep 1
done
ready_s=$(($(date +%s) - t1))
say "    ready after ${ready_s} s; plugin: $(grep -m1 -o '\[moe-lb\] ready: .*' "$out/server.log" || echo 'off (no [moe-lb] ready line)')"
if grep -q '\[moe-lb\] start-up.*plans installed' "$out/server.log"; then
  say "    plans installed before the first forward pass (EP rank 0's line):"
  grep -m1 -o '\[moe-lb\] start-up.*plans installed.*' "$out/server.log" | sed 's/^/    /'
fi

post() {  # post PATH [JSON]: POST to the server (loopback), print the start of the response
  "$py" - "$port" "$1" "${2:-{\}}" <<'EOF'
import sys, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}", data=sys.argv[3].encode(),
                             method="POST", headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=300).read().decode()[:200])
EOF
}

# --------------------------------------------------------------------------------------- 2
say "2/5 warm-up traffic until SGLang's EPLB rebalances (every $rebalance_every forward passes)"
t2=$(date +%s)
plans_before=$(grep -c '\[moe-lb\] rebalance #[0-9]*: plans installed' "$out/server.log" || true)
eplb_before=$(grep -c 'TP0.*\[EPLBManager\] rebalance end' "$out/server.log" || true)
warm='{"text": ["def f(x):", "import os", "class A:", "for i in range(3):"], "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": true}}'
for i in $(seq 30); do
  post /generate "$warm" >/dev/null
  eplb_now=$(grep -c 'TP0.*\[EPLBManager\] rebalance end' "$out/server.log" || true)
  plans_now=$(grep -c '\[moe-lb\] rebalance #[0-9]*: plans installed' "$out/server.log" || true)
  if [ "$eplb_now" -gt "$eplb_before" ] && { ! grep -q '\[moe-lb\] ready: mode=lplb/plan' "$out/server.log" \
       || [ "$plans_now" -gt "$plans_before" ]; }; then break; fi
done
[ "$eplb_now" -gt "$eplb_before" ] || die "no EPLB rebalance after $i warm-up requests"
say "    SGLang rebalanced after $i warm-up requests ($(($(date +%s) - t2)) s): $(grep -o '\[EPLBManager\] rebalance end.*' "$out/server.log" | tail -n 1)"
if grep -q '\[moe-lb\] rebalance #[0-9]*: plans installed' "$out/server.log"; then
  say "    our plans for the new placement (solved from EPLB's window off the forward thread, installed at the"
  say "    next pass boundary on every rank; EP rank 0's line):"
  grep -o '\[moe-lb\] rebalance #[0-9]*: plans installed.*' "$out/server.log" | tail -n 1 | sed 's/^/    /'
  say "    plan refreshes from the recorder so far: $(grep -c '\[moe-lb\] refresh #[0-9]*: plans installed' "$out/server.log" || true)"
fi

# --------------------------------------------------------------------------------------- 3
say "3/5 recorder reset, then bench_serving: $prompts prompts x $input_len tokens in / $output_len out (random-ids, all at once)"
post /start_expert_distribution_record >/dev/null  # EPLB keeps recording; this only empties the buffer
t3=$(date +%s)
"$py" -m sglang.bench_serving --backend sglang --host 127.0.0.1 --port "$port" \
  --dataset-name random-ids --random-input-len "$input_len" --random-output-len "$output_len" \
  --random-range-ratio 1.0 --num-prompts "$prompts" --tokenizer "$model_dir" --seed 1 --disable-tqdm \
  --output-file "$out/bench.jsonl" >"$out/bench.log" 2>&1 || { tail -n 40 "$out/bench.log" >&2; die "bench_serving failed"; }
bench_s=$(($(date +%s) - t3))
grep -E '^(Successful requests|Benchmark duration|Total generated tokens:|Request throughput|Output token throughput|Mean TTFT|Mean TPOT)' "$out/bench.log" | sed 's/^/    /'
say "    bench_serving took ${bench_s} s (client start-up included)"

# --------------------------------------------------------------------------------------- 4
say "4/5 dumping the expert-distribution recorder (/dump_expert_distribution_record)"
post /dump_expert_distribution_record >/dev/null
dump=""
for _ in $(seq 60); do
  dump=$(ls -t "$out"/expert_distribution/expert_distribution_recorder_*.pt 2>/dev/null | head -n 1 || true)
  [ -n "$dump" ] && break
  sleep 0.5
done
[ -n "$dump" ] || die "no recorder dump appeared in $out/expert_distribution"
"$py" - "$dump" <<'EOF'
import sys, torch
c = torch.load(sys.argv[1], weights_only=False)["logical_count"]
print(f"    {sys.argv[1]}: logical_count {list(c.shape)} (steps, layers, experts), "
      f"{int((c.sum((1, 2)) > 0).sum())} steps with tokens, {int(c.sum())} routed (token, expert) pairs")
EOF

# --------------------------------------------------------------------------------------- 5
say "5/5 sglang-moe-lb replay on that dump (SGLang's dispatch modes and ours, same batches)"
t5=$(date +%s)
"$py" -m sglang_moe_lb replay "$dump" --ep-size 2 --redundant-experts 2 --top-k 4 \
  --no-progress --json "$out/replay.json" | tee "$out/replay.txt"
replay_s=$(($(date +%s) - t5))
say "    replay took ${replay_s} s; the plan rows (lplb/plan, and the server default that --moe-lb lplb runs):"
{ grep -E '^lplb/plan' "$out/replay.txt" || echo '(no plan rows)'; } | sed 's/^/    /'
if [ -n "$moe_lb" ]; then
  say "    plans installed during the whole run (EP rank 0): $(grep -c '\[moe-lb\] .*: plans installed' "$out/server.log" || true)" \
      "($(grep -c '\[moe-lb\] rebalance #[0-9]*: plans installed' "$out/server.log" || true) at rebalances," \
      "$(grep -c '\[moe-lb\] refresh #[0-9]*: plans installed' "$out/server.log" || true) refreshes)"
fi

say "wall times: server start ${ready_s} s, warm-up to the first rebalance $((t3 - t2)) s, bench_serving ${bench_s} s, replay ${replay_s} s"
