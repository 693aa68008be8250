"""TEST AND DEMO ONLY: expert-parallel-aware wrapper of SGLang's torch-native MoE forward.

With ``--ep-size > 1 --moe-a2a-backend none`` every EP rank sees every token, and
SGLang's standard dispatcher maps the experts that live on other ranks to local id
``-1``. SGLang 0.5.23's ``moe_forward_native`` (the CPU path when the scheduler has no
AMX) does not expect ``-1`` and indexes out of bounds. This wrapper gives a ``-1``
slot a contribution of exactly 0: only the (token, slot) pairs with a local expert
are passed to the original function, one pair per row, and the rows are summed back
per token in float32. Batches without ``-1`` go to the original unchanged.

Installed as an AROUND hook by ``sglang_moe_lb.testing.cpu_serving.plugin``.

Slot log (opt-in, ``SGLANG_MOE_LB_CPU_SLOT_LOG=<dir>``): every call appends one JSON line to
``<dir>/slots_ep<rank>.jsonl`` with the layer id, this rank's tokens per local expert slot,
the layer's physical-to-logical map at that moment, and which (token, top-k column) entries
this rank executes (``shape`` of ``topk_ids`` and ``local``: the ``topk_ids >= 0`` mask, row
major, bit-packed, hex). Both EP ranks run the same batches in the same order (no a2a
backend), so line i of each file is the same MoE call, and together they give the per-rank
loads the server really executed, independent of any balancer's own bookkeeping. Tests use it
to check that per-batch LPLB reached the optimal max rank load, and that the ranks agreed on
every entry's copy (each entry executed on exactly one rank).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

_ARG_NAMES = ("layer", "x", "topk_output", "moe_runner_config")
SLOT_LOG_ENV = "SGLANG_MOE_LB_CPU_SLOT_LOG"


def _log_slots(layer, topk_ids: torch.Tensor) -> None:
    out_dir = os.environ.get(SLOT_LOG_ENV)
    layer_id = getattr(layer, "layer_id", None)
    if not out_dir or layer_id is None:
        return
    num_local = int(getattr(layer, "num_local_experts", 0) or 0)
    ids = topk_ids[topk_ids >= 0].to(torch.long)
    counts = torch.bincount(ids, minlength=num_local).tolist() if ids.numel() else [0] * num_local
    p2l = None
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        md = get_global_expert_location_metadata()
        if md is not None and layer_id < md.num_layers:
            p2l = md.physical_to_logical_map_cpu[layer_id].tolist()
    except Exception:
        pass
    rank = int(getattr(layer, "moe_ep_rank", 0) or 0)
    local = np.packbits((topk_ids >= 0).reshape(-1).to("cpu").numpy()).tobytes().hex()
    line = json.dumps({"layer": int(layer_id), "counts": counts, "p2l": p2l, "shape": list(topk_ids.shape),
                       "local": local})
    with open(os.path.join(out_dir, f"slots_ep{rank}.jsonl"), "a") as f:
        f.write(line + "\n")


def moe_forward_native_ep(original, *args, **kwargs):
    """AROUND hook for ``sglang.srt.layers.moe.fused_moe_native.moe_forward_native``."""
    bound = dict(zip(_ARG_NAMES, args))
    bound.update(kwargs)
    if len(args) > len(_ARG_NAMES) or set(bound) != set(_ARG_NAMES):
        return original(*args, **kwargs)  # an unknown call shape: leave it to upstream
    layer, x, topk_output, cfg = (bound[n] for n in _ARG_NAMES)
    topk_weights, topk_ids = topk_output[0], topk_output[1]
    _log_slots(layer, topk_ids)
    keep = topk_ids >= 0
    if bool(keep.all()):
        return original(layer, x, topk_output, cfg)

    token_idx, slot_idx = keep.nonzero(as_tuple=True)
    out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
    if token_idx.numel() > 0:
        pair_ids = topk_ids[token_idx, slot_idx].unsqueeze(1)
        pair_weights = topk_weights[token_idx, slot_idx].unsqueeze(1)
        if hasattr(topk_output, "_replace"):
            pair_output = topk_output._replace(topk_weights=pair_weights, topk_ids=pair_ids)
        else:
            pair_output = (pair_weights, pair_ids, *tuple(topk_output)[2:])
        rows = original(layer, x[token_idx], pair_output, cfg)
        out.index_add_(0, token_idx, rows.float())
    return out.to(x.dtype)
