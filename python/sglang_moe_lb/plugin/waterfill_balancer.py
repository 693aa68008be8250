"""Our stand-in for SGLang's ``WaterfillBalancer`` on a ``TopK`` module.

SGLang builds the fused layout when ``enable_waterfill`` is on (the plugin turns it on for
``--moe-lb waterfill*``): ``TopK`` emits the routed top-k, calls
``module.waterfill_balancer.expand_topk(topk_output, num_tokens)``, and the DeepEP MoE layer
holds ``S + 1`` experts per rank (S routed slots, then the shared expert). We keep all of
that and swap only the balancer object, so the shared-expert rank per token comes from the
runtime (the layer path; decided with the LPLB split when LPLB is on) and the fused ids from
``waterfill.fuse_topk``.
"""

from __future__ import annotations

from .runtime import Runtime

__all__ = ["MoeLbWaterfill"]


class MoeLbWaterfill:
    """Duck-typed replacement for ``sglang.srt.layers.moe.waterfill.WaterfillBalancer``."""

    def __init__(self, runtime: Runtime, layer_id: int, shared_weight: float):
        self.runtime = runtime
        self.layer_id = layer_id
        self.shared_weight = float(shared_weight)

    def expand_topk(self, topk_output, num_tokens: int):
        """``[T, k]`` physical routed ids -> ``[T, k + 1]`` fused ids and weights."""
        from sglang.srt.layers.moe.topk import StandardTopKOutput

        from ..waterfill import fuse_topk

        rt = self.runtime
        phys = topk_output.topk_ids
        shared_rank = rt.shared_ranks(self.layer_id, phys)
        ids, weights = fuse_topk(
            phys, topk_output.topk_weights, shared_rank, rt.slots_per_rank, self.shared_weight
        )
        return StandardTopKOutput(
            topk_weights=weights, topk_ids=ids.to(phys.dtype), router_logits=topk_output.router_logits
        )

    def __repr__(self) -> str:
        return f"MoeLbWaterfill(layer={self.layer_id}, {self.runtime.opts.describe()})"
