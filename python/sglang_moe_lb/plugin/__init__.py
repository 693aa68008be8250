"""SGLang plugin: ``--moe-lb {off,lplb,waterfill,waterfill+lplb}`` in ``sglang==0.5.23``.

Installed as the entry point ``moe_lb`` in group ``sglang.srt.plugins``; SGLang's
``load_plugins()`` calls ``register()`` once in every process (launcher, schedulers,
detokenizer, ...). The plugin only translates between SGLang's objects and the core
(``mode``, ``chain``, ``plan``, ``cost``, ``gate``):

* ``options``        the flag and sub-options (from ``mode.BalanceMode``), every start-up check
* ``manifest``       every SGLang touch point (hooks, attributes written and read) and its check
* ``hooks``          registration from the manifest, ``uninstall()``
* ``cli_hooks``      argument hooks and ``sglang.Engine(moe_lb=...)``: parse, validate, carry
* ``activation``     scheduler start-up: the runtime and the forward-path hooks
* ``forward_hooks``  the forward-path hooks, thin calls into the runtime
* ``runtime``        per-scheduler wiring: the layers, the gate, the collectives, the forward-path calls
* ``layers``         one MoE layer's state (plan maps, layer path, pending Waterfill decision) and its build
* ``gate_cache``     the gate's decision and the plan level per shared batch size, memoised
* ``hot_path``       picks the layer path (``layer_path``: kernels on CUDA, the core's chain otherwise); CUDA-graph rule
* ``comm``           the one int32 EP all-gather of the global-sync modes
* ``waterfill_balancer``  our drop-in for SGLang's ``WaterfillBalancer`` on ``TopK``
* ``rebalance``      dispatch plans inside the EPLB cycle (a generator advanced per forward pass)
* ``doctor``         ``sglang-moe-lb doctor``

Usage, every start-up error and the touch-point table: docs/usage.md.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Entry point: check and add the argument hooks (forward-path hooks come when a scheduler starts).

    Exits the process with one line naming what is missing if the installed SGLang lacks
    an argument-handling touch point (``manifest``)."""
    from .hooks import register_light_hooks

    register_light_hooks()
