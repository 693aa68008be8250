"""Waterfill through SGLang's real ``DeepseekV2MoE`` on 2 CPU ranks (gloo), DeepEP stood in.

The plugin refuses ``--moe-lb waterfill*`` without ``--moe-a2a-backend deepep`` (the fused
shared-expert slot travels to another rank only through DeepEP's dispatcher), and DeepEP needs
GPUs, so the CPU server cannot serve Waterfill. This test proves it one layer down instead:

* two spawned ranks, SGLang's own process groups over gloo, DP-attention layout (each rank
  routes only its own tokens), EPLB placement with 2 redundant experts;
* per mode, the real ``DeepseekV2MoE`` of layer 1 (gate, ``TopK`` with SGLang's fused shared
  slot, ``DeepEPMoE`` with its ``DeepEPDispatcher``), built as SGLang's loader builds it;
  our plugin's hooks installed as in a scheduler (``prepare_moe_topk`` swaps in its balancer);
* DeepEP's GPU transport replaced by ``GlooNormalTransport`` (all_to_all_single over gloo),
  the expert math by SGLang's ``moe_forward_native`` on the layer's own weights;
* placement-invariant weights (every replica and every rank's shared slot hold the same
  weights), float32.

``off`` is SGLang's own fused layout with the shared expert on the token's home rank
(``remap_topk_for_per_rank_shared_slots``). Checked per Waterfill mode, batch and rank: the
layer output equals ``off``'s to float32 tolerance; some shared-expert pairs really ran on the
other rank; both ranks finish, including batches where one rank has zero tokens; the
dynamic modes run exactly one all-gather per layer and batch on every rank (idle rank
included, through the dispatcher safety net), the static ones none.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from sglang_moe_lb import BalanceMode
from sglang_moe_lb.plugin.options import mode_flags
from sglang_moe_lb.testing.gloo_ranks import run_ranks

pytestmark = pytest.mark.e2e  # ~1 min: two spawned ranks import SGLang and run 6 modes

HERE = Path(__file__).resolve().parent
TINY = HERE.parent / "plugin" / "data" / "tiny_dsv3"
R = 2
# Tokens per rank for each batch: skewed, balanced, one idle rank each way.
BATCHES = [[40, 6], [24, 24], [0, 30], [33, 0]]
COMMON = ["--tp", "2", "--attn-dp-size", "2", "--moe-a2a-backend", "deepep",
          "--ep-num-redundant-experts", "2", "--enable-eplb", "--dtype", "float32"]
# Every sub-option spelled out (plugin.options.mode_flags): the server defaults may change.
MODES = {
    "off": ["--enable-waterfill"],  # SGLang's fused layout; the worker keeps the shared expert home
    **{name: mode_flags(BalanceMode.parse(name)) for name in (
        "waterfill/conservative/local", "waterfill/conservative/global",
        "waterfill/all_rank/local", "waterfill/all_rank/global",
        "waterfill+lplb/per-batch/global/tokens/all_rank",
    )},
}
TIMEOUT_S = 300


def _argv(*extra):
    return ["--model-path", str(TINY), "--device", "cpu", "--load-format", "dummy", *COMMON, *extra]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, e2e_timings):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import prepare_server_args

    from sglang_moe_lb.plugin import hooks, register

    sys.path.insert(0, str(HERE))
    import waterfill_gloo_worker

    register()
    HookRegistry.apply_hooks()
    try:
        jobs = []
        for name, flags in MODES.items():  # parsed + resolved here, as SGLang's launcher does
            sa = prepare_server_args(_argv(*flags))
            sa.resolve_once()
            jobs.append((name, sa))
    finally:
        hooks.uninstall()
    out = tmp_path_factory.mktemp("waterfill_gloo")
    t0 = time.monotonic()
    results = run_ranks(waterfill_gloo_worker.run, R, (jobs, str(out), BATCHES), out, TIMEOUT_S)
    e2e_timings[f"waterfill gloo ranks ({len(MODES)} modes)"] = time.monotonic() - t0
    return {name: [res[name] for res in results] for name in MODES}


def test_layout_is_sglangs_fused_one(ranks):
    for name, per_rank in ranks.items():
        for r, res in enumerate(per_rank):
            num_fused, use_waterfill = res["shared"]
            assert num_fused == 1, (name, res["shared"])
            assert use_waterfill, (name, res["shared"])
            assert res["balancer"] == ("HomeRankShared" if name == "off" else "MoeLbWaterfill"), (name, res["balancer"])
            assert res["num_local_experts"] == res["S"] + 1


@pytest.mark.parametrize("mode", [m for m in MODES if m != "off"])
def test_outputs_equal_shared_local(ranks, mode):
    for r in range(R):
        for b, (got, ref) in enumerate(zip(ranks[mode][r]["batches"], ranks["off"][r]["batches"])):
            assert torch.equal(got["x"], ref["x"])
            assert got["y"].shape == (BATCHES[b][r], got["x"].shape[1])
            torch.testing.assert_close(got["y"], ref["y"], rtol=1e-5, atol=1e-5, msg=lambda m: f"{mode} rank {r} batch {b}: {m}")
            if BATCHES[b][r]:
                assert got["y"].abs().max() > 1e-3  # the layer really computed something


@pytest.mark.parametrize("mode", [m for m in MODES if m != "off"])
def test_some_shared_slots_ran_on_the_other_rank(ranks, mode):
    moved = sum(res["transport"]["shared_pairs_sent_away"] for res in ranks[mode])
    ran = sum(res["transport"]["foreign_shared_pairs_run"] for res in ranks[mode])
    assert moved == ran > 0, (mode, moved, ran)
    assert sum(res["transport"]["shared_pairs_sent_away"] for res in ranks["off"]) == 0


@pytest.mark.parametrize("mode", [m for m in MODES if m != "off"])
def test_fused_ids_are_in_the_layout(ranks, mode):
    for r in range(R):
        res = ranks[mode][r]
        S = res["S"]
        for b, batch in enumerate(res["batches"]):
            ids = batch["fused_ids"]
            if BATCHES[b][r] == 0:
                continue
            assert ids.shape[1] == 4 + 1
            shared_col = ids[:, -1]
            assert bool(((shared_col % (S + 1)) == S).all()), "shared column must hit a shared slot"
            routed = ids[:, :-1]
            assert bool(((routed % (S + 1)) != S).all()), "routed columns must not hit a shared slot"


def test_off_layout_is_sglangs_home_rank_remap(ranks):
    for r, res in enumerate(ranks["off"]):
        assert res["home_matches_sglang_remap"] and all(res["home_matches_sglang_remap"]), (r, res["home_matches_sglang_remap"])


def test_collectives(ranks):
    for mode, per_rank in ranks.items():
        dynamic = mode != "off" and BalanceMode.parse(mode).collective
        for r, res in enumerate(per_rank):
            want = len(BATCHES) if dynamic else 0  # one MoE layer, one all-gather per batch
            assert res["collectives"] == want, (mode, r, res["collectives"])


def test_report(ranks, capsys):
    """Not a check: one line per mode (max |diff| to off, shared pairs moved), shown with -s."""
    lines = []
    for mode, per_rank in ranks.items():
        diff = max(
            (float((g["y"] - o["y"]).abs().max()) if g["y"].numel() else 0.0)
            for r in range(R) for g, o in zip(per_rank[r]["batches"], ranks["off"][r]["batches"])
        )
        moved = [res["transport"]["shared_pairs_sent_away"] for res in per_rank]
        lines.append(f"{mode:36s} max|y - y_off| {diff:.2e}  shared pairs run on the other rank, per source rank: {moved}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
