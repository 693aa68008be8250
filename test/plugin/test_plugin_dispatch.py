"""The dispatcher and ``TopK`` forward in each mode, single process (EP rank 0 of a simulated 4-rank group).

Without an a2a backend every rank sees every token, so LPLB needs no collective and the
counts it sees are global: the physical ids must meet the quotas exactly. Waterfill needs
DeepEP (not importable on CPU; only its layout matters here) and runs ``static`` here;
the dynamic modes are covered by ``test_plugin_multiprocess.py``.
"""

from __future__ import annotations

import pytest
import torch
from plugin_helpers import E, K, make_topk

from sglang_moe_lb import Placement, balance_layer, fractions_to_split, integer_quotas, solve_split

LPLB_EP4 = ["--tp", "4", "--ep-size", "4", "--ep-num-redundant-experts", "4", "--enable-eplb"]
DEEPEP4 = ["--tp", "4", "--moe-a2a-backend", "deepep", "--ep-num-redundant-experts", "4", "--enable-eplb"]
MOE_LAYERS = (1, 2, 3)  # tiny_dsv3: layer 0 is dense

MODES = {
    "lplb/rebalance-only": ["--moe-lb", "lplb", *LPLB_EP4],
    "lplb/per-batch": ["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "per-batch", *LPLB_EP4],
    "waterfill/static/conservative": ["--moe-lb", "waterfill", *DEEPEP4],
    "waterfill/static/all_rank": ["--moe-lb", "waterfill", "--moe-lb-waterfill-candidates", "all_rank", *DEEPEP4],
    "waterfill+lplb/rebalance-only": ["--moe-lb", "waterfill+lplb", *DEEPEP4],
}


def logical_batch(n: int, seed: int) -> torch.Tensor:
    """``[n, K]`` distinct logical experts per token, skewed towards a few hot experts."""
    g = torch.Generator().manual_seed(seed)
    w = torch.linspace(4.0, 0.5, E)
    return torch.stack([torch.multinomial(w, K, replacement=False, generator=g) for _ in range(n)]).to(torch.int32)


def expected_quotas(rt, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The core's quotas for this batch (``joint.balance_layer`` is the oracle of the wiring)."""
    plan = rt.plans[layer]
    lplb = "per_batch" if rt.opts.per_batch else "table"
    quotas = balance_layer(plan.placement, ids, lplb=lplb, split_table=plan.table).quotas
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    if lplb == "per_batch":
        assert torch.equal(quotas, integer_quotas(plan.placement, solve_split(plan.placement, counts), counts))
    else:  # the installed table, rounded
        frac = fractions_to_split(plan.placement, plan.table, counts)
        assert bool(((quotas - frac).abs() < 1).all())
    return quotas


def ready(rank0, mode: str, topks=()):
    """Publish ``mode`` as rank 0, build the metadata, run SGLang's prepare_moe_topk."""
    from sglang.srt.model_executor.model_runner_components import moe_ep_setup

    from sglang_moe_lb.plugin.runtime import get_runtime

    sa, md, mc = rank0(*MODES[mode])
    topks = list(topks) or [make_topk(layer, waterfill=sa._moe_lb.waterfill) for layer in MOE_LAYERS]
    moe_ep_setup.prepare_moe_topk(model=torch.nn.ModuleList(topks), model_config=mc)
    rt = get_runtime()
    assert rt is not None and rt.attached
    return rt, md, topks


@pytest.mark.parametrize("mode", ["lplb/rebalance-only", "lplb/per-batch"])
def test_dispatcher_maps_back_and_meets_quotas(rank0, mode):
    from sglang.srt.eplb import expert_location_dispatch as eld

    rt, md, _ = ready(rank0, mode)
    for layer in MOE_LAYERS:
        pl = rt.plans[layer].placement
        assert pl.has_replicas
        assert torch.equal(pl.phy2log[0].cpu(), md.physical_to_logical_map_cpu[layer])
        info = eld.ExpertLocationDispatchInfo.init_new(layer)
        assert info.rank_invariant and info._moe_lb_layer == layer
        ids = logical_batch(200, seed=layer)
        phys = eld.topk_ids_logical_to_physical(ids, info)
        assert phys.shape == ids.shape and phys.dtype == ids.dtype
        assert torch.equal(md.physical_to_logical_map[layer][phys.long()], ids.long()), "a token changed expert"
        got = torch.bincount(phys.reshape(-1).long(), minlength=md.num_physical_experts)
        assert torch.equal(got, expected_quotas(rt, layer, ids)), "quotas not met"
        # Deterministic: a second call gives the same ids (rank invariance needs this).
        assert torch.equal(eld.topk_ids_logical_to_physical(ids, info), phys)


def test_rebalance_only_table_beats_even_split_on_its_window(rank0):
    """Start-up tables come from the scenario LP over the --init-expert-location window."""
    from plugin_helpers import window

    from sglang_moe_lb.lp_split import scenario_split

    rt, md, _ = ready(rank0, "lplb/rebalance-only")
    win = window(0)
    for layer in MOE_LAYERS:
        plan = rt.plans[layer]
        assert plan.source == "startup-scenario"
        pl = Placement(md.physical_to_logical_map_cpu[layer], rt.num_ranks, E)
        assert torch.allclose(plan.table.cpu(), scenario_split(pl, win[:, layer].double()))


def _unfuse(fused: torch.Tensor, S: int) -> torch.Tensor:
    return fused - torch.div(fused, S + 1, rounding_mode="floor")


@pytest.mark.parametrize("mode", list(MODES))
def test_topk_forward_shapes_and_layout(rank0, mode):
    rt, md, topks = ready(rank0, mode)
    S, R = rt.slots_per_rank, rt.num_ranks
    T = 40
    for tk in topks:
        layer = tk.layer_id
        g = torch.Generator().manual_seed(100 + layer)
        logits = torch.randn(T, E, generator=g)
        out = tk.forward_native(torch.randn(T, 64, generator=g), logits)
        want_logical = torch.topk(torch.softmax(logits, -1), K, dim=-1).indices.sort(-1).values
        p2l = md.physical_to_logical_map[layer]
        if not rt.opts.waterfill:
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
        if rt.opts.waterfill_candidates == "conservative":
            visited = routed // (S + 1)
            ok = (shared_rank == rt.ep.rank) | (visited == shared_rank[:, None]).any(1)
            assert bool(ok.all()), "conservative Waterfill picked a rank the token does not visit"
        assert torch.allclose(out.topk_weights[:, K], torch.full((T,), 1 / 2.5))
        if rt.opts.lplb:  # table dispatch under the Waterfill columns
            assert torch.equal(p2l[_unfuse(routed, S)].long().sort(-1).values, want_logical)


def test_waterfill_static_balances_against_local_loads(rank0):
    """Static Waterfill is never worse than always-local for this rank's own tokens."""
    from sglang_moe_lb import routed_rank_load

    rt, md, topks = ready(rank0, "waterfill/static/all_rank")
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
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import prepare_server_args

    from plugin_helpers import base_argv
    from sglang_moe_lb.plugin.hooks import _ORIGINALS, LIGHT_HOOKS
    from sglang_moe_lb.plugin.runtime import get_runtime

    sa = prepare_server_args(base_argv(*LPLB_EP4))
    sa.resolve_once()
    publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0))
    assert get_runtime() is None
    assert set(_ORIGINALS) == {t for t, _, _ in LIGHT_HOOKS}


def test_padded_rows_stay_padding(rank0):
    """Rows past num_token_non_padded (CUDA-graph padding) neither count nor get a copy."""
    from sglang.srt.eplb import expert_location_dispatch as eld
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    rt, md, _ = ready(rank0, "lplb/per-batch")
    ids = logical_batch(64, seed=3)
    info = eld.ExpertLocationDispatchInfo.init_new(1)
    n = torch.tensor(50)
    with forward_context(ForwardContext(attn_backend=None, moe_num_token_non_padded=lambda: n)):
        phys = eld.topk_ids_logical_to_physical(ids, info)
    assert bool((phys[50:] == -1).all())
    got = torch.bincount(phys[:50].reshape(-1).long(), minlength=md.num_physical_experts)
    assert torch.equal(got, expected_quotas(rt, 1, ids[:50]))
