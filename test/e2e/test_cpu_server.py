"""A real SGLang 0.5.23 server on CPU, one per ``--moe-lb`` mode, EP=2 with EPLB.

Each mode's server is started once (module-scoped, parametrized fixture) with the tiny
DeepSeek-V3, dummy weights that do not depend on expert placement (see
``sglang_moe_lb.testing.cpu_serving.dummy_weights``) and ``--dtype float32``, so greedy
outputs are decided by real margins, not by bf16 rounding. Then, per mode: greedy generation
(repeatable, and equal to ``off``'s: a balancing mode only picks which copy of the same expert
computes a token), ``sglang.bench_serving`` (every request completes), the expert distribution
recorder (dump is ``logical_count[steps, layers, experts]``), SGLang's EPLB rebalance log line,
and from the harness's slot log (what each rank really executed) that every (token, expert)
entry of every MoE call ran on exactly one rank.

The plugin's servers run ``--moe-lb lplb`` with no sub-option: the server default
(``mode.SERVER_DEFAULTS``, ``lplb/plan/local/tokens/gate``), dispatch plans per batch-size
level. Checked: the plugin's ready line on both ranks; its plan lines (solved at start-up, at
every EPLB rebalance and at every refresh, none failed or stale); and ``sglang-moe-lb replay``
on the live recorder dump, with the plan modes in its default mode set. ``lplb-decode`` is the
same default with ``--moe-lb-placement decode`` (the decode-aware post-step on EPLB's
placement).

Waterfill modes are not served here: the plugin refuses them without ``--moe-a2a-backend
deepep`` (``test_waterfill_refused_without_deepep``), and DeepEP needs GPUs. Waterfill is proved
one layer down instead, through SGLang's real ``DeepseekV2MoE`` on 2 gloo ranks
(``test_waterfill_gloo.py``).

To try another configuration without editing: ``SGLANG_MOE_LB_E2E_MODES=off,lplb-per-batch``
(names from ``MODE_FLAGS``; any other name is passed as ``--moe-lb NAME``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sglang_moe_lb import BalanceMode
from sglang_moe_lb.plan import DEFAULT_HASH_SLOTS, DEFAULT_LEVELS
from sglang_moe_lb.plugin.options import mode_flags
from sglang_moe_lb.testing.cpu_serving.ep_moe import SLOT_LOG_ENV, moe_forward_native_ep
from sglang_moe_lb.testing.cpu_serving.model_dir import prepare_model_dir
from sglang_moe_lb.testing.cpu_serving.server import (
    CPU_SHIMS_PLUGIN,
    EP2_EPLB_ARGS,
    EPLB_REBALANCE_RE,
    STUBS_DIR,
    ServerStartError,
    launch_cpu_server,
    omp_bind,
)

# What --moe-lb lplb runs with no sub-option (mode.SERVER_DEFAULTS): the mode under test.
SERVER_DEFAULT = BalanceMode.from_flag("lplb")
MODE_FLAGS = {
    "off": [],
    # the server default, as a user starts it: no sub-option
    "lplb": ["--moe-lb", "lplb"],
    # the default with the decode-aware post-step on EPLB's placement
    "lplb-decode": ["--moe-lb", "lplb", "--moe-lb-placement", "decode"],
    # opt-in (SGLANG_MOE_LB_E2E_MODES): the exact split of every batch, ungated; the slot log
    # checks that every MoE call reached the optimal max rank load
    "lplb-per-batch": mode_flags(BalanceMode(lplb="per-batch", lplb_sync="global", objective="tokens")),
    # the fork form: the same default, served by a copy of the installed SGLang patched with
    # `sglang-moe-lb export-patch`, with the plugin left out (SGLANG_PLUGINS)
    "lplb-native": ["--moe-lb", "lplb"],
}
NATIVE_MODES = {"lplb-native": "lplb"}  # native mode -> the plugin mode it must match
# Modes whose ready line names another mode than SERVER_DEFAULT (all sub-options spelled out).
EXPECTED_MODE = {"lplb-per-batch": BalanceMode(lplb="per-batch", lplb_sync="global", objective="tokens")}
# "off" runs first: it is the reference of test_outputs_equal_off (a module-scoped
# parametrized fixture runs in param order).
DEFAULT_MODES = "off,lplb,lplb-decode,lplb-native"
MODES = [m.strip() for m in os.environ.get("SGLANG_MOE_LB_E2E_MODES", DEFAULT_MODES).split(",") if m.strip()]
MODES.sort(key=lambda m: m != "off")

# float32: LB modes move (token, expert) pairs between ranks, which changes float summation
# order. In bf16 even repeating a request (prefix-cache hit, EPLB moved experts) flipped greedy
# tokens of this random model; in float32 the smallest top-2 log-prob gap seen (2.6e-4) is
# far above the rounding differences.
SERVER_ARGS = [*EP2_EPLB_ARGS, "--dtype", "float32"]
START_TIMEOUT_S = 240
REBALANCE_EVERY = int(EP2_EPLB_ARGS[EP2_EPLB_ARGS.index("--eplb-rebalance-num-iterations") + 1])

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Stack:\n    def __init__(self):",
    "for i in range(10):\n    print(",
    "x = [1, 2, 3]\ny = ",
    "while True:\n    line = f.readline()",
    "# Copyright (c) Python Software Foundation",
    "return None",
]
MAX_NEW_TOKENS = 16
BENCH_PROMPTS, BENCH_INPUT_LEN, BENCH_OUTPUT_LEN = 32, 32, 8

CONFIG = json.loads((prepare_model_dir() / "config.json").read_text())
MOE_LAYERS = CONFIG["num_hidden_layers"] - CONFIG["first_k_dense_replace"]
# replay runs once per session (~10-15 s), on this mode's live dump.
REPLAY_MODE = "lplb" if "lplb" in MODES else MODES[-1]

# The plugin's lines (python/sglang_moe_lb/plugin/forward_hooks.py, runtime.py and rebalance.py).
_RANK = r"\[[^\]]*?(?P<rank>TP\d+)[^\]]*\] "
READY_RE = re.compile(
    _RANK + r"\[moe-lb\] ready: mode=(?P<mode>\S+)[^,]*, (?P<layers>\d+) layers, (?P<ranks>\d+) ranks x "
    r"(?P<slots>\d+) slots, per-batch path (?P<path>\S+),(?P<rest>.*)$", re.M)
PLAN_SUMMARY_RE = re.compile(
    r"plans at (?P<levels>\d+) levels x (?P<hash>\d+) hash slots \(placement (?P<placement>\w+)(?: \(auto\))?, "
    r"refresh every (?P<refresh>\d+) passes from the last (?P<window>\d+)\)")
PLANS_RE = re.compile(
    _RANK + r"\[moe-lb\] (?P<label>start-up(?: \([^)]*\))?|rebalance #\d+|refresh #\d+): plans installed for "
    r"(?P<layers>\d+) layers x (?P<levels>\d+) levels \((?P<lo>\d+)\.\.(?P<hi>\d+) tokens/rank\), "
    r"solved in (?P<solve>[0-9.]+)s \(waited (?P<waited>[0-9.]+)s, install (?P<install>[0-9.]+)s\); "
    r"(?P<failed>\d+) failed, (?P<stale>\d+) stale$", re.M)
# A refresh solve still running when EPLB rebalances is superseded by the rebalance's solve
# (rebalance.py: its rows are the old placement). Expected; any other drop is not.
SUPERSEDED_RE = re.compile(r"\[moe-lb\] refresh #\d+: plan solve dropped after [0-9.]+s \(a new rebalance\)")
# Every other plugin line a healthy server may log.
INFO_RE = re.compile(r"\[moe-lb\] (mode=|ready: |no CUDA device; the cost model uses )")


def expected_mode(mode: str) -> BalanceMode:
    """The mode a server's ready line must name (``--moe-lb NAME`` alone: that flag's defaults)."""
    if mode in EXPECTED_MODE:
        return EXPECTED_MODE[mode]
    return SERVER_DEFAULT if mode in MODE_FLAGS else BalanceMode.from_flag(mode)


def plan_server(mode: str) -> bool:
    return mode != "off" and expected_mode(mode).plan


def mode_args(mode: str) -> list[str]:
    return list(SERVER_ARGS) + MODE_FLAGS.get(mode, ["--moe-lb", mode])


def slug(mode: str) -> str:
    return mode.replace("+", "_")


def export_and_apply(dest: Path) -> Path:
    """A copy of the installed SGLang with the exported series applied (``git apply``, each
    patch checked first); returns the folder to put first on ``PYTHONPATH``."""
    import sglang

    src = Path(sglang.__file__).resolve().parent
    root, series = dest / "site", dest / "series"
    if (root / "sglang" / "srt" / "moe_lb.py").exists():
        return root
    shutil.copytree(src, root / "sglang", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "sglang_moe_lb", "export-patch", "--sglang-src", str(src),
                          "--out", str(series)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    patches = sorted(series.glob("*.patch"))
    assert [p.name[:4] for p in patches] == [f"{i:04d}" for i in range(1, len(patches) + 1)]
    for patch in patches:
        for args in (["--check"], []):
            res = subprocess.run(["git", "apply", *args, str(patch)], cwd=root / "sglang", capture_output=True,
                                 text=True, timeout=120)
            assert res.returncode == 0, f"git apply {' '.join(args)} {patch.name}: {res.stderr}"
    return root


def native_env(root: Path) -> dict:
    """Serve from the patched copy, with our plugin left out (only the CPU test shims load)."""
    path = [str(STUBS_DIR), str(root), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {"PYTHONPATH": os.pathsep.join(path), "SGLANG_PLUGINS": CPU_SHIMS_PLUGIN}


@pytest.fixture(scope="module", params=MODES)
def server(request, e2e_log_dir, e2e_timings, tmp_path_factory):
    mode = request.param
    log = e2e_log_dir / f"server_{slug(mode)}.log"
    slot_dir = e2e_log_dir / f"slots_{slug(mode)}"
    slot_dir.mkdir(parents=True, exist_ok=True)
    for old in slot_dir.glob("slots_ep*.jsonl"):
        old.unlink()
    env = {SLOT_LOG_ENV: str(slot_dir)}
    if mode in NATIVE_MODES:
        t0 = time.monotonic()
        env.update(native_env(export_and_apply(tmp_path_factory.mktemp("native"))))
        e2e_timings[f"export + apply [{mode}]"] = time.monotonic() - t0
    t0 = time.monotonic()
    # A failed start raises ServerStartError with the log's tail; pytest keeps that error for
    # every test of this mode instead of starting the server again.
    srv = launch_cpu_server(
        mode_args(mode), ep=2, log_path=log, recorder_dir=e2e_log_dir / f"recorder_{slug(mode)}",
        extra_env=env, timeout=START_TIMEOUT_S,
    )  # fmt: skip
    e2e_timings[f"server start [{mode}]"] = time.monotonic() - t0
    srv.mode = mode
    srv.slot_dir = slot_dir
    try:
        yield srv
    finally:
        t1 = time.monotonic()
        srv.stop()
        e2e_timings[f"server stop [{mode}]"] = time.monotonic() - t1
        left = srv.alive_pids()
        assert not left, f"server processes left after stop: {left}"
        assert not srv.leaked_shm(), f"/dev/shm segments left after stop: {srv.leaked_shm()}"


def _ids(outputs):
    return [o["output_ids"] for o in outputs]


@pytest.mark.e2e
def test_greedy_generate(server, greedy_results):
    first = server.generate(PROMPTS, greedy=True, max_new_tokens=MAX_NEW_TOKENS, return_logprob=True, top_logprobs_num=2)
    assert len(first) == len(PROMPTS)
    for out in first:
        assert len(out["output_ids"]) == MAX_NEW_TOKENS
        assert all(0 <= t < CONFIG["vocab_size"] for t in out["output_ids"])
        assert isinstance(out["text"], str)
        assert out["meta_info"]["finish_reason"]["type"] == "length"
    # The placement-invariant dummy weights give real logit margins (not a uniform distribution).
    margins = [top[0][0] - top[1][0] for out in first for top in out["meta_info"]["output_top_logprobs"]]
    assert max(margins) > 0.1, "logits look uniform: are the placement-invariant dummy weights installed?"
    # Same request again (prefix cache hit, and EPLB has moved experts in between): same tokens.
    again = server.generate(PROMPTS, greedy=True, max_new_tokens=MAX_NEW_TOKENS)
    assert _ids(again) == _ids(first), "greedy generation is not repeatable within one server"
    greedy_results[server.mode] = {"ids": _ids(first), "min_margin": min(margins)}


@pytest.mark.e2e
def test_bench_serving_completes(server, e2e_log_dir):
    result = server.bench_serving(
        num_prompts=BENCH_PROMPTS, input_len=BENCH_INPUT_LEN, output_len=BENCH_OUTPUT_LEN,
        output_file=e2e_log_dir / f"bench_{slug(server.mode)}.jsonl",
    )  # fmt: skip
    print(f"\n[{server.mode}] bench_serving: {result['completed']}/{BENCH_PROMPTS} completed, "
          f"{result['output_throughput']:.1f} output tok/s, duration {result['duration']:.1f} s")
    assert result["completed"] == BENCH_PROMPTS, result["_log"][-3000:]
    assert result["total_output_tokens"] == BENCH_PROMPTS * BENCH_OUTPUT_LEN
    assert result["output_throughput"] > 0


@pytest.mark.e2e
def test_expert_distribution_recorder_dump(server, live_dumps):
    before = set(server.recorder_dumps())
    server.start_expert_distribution_record()
    try:
        server.generate(PROMPTS, greedy=True, max_new_tokens=7)
        server.stop_expert_distribution_record()
        server.dump_expert_distribution_record()
    finally:
        server.start_expert_distribution_record()  # EPLB reads the same recorder: leave it recording
    deadline = time.monotonic() + 30
    while not (new := sorted(set(server.recorder_dumps()) - before)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(new) == 1, f"expected one new dump in {server.recorder_dir}, got {new}"
    dump = torch.load(new[0], weights_only=False)
    count = dump["logical_count"]
    assert count.dim() == 3, count.shape
    steps, layers, experts = count.shape
    assert steps >= 1
    assert (layers, experts) == (CONFIG["num_hidden_layers"], CONFIG["n_routed_experts"])
    assert int(count.min()) >= 0
    # Dense layers (before first_k_dense_replace) route nothing.
    assert int(count[:, : CONFIG["first_k_dense_replace"]].sum()) == 0
    assert int(count.sum()) > 0
    live_dumps[server.mode] = new[0]


@pytest.mark.e2e
def test_replay_on_live_dump(server, live_dumps, e2e_log_dir):
    """``sglang-moe-lb replay`` (a subprocess, as a user runs it) on the dump this server wrote:
    its default mode set has SGLang's modes, the plan modes (``lplb/plan`` and the server
    default) and the per-batch and joint modes, every one scored on every step."""
    if server.mode != REPLAY_MODE:
        pytest.skip(f"replay runs once, on the {REPLAY_MODE!r} server's dump")
    dump = live_dumps.get(server.mode)
    if dump is None:
        pytest.skip("needs test_expert_distribution_recorder_dump of this mode")
    out = e2e_log_dir / f"replay_{slug(server.mode)}.json"
    cmd = [
        sys.executable, "-m", "sglang_moe_lb", "replay", str(dump),
        "--ep-size", "2", "--redundant-experts", "2", "--top-k", str(CONFIG["num_experts_per_tok"]),
        "--upstream-waterfill-steps", "1", "--workers", "1", "--no-progress", "--json", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"replay failed (rc={res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    table = res.stdout
    (e2e_log_dir / f"replay_{slug(server.mode)}.txt").write_text(table)
    assert "SGLang recorder dump (stat)" in table and str(dump) in table, table[-2000:]
    plan, default = BalanceMode(lplb="plan").name, SERVER_DEFAULT.name
    for mode in ("static", "dynamic", plan, default, "lplb/per-batch/global/tokens", "waterfill/conservative/global",
                 "waterfill+lplb/per-batch/global/tokens/all_rank", "bound (joint LP)"):
        assert re.search(rf"^{re.escape(mode)}\s", table, re.M), f"no row {mode!r} in:\n{table}"
    assert f"--moe-lb lplb runs {default}" in table, table[-2000:]

    result = json.loads(out.read_text())
    cfg = result["config"]
    recorded = torch.load(dump, weights_only=False)["logical_count"]
    steps_with_tokens = int((recorded.sum((1, 2)) > 0).sum())
    assert cfg["trace"]["kind"] == "stat" and cfg["trace"]["files"] == [str(dump)]
    assert (cfg["ep_size"], cfg["num_logical_experts"], cfg["num_physical_experts"], cfg["top_k"], cfg["num_layers"]) == (
        2, CONFIG["n_routed_experts"], CONFIG["n_routed_experts"] + 2, CONFIG["num_experts_per_tok"], CONFIG["num_hidden_layers"],
    )
    assert cfg["num_steps"] == steps_with_tokens >= 1
    assert result["server_default"]["lplb"] == default
    modes = result["modes"]
    assert modes["static"]["moe_time_ratio_vs_static"] == pytest.approx(1.0)
    for name, m in modes.items():
        if name in result["skipped"]:
            continue
        assert 0.0 < m["balancedness_mean"] <= 1.0 + 1e-9, (name, m)
        assert m["balancedness_mean"] <= result["bound"]["balancedness_mean"] + 1e-9, (name, m)
        if m["family"] == "ours" and "upstream" not in name:
            assert m["steps_scored"] == steps_with_tokens, (name, m)
    assert plan not in result["skipped"] and default not in result["skipped"], result["skipped"]
    # Where the gate never opened, the gated default ran its plan on every step: the same loads.
    if modes[default]["gate_open_share"] == 0:
        for key in ("balancedness_mean", "moe_time_ratio_vs_static"):
            assert modes[default][key] == pytest.approx(modes[plan][key]), (key, modes[default], modes[plan])
    # Per-batch LPLB is never worse than SGLang's static dispatch on a batch (it is optimal
    # among integral dispatches); the joint mode reaches the joint LP bound up to integrality.
    lplb, joint = modes["lplb/per-batch/global/tokens"], modes["waterfill+lplb/per-batch/global/tokens/all_rank"]
    assert lplb["moe_time_ratio_vs_static"] <= 1.0 + 1e-9
    assert joint["moe_time_ratio_vs_static"] <= lplb["moe_time_ratio_vs_static"] + 1e-9


@pytest.mark.e2e
def test_eplb_rebalanced(server):
    # bench_serving and generation above ran many more than --eplb-rebalance-num-iterations passes.
    found = server.wait_for_log(EPLB_REBALANCE_RE, timeout=5)
    if not found:
        server.generate(PROMPTS[:2], greedy=True, max_new_tokens=24)
        found = server.wait_for_log(EPLB_REBALANCE_RE, timeout=30)
    assert found, f"no '[EPLBManager] rebalance end' line in {server.log_path}"
    ranks = {ln.split("]")[0] for ln in server.log_text().splitlines() if EPLB_REBALANCE_RE.search(ln)}
    assert any("TP0" in r for r in ranks) and any("TP1" in r for r in ranks), ranks


@pytest.mark.e2e
def test_moe_lb_ready_on_both_ranks(server):
    """The plugin activated in both scheduler processes, in the mode asked for (``--moe-lb lplb``
    alone: the server default, plans), and logged nothing but its expected lines."""
    text = server.log_text()
    if server.mode == "off":
        assert "[moe-lb]" not in text
        pytest.skip("plugin off")
    ready = {m["rank"]: m for m in READY_RE.finditer(text)}
    assert set(ready) == {"TP0", "TP1"}, f"no '[moe-lb] ready' line on both ranks in {server.log_path}"
    want = expected_mode(server.mode)
    for m in ready.values():
        assert m["mode"] == want.name, m.group(0)
        assert (int(m["layers"]), int(m["ranks"]), int(m["slots"])) == (
            MOE_LAYERS, 2, (CONFIG["n_routed_experts"] + 2) // 2), m.group(0)
        plans = PLAN_SUMMARY_RE.search(m["rest"])
        assert (plans is not None) == want.plan, m.group(0)
        if plans:
            placement = "decode" if "--moe-lb-placement" in mode_args(server.mode) else "eplb"
            # Refresh default: a quarter of --eplb-rebalance-num-iterations, from as many passes.
            assert plans.groupdict() == {"levels": str(len(DEFAULT_LEVELS)), "hash": str(DEFAULT_HASH_SLOTS),
                                         "placement": placement, "refresh": str(REBALANCE_EVERY // 4),
                                         "window": str(REBALANCE_EVERY // 4)}, m.group(0)
    # The server log has no level column: every plugin line must be one a healthy run logs.
    problems = [
        ln for ln in text.splitlines()
        if ("[moe-lb]" in ln and not (INFO_RE.search(ln) or PLANS_RE.search(ln) or SUPERSEDED_RE.search(ln)))
        or "Traceback" in ln
    ]
    assert not problems, "\n".join(problems[:20])


@pytest.mark.e2e
def test_plans_installed_at_startup_and_rebalance(server, e2e_timings):
    """Plans were solved and installed before the first forward pass (start-up), after every
    EPLB rebalance and at the refresh cadence: every MoE layer, every batch-size level, no
    layer failed or stale (the plugin's ``plans installed`` lines). rebalance.py logs them on EP
    rank 0; a rank that logs them too must log the same ones (that both ranks served the same
    plans at every pass is test_every_entry_ran_on_exactly_one_rank's)."""
    if not plan_server(server.mode):
        pytest.skip("plans are the plan schedule's")
    rebalance_re = re.compile(r"\[moe-lb\] rebalance #\d+: plans installed")
    if not rebalance_re.search(server.log_text()):  # installed at the pass after a rebalance
        server.generate(PROMPTS[:2], greedy=True, max_new_tokens=3 * REBALANCE_EVERY)
        server.wait_for_log(rebalance_re, timeout=30)
    text = server.log_text()
    by_rank: dict[str, list] = {}
    for m in PLANS_RE.finditer(text):
        by_rank.setdefault(m["rank"], []).append(m)
    lines = by_rank.pop("TP0", [])
    assert lines, f"no '[TP0 ...] [moe-lb] ...: plans installed' line in {server.log_path}"
    for rank, other in by_rank.items():  # the last install may not be logged yet on this rank
        assert [m["label"] for m in other] == [m["label"] for m in lines][: len(other)] and len(other) >= len(lines) - 1, rank
    for m in [*lines, *(m for other in by_rank.values() for m in other)]:
        assert (int(m["layers"]), int(m["levels"]), int(m["lo"]), int(m["hi"])) == (
            MOE_LAYERS, len(DEFAULT_LEVELS), DEFAULT_LEVELS[0], DEFAULT_LEVELS[-1]), m.group(0)
        assert (int(m["failed"]), int(m["stale"])) == (0, 0), m.group(0)
    labels = [m["label"] for m in lines]
    # Start-up: once, first, before the plugin said it is ready. --init-expert-location
    # trivial gives no counts, so the start-up plans are solved from uniform shares.
    startup = [m for m in lines if m["label"].startswith("start-up")]
    assert len(startup) == 1 and lines[0] is startup[0], labels
    assert "uniform shares" in startup[0]["label"], startup[0].group(0)
    ready_tp0 = next(m for m in READY_RE.finditer(text) if m["rank"] == "TP0")
    assert startup[0].start() < ready_tp0.start(), "start-up plans logged after the ready line"
    # Rebalances: #1..#n in order, each after SGLang's i-th rebalance on TP0 (the last one may
    # still be waiting for its pass boundary).
    eplb_ends = [m for m in EPLB_REBALANCE_RE.finditer(text) if " TP0 " in _line_start(text, m.start())]
    rebalances = [m for m in lines if m["label"].startswith("rebalance #")]
    assert [m["label"] for m in rebalances] == [f"rebalance #{i}" for i in range(1, len(rebalances) + 1)], labels
    assert len(eplb_ends) - 1 <= len(rebalances) <= len(eplb_ends) and rebalances, (len(rebalances), len(eplb_ends))
    for end, m in zip(eplb_ends, rebalances):
        assert end.start() < m.start(), f"{m['label']} installed before SGLang's rebalance ended"
    # Refreshes from the recorder between rebalances (default cadence on): numbered in order.
    refreshes = [int(m["label"].split("#")[1]) for m in lines if m["label"].startswith("refresh #")]
    assert refreshes and refreshes == sorted(refreshes), labels
    solve = [float(m["solve"]) for m in lines]
    waited = [float(m["waited"]) for m in lines]
    e2e_timings[f"plan solve, longest of {len(lines)} [{server.mode}]"] = max(solve)
    e2e_timings[f"plan install wait of the forward thread, in all [{server.mode}]"] = sum(waited)
    print(f"\n[{server.mode}] {len(rebalances)} rebalance, {len(refreshes)} refresh installs; solve max "
          f"{max(solve):.3f}s, forward thread waited {sum(waited):.2f}s in all (max {max(waited):.2f}s)")


def _line_start(text: str, pos: int) -> str:
    """The log line up to ``pos`` (its timestamp and rank prefix)."""
    return text[text.rfind("\n", 0, pos) + 1 : pos]


def _unpack(hexmask: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(hexmask), dtype=np.uint8))[:n].astype(bool)


def _slot_log(slot_dir: Path) -> tuple[list, list]:
    files = [slot_dir / f"slots_ep{r}.jsonl" for r in range(2)]
    a, b = ([json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else [] for f in files)
    return a, b


def _slot_calls(slot_dir: Path) -> list[dict]:
    """Per MoE call the server ran: per-rank loads and the best max rank load possible (2 ranks)."""
    per_rank = _slot_log(slot_dir)
    n = min(len(p) for p in per_rank)
    calls = []
    for i in range(n):
        a, b = per_rank[0][i], per_rank[1][i]
        assert a["layer"] == b["layer"] and a["p2l"] == b["p2l"], f"slot logs out of step at call {i}"
        S = len(a["counts"])
        p2l = a["p2l"]
        counts = a["counts"] + b["counts"]  # global physical slot order: rank 0's slots, then rank 1's
        per_expert: dict[int, int] = {}
        ranks_of: dict[int, set] = {}
        for p, c in enumerate(counts):
            per_expert[p2l[p]] = per_expert.get(p2l[p], 0) + c
            ranks_of.setdefault(p2l[p], set()).add(p // S)
        fixed = [sum(c for e, c in per_expert.items() if ranks_of[e] == {r}) for r in range(2)]
        total = sum(counts)
        loads = [sum(a["counts"]), sum(b["counts"])]
        flexible = total - sum(fixed)
        calls.append({"layer": a["layer"], "loads": loads, "best": max(*fixed, math.ceil(total / 2)), "flexible": flexible})
    return calls


@pytest.mark.e2e
def test_every_entry_ran_on_exactly_one_rank(server):
    """Without an a2a backend both ranks see every token and must pick the same copy for each
    (token, expert) entry: a plan installed on one rank but not yet on the other would run an
    entry twice or not at all. From the slot log (what each rank really executed), for every MoE
    call the server ran: each entry ran on exactly one rank."""
    a, b = _slot_log(server.slot_dir)
    assert len(a) == len(b) >= 10 * MOE_LAYERS, (len(a), len(b))
    bad = []
    for i, (x, y) in enumerate(zip(a, b)):
        assert x["layer"] == y["layer"] and x["shape"] == y["shape"], f"slot logs out of step at call {i}"
        n = x["shape"][0] * x["shape"][1]
        on0, on1 = _unpack(x["local"], n), _unpack(y["local"], n)
        if not (on0 ^ on1).all():
            bad.append((i, x["layer"], x["shape"], int((on0 & on1).sum()), int((~on0 & ~on1).sum())))
    assert not bad, f"{len(bad)} of {len(a)} calls ran entries on both ranks or on none (call, layer, shape, both, none): {bad[:5]}"


@pytest.mark.e2e
def test_rank_loads_from_slot_log(server, slot_stats):
    """What each rank really executed, per MoE call. Per-batch LPLB must reach the optimum
    (2 ranks: max(tokens pinned to rank 0, pinned to rank 1, ceil(total / 2))) on every call;
    the other modes' share of optimal calls is printed at the end of the run."""
    calls = _slot_calls(server.slot_dir)
    assert len(calls) >= 10 * MOE_LAYERS, f"only {len(calls)} MoE calls logged in {server.slot_dir}"
    optimal = sum(max(c["loads"]) == c["best"] for c in calls)
    contested = [c for c in calls if c["flexible"] > 0]
    slot_stats[server.mode] = {"calls": len(calls), "optimal": optimal, "contested": len(contested),
                               "contested_optimal": sum(max(c["loads"]) == c["best"] for c in contested)}
    print(f"\n[{server.mode}] slot log: {slot_stats[server.mode]}")
    assert all(max(c["loads"]) >= c["best"] for c in calls)  # nothing beats the optimum (sanity of the log)
    if server.mode != "off" and expected_mode(server.mode).per_batch:
        assert contested, "no call had tokens of a replicated expert: nothing to balance"
        bad = [c for c in calls if max(c["loads"]) != c["best"]]
        assert not bad, f"{len(bad)} of {len(calls)} calls above the optimal max rank load, e.g. {bad[:3]}"


@pytest.mark.e2e
def test_outputs_equal_off(server, greedy_results):
    """A balancing mode only picks which copy of the same expert computes a token, and every
    copy holds the same weights (placement-invariant dummy weights): greedy outputs equal ``off``'s."""
    if server.mode == "off":
        pytest.skip("reference mode")
    if "off" not in greedy_results or server.mode not in greedy_results:
        pytest.skip("needs test_greedy_generate of 'off' and of this mode in the same session")
    assert greedy_results[server.mode]["ids"] == greedy_results["off"]["ids"]


def _plan_lines(text: str) -> list[tuple[str, str]]:
    """(rank, label) of the plan installs at start-up and at EPLB rebalances, in log order
    (rank 0 logs them)."""
    return [(m["rank"], m["label"]) for m in PLANS_RE.finditer(text) if not m["label"].startswith("refresh")]


def _ready(text: str) -> dict[str, str]:
    return {m["rank"]: m.group(0).split("] [moe-lb] ", 1)[1] for m in READY_RE.finditer(text)}


@pytest.mark.e2e
def test_native_form_matches_plugin(server, greedy_results, served_logs):
    """The fork form (the exported series applied to a copy of SGLang, plugin left out) serves
    the same feature: greedy outputs equal to the plugin's, the same ready line on both ranks,
    and plans installed at start-up and at each EPLB rebalance in the same order."""
    served_logs[server.mode] = server.log_text()
    if server.mode not in NATIVE_MODES:
        pytest.skip("plugin-form server")
    text = served_logs[server.mode]
    plugin_mode = NATIVE_MODES[server.mode]
    if plugin_mode not in greedy_results or plugin_mode not in served_logs:
        pytest.skip(f"needs the {plugin_mode!r} plugin server in the same session")
    assert greedy_results[server.mode]["ids"] == greedy_results[plugin_mode]["ids"]
    plugin_text = served_logs[plugin_mode]
    assert _ready(text) == _ready(plugin_text) and len(_ready(text)) == 2, (_ready(text), _ready(plugin_text))
    native, plugin = _plan_lines(text), _plan_lines(plugin_text)
    for lines in (native, plugin):  # the plan lines come from rank 0 (rebalance.py)
        labels = [lb for r, lb in lines if r == "TP0"]
        assert labels and labels[0].startswith("start-up") and "rebalance #1" in labels, lines
        assert labels[1:] == [f"rebalance #{i}" for i in range(1, len(labels))], lines
    # Both servers ran the same requests in the same order: the same rebalances, up to the
    # last one, which depends on how many passes the batching formed.
    n = min(len(native), len(plugin))
    assert native[:n] == plugin[:n] and n >= 2, (native, plugin)


# --------------------------------------------------------------------------- no server needed


def _reference_moe(x, weights, ids, experts):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            if e >= 0:
                out[t] += weights[t, s] * experts[e](x[t])
    return out


def test_ep_moe_wrapper_drops_foreign_experts():
    torch.manual_seed(0)
    experts = [torch.nn.Linear(8, 8, bias=False) for _ in range(3)]
    x = torch.randn(5, 8)
    ids = torch.tensor([[0, -1], [-1, -1], [2, 1], [-1, 2], [1, 1]])
    weights = torch.rand(5, 2)

    calls = []

    def upstream(layer, xs, topk_output, cfg):  # stands in for moe_forward_native (no -1 support)
        w, i = topk_output[0], topk_output[1]
        assert int(i.min()) >= 0
        calls.append(i.shape)
        return _reference_moe(xs, w, i, experts)

    with torch.no_grad():
        got = moe_forward_native_ep(upstream, None, x, (weights, ids, None), None)
        want = _reference_moe(x, weights, ids, experts)
    torch.testing.assert_close(got, want)
    assert calls == [(6, 1)]  # only the 6 local (token, slot) pairs, one per row
    assert torch.all(got[1] == 0)
    # No -1: upstream is called unchanged.
    full = torch.tensor([[0, 1]] * 5)
    with torch.no_grad():
        torch.testing.assert_close(moe_forward_native_ep(upstream, None, x, (weights, full, None), None), _reference_moe(x, weights, full, experts))


@pytest.mark.e2e
def test_waterfill_refused_without_deepep(tmp_path):
    """The CPU server runs ``--moe-a2a-backend none``; the plugin must refuse Waterfill there,
    before any scheduler starts, with a message that says why (exit status 2)."""
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        launch_cpu_server([*SERVER_ARGS, "--moe-lb", "waterfill"], ep=2, log_path=tmp_path / "server.log",
                          recorder_dir=tmp_path / "rec", timeout=120)
    assert "exited with code 2" in str(err.value), str(err.value)[-2000:]
    assert "needs --moe-a2a-backend deepep" in str(err.value), str(err.value)[-2000:]
    assert time.monotonic() - t0 < 120


def test_omp_bind_splits_cpus():
    parts = omp_bind(2).split("|")
    assert len(parts) == 2 and all(parts)


def test_tiny_model_dir(tmp_path):
    d = prepare_model_dir()
    assert CONFIG["n_shared_experts"] == 1 and CONFIG["rope_scaling"]["type"] == "yarn"
    tok = json.loads((d / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) + len(tok.get("added_tokens", [])) >= CONFIG["vocab_size"] - 3
    variant = prepare_model_dir({"num_hidden_layers": 2}, cache_dir=tmp_path / "variant")
    assert json.loads((variant / "config.json").read_text())["num_hidden_layers"] == 2
    assert (variant / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()


def test_shims_plugin_is_opt_in_and_fails_loudly(monkeypatch):
    from sglang_moe_lb.testing.cpu_serving import plugin

    monkeypatch.delenv(plugin.ENV, raising=False)
    plugin.register()  # not enabled: must not import SGLang or register anything
    assert not plugin._registered
    with pytest.raises(SystemExit, match=r"written for sglang==0\.5\.23, found sglang=="):
        plugin._require("sglang_moe_lb_no_such_module.layer.fn")


_STUB_CHECK = r"""
import torch, torch.nn.functional as F, sgl_kernel
torch.manual_seed(0)
H, D, Dv, P, E = 4, 40, 32, 5, 3           # heads, qk dim, v dim, cached prefix, new tokens
pool = torch.randn(64, 1, D)               # MLA-like: one KV head, value = first Dv dims of the key
req_to_token = torch.zeros(2, 32, dtype=torch.int64)
sgl_kernel.assign_req_to_token_pool_cpu(torch.tensor([1]), req_to_token, torch.tensor([0]), torch.tensor([P + E]),
                                        torch.arange(10, 10 + P + E), 32)
assert req_to_token[1, : P + E].tolist() == list(range(10, 10 + P + E))
q = torch.randn(E, H, D)
k_new, v_new = pool[10 + P : 10 + P + E], pool[10 + P : 10 + P + E, :, :Dv]
o = torch.empty(E, H, Dv)
sgl_kernel.extend_attention_cpu(q, k_new, v_new, o, pool, pool[..., :Dv], 1.0, 1.0, req_to_token, torch.tensor([1]),
                                torch.tensor([P + E]), torch.tensor([E]), torch.tensor([0]), E, 0.3, 0.0)
k_all = pool[10 : 10 + P + E].expand(-1, H, -1).transpose(0, 1)
mask = torch.ones(E, P + E, dtype=torch.bool).tril(diagonal=P)
ref = F.scaled_dot_product_attention(q.transpose(0, 1), k_all, k_all[..., :Dv], attn_mask=mask, scale=0.3).transpose(0, 1)
torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
out = torch.empty(1, H, Dv)
sgl_kernel.decode_attention_cpu(q[-1:], pool, pool[..., :Dv], 1.0, 1.0, out, None, None, None, None, req_to_token,
                                torch.tensor([1]), torch.tensor([P + E]), 0.3, 0.0)
torch.testing.assert_close(out, ref[-1:], atol=1e-5, rtol=1e-5)
assert torch.cpu.is_current_stream_capturing() is False
try:
    sgl_kernel.fused_experts_cpu()
except NotImplementedError as e:
    assert "fused_experts_cpu" in str(e) and "sglang==" in str(e)
else:
    raise AssertionError("unimplemented op did not raise")
print("ok")
"""


def test_sgl_kernel_stub_matches_sdpa():
    """The stand-in's attention equals torch SDPA (run in a subprocess: importing it patches torch.ops)."""
    import subprocess
    import sys

    from sglang_moe_lb.testing.cpu_serving import STUBS_DIR

    env = {**os.environ, "PYTHONPATH": str(STUBS_DIR)}
    res = subprocess.run([sys.executable, "-c", _STUB_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
