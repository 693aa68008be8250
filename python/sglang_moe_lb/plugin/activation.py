"""Scheduler start-up: the ``runtime_context.publish`` hook creates the runtime and hooks the
forward path for the chosen mode (only what it needs; nothing with ``--moe-lb off``)."""

from __future__ import annotations

from . import hooks, runtime
from .options import MoeLbOptions

__all__ = ["after_publish", "activate_in_scheduler"]


def activate_in_scheduler(server_args, opts: MoeLbOptions) -> runtime.Runtime:
    """Create this process's runtime and install the forward-path hooks its mode needs."""
    from sglang.srt.runtime_context import get_exec

    rank_invariant = get_exec().moe.moe_a2a_backend == "none"
    rt = runtime.activate(opts, rank_invariant=rank_invariant)
    hooks.install_runtime_hooks(opts.mode, rank_invariant=rank_invariant)
    return rt


def after_publish(result, server_args, *args, role=None, **kwargs):
    if role != "scheduler":
        return result
    opts = getattr(server_args, "_moe_lb", None)
    if isinstance(opts, MoeLbOptions) and opts.active:
        activate_in_scheduler(server_args, opts)
    return result
