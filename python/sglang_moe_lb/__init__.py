"""sglang-moe-lb: dispatch-time load balancing for MoE expert parallelism.

The core (this package's top level) needs only torch, numpy and highspy; the SGLang
plugin lives in ``sglang_moe_lb.plugin`` and is imported only by SGLang's plugin loader.
docs/layout.md says which module owns what.

The names below are imported on first use (PEP 562), so ``import sglang_moe_lb.cli`` does
not load torch: a Ctrl-C in the command line's first second is then its quiet one line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the core module that defines it
_HOME = {
    "LayerDispatch": "chain", "balance_layer": "chain", "local_stats": "chain",
    "CostModel": "cost",
    "CoreLayerPath": "layer_path", "LayerPath": "layer_path", "make_layer_path": "layer_path",
    "even_split": "lp_split", "fractions_to_split": "lp_split", "lower_bound": "lp_split", "solve_split": "lp_split",
    "BalanceMode": "mode", "ModeError": "mode",
    "FLOAT_STEPS": "objective", "balanced_quotas": "objective",
    "Placement": "placement", "PlacementError": "placement",
    "PlanSet": "plan", "apply_plan": "plan", "hash_offsets": "plan", "plan_maps": "plan", "solve_plans": "plan",
    "count_experts": "quota_dispatch", "dispatch": "quota_dispatch", "dp_offsets": "quota_dispatch",
    "integer_quotas": "quota_dispatch",
    "assign_shared": "waterfill", "fuse_topk": "waterfill", "routed_rank_load": "waterfill",
    "shared_quotas": "waterfill",
}
# Not ``waterfill`` itself: with lazy imports the name would be the submodule or the function
# depending on what ran first; it is ``sglang_moe_lb.waterfill.waterfill``.

__all__ = list(_HOME)
__version__ = "0.2.0"

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .chain import LayerDispatch, balance_layer, local_stats  # noqa: F401
    from .cost import CostModel  # noqa: F401
    from .layer_path import CoreLayerPath, LayerPath, make_layer_path  # noqa: F401
    from .lp_split import even_split, fractions_to_split, lower_bound, solve_split  # noqa: F401
    from .mode import BalanceMode, ModeError  # noqa: F401
    from .objective import FLOAT_STEPS, balanced_quotas  # noqa: F401
    from .placement import Placement, PlacementError  # noqa: F401
    from .plan import PlanSet, apply_plan, hash_offsets, plan_maps, solve_plans  # noqa: F401
    from .quota_dispatch import count_experts, dispatch, dp_offsets, integer_quotas  # noqa: F401
    from .waterfill import assign_shared, fuse_topk, routed_rank_load, shared_quotas  # noqa: F401


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'sglang_moe_lb' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
