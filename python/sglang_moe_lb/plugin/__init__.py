"""SGLang plugin: ``--moe-lb {off,waterfill,lplb,waterfill+lplb}`` in ``sglang==0.5.23``.

Installed as the entry point ``moe_lb`` in group ``sglang.srt.plugins``; SGLang's
``load_plugins()`` calls ``register()`` once in every process (launcher, schedulers,
detokenizer, ...). The plugin only translates between SGLang's objects and the core
(``sglang_moe_lb.placement``, ``lp_split``, ``quota_dispatch``, ``waterfill``, ``joint``):

* ``options``     the flag, sub-options and start-up checks (no SGLang import)
* ``cli_hooks``   argument hooks: parse, validate, carry to schedulers, activate
* ``hooks``       every hooked SGLang target, registration, ``uninstall()``
* ``runtime``     per-scheduler state: one plan (placement + split table) per layer
* ``hot_path``    the single indirection to the per-batch functions (core torch, or kernels)
* ``comm``        the one EP all-gather of the dynamic modes
* ``waterfill_balancer``  our drop-in for SGLang's ``WaterfillBalancer`` on ``TopK``
* ``rebalance``   HiGHS split tables inside the EPLB cycle (background thread, atomic install)

Usage and every start-up error: docs/usage.md.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Entry point: add the argument hooks (forward-path hooks come when a scheduler starts)."""
    from .hooks import register_light_hooks

    register_light_hooks()
