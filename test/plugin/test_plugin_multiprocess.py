"""Dynamic modes across 3 EP ranks (spawned processes, gloo, SGLang's own process groups).

DeepEP + DP attention layout (``--tp 3 --attn-dp-size 3 --moe-a2a-backend deepep``): every
rank routes only its own tokens; rank 2 is idle (zero tokens). For layer 3 the idle rank
skips TopK altogether and only reaches the DeepEP dispatcher (a model with an early return),
whose hook must join the collective. Checked here: every rank finishes (no deadlock), runs
exactly one collective per MoE layer in dynamic modes and none in static ones, dispatches
what the core decides from the gathered counts bit for bit, and the union over ranks meets
the global quotas.
"""

from __future__ import annotations


import pytest
import torch
from plugin_helpers import E, K, base_argv

from sglang_moe_lb.testing.gloo_ranks import run_ranks

from sglang_moe_lb import Placement, balance_layer, fuse_topk, integer_quotas, local_stats, routed_rank_load, solve_split

pytestmark = pytest.mark.multiprocess

R, IDLE = 3, 2
COMMON = ["--tp", str(R), "--attn-dp-size", str(R), "--moe-a2a-backend", "deepep",
          "--ep-num-redundant-experts", "5", "--enable-eplb"]
MODES = {
    "lplb/per-batch": ["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "per-batch"],
    "waterfill/dynamic": ["--moe-lb", "waterfill", "--moe-lb-waterfill-sync", "dynamic"],
    "joint/all_rank": ["--moe-lb", "waterfill+lplb", "--moe-lb-lplb-schedule", "per-batch",
                       "--moe-lb-waterfill-candidates", "all_rank"],
    "joint/conservative": ["--moe-lb", "waterfill+lplb", "--moe-lb-lplb-schedule", "per-batch"],
    "waterfill/static": ["--moe-lb", "waterfill"],
    "lplb/rebalance-only": ["--moe-lb", "lplb"],
}
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every mode on R spawned ranks once; return {mode: [rank results]}."""
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import prepare_server_args

    from sglang_moe_lb.plugin import hooks, register

    import plugin_mp_worker

    register()
    HookRegistry.apply_hooks()
    try:
        jobs = []
        for name, flags in MODES.items():  # parsed + resolved here, like SGLang's launcher
            sa = prepare_server_args(base_argv(*COMMON, *flags))
            sa.resolve_once()
            jobs.append((name, sa))
    finally:
        hooks.uninstall()
    out = tmp_path_factory.mktemp("mp")
    results = run_ranks(plugin_mp_worker.run, R, (jobs, str(out), IDLE), out, TIMEOUT_S)
    return {name: [res[name] for res in results] for name in MODES}


def _unfuse(fused, S):
    return fused - torch.div(fused, S + 1, rounding_mode="floor")


def _per_layer(res, layer):
    """Per rank: (phys routed ids [n, K], shared rank [n] or None, weights) as dispatched."""
    S = res[0]["S"]
    rows = []
    for r in range(R):
        d = res[r]["layers"][layer]
        ids = d["ids"]
        if ids is None:  # the idle rank skipped TopK for this layer
            rows.append((torch.zeros(0, K, dtype=torch.long), None, None))
            continue
        if ids.shape[1] == K:
            rows.append((ids.long(), None, d["weights"]))
        else:
            rows.append((_unfuse(ids[:, :K].long(), S), (ids[:, K].long() // (S + 1)), d["weights"]))
    return rows


def _check_common(res, dynamic):
    for r in range(R):
        assert res[r]["collective_per_layer"] is dynamic
        assert res[r]["collectives"] == (3 if dynamic else 0), f"rank {r}: {res[r]['collectives']} collectives"
    for layer in (1, 2, 3):
        assert all(torch.equal(res[r]["p2l"], res[0]["p2l"]) for r in range(R))
        idle = res[IDLE]["layers"][layer]
        assert idle["ids"] is None or idle["ids"].shape[0] == 0


def _setup(res, layer):
    S = res[0]["S"]
    pl = Placement(res[0]["p2l"][layer], R, E)
    assert pl.has_replicas
    rows = _per_layer(res, layer)
    p2l = pl.phy2log[0]
    logical = [p2l[phys] for phys, _, _ in rows]
    for r in range(R):  # the routed experts are the router's top-k, whatever the copy
        want = res[r]["layers"][layer]["logical"]
        if res[r]["layers"][layer]["ids"] is not None:
            assert torch.equal(logical[r].sort(-1).values, want.sort(-1).values)
    return S, pl, rows, logical


@pytest.mark.parametrize("mode", ["lplb/per-batch", "joint/all_rank", "joint/conservative"])
def test_per_batch_lplb_meets_global_quotas_bit_for_bit(ranks, mode):
    res = ranks[mode]
    _check_common(res, dynamic=True)
    cands = {"lplb/per-batch": None, "joint/all_rank": "all_rank", "joint/conservative": "conservative"}[mode]
    for layer in (1, 2, 3):
        S, pl, rows, logical = _setup(res, layer)
        gathered = torch.stack([local_stats(logical[r], E, R, S) for r in range(R)])
        quotas = None
        for r in range(R):
            want = balance_layer(pl, logical[r], source_rank=r, lplb="per_batch", waterfill=cands, gathered=gathered)
            assert torch.equal(rows[r][0], want.phys_ids.long()), f"rank {r} layer {layer}: routed ids differ"
            if cands is not None and rows[r][1] is not None:
                assert torch.equal(rows[r][1], want.shared_rank.long()), f"rank {r} layer {layer}: shared ranks differ"
            assert quotas is None or torch.equal(quotas, want.quotas), "ranks derived different quotas"
            quotas = want.quotas
        union = torch.bincount(torch.cat([p.reshape(-1) for p, _, _ in rows]), minlength=pl.num_physical)
        assert torch.equal(union, quotas), f"layer {layer}: union of dispatched tokens misses the global quotas"
        counts = gathered[:, :E].sum(0)
        if cands is None:
            assert torch.equal(quotas, integer_quotas(pl, solve_split(pl, counts), counts))
        if cands == "all_rank":  # shared slots: one joint split, met exactly
            fpl = pl.with_shared_expert
            c_ext = torch.cat([counts, gathered[:, E + R].sum().reshape(1)])
            q_ext = integer_quotas(fpl, solve_split(fpl, c_ext), c_ext).reshape(R, S + 1)
            shared = torch.bincount(torch.cat([s for _, s, _ in rows if s is not None]), minlength=R)
            assert torch.equal(shared, q_ext[:, S])
            assert torch.equal(q_ext[:, :S].reshape(-1), quotas)


@pytest.mark.parametrize("mode, dynamic", [("waterfill/dynamic", True), ("waterfill/static", False)])
def test_waterfill_sync_modes(ranks, mode, dynamic):
    res = ranks[mode]
    _check_common(res, dynamic=dynamic)
    for layer in (1, 2, 3):
        S, pl, rows, logical = _setup(res, layer)
        routed = torch.stack([routed_rank_load(p, R, S) for p, _, _ in rows]).sum(0)
        gathered = torch.stack([local_stats(logical[r], E, R, S, phys_ids=rows[r][0]) for r in range(R)])
        shared_load = torch.zeros(R, dtype=torch.long)
        local_load = routed.clone()
        for r in range(R):
            phys, shared, weights = rows[r]
            if shared is None:
                continue
            want = balance_layer(pl, logical[r], source_rank=r, lplb="off", waterfill="conservative",
                                 gathered=gathered if dynamic else None, phys_ids=phys)
            assert torch.equal(shared, want.shared_rank.long()), f"rank {r} layer {layer}: shared ranks differ"
            ids, w = fuse_topk(phys, weights[:, :K], want.shared_rank, S, 1 / 2.5)
            assert torch.equal(res[r]["layers"][layer]["ids"].long(), ids.long())
            assert torch.allclose(res[r]["layers"][layer]["weights"], w)
            shared_load += torch.bincount(shared, minlength=R)
            local_load[r] += phys.shape[0]
        if dynamic:  # global Waterfill never loses to always-local
            assert (routed + shared_load).max() <= local_load.max()


def test_rebalance_only_tables_are_identical_and_need_no_collective(ranks):
    """Every rank solves the same scenario LP from the same window: bit-identical tables."""
    res = ranks["lplb/rebalance-only"]
    _check_common(res, dynamic=False)
    for layer in (1, 2, 3):
        tables = [res[r]["tables"][layer] for r in range(R)]
        assert all(torch.equal(t, tables[0]) for t in tables[1:]), f"layer {layer}: ranks solved different tables"
        S, pl, rows, logical = _setup(res, layer)
        for r in range(R):
            want = balance_layer(pl, logical[r], lplb="table", split_table=tables[0])
            assert torch.equal(rows[r][0], want.phys_ids.long()), f"rank {r} layer {layer}: routed ids differ"
