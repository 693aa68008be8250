"""Every sync across 3 EP ranks (spawned processes, gloo, SGLang's own process groups).

DeepEP + DP attention layout (``--tp 3 --attn-dp-size 3 --moe-a2a-backend deepep``): every
rank routes only its own tokens; rank 2 is idle (zero tokens). For layer 3 the idle rank
skips TopK altogether and only reaches the DeepEP dispatcher (a model with an early return),
whose hook must join the collective. Checked here: every rank finishes (no deadlock), runs
exactly one int32 collective per MoE layer in global-sync modes and none otherwise,
dispatches what the core decides from the gathered rows bit for bit, and the union over
ranks meets the global quotas. The gate: several batches of mixed sizes, decided on the
per-rank token counts every rank shares (DP attention's), identical on every rank, with the
collective skipped everywhere when closed. Test ids are ``BalanceMode`` names.
"""

from __future__ import annotations

import json

import pytest
import torch
from plugin_helpers import TINY, E, K, base_argv

from sglang_moe_lb import BalanceMode, Placement, fuse_topk, integer_quotas, routed_rank_load, solve_split
from sglang_moe_lb.chain import balance_layer, local_stats
from sglang_moe_lb.cost import CostModel
from sglang_moe_lb.gate import uniform_layer_time
from sglang_moe_lb.plan import apply_plan, hash_offsets, level_index
from sglang_moe_lb.plugin.options import mode_flags
from sglang_moe_lb.testing.gloo_ranks import run_ranks

pytestmark = pytest.mark.multiprocess

R, IDLE = 3, 2
COMMON = ["--tp", str(R), "--attn-dp-size", str(R), "--moe-a2a-backend", "deepep",
          "--ep-num-redundant-experts", "5", "--enable-eplb"]
ONE_BATCH = [[24 + 13 * 0, 24 + 13 * 1, 0]]  # rank 2 idle
# Gate batches (tokens per rank): open iff the largest rank has >= 300 (overheads built below).
GATE_BATCHES = [[2, 3, 0], [1, 300, 0], [400, 5, 0], [150, 120, 0]]
GATE_OPEN = [max(b) >= 300 for b in GATE_BATCHES]
MODES = {
    "lplb/per-batch/global/tokens": ONE_BATCH,
    "lplb/per-batch/local/tokens": ONE_BATCH,
    "waterfill/conservative/global": ONE_BATCH,
    "waterfill+lplb/per-batch/global/tokens/all_rank": ONE_BATCH,
    "waterfill+lplb/per-batch/global/tokens/conservative": ONE_BATCH,
    "waterfill/conservative/local": ONE_BATCH,
    "lplb/plan": ONE_BATCH,
    "lplb/per-batch/global/tokens/gate": GATE_BATCHES,
    "lplb/plan/global/tokens/gate": GATE_BATCHES,
    "waterfill+lplb/per-batch/global/tokens/all_rank/gate": GATE_BATCHES,
}
TIMEOUT_S = 300


def _gate_overheads(path) -> str:
    """Hot-path µs between the modelled layer time at 150 and at 300 tokens per rank (gain 1.0,
    no collective cost), so the gate opens exactly from 300 tokens per rank on."""
    cm = CostModel.for_model(TINY)
    S = (E + 5) // R
    hot = {}
    for key, shared in (("lplb/per-batch", False), ("waterfill+lplb/per-batch/all_rank", True)):
        lo, hi = uniform_layer_time(cm, 150, K, S, shared), uniform_layer_time(cm, 300, K, S, shared)
        assert lo < hi
        hot[key] = {"1": (lo + hi) / 2, "65536": (lo + hi) / 2}
    path.write_text(json.dumps({
        "format": "sglang-moe-lb-overheads/1", "gpu": "test", "kernels_version": "test", "date": "test",
        "hot_path_us": hot, "collective_us": {"intra_node": 0.0, "inter_node": 0.0, "ranks_per_node": 8},
    }))
    return str(path)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every mode on R spawned ranks once; return {mode: [rank results]}."""
    import plugin_mp_worker
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import prepare_server_args

    from sglang_moe_lb.plugin import hooks, register

    out = tmp_path_factory.mktemp("mp")
    gate = ["--moe-lb-overheads", _gate_overheads(out / "overheads.json"), "--moe-lb-expected-gain", "1"]
    register()
    HookRegistry.apply_hooks()
    try:
        jobs = []
        for name, batches in MODES.items():  # parsed + resolved here, like SGLang's launcher
            mode = BalanceMode.parse(name)
            sa = prepare_server_args(base_argv(*COMMON, *mode_flags(mode), *(gate if mode.gate else [])))
            sa.resolve_once()
            assert sa._moe_lb.mode == mode
            jobs.append((name, sa, batches))
    finally:
        hooks.uninstall()
    results = run_ranks(plugin_mp_worker.run, R, (jobs, str(out), IDLE), out, TIMEOUT_S)
    return {name: [res[name] for res in results] for name in MODES}


def _unfuse(fused, S):
    return fused - torch.div(fused, S + 1, rounding_mode="floor")


def _rows(res, b, layer):
    """Per rank: (phys routed ids [n, K], shared rank [n] or None, weights) as dispatched."""
    S = res[0]["S"]
    rows = []
    for r in range(R):
        d = res[r]["batches"][b]["layers"][layer]
        ids = d["ids"]
        if ids is None:  # the idle rank skipped TopK for this layer
            rows.append((torch.zeros(0, K, dtype=torch.long), None, None))
        elif ids.shape[1] == K:
            rows.append((ids.long(), None, d["weights"]))
        else:
            rows.append((_unfuse(ids[:, :K].long(), S), ids[:, K].long() // (S + 1), d["weights"]))
    return rows


def _setup(res, b, layer):
    pl = Placement(res[0]["p2l"][layer], R, E)
    assert pl.has_replicas
    assert all(torch.equal(res[r]["p2l"], res[0]["p2l"]) for r in range(R))
    rows = _rows(res, b, layer)
    logical = [pl.phy2log[0][phys] for phys, _, _ in rows]
    for r in range(R):  # the routed experts are the router's top-k, whatever the copy
        d = res[r]["batches"][b]["layers"][layer]
        if d["ids"] is not None:
            assert torch.equal(logical[r].sort(-1).values, d["logical"].sort(-1).values)
    return res[0]["S"], pl, rows, logical


def _check_collectives(res, collective: bool, opened=None):
    for r in range(R):
        assert res[r]["collective"] is collective
        for b, batch in enumerate(res[r]["batches"]):
            want = 3 if collective and (opened is None or opened[b]) else 0
            assert batch["collectives"] == want, f"rank {r} batch {b}: {batch['collectives']} collectives, want {want}"


def _check_per_batch(mode: BalanceMode, res, b):
    """Global sync: every rank's ids are the core's decision from the gathered rows; the union meets the quotas."""
    for layer in (1, 2, 3):
        S, pl, rows, logical = _setup(res, b, layer)
        gathered = torch.stack([local_stats(pl, logical[r], mode) for r in range(R)])
        assert gathered.dtype == torch.int32 and gathered.shape == (R, E + 1)
        quotas = None
        for r in range(R):
            want = balance_layer(pl, logical[r], mode, source_rank=r, gathered=gathered)
            assert torch.equal(rows[r][0], want.phys_ids.long()), f"rank {r} layer {layer}: routed ids differ"
            if mode.waterfill is not None and rows[r][1] is not None:
                assert torch.equal(rows[r][1], want.shared_rank.long()), f"rank {r} layer {layer}: shared ranks differ"
            assert quotas is None or torch.equal(quotas, want.quotas), "ranks derived different quotas"
            quotas = want.quotas
        union = torch.bincount(torch.cat([p.reshape(-1) for p, _, _ in rows]), minlength=pl.num_physical)
        assert torch.equal(union, quotas), f"layer {layer}: union of dispatched tokens misses the global quotas"
        counts = gathered[:, :E].sum(0).long()
        if mode.waterfill is None:
            assert torch.equal(quotas, integer_quotas(pl, solve_split(pl, counts), counts))
        if mode.waterfill == "all_rank":  # shared slots: one joint split, met exactly
            fpl = pl.with_shared_expert
            c_ext = torch.cat([counts, gathered[:, E].sum().reshape(1).long()])
            q_ext = integer_quotas(fpl, solve_split(fpl, c_ext), c_ext).reshape(R, S + 1)
            shared = torch.bincount(torch.cat([s for _, s, _ in rows if s is not None]), minlength=R)
            assert torch.equal(shared, q_ext[:, S])
            assert torch.equal(q_ext[:, :S].reshape(-1), quotas)


@pytest.mark.parametrize("name", ["lplb/per-batch/global/tokens", "waterfill+lplb/per-batch/global/tokens/all_rank",
                                  "waterfill+lplb/per-batch/global/tokens/conservative"])
def test_global_per_batch_meets_global_quotas_bit_for_bit(ranks, name):
    res = ranks[name]
    _check_collectives(res, collective=True)
    _check_per_batch(BalanceMode.parse(name), res, 0)


def test_local_per_batch_needs_no_collective(ranks):
    """Local sync: each rank splits its own tokens (the core with gathered=None); no collective."""
    mode = BalanceMode.parse("lplb/per-batch/local/tokens")
    res = ranks[mode.name]
    _check_collectives(res, collective=False)
    for layer in (1, 2, 3):
        S, pl, rows, logical = _setup(res, 0, layer)
        for r in range(R):
            if res[r]["batches"][0]["layers"][layer]["ids"] is None:
                continue
            want = balance_layer(pl, logical[r], mode, source_rank=r)
            assert torch.equal(rows[r][0], want.phys_ids.long()), f"rank {r} layer {layer}: routed ids differ"
            counts = torch.bincount(logical[r].reshape(-1).long(), minlength=E)
            got = torch.bincount(rows[r][0].reshape(-1), minlength=pl.num_physical)
            assert torch.equal(got, integer_quotas(pl, solve_split(pl, counts), counts)), "local quotas not met"


@pytest.mark.parametrize("name, collective", [("waterfill/conservative/global", True),
                                              ("waterfill/conservative/local", False)])
def test_waterfill_sync_modes(ranks, name, collective):
    mode = BalanceMode.parse(name)
    res = ranks[name]
    _check_collectives(res, collective=collective)
    for layer in (1, 2, 3):
        S, pl, rows, logical = _setup(res, 0, layer)
        routed = torch.stack([routed_rank_load(p, R, S) for p, _, _ in rows]).sum(0)
        gathered = torch.stack([local_stats(pl, logical[r], mode, phys_ids=rows[r][0]) for r in range(R)])
        assert gathered.shape == (R, R + 1)
        shared_load = torch.zeros(R, dtype=torch.long)
        local_load = routed.clone()
        for r in range(R):
            phys, shared, weights = rows[r]
            if shared is None:
                continue
            want = balance_layer(pl, logical[r], mode, source_rank=r, gathered=gathered if collective else None,
                                 phys_ids=phys)
            assert torch.equal(shared, want.shared_rank.long()), f"rank {r} layer {layer}: shared ranks differ"
            ids, w = fuse_topk(phys, weights[:, :K], want.shared_rank, S, 1 / 2.5)
            assert torch.equal(res[r]["batches"][0]["layers"][layer]["ids"].long(), ids.long())
            assert torch.allclose(res[r]["batches"][0]["layers"][layer]["weights"], w)
            shared_load += torch.bincount(shared, minlength=R)
            local_load[r] += phys.shape[0]
        if collective:  # global Waterfill never loses to always-local
            assert (routed + shared_load).max() <= local_load.max()


def _check_plan(res, b):
    """Each rank's routed ids are its plan's gather: the level of the largest DP rank's batch (the
    size every rank shares), the hash slots of its own rank (ranks may disagree with DeepEP)."""
    sizes = res[0]["batches"][b]["sizes"]
    for layer in (1, 2, 3):
        S, pl, rows, logical = _setup(res, b, layer)
        for r in range(R):
            maps = res[r]["plans"][layer]
            level = level_index(res[r]["levels"], max(sizes))
            n = logical[r].shape[0]
            want = apply_plan(maps[level], logical[r], hash_offsets(n, K, res[r]["hash_slots"], salt=res[r]["rank"]))
            assert torch.equal(rows[r][0], want.long()), f"batch {b} rank {r} layer {layer}: not the plan's gather"


def test_plans_are_identical_on_every_rank_and_need_no_collective(ranks):
    """Every rank solves the same plans from the same window; a plan call runs no collective."""
    res = ranks["lplb/plan"]
    _check_collectives(res, collective=False)
    for layer in (1, 2, 3):
        plans = [res[r]["plans"][layer] for r in range(R)]
        assert all(torch.equal(p, plans[0]) for p in plans[1:]), f"layer {layer}: ranks solved different plans"
    _check_plan(res, 0)


@pytest.mark.parametrize("name", ["lplb/per-batch/global/tokens/gate", "waterfill+lplb/per-batch/global/tokens/all_rank/gate",
                                  "lplb/plan/global/tokens/gate"])
def test_gate_decides_the_same_on_every_rank(ranks, name):
    """Mixed batch sizes, an idle rank: the gate follows the largest rank's batch (shared by all
    ranks), so a rank with 1 token balances when another has 300, and a closed batch skips the
    collective on every rank (no deadlock: the run finished)."""
    mode = BalanceMode.parse(name)
    res = ranks[name]
    _check_collectives(res, collective=True, opened=GATE_OPEN)
    assert any(GATE_OPEN) and not all(GATE_OPEN)
    for b, opened in enumerate(GATE_OPEN):
        if opened:
            _check_per_batch(mode.opened, res, b)
            continue
        if mode.plan:  # closed: the plan's gather, no collective
            _check_plan(res, b)
            continue
        for layer in (1, 2, 3):  # closed: SGLang's own mapping, the shared expert at home
            S, pl, rows, logical = _setup(res, b, layer)
            for r, (phys, shared, _) in enumerate(rows):
                if mode.waterfill is not None and shared is not None:
                    assert bool((shared == r).all()), f"batch {b} rank {r}: the shared expert left home with the gate closed"
