"""sglang-moe-lb: dispatch-time load balancing for MoE expert parallelism.

The core (this package's top level) needs only torch, numpy and highspy; the SGLang
plugin lives in ``sglang_moe_lb.plugin`` and is imported only by SGLang's plugin loader.
docs/layout.md says which module owns what.
"""

from .chain import LayerDispatch, balance_layer, local_stats
from .cost import CostModel
from .lp_split import even_split, fractions_to_split, lower_bound, solve_split
from .mode import BalanceMode, ModeError
from .objective import FLOAT_STEPS, balanced_quotas
from .placement import Placement, PlacementError
from .plan import PlanSet, apply_plan, hash_offsets, plan_maps, solve_plans
from .quota_dispatch import count_experts, dispatch, dp_offsets, integer_quotas
from .waterfill import assign_shared, fuse_topk, routed_rank_load, shared_quotas, waterfill

__all__ = [
    "Placement",
    "PlacementError",
    "BalanceMode",
    "ModeError",
    "CostModel",
    "balanced_quotas",
    "solve_plans",
    "PlanSet",
    "plan_maps",
    "hash_offsets",
    "apply_plan",
    "FLOAT_STEPS",
    "solve_split",
    "even_split",
    "lower_bound",
    "fractions_to_split",
    "integer_quotas",
    "dispatch",
    "dp_offsets",
    "count_experts",
    "shared_quotas",
    "assign_shared",
    "waterfill",
    "fuse_topk",
    "routed_rank_load",
    "balance_layer",
    "local_stats",
    "LayerDispatch",
]
__version__ = "0.2.0"
