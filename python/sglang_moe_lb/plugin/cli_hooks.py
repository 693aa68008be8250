"""Hooks on SGLang's argument handling: the flag, its validation, its trip to the schedulers.

* ``ServerArgs.add_cli_args`` (AFTER): adds ``--moe-lb`` and sub-options to the parser.
* ``ServerArgs.from_cli_args`` (AFTER): reads them, runs the raw-value checks, stores the
  options as ``server_args._moe_lb`` (``ServerArgs`` is a sealed msgspec struct that drops
  unknown flags; a non-field underscore attribute survives pickling into every spawned
  scheduler), and sets the SGLang fields our modes build on: ``enable_waterfill`` (SGLang's
  fused shared-expert layout, which our balancer then drives) and, for LPLB,
  ``ep_dispatch_algorithm=dynamic`` when unset (so the expert-location dispatch path runs).
* ``ServerArgs.resolve_once`` (AFTER): checks that need the resolved configuration and the
  model's config (EP size, device and CUDA graphs, shared expert), in the launcher, before
  any process is spawned or any GPU is touched.
* ``runtime_context.publish`` (AFTER): in a scheduler process, activates the runtime and
  installs the forward-path hooks for the chosen mode (``hooks.install_runtime_hooks``).

A failed check prints ``<prog>: error: <message>`` and exits with status 2, like argparse.
"""

from __future__ import annotations

import logging
import sys

from .options import (
    MoeLbConfigError,
    MoeLbOptions,
    add_cli_flags,
    check_raw_args,
    check_resolved,
    options_from_namespace,
)

__all__ = ["after_add_cli_args", "after_from_cli_args", "after_resolve_once", "after_publish", "fail"]

logger = logging.getLogger("sglang_moe_lb.plugin")
PROG = "sglang serve"


def fail(err: Exception) -> None:
    """Exit like an argparse error: message on stderr, status 2."""
    print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def after_add_cli_args(result, parser, *args, **kwargs):
    add_cli_flags(parser)
    return result


def after_from_cli_args(result, cls, args, *rest, **kwargs):
    try:
        opts, warnings = check_raw_args(options_from_namespace(args), args)
    except MoeLbConfigError as err:
        fail(err)
    for w in warnings:
        logger.warning("[moe-lb] %s", w)
    if opts.waterfill:
        result.enable_waterfill = True
    if opts.lplb and result.ep_dispatch_algorithm is None:
        result.ep_dispatch_algorithm = "dynamic"
    result._moe_lb = opts
    if opts.active:
        logger.info("[moe-lb] %s", opts.describe())
    return result


def _shared_experts(hf_config) -> tuple[int | None, str]:
    """Shared experts per MoE layer from a HF config, or None when the config does not say."""
    for name in ("n_shared_experts", "num_shared_experts", "shared_expert_intermediate_size"):
        if hasattr(hf_config, name):
            val = getattr(hf_config, name)
            n = int(bool(val)) if name == "shared_expert_intermediate_size" else int(val or 0)
            return n, f"{name}={val}"
    return None, "no shared-expert field in the model config"


def _fusion_supported(arch: str) -> bool | None:
    """Whether SGLang's model class for ``arch`` can fuse its shared expert (None: unknown)."""
    try:
        from sglang.srt.models.registry import ModelRegistry

        cls, _ = ModelRegistry.resolve_model_cls([arch])
    except Exception:
        return None
    return bool(getattr(cls, "num_fusable_shared_experts", None) and getattr(cls, "shared_experts_fusion_disable_reason", None))


def resolved_view(server_args) -> dict:
    """The few resolved values ``check_resolved`` needs (model config read lazily, CPU only)."""
    from sglang.srt.arg_groups.overrides import resolving_view

    from . import hot_path

    v = resolving_view(server_args)
    cfg = getattr(v, "cuda_graph_config", None)  # resolved: one backend per phase
    phases = [getattr(cfg, name, None) for name in ("decode", "prefill")] if cfg is not None else []
    if phases and all(p is not None for p in phases):
        cuda_graph = any(p.backend != "disabled" for p in phases)
    else:
        cuda_graph = not bool(getattr(v, "disable_cuda_graph", False)) and (
            getattr(v, "cuda_graph_backend_decode", None) != "disabled"
            or getattr(v, "cuda_graph_backend_prefill", None) not in (None, "disabled")
        )
    view = {
        "ep_size": int(getattr(v, "ep_size", 1) or 1),
        "device": getattr(v, "device", None),
        "cuda_graph": cuda_graph,
        "graph_safe_kernels": hot_path.kernels_graph_safe(),
    }
    opts: MoeLbOptions = server_args._moe_lb
    if opts.waterfill:
        try:
            from sglang.srt.arg_groups.overrides import model_config_of

            hf = model_config_of(server_args).hf_config
        except Exception as err:  # config not readable here: leave it to the load-time check
            logger.debug("[moe-lb] model config unavailable for start-up checks: %s", err)
            hf = None
        if hf is not None:
            arch = (getattr(hf, "architectures", None) or [type(hf).__name__])[0]
            view["arch"] = arch
            view["shared_experts"], view["shared_detail"] = _shared_experts(hf)
            view["fusion_supported"] = _fusion_supported(arch)
    return view


def after_resolve_once(result, server_args, *args, **kwargs):
    opts = getattr(server_args, "_moe_lb", None)
    if not isinstance(opts, MoeLbOptions) or not opts.active or getattr(server_args, "_moe_lb_checked", False):
        return result
    try:
        new_opts, warnings = check_resolved(opts, resolved_view(server_args))
    except MoeLbConfigError as err:
        fail(err)
    for w in warnings:
        logger.warning("[moe-lb] %s", w)
    server_args._moe_lb = new_opts
    server_args._moe_lb_checked = True
    return result


def after_publish(result, server_args, *args, role=None, **kwargs):
    if role != "scheduler":
        return result
    opts = getattr(server_args, "_moe_lb", None)
    if isinstance(opts, MoeLbOptions) and opts.active:
        from . import hooks

        hooks.activate_in_scheduler(server_args, opts)
    return result
