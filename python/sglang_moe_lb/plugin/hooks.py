"""Every SGLang target the plugin hooks, the hooks themselves, and how they are (un)installed.

Two stages. ``register()`` (the entry point) adds only the argument hooks, whose targets
(``sglang.srt.server_args``, ``sglang.srt.runtime_context``) every SGLang process imports
anyway. The forward-path hooks are registered and applied when a scheduler process
publishes a configuration with ``--moe-lb`` on (``activate_in_scheduler``), and only those the
chosen mode needs: with the flag off nothing on the forward path is touched, and no process
imports MoE or DeepEP modules on our account. ``HookRegistry.apply_hooks()`` is idempotent,
and we check afterwards that each of our hooks really sits on its target (the registry skips
a target another plugin already patched).

Forward-path targets (SGLang 0.5.23), each a thin translation into ``Runtime``:

=====================================================================  =======  ===================================
target                                                                 type     when
=====================================================================  =======  ===================================
sglang.srt.eplb.expert_location_dispatch.ExpertLocationDispatchInfo     AFTER    any mode: tags the info with its
  .init_new                                                                      layer id
sglang.srt.eplb.expert_location_dispatch.topk_ids_logical_to_physical  AROUND   LPLB: our split -> physical ids
sglang.srt.layers.moe.topk.TopK.empty_topk_output                      AROUND   per-batch LPLB: idle rank joins
sglang.srt.model_executor.model_runner_components.moe_ep_setup         AFTER    any mode: plans, Waterfill
  .prepare_moe_topk                                                              balancers, dispatcher tags
sglang.srt.layers.moe.token_dispatcher.deepep.DeepEPDispatcher          BEFORE   modes with a collective: safety
  .dispatch_a                                                                    net for idle ranks
sglang.srt.eplb.expert_location.ExpertLocationMetadata.update          AFTER    any mode: follow placements
sglang.srt.eplb.expert_location.set_global_expert_location_metadata    AFTER    any mode: metadata replaced
sglang.srt.eplb.expert_location.ExpertLocationMetadata.init_by_eplb    AFTER    LPLB tables: window + new placement
sglang.srt.eplb.eplb_manager.EPLBManager.rebalance                     AROUND   LPLB tables: rebalance begin/end
sglang.srt.eplb.eplb_manager.EPLBManager.on_forward_pass_end           AFTER    LPLB tables: install point
=====================================================================  =======  ===================================
"""

from __future__ import annotations

import logging
import pkgutil
import sys
import types

import torch

from . import cli_hooks
from .options import ERRORS, MoeLbConfigError, MoeLbOptions
from .runtime import activate, deactivate, fusion_off_error, get_runtime

__all__ = ["LIGHT_HOOKS", "register_light_hooks", "activate_in_scheduler", "runtime_hook_specs",
           "install_runtime_hooks", "uninstall"]

logger = logging.getLogger("sglang_moe_lb.plugin")

_ELD = "sglang.srt.eplb.expert_location_dispatch"
_EL = "sglang.srt.eplb.expert_location"
_EPLB = "sglang.srt.eplb.eplb_manager.EPLBManager"


def _hook_type(name: str):
    from sglang.srt.plugins.hook_registry import HookType

    return getattr(HookType, name)


# ---------------------------------------------------------------------------------------------
# Forward-path hooks (thin: read SGLang objects, call the runtime)
# ---------------------------------------------------------------------------------------------
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
    """``TopK.empty_topk_output``: an idle rank joins the layer's per-batch collective."""
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


def after_prepare_moe_topk(result, *args, model=None, model_config=None, **kwargs):
    """``prepare_moe_topk`` (model loaded, before CUDA graphs): plans, balancers, tags."""
    rt = get_runtime()
    if rt is None or model is None:
        return result
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    md = get_global_expert_location_metadata()
    if md is None:
        return result
    rt.attach_metadata(md)
    rt.moe_layers |= _moe_layers(model, rt)
    if rt.rebalancer is not None:
        rt.rebalancer.startup()
    if rt.opts.waterfill:
        _install_waterfill(rt, model)
    if rt.collective_per_layer:
        _tag_dispatchers(model)
    logger.info("[moe-lb] ready: %s, %d layers, %d ranks x %d slots, hot path %s", rt.opts.describe(),
                len(rt.plans), rt.num_ranks, rt.slots_per_rank, _hot_path_name(rt))
    return result


def _hot_path_name(rt) -> str:
    from . import hot_path

    return hot_path.impl(rt.device or "cpu").name


def _target_topks(model, rt):
    """The model's non-draft TopK/HashTopK modules of layers we hold a plan for."""
    from sglang.srt.layers.moe.hash_topk import HashTopK
    from sglang.srt.layers.moe.topk import TopK

    for module in model.modules():
        if isinstance(module, (TopK, HashTopK)) and not getattr(module, "is_draft", False):
            if module.layer_id in rt.plans:
                yield module


def _moe_layers(model, rt) -> set[int]:
    return {m.layer_id for m in _target_topks(model, rt)}


def _install_waterfill(rt, model) -> None:
    from .waterfill_balancer import MoeLbWaterfill

    targets = list(_target_topks(model, rt))
    for module in targets:
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


def after_init_by_eplb(result, *args, **kwargs):
    """``ExpertLocationMetadata.init_by_eplb``: a placement computed from a recorded window."""
    rt = get_runtime()
    if rt is None or rt.rebalancer is None:
        return result
    logical_count = _arg(args, kwargs, 1, "logical_count")
    rt.rebalancer.on_new_placement(result, logical_count)
    return result


def around_rebalance(orig, manager, *args, **kwargs):
    """``EPLBManager.rebalance`` (a generator): bracket it so the tables install after it."""
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
        rt.rebalancer.tick()
    return result


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
LIGHT_HOOKS = (
    ("sglang.srt.server_args.ServerArgs.add_cli_args", cli_hooks.after_add_cli_args, "AFTER"),
    ("sglang.srt.server_args.ServerArgs.from_cli_args", cli_hooks.after_from_cli_args, "AFTER"),
    ("sglang.srt.server_args.ServerArgs.resolve_once", cli_hooks.after_resolve_once, "AFTER"),
    ("sglang.srt.runtime_context.publish", cli_hooks.after_publish, "AFTER"),
)


def runtime_hook_specs(opts: MoeLbOptions, *, rank_invariant: bool) -> list[tuple]:
    """The forward-path hooks ``opts`` needs (see the table in the module docstring)."""
    specs = [
        (f"{_ELD}.ExpertLocationDispatchInfo.init_new", tag_dispatch_info, "AFTER"),
        ("sglang.srt.model_executor.model_runner_components.moe_ep_setup.prepare_moe_topk",
         after_prepare_moe_topk, "AFTER"),
        (f"{_EL}.ExpertLocationMetadata.update", after_metadata_update, "AFTER"),
        (f"{_EL}.set_global_expert_location_metadata", after_set_global_metadata, "AFTER"),
    ]
    if opts.lplb:
        specs.append((f"{_ELD}.topk_ids_logical_to_physical", logical_to_physical, "AROUND"))
    if opts.per_batch:
        specs.append(("sglang.srt.layers.moe.topk.TopK.empty_topk_output", empty_topk_output, "AROUND"))
    if (opts.per_batch and not rank_invariant) or opts.dynamic_waterfill:
        specs.append(("sglang.srt.layers.moe.token_dispatcher.deepep.DeepEPDispatcher.dispatch_a",
                      dispatcher_net, "BEFORE"))
    if opts.lplb and not opts.per_batch:
        specs += [
            (f"{_EL}.ExpertLocationMetadata.init_by_eplb", after_init_by_eplb, "AFTER"),
            (f"{_EPLB}.rebalance", around_rebalance, "AROUND"),
            (f"{_EPLB}.on_forward_pass_end", after_forward_pass_end, "AFTER"),
        ]
    return specs


# target -> (owner, attribute, raw attribute before we patched it, our hook)
_ORIGINALS: dict[str, tuple] = {}


def _resolve(target: str):
    owner_path, attr = target.rsplit(".", 1)
    owner = pkgutil.resolve_name(owner_path)
    raw = owner.__dict__[attr] if isinstance(owner, type) and attr in owner.__dict__ else getattr(owner, attr)
    return owner, attr, raw


def _source():
    from sglang.srt.plugins.hook_registry import HookSource

    return HookSource(plugin_name="moe_lb", dist_name="sglang-moe-lb")


def _register(specs) -> list[tuple]:
    from sglang.srt.plugins.hook_registry import HookRegistry

    fresh = []
    for target, fn, kind in specs:
        if target in _ORIGINALS:
            continue
        owner, attr, raw = _resolve(target)
        _ORIGINALS[target] = (owner, attr, raw, fn)
        HookRegistry.register(target, fn, _hook_type(kind), source=_source())
        fresh.append((target, fn, kind))
    return fresh


def register_light_hooks() -> None:
    _register(LIGHT_HOOKS)


def _fn_of(obj):
    return obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj


def _installed(target: str, fn) -> bool:
    """Whether ``fn`` is in the wrapper chain now sitting on ``target``."""
    cur = _fn_of(_resolve(target)[2])
    seen = 0
    while cur is not None and seen < 64:
        for cell in getattr(cur, "__closure__", None) or ():
            try:
                if cell.cell_contents is fn:
                    return True
            except ValueError:
                pass
        cur = getattr(cur, "__wrapped__", None)
        seen += 1
    return False


def install_runtime_hooks(opts: MoeLbOptions, *, rank_invariant: bool) -> None:
    """Register + apply the forward-path hooks for ``opts``; fail loudly if one did not land."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    specs = runtime_hook_specs(opts, rank_invariant=rank_invariant)
    _register(specs)
    HookRegistry.apply_hooks()
    missing = [t for t, fn, _ in specs if not _installed(t, fn)]
    if missing:
        raise MoeLbConfigError(ERRORS["hook_conflict"].format(mode=opts.mode, targets=", ".join(missing)))


def activate_in_scheduler(server_args, opts: MoeLbOptions) -> None:
    """Scheduler start-up: create the runtime and hook the forward path."""
    from sglang.srt.runtime_context import get_exec

    from .rebalance import Rebalancer

    rank_invariant = get_exec().moe.moe_a2a_backend == "none"
    rt = activate(opts, rank_invariant=rank_invariant)
    if opts.lplb and not opts.per_batch and rt.rebalancer is None:
        Rebalancer(rt)
    install_runtime_hooks(opts, rank_invariant=rank_invariant)


def uninstall() -> None:
    """Put every SGLang attribute we patched back, forget our hooks, drop the runtime.

    ``HookRegistry.reset()`` alone does not undo patches; tests and engine restarts use this.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry

    for target, (owner, attr, raw, fn) in list(_ORIGINALS.items()):
        current = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        if current is not raw:
            setattr(owner, attr, raw)
            cur_fn, raw_fn = _fn_of(current), _fn_of(raw)
            if isinstance(cur_fn, types.FunctionType) and not isinstance(owner, type):
                for mod in list(sys.modules.values()):
                    if isinstance(mod, types.ModuleType) and mod is not owner:
                        try:
                            for name, val in list(vars(mod).items()):
                                if val is cur_fn:
                                    setattr(mod, name, raw_fn)
                        except TypeError:
                            pass
        HookRegistry._patched.discard(target)
        kept = [h for h in HookRegistry._hooks.get(target, []) if h[1] is not fn]
        if kept:
            HookRegistry._hooks[target] = kept
        else:
            HookRegistry._hooks.pop(target, None)
    _ORIGINALS.clear()
    deactivate()
