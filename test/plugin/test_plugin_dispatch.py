"""The dispatcher and ``TopK`` forward in each mode, single process (EP rank 0 of a simulated 4-rank group).

Without an a2a backend every rank sees every token, so LPLB needs no collective and the
counts it sees are global: the physical ids must meet the quotas exactly. Waterfill needs
DeepEP (not importable on CPU; only its layout matters here) and runs with local sync here;
the global-sync modes are covered by ``test_plugin_multiprocess.py``. Test ids are
``BalanceMode`` names; the flags come from ``options.mode_flags``.
"""

from __future__ import annotations

import json

import pytest
import torch
from plugin_helpers import TINY, E, K, make_topk

from sglang_moe_lb import BalanceMode, integer_quotas, solve_split
from sglang_moe_lb.chain import balance_layer
from sglang_moe_lb.cost import CostModel
from sglang_moe_lb.plan import apply_plan, hash_offsets, level_index
from sglang_moe_lb.plugin.options import mode_flags
from sglang_moe_lb.testing.torch_ops import TorchOps, storages

LPLB_EP4 = ["--tp", "4", "--ep-size", "4", "--ep-num-redundant-experts", "4", "--enable-eplb"]
DEEPEP4 = ["--tp", "4", "--moe-a2a-backend", "deepep", "--ep-num-redundant-experts", "4", "--enable-eplb"]
MOE_LAYERS = (1, 2, 3)  # tiny_dsv3: layer 0 is dense

MODES = [
    "lplb/plan",
    "lplb/plan/local/tokens/gate",
    "lplb/per-batch/global/tokens",
    "lplb/per-batch/local/tiles",
    "waterfill/conservative/local",
    "waterfill/all_rank/local",
    "waterfill+lplb/plan/conservative/local",
]


def flags(name: str, *extra: str) -> list[str]:
    mode = BalanceMode.parse(name)
    return [*mode_flags(mode), *(DEEPEP4 if mode.waterfill else LPLB_EP4), *extra]


def logical_batch(n: int, seed: int) -> torch.Tensor:
    """``[n, K]`` distinct logical experts per token, skewed towards a few hot experts."""
    g = torch.Generator().manual_seed(seed)
    w = torch.linspace(4.0, 0.5, E)
    return torch.stack([torch.multinomial(w, K, replacement=False, generator=g) for _ in range(n)]).to(torch.int32)


def tiny_cost() -> CostModel:
    return CostModel.for_model(TINY, gpu="H200", dtype="bf16")


def expected_quotas(rt, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The core's quotas for this batch (``chain.balance_layer`` is the oracle of the wiring),
    cross-checked against the LP (token objective)."""
    st = rt.layers[layer]
    mode = rt.mode.opened
    cost = tiny_cost() if mode.objective == "tiles" else None
    quotas = balance_layer(st.placement, ids, mode, cost=cost).quotas
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    if mode.objective == "tokens":
        assert torch.equal(quotas, integer_quotas(st.placement, solve_split(st.placement, counts), counts))
    return quotas


def expected_plan_ids(rt, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The installed plan's gather, rebuilt here: level from ceil(rows / EP size) (no a2a backend,
    every rank sees the same rows), hash slots of source 0 (ranks must agree)."""
    st = rt.layers[layer]
    level = level_index(rt.levels, -(-ids.shape[0] // rt.num_ranks))
    return apply_plan(st.maps[level], ids, hash_offsets(ids.shape[0], ids.shape[1], rt.hash_slots))


def ready(rank0, name: str, *extra: str, topks=()):
    """Publish ``name`` as rank 0, build the metadata, run SGLang's prepare_moe_topk."""
    from sglang.srt.model_executor.model_runner_components import moe_ep_setup

    from sglang_moe_lb.plugin.runtime import get_runtime

    sa, md, mc = rank0(*flags(name, *extra))
    topks = list(topks) or [make_topk(layer, waterfill=sa._moe_lb.mode.waterfill is not None) for layer in MOE_LAYERS]
    moe_ep_setup.prepare_moe_topk(model=torch.nn.ModuleList(topks), model_config=mc)
    rt = get_runtime()
    assert rt is not None and rt.attached and rt.opts.mode == BalanceMode.parse(name)
    return rt, md, topks


@pytest.mark.parametrize("name", ["lplb/plan", "lplb/per-batch/global/tokens", "lplb/per-batch/local/tiles"])
def test_dispatcher_maps_back_and_meets_quotas(rank0, name):
    from sglang.srt.eplb import expert_location_dispatch as eld

    rt, md, _ = ready(rank0, name)
    assert not rt.collective  # no a2a backend: the counts are already global
    for layer in MOE_LAYERS:
        pl = rt.layers[layer].placement
        assert pl.has_replicas
        assert torch.equal(pl.phy2log[0].cpu(), md.physical_to_logical_map_cpu[layer])
        info = eld.ExpertLocationDispatchInfo.init_new(layer)
        assert info.rank_invariant and info._moe_lb_layer == layer
        ids = logical_batch(200, seed=layer)
        phys = eld.topk_ids_logical_to_physical(ids, info)
        assert phys.shape == ids.shape and phys.dtype == ids.dtype
        assert torch.equal(md.physical_to_logical_map[layer][phys.long()], ids.long()), "a token changed expert"
        if rt.mode.plan:
            assert torch.equal(phys, expected_plan_ids(rt, layer, ids)), "not the installed plan's gather"
        else:
            got = torch.bincount(phys.reshape(-1).long(), minlength=md.num_physical_experts)
            assert torch.equal(got, expected_quotas(rt, layer, ids)), "quotas not met"
        # Deterministic: a second call gives the same ids (rank invariance needs this).
        assert torch.equal(eld.topk_ids_logical_to_physical(ids, info), phys)


def test_tile_objective_uses_the_full_tile_without_a2a(rank0):
    """No a2a backend: this rank's tokens are the whole batch, so a 'local' tile split is the
    global one (the full GEMM tile, not tile / R): few-token experts stay on one copy."""
    rt, md, _ = ready(rank0, "lplb/per-batch/local/tiles")
    assert rt.mode.lplb_sync == "global" and rt.cost is not None and rt.cost.tile_tokens == 128
    from sglang.srt.eplb import expert_location_dispatch as eld

    ids = logical_batch(40, seed=5)  # 160 entries over 16 experts: every expert below one tile
    phys = eld.topk_ids_logical_to_physical(ids, eld.ExpertLocationDispatchInfo.init_new(1))
    pl = rt.layers[1].placement
    got = torch.bincount(phys.reshape(-1).long(), minlength=pl.num_physical)
    active_copies = torch.zeros(E, dtype=torch.long).index_add_(0, pl.phy2log[0].cpu(), (got > 0).long())
    assert bool((active_copies <= 1).all()), "an expert with less than one tile of tokens was split"


def _unfuse(fused: torch.Tensor, S: int) -> torch.Tensor:
    return fused - torch.div(fused, S + 1, rounding_mode="floor")


@pytest.mark.parametrize("name", MODES)
def test_topk_forward_shapes_and_layout(rank0, name):
    rt, md, topks = ready(rank0, name)
    S, R = rt.slots_per_rank, rt.num_ranks
    T = 40
    for tk in topks:
        layer = tk.layer_id
        g = torch.Generator().manual_seed(100 + layer)
        logits = torch.randn(T, E, generator=g)
        out = tk.forward_native(torch.randn(T, 64, generator=g), logits)
        want_logical = torch.topk(torch.softmax(logits, -1), K, dim=-1).indices.sort(-1).values
        p2l = md.physical_to_logical_map[layer]
        if rt.mode.waterfill is None:
            assert out.topk_ids.shape == (T, K) and out.topk_weights.shape == (T, K)
            assert torch.equal(p2l[out.topk_ids.long()].sort(-1).values, want_logical)
            continue
        assert out.topk_ids.shape == (T, K + 1) and out.topk_weights.shape == (T, K + 1)
        routed, shared = out.topk_ids[:, :K].long(), out.topk_ids[:, K].long()
        assert bool((routed % (S + 1) != S).all()), "a routed id landed in a shared slot"
        assert torch.equal(p2l[_unfuse(routed, S)].sort(-1).values, want_logical)
        assert bool((shared % (S + 1) == S).all()), "shared column is not a shared slot"
        shared_rank = shared // (S + 1)
        assert bool(((shared_rank >= 0) & (shared_rank < R)).all())
        if rt.mode.waterfill == "conservative":
            visited = routed // (S + 1)
            ok = (shared_rank == rt.ep.rank) | (visited == shared_rank[:, None]).any(1)
            assert bool(ok.all()), "conservative Waterfill picked a rank the token does not visit"
        assert torch.allclose(out.topk_weights[:, K], torch.full((T,), 1 / 2.5))


def test_local_waterfill_balances_against_local_loads(rank0):
    """Local-sync Waterfill is never worse than always-local for this rank's own tokens."""
    from sglang_moe_lb import routed_rank_load

    rt, md, topks = ready(rank0, "waterfill/all_rank/local")
    S, R = rt.slots_per_rank, rt.num_ranks
    tk = topks[0]
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(300, E, generator=g) + torch.linspace(3, 0, E)  # skewed: some ranks hot
    out = tk.forward_native(torch.randn(300, 64, generator=g), logits)
    routed = _unfuse(out.topk_ids[:, :K].long(), S)
    load = routed_rank_load(routed, R, S)
    shared = torch.bincount(out.topk_ids[:, K].long() // (S + 1), minlength=R)
    local = load.clone()
    local[rt.ep.rank] += out.topk_ids.shape[0]
    assert (load + shared).max() <= local.max()
    assert int(shared.sum()) == out.topk_ids.shape[0]


def test_off_touches_no_forward_path(plugin, gloo_world):
    from plugin_helpers import base_argv
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import prepare_server_args

    from sglang_moe_lb.plugin import manifest
    from sglang_moe_lb.plugin.hooks import _ORIGINALS
    from sglang_moe_lb.plugin.runtime import get_runtime

    sa = prepare_server_args(base_argv(*LPLB_EP4))
    sa.resolve_once()
    publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0))
    assert get_runtime() is None
    assert set(_ORIGINALS) == {h.target for h in manifest.hooks_for("light")}


@pytest.mark.parametrize("name", MODES)
def test_hooks_installed_are_the_manifests(rank0, name):
    """What a mode hooks is exactly what the manifest says it needs (no list rebuilt here)."""
    from sglang_moe_lb.plugin import manifest
    from sglang_moe_lb.plugin.hooks import _ORIGINALS

    rt, _, _ = ready(rank0, name)
    want = {h.target for h in manifest.hooks_for("light")}
    want |= {h.target for h in manifest.hooks_for("forward", rt.opts.mode, rt.rank_invariant)}
    assert set(_ORIGINALS) == want
    assert ("sglang.srt.eplb.eplb_manager.EPLBManager.rebalance" in want) == rt.mode.plan


def test_padded_rows_stay_padding(rank0):
    """Rows past num_token_non_padded (CUDA-graph padding) neither count nor get a copy."""
    from sglang.srt.eplb import expert_location_dispatch as eld
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    rt, md, _ = ready(rank0, "lplb/per-batch/global/tokens")
    ids = logical_batch(64, seed=3)
    info = eld.ExpertLocationDispatchInfo.init_new(1)
    n = torch.tensor(50)
    with forward_context(ForwardContext(attn_backend=None, moe_num_token_non_padded=lambda: n)):
        phys = eld.topk_ids_logical_to_physical(ids, info)
    assert bool((phys[50:] == -1).all())
    got = torch.bincount(phys[:50].reshape(-1).long(), minlength=md.num_physical_experts)
    assert torch.equal(got, expected_quotas(rt, 1, ids[:50]))


def _overheads(tmp_path, collective_us: float, hot_us: float) -> str:
    path = tmp_path / "overheads.json"
    path.write_text(json.dumps({
        "format": "sglang-moe-lb-overheads/1", "gpu": "test", "kernels_version": "test", "date": "test",
        "hot_path_us": {"lplb/per-batch": {"1": hot_us, "65536": hot_us}},
        "collective_us": {"intra_node": collective_us, "inter_node": collective_us, "ranks_per_node": 8},
    }))
    return str(path)


def test_gate_closed_runs_sglangs_own_mapping(rank0, tmp_path):
    """No a2a backend: the gate decides on ceil(rows / EP) (the same on every rank); closed, the
    ids are exactly SGLang's own (deterministic, rank-invariant) dynamic pick."""
    from sglang.srt.eplb import expert_location_dispatch as eld

    from sglang_moe_lb.gate import uniform_layer_time
    from sglang_moe_lb.plugin.hooks import _ORIGINALS

    cm = tiny_cost()
    S = (E + 4) // 4
    lo, hi = uniform_layer_time(cm, 25, K, S), uniform_layer_time(cm, 400, K, S)
    assert lo < hi  # one tile per copy at 25 tokens per rank, several at 400
    hot = (lo + hi) / 2  # expected gain 1.0: open where the modelled layer time beats the hot path
    rt, md, _ = ready(rank0, "lplb/per-batch/global/tokens/gate", "--moe-lb-overheads", _overheads(tmp_path, 0.0, hot),
                      "--moe-lb-expected-gain", "1")
    assert rt.gate is not None
    info = eld.ExpertLocationDispatchInfo.init_new(1)
    sglang_pick = _ORIGINALS["sglang.srt.eplb.expert_location_dispatch.topk_ids_logical_to_physical"][2]
    small, big = logical_batch(100, seed=1), logical_batch(1600, seed=2)  # 25 and 400 tokens per EP rank
    assert torch.equal(eld.topk_ids_logical_to_physical(small, info), sglang_pick(small, info))
    got = eld.topk_ids_logical_to_physical(big, info)
    assert not torch.equal(got, sglang_pick(big, info))
    q = torch.bincount(got.reshape(-1).long(), minlength=md.num_physical_experts)
    assert torch.equal(q, expected_quotas(rt, 1, big))


def test_gated_plan_runs_the_plan_closed_and_the_split_open(rank0, tmp_path):
    """The default schedule: where the gate is closed the plan's gather runs, where it opens the
    exact per-batch split (the same decision on every rank: from ceil(rows / EP))."""
    from sglang.srt.eplb import expert_location_dispatch as eld

    from sglang_moe_lb.gate import uniform_layer_time

    cm = tiny_cost()
    S = (E + 4) // 4
    hot = (uniform_layer_time(cm, 25, K, S) + uniform_layer_time(cm, 400, K, S)) / 2
    rt, md, _ = ready(rank0, "lplb/plan/global/tokens/gate", "--moe-lb-overheads", _overheads(tmp_path, 0.0, hot),
                      "--moe-lb-expected-gain", "1")
    info = eld.ExpertLocationDispatchInfo.init_new(1)
    small, big = logical_batch(100, seed=1), logical_batch(1600, seed=2)  # 25 and 400 tokens per EP rank
    assert torch.equal(eld.topk_ids_logical_to_physical(small, info), expected_plan_ids(rt, 1, small))
    q = torch.bincount(eld.topk_ids_logical_to_physical(big, info).reshape(-1).long(), minlength=md.num_physical_experts)
    assert torch.equal(q, expected_quotas(rt, 1, big))


def _compute_ops(calls: list[str]) -> list[str]:
    """The ops that launch device work (views and metadata ops launch nothing)."""
    views = ("aten.slice", "aten.view", "aten.select", "aten.expand", "aten.alias", "aten.unsqueeze",
             "aten.reshape", "aten._unsafe_view", "aten.detach", "aten.t.", "aten.as_strided")
    return [c for c in calls if not c.startswith(views)]


def test_a_plan_call_is_one_gather_like_sglang_static(rank0):
    """Per MoE layer, the plan path issues no more ATen work than SGLang's static dispatch (one
    indexing op; SGLang's adds a dtype cast), with no host sync, no collective, and no allocation
    but its output; the maps and hash slots it reads keep their addresses (what captured graphs
    replay)."""
    from sglang.srt.eplb import expert_location_dispatch as eld
    from sglang.srt.model_executor.model_runner_components import moe_ep_setup

    from sglang_moe_lb.plugin import comm
    from sglang_moe_lb.plugin.hooks import _ORIGINALS
    from sglang_moe_lb.plugin.runtime import get_runtime

    # SGLang's static dispatch needs an a2a backend (each rank routes its own tokens).
    name = "lplb/plan/local/tokens/gate"
    sa, md, mc = rank0(*mode_flags(BalanceMode.parse(name)), *DEEPEP4, "--ep-dispatch-algorithm", "static")
    moe_ep_setup.prepare_moe_topk(model=torch.nn.ModuleList([make_topk(layer, False) for layer in MOE_LAYERS]),
                                  model_config=mc)
    rt = get_runtime()
    assert not rt.rank_invariant and not rt.collective
    info = eld.ExpertLocationDispatchInfo.init_new(1)
    assert info.ep_dispatch_algorithm == "static"
    static = _ORIGINALS["sglang.srt.eplb.expert_location_dispatch.topk_ids_logical_to_physical"][2]
    ids = logical_batch(32, seed=4)
    eld.topk_ids_logical_to_physical(ids, info)  # warm-up (memos of the level and gate)
    before = storages([rt.layers[1].maps, rt.offsets])
    gathers = []
    real = comm.all_gather_rows
    comm.all_gather_rows = lambda *a, **k: gathers.append(1) or real(*a, **k)
    try:
        with TorchOps() as ours:
            out = eld.topk_ids_logical_to_physical(ids, info)
        with TorchOps() as theirs:
            static(ids, info)
    finally:
        comm.all_gather_rows = real
    assert not gathers and not ours.syncs
    # SGLang's gather: index + a dtype cast (its map is int64, topk ids int32); ours: the index alone
    assert _compute_ops(ours.calls) == ["aten.index.Tensor"], ours.calls
    assert _compute_ops(theirs.calls)[0] == "aten.index.Tensor" and len(_compute_ops(theirs.calls)) >= 1
    assert len(ours.allocs) == 1 <= len(theirs.allocs)  # the output ids only
    assert storages([rt.layers[1].maps, rt.offsets]) == before
    level = level_index(rt.levels, ids.shape[0])  # a2a without DP attention: this rank's rows
    want = apply_plan(rt.layers[1].maps[level], ids, hash_offsets(ids.shape[0], K, rt.hash_slots, salt=rt.ep.rank))
    assert torch.equal(out, want)


def test_the_waterfill_decision_lives_on_its_layer(rank0, caplog):
    """Joint per-batch split: the dispatch hook leaves the shared ranks of the split on that
    layer's state (no other layer's), the TopK Waterfill hook takes them once; a miss keeps the
    shared expert home with one warning, and ``HOME`` (gate closed) keeps it home silently."""
    import logging

    from sglang.srt.eplb import expert_location_dispatch as eld

    from sglang_moe_lb.plugin.layers import HOME

    rt, md, _ = ready(rank0, "waterfill+lplb/per-batch/local/tokens/all_rank")
    ids = logical_batch(12, seed=9)
    phys = eld.topk_ids_logical_to_physical(ids, eld.ExpertLocationDispatchInfo.init_new(1))
    st1, st2 = rt.layers[1], rt.layers[2]
    want = balance_layer(st1.placement, ids, rt.mode, source_rank=rt.ep.rank).shared_rank
    assert isinstance(st1.pending_shared, torch.Tensor) and st2.pending_shared is None
    assert torch.equal(rt.shared_ranks(1, phys), want) and st1.pending_shared is None
    home = torch.full((12,), rt.ep.rank, dtype=torch.long)
    log = logging.getLogger("sglang_moe_lb.plugin")  # SGLang's logging setup may stop propagation
    log.addHandler(caplog.handler)
    try:
        assert torch.equal(rt.shared_ranks(1, phys), home)  # taken already: a miss
        assert torch.equal(rt.shared_ranks(1, phys), home)
        st2.pending_shared = HOME
        assert torch.equal(rt.shared_ranks(2, phys), home) and st2.pending_shared is None
    finally:
        log.removeHandler(caplog.handler)
    assert sum("no Waterfill decision" in r.getMessage() for r in caplog.records) == 1
