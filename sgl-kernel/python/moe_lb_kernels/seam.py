"""The plugin's per-batch seam on CUDA: ``joint.balance_layer``'s signature over ``LayerBalancer``.

``sglang_moe_lb.plugin.hot_path`` looks for ``balance_layer`` here when the device is CUDA;
``local_stats`` and ``fuse_topk`` stay on the core (they are one or two torch ops). One
``LayerBalancer`` is kept per (layer, mode, rank, sync, top-k, device): a new placement after
an EPLB rebalance is installed in place (``update_placement``), a new split table with
``set_split_table``, and a batch larger than the buffers rebuilds them at twice the size.

This eager adapter allocates when it (re)builds, so it does not promise CUDA-graph safety
(``CUDA_GRAPH_SAFE`` is not set); a graph-captured path uses ``LayerBalancer`` directly.
"""

from __future__ import annotations

import torch

from sglang_moe_lb.joint import LayerDispatch
from sglang_moe_lb.placement import Placement

from .balancer import LayerBalancer

__all__ = ["balance_layer"]

_MIN_TOKENS = 256
_cache: dict[tuple, list] = {}  # key -> [balancer, placement, table, capacity]


def balance_layer(
    pl: Placement,
    topk_ids: torch.Tensor,
    *,
    layer: int = 0,
    source_rank: int = 0,
    lplb: str = "per_batch",
    split_table: torch.Tensor | None = None,
    waterfill: str | None = None,
    gathered: torch.Tensor | None = None,
    phys_ids: torch.Tensor | None = None,
    method: str = "fast",  # the kernels always run the certified fast split
) -> LayerDispatch:
    """Same contract as ``sglang_moe_lb.joint.balance_layer``, computed by the Triton kernels."""
    if lplb == "off":
        if waterfill is None:
            raise ValueError("lplb='off' without waterfill has nothing to decide")
        mode, split = "waterfill", "per_batch"
    else:
        mode = "lplb" if waterfill is None else "waterfill+lplb"
        split = "table" if lplb == "table" else "per_batch"
    T, k = topk_ids.shape
    key = (layer, mode, split, waterfill or "all_rank", source_rank, gathered is not None, k, topk_ids.device)
    entry = _cache.get(key)
    old_cap = entry[3] if entry else 0
    if entry is not None and entry[1] is not pl:
        try:
            entry[0].update_placement(pl, layer)
            entry[1], entry[2] = pl, None
        except ValueError:  # the new placement does not fit the buffers: rebuild below
            entry = None
    if entry is None or T > entry[3]:
        cap = max(_MIN_TOKENS, T, 2 * old_cap if T > old_cap else old_cap)
        bal = LayerBalancer(
            pl, cap, k, mode, topk_ids.device, layer=layer, candidates=waterfill or "all_rank",
            split=split, source_rank=source_rank, dynamic=gathered is not None,
        )
        entry = _cache[key] = [bal, pl, None, cap]
    bal = entry[0]
    if split == "table" and entry[2] is not split_table:
        bal.set_split_table(split_table)
        entry[2] = split_table
    if gathered is not None:
        # The balancer's dynamic call reads per-block offsets that its own local_stats leaves
        # behind; the plugin built ``gathered`` from the core's rows, so recount here.
        bal.local_stats(topk_ids, phys_ids)
    return bal(topk_ids, phys_ids=phys_ids, gathered=gathered)
