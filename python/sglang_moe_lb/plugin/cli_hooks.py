"""Hooks on SGLang's argument handling, and the ``sglang.Engine(moe_lb=...)`` entry point.

* ``ServerArgs.add_cli_args`` (AFTER): adds ``--moe-lb`` and sub-options to the parser.
* ``ServerArgs.from_cli_args`` (AFTER): reads them, runs the raw-value checks, stores the
  options as ``server_args._moe_lb`` (``ServerArgs`` is a sealed msgspec struct that drops
  unknown flags; a non-field underscore attribute survives pickling into every spawned
  scheduler), and sets the SGLang fields our modes build on: ``enable_waterfill`` (SGLang's
  fused shared-expert layout, which our balancer then drives) and, for LPLB,
  ``ep_dispatch_algorithm=dynamic`` when unset (so the expert-location dispatch path runs).
* ``Engine.server_args_class`` (SGLang's override point, set by ``hooks``):
  ``engine_server_args_factory`` takes the ``moe_lb``/``moe_lb_*`` keywords out of an
  ``sglang.Engine(...)`` call and does the same as ``from_cli_args``.
* ``ServerArgs.resolve_once`` (AFTER): checks that need the resolved configuration and the
  model's config (EP size, device and CUDA graphs, shared expert, expert counts), and that
  the installed SGLang has every forward-path touch point the mode needs, in the launcher,
  before any process is spawned or any GPU is touched.

A failed check prints ``<prog>: error: <message>`` and exits with status 2, like argparse;
from ``sglang.Engine`` it raises ``MoeLbConfigError`` (a ``ValueError``) instead.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

from ..cost import CostModelError, expert_shape
from ..mode import BalanceMode
from . import manifest
from .options import (
    MoeLbConfigError,
    MoeLbOptions,
    add_cli_flags,
    check_raw_args,
    check_resolved,
    engine_options,
    options_from_namespace,
    pop_engine_kwargs,
)

__all__ = ["after_add_cli_args", "after_from_cli_args", "after_resolve_once", "engine_server_args_factory",
           "check_forward_targets", "fail"]

logger = logging.getLogger("sglang_moe_lb.plugin")
PROG = "sglang serve"


def fail(err: Exception, entry: str = "cli") -> None:
    """A user error: from the CLI exit like argparse (message on stderr, status 2); from the
    Engine raise it (a ``ValueError`` the caller can catch)."""
    if entry == "engine":
        raise err
    print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def after_add_cli_args(result, parser, *args, **kwargs):
    add_cli_flags(parser)
    return result


def _apply(server_args, opts: MoeLbOptions, raw) -> None:
    """Raw checks, then the options onto ``server_args`` (before resolution)."""
    try:
        opts, warnings = check_raw_args(opts, raw)
    except MoeLbConfigError as err:
        fail(err, opts.entry)
    for w in warnings:
        logger.warning("[moe-lb] %s", w)
    if opts.mode.waterfill is not None:
        server_args.enable_waterfill = True
    if opts.mode.lplb != "off" and server_args.ep_dispatch_algorithm is None:
        server_args.ep_dispatch_algorithm = "dynamic"
    server_args._moe_lb = opts
    if opts.active:
        logger.info("[moe-lb] %s", opts.describe())


def after_from_cli_args(result, cls, args, *rest, **kwargs):
    try:
        opts = options_from_namespace(args)
    except MoeLbConfigError as err:
        fail(err)
    _apply(result, opts, args)
    return result


def engine_server_args_factory(server_args_class):
    """``Engine.server_args_class`` replacement: ``ServerArgs(**kwargs)`` with our keywords taken out."""

    def build(**kwargs):
        ours = pop_engine_kwargs(kwargs)
        opts = engine_options(ours) if ours else None  # a bad keyword fails before ServerArgs is built
        server_args = server_args_class(**kwargs)
        if opts is not None:
            _apply(server_args, opts, server_args)
        return server_args

    build.__name__ = build.__qualname__ = "moe_lb_server_args"
    build.__doc__ = f"{server_args_class.__name__}(**kwargs), taking sglang-moe-lb's moe_lb* keywords out first."
    return build


def _shared_experts(hf_config) -> tuple[int | None, str]:
    """Shared experts per MoE layer from a HF config, or None when the config does not say."""
    for name in ("n_shared_experts", "num_shared_experts", "shared_expert_intermediate_size"):
        if hasattr(hf_config, name):
            val = getattr(hf_config, name)
            n = int(bool(val)) if name == "shared_expert_intermediate_size" else int(val or 0)
            return n, f"{name}={val}"
    return None, "no shared-expert field in the model config"


def _routed_experts(hf_config) -> int | None:
    for name in ("n_routed_experts", "num_experts", "num_local_experts"):
        v = getattr(hf_config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _fusion_supported(arch: str) -> bool | None:
    """Whether SGLang's model class for ``arch`` can fuse its shared expert (None: unknown)."""
    try:
        from sglang.srt.models.registry import ModelRegistry

        cls, _ = ModelRegistry.resolve_model_cls([arch])
    except Exception:
        return None
    return bool(getattr(cls, "num_fusable_shared_experts", None) and getattr(cls, "shared_experts_fusion_disable_reason", None))


def graph_phases(v) -> list[str]:
    """Phases (``decode``, ``prefill``) that will capture CUDA graphs, from a resolving view."""
    cfg = getattr(v, "cuda_graph_config", None)  # resolved: one backend per phase
    phases = {name: getattr(cfg, name, None) for name in ("decode", "prefill")} if cfg is not None else {}
    if phases and all(p is not None for p in phases.values()):
        return [name for name, p in phases.items() if p.backend != "disabled"]
    if getattr(v, "disable_cuda_graph", False):
        return []
    out = []
    if getattr(v, "cuda_graph_backend_decode", None) != "disabled" and not getattr(v, "disable_decode_cuda_graph", False):
        out.append("decode")
    if getattr(v, "cuda_graph_backend_prefill", None) not in (None, "disabled") and not getattr(v, "disable_prefill_cuda_graph", False):
        out.append("prefill")
    return out


def resolved_view(server_args) -> dict:
    """The few resolved values ``check_resolved`` needs (model config read lazily, CPU only)."""
    from sglang.srt.arg_groups.overrides import resolving_view

    from . import hot_path

    v = resolving_view(server_args)
    view = {
        "ep_size": int(getattr(v, "ep_size", 1) or 1),
        "device": getattr(v, "device", None),
        "graph_phases": graph_phases(v),
        "redundant": int(getattr(v, "ep_num_redundant_experts", 0) or 0),
        "attn_dp_size": int(getattr(v, "attn_dp_size", 1) or 1),
        "a2a_backend": getattr(v, "moe_a2a_backend", None) or "none",
    }
    if view["device"] == "cuda" and view["graph_phases"]:
        mode = server_args._moe_lb.mode
        view["graph_safe"] = hot_path.graph_safety(mode)  # imports the kernel seam: GPU only
        if not view["graph_safe"][0] and mode.objective == "tiles":
            # the error can then name the one flag that keeps graphs on
            view["graph_safe_with_tokens"] = hot_path.graph_safety(dataclasses.replace(mode, objective="tokens"))[0]
    opts: MoeLbOptions = server_args._moe_lb
    try:
        from sglang.srt.arg_groups.overrides import model_config_of

        hf = model_config_of(server_args).hf_config
    except Exception as err:  # config not readable here: leave it to the load-time checks
        logger.debug("[moe-lb] model config unavailable for start-up checks: %s", err)
        hf = None
    if hf is not None:
        view["num_experts"] = _routed_experts(hf)
        if opts.mode.plan or opts.mode.objective == "tiles" or opts.mode.gate:
            try:
                expert_shape(hf)
            except CostModelError as err:
                view["cost_model_error"] = str(err)
        if opts.mode.waterfill is not None:
            arch = (getattr(hf, "architectures", None) or [type(hf).__name__])[0]
            view["arch"] = arch
            view["shared_experts"], view["shared_detail"] = _shared_experts(hf)
            view["fusion_supported"] = _fusion_supported(arch)
    return view


def check_forward_targets(mode: BalanceMode, *, rank_invariant: bool) -> None:
    """Raise ``MoeLbConfigError`` (one line) if a forward-path touch point ``mode`` needs is missing."""
    entries = manifest.hooks_for("forward", mode, rank_invariant) + manifest.attrs_for(mode, rank_invariant)
    problems = manifest.check(entries)
    if problems:
        raise MoeLbConfigError(manifest.missing_message(problems, where=f" --moe-lb {mode.flag}"))


def after_resolve_once(result, server_args, *args, **kwargs):
    opts = getattr(server_args, "_moe_lb", None)
    if not isinstance(opts, MoeLbOptions) or not opts.active or getattr(server_args, "_moe_lb_checked", False):
        return result
    try:
        view = resolved_view(server_args)
        new_opts, warnings = check_resolved(opts, view)
        if new_opts.active:
            check_forward_targets(new_opts.mode, rank_invariant=view["a2a_backend"] == "none")
    except MoeLbConfigError as err:
        fail(err, opts.entry)
    for w in warnings:
        logger.warning("[moe-lb] %s", w)
    server_args._moe_lb = new_opts
    server_args._moe_lb_checked = True
    return result
