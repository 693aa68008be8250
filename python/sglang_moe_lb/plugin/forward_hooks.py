"""The forward-path hooks: thin translations from SGLang's calls into the ``Runtime``.

Which SGLang target each one hooks, its hook type and when it is installed:
``manifest.HOOKS`` (stage ``forward``); ``hooks.install_runtime_hooks`` registers them.
"""

from __future__ import annotations

import logging

import torch

from ..plan import plan_cadence
from . import hot_path
from .runtime import call_capacity, fusion_off_error, gate_summary, get_runtime, plan_summary

__all__ = [
    "tag_dispatch_info",
    "logical_to_physical",
    "empty_topk_output",
    "dispatcher_net",
    "after_prepare_moe_topk",
    "after_metadata_update",
    "after_set_global_metadata",
    "around_init_by_eplb",
    "after_rebalance_experts",
    "around_rebalance",
    "after_forward_pass_end",
    "recent_logical_counts",
]

logger = logging.getLogger("sglang_moe_lb.plugin")


def _arg(args, kwargs, index: int, name: str, default=None):
    """An argument of the hooked call, whether it came positionally or by keyword."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def tag_dispatch_info(result, cls, *args, **kwargs):
    """``ExpertLocationDispatchInfo.init_new``: remember which layer the info is for."""
    if result is not None:
        result._moe_lb_layer = int(_arg(args, kwargs, 0, "layer_id"))
    return result


@torch.compiler.disable
def logical_to_physical(orig, *args, **kwargs):
    """``topk_ids_logical_to_physical``: LPLB's physical ids instead of SGLang's pick.

    SGLang calls this inside a ``torch.compile``d helper on CUDA; it runs eagerly (a graph
    break), so the compiled code neither traces the plugin nor guards on the layer id.
    """
    topk_ids = _arg(args, kwargs, 0, "topk_ids")
    info = _arg(args, kwargs, 1, "info")
    layer = getattr(info, "_moe_lb_layer", None) if info is not None else None
    rt = get_runtime()
    if rt is not None and layer is not None and _arg(args, kwargs, 2, "log2phy_prob") is None:
        out = rt.dispatch(layer, topk_ids)
        if out is not None:
            return out
    return orig(*args, **kwargs)


def empty_topk_output(orig, topk, *args, **kwargs):
    """``TopK.empty_topk_output``: an idle rank joins the layer's collective."""
    rt = get_runtime()
    if rt is not None and not topk.is_draft:
        rt.join_empty(topk.layer_id, _arg(args, kwargs, 0, "device"))
    return orig(topk, *args, **kwargs)


def dispatcher_net(dispatcher, *args, **kwargs):
    """``DeepEPDispatcher.dispatch_a``: join the layer's collective if TopK was skipped here."""
    rt = get_runtime()
    layer = getattr(dispatcher, "_moe_lb_layer", None)
    if rt is not None and layer is not None:
        topk_output = _arg(args, kwargs, 1, "topk_output")
        ids = getattr(topk_output, "topk_ids", None)
        rt.ensure_joined(layer, ids.device if ids is not None else rt.device)
    return None


def _top_k(model, model_config) -> int:
    """Routed experts per token: the model config's ``num_experts_per_tok``, else a TopK's."""
    hf = getattr(model_config, "hf_config", None)
    k = getattr(hf, "num_experts_per_tok", None)
    if isinstance(k, int) and k > 0:
        return k
    if model is None:
        return 0
    for module in _topks(model):
        cfg = getattr(module, "topk_config", None)
        if cfg is not None:
            return int(cfg.top_k - getattr(cfg, "num_shared_topk_slots", 0))
    return 1


def after_prepare_moe_topk(result, *args, model=None, model_config=None, **kwargs):
    """``prepare_moe_topk`` (model loaded, before CUDA graphs): layer paths, balancers, tags."""
    rt = get_runtime()
    if rt is None or model is None:
        return result
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    md = get_global_expert_location_metadata()
    if md is None:
        return result
    cap, why = call_capacity(rt.rank_invariant)
    rt.configure(topk=_top_k(model, model_config), max_tokens=cap, model_config=model_config)
    rt.moe_layers |= {m.layer_id for m in _topks(model)}
    rt.attach_metadata(md)
    if rt.rebalancer is not None:
        _configure_plans(rt)
        rt.rebalancer.startup()
    if rt.mode.waterfill is not None:
        _install_waterfill(rt, model)
    if rt.collective:
        _tag_dispatchers(model)
    logger.info("[moe-lb] ready: %s, %d layers, %d ranks x %d slots, per-batch path %s, %d rows per call (%s)%s%s",
                rt.opts.describe(), len(rt.layers), rt.num_ranks, rt.slots_per_rank,
                hot_path.impl_name(rt.device or "cpu", rt.mode), cap, why, gate_summary(rt), plan_summary(rt))
    return result


def _configure_plans(rt) -> None:
    """The plan cycle's cadence from the options and SGLang's EPLB settings, and its counts reader."""
    from sglang.srt.runtime_context import get_exec

    moe = get_exec().moe
    p = rt.opts.plan
    every = int(getattr(moe, "eplb_rebalance_num_iterations", 0) or 0) if getattr(moe, "enable_eplb", False) else 0
    refresh, window = plan_cadence(every, p.refresh_passes, p.window_passes)
    rt.rebalancer.counts_source = lambda passes: recent_logical_counts(rt, passes)
    rt.rebalancer.configure(refresh_passes=refresh, window_passes=window, timeout_s=p.timeout_s, solver=p.solver)


def recent_logical_counts(rt, passes: int) -> torch.Tensor | None:
    """The last ``passes`` forward passes of SGLang's recorder, per logical expert, summed over the
    EP group: ``[L, E]`` float64 on the CPU, or None (no stat recorder running: refresh is off).

    Reads the recorder's ring of per-pass physical counts (``_StatAccumulator``), maps physical
    slots to logical experts with the placement being served, and, with an a2a backend (each
    rank counts only its own tokens), all-reduces the sum over the group: one collective per
    refresh, at a pass boundary every rank reaches together (as EPLB's own dump does)."""
    from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder

    rec = get_global_expert_distribution_recorder()
    buf = getattr(getattr(rec, "_accumulator", None), "_global_physical_count_of_buffered_step", None)
    if buf is None or not getattr(rec, "recording", False):
        rt.warn_once("no-recorder", "plan refresh needs SGLang's expert-distribution recorder in stat mode, "
                     "recording (--enable-eplb sets it up); plans refresh only at rebalance")
        return None
    data = buf._buffer
    if hasattr(buf, "_curr_index"):  # circular: the last `passes` rows before the write index
        idx = (torch.arange(-passes, 0) + int(buf._curr_index)) % data.shape[0]
        recent = data[idx.to(data.device)]
    else:
        size = int(getattr(buf, "_size", data.shape[0]))
        recent = data[max(0, size - passes):size]
    phys = recent.sum(0).to(torch.long)  # [L, P]
    logical = torch.zeros(phys.shape[0], rt.num_logical, dtype=torch.long, device=phys.device)
    for layer, st in rt.layers.items():
        logical[layer].scatter_add_(0, st.placement.phy2log[0].to(phys.device), phys[layer])
    if not rt.rank_invariant:
        import torch.distributed as dist

        dist.all_reduce(logical, op=dist.ReduceOp.SUM)
    return logical.to("cpu", torch.float64)


def _topks(model):
    """The model's non-draft TopK/HashTopK modules."""
    from sglang.srt.layers.moe.hash_topk import HashTopK
    from sglang.srt.layers.moe.topk import TopK

    for module in model.modules():
        if isinstance(module, (TopK, HashTopK)) and not getattr(module, "is_draft", False):
            yield module


def _install_waterfill(rt, model) -> None:
    from .waterfill_balancer import MoeLbWaterfill

    for module in _topks(model):
        if module.layer_id not in rt.layers:
            continue
        if not module.enable_waterfill:
            # SGLang built this model without the fused slot (fusion turned off for it).
            raise fusion_off_error(rt.opts.mode)
        if not isinstance(module.waterfill_balancer, MoeLbWaterfill):
            module.waterfill_balancer = MoeLbWaterfill(rt, module.layer_id, _shared_weight(module))


def _shared_weight(module) -> float:
    """The shared slot's weight SGLang chose for this router (its balancer carries it)."""
    upstream = getattr(module, "waterfill_balancer", None)
    if upstream is not None and hasattr(upstream, "shared_weight"):
        return float(upstream.shared_weight)
    from sglang.srt.layers.moe.topk import fused_shared_expert_weight, is_routed_scaling_factor_fused_in_topk

    cfg = getattr(module, "topk_config", None)
    if cfg is not None:
        return fused_shared_expert_weight(routed_scaling_factor=cfg.routed_scaling_factor,
                                          fused_in_topk=is_routed_scaling_factor_fused_in_topk(cfg))
    return fused_shared_expert_weight(routed_scaling_factor=getattr(module, "routed_scaling_factor", None),
                                      fused_in_topk=bool(getattr(module, "apply_routed_scaling_factor_on_output", False)))


def _tag_dispatchers(model) -> None:
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPDispatcher

    for module in model.modules():
        layer = getattr(module, "layer_id", None)
        if not isinstance(layer, int):
            continue
        for name in ("dispatcher", "deepep_dispatcher"):
            d = getattr(module, name, None)
            for inner in getattr(d, "_inners", [d]):
                if isinstance(inner, DeepEPDispatcher):
                    inner._moe_lb_layer = layer


def after_metadata_update(result, metadata, *args, **kwargs):
    """``ExpertLocationMetadata.update``: follow SGLang's new placement layer by layer."""
    update_layer_ids = _arg(args, kwargs, 1, "update_layer_ids") or []
    rt = get_runtime()
    if rt is None or not rt.attached:
        return result
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    if metadata is get_global_expert_location_metadata():
        for layer in update_layer_ids:
            rt.set_placement(int(layer), metadata.physical_to_logical_map_cpu[int(layer)])
    return result


def after_set_global_metadata(result, *args, **kwargs):
    """``set_global_expert_location_metadata``: a new metadata object (elastic EP, reload)."""
    value = _arg(args, kwargs, 0, "value")
    rt = get_runtime()
    if rt is not None and rt.attached and value is not None:
        rt.attach_metadata(value)
    return result


def around_init_by_eplb(orig, *args, **kwargs):
    """``ExpertLocationMetadata.init_by_eplb``: a placement computed from a recorded window.

    The model config is kept for the call (the decode-aware post-step on ``rebalance_experts``
    needs its expert shape and top-k, also at start-up, before the model is loaded)."""
    rt = get_runtime()
    if rt is None or rt.rebalancer is None:
        return orig(*args, **kwargs)
    rt.eplb_model_config = _arg(args, kwargs, 0, "model_config")
    try:
        result = orig(*args, **kwargs)
    finally:
        rt.eplb_model_config = None
    rt.rebalancer.on_new_placement(result, _arg(args, kwargs, 1, "logical_count"))
    return result


def after_rebalance_experts(result, *args, **kwargs):
    """``eplb_algorithms.rebalance_experts``: with ``--moe-lb-placement decode`` (or ``auto`` at
    enough EP ranks), EPLB's placement after the decode-aware post-step (same replica counts;
    ``decode_placement``)."""
    rt = get_runtime()
    if rt is None or not rt.mode.plan or result is None:
        return result
    from ..decode_placement import decode_aware_placement, logical_to_all_physical, resolve_placement
    from .runtime import cost_model_for

    P = int(_arg(args, kwargs, 1, "num_physical_experts"))
    ranks = P // int(_arg(args, kwargs, 2, "num_local_physical_experts"))
    if resolve_placement(rt.opts.plan.placement, ranks) != "decode":
        return result
    model_config = rt.model_config if rt.model_config is not None else getattr(rt, "eplb_model_config", None)
    window = _arg(args, kwargs, 0, "tokens_per_expert")
    cost = rt.cost if rt.cost is not None else (cost_model_for(rt.opts, model_config) if model_config is not None else None)
    top_k = rt.topk or _top_k(None, model_config)
    if cost is None or not top_k:
        rt.warn_once("decode-placement", "--moe-lb-placement decode: no model config at this rebalance; "
                     "keeping EPLB's placement")
        return result
    p2l, l2p, count = result
    ours = decode_aware_placement(p2l, window.to("cpu"), ranks, top_k=top_k, cost=cost).to(p2l)
    new_l2p = logical_to_all_physical(ours, l2p.shape[1])
    pad = torch.full_like(l2p, -1, device="cpu")
    pad[..., : new_l2p.shape[2]] = new_l2p[..., : pad.shape[2]]
    return ours, pad.to(l2p), count


def around_rebalance(orig, manager, *args, **kwargs):
    """``EPLBManager.rebalance`` (a generator): bracket it so the plans install after it."""
    rt = get_runtime()
    reb = rt.rebalancer if rt is not None else None
    if reb is not None:
        reb.begin()
    try:
        result = yield from orig(manager, *args, **kwargs)
    finally:
        if reb is not None:
            reb.end()
    return result


def after_forward_pass_end(result, manager, *args, **kwargs):
    """``EPLBManager.on_forward_pass_end``: the pass boundary every rank shares."""
    rt = get_runtime()
    if rt is not None and rt.rebalancer is not None:
        rt.rebalancer.on_forward_pass_end()
    return result
