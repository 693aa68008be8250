"""TEST AND DEMO ONLY: placement-invariant dummy weights for ``--load-format dummy``.

What SGLang 0.5.23 does (``srt/model_loader/weight_utils.py: initialize_dummy_weights``):
every floating tensor in ``model.state_dict()`` is filled with U(-1e-3, 1e-3) from a
generator seeded with 1234 *per tensor*, so a tensor's values depend only on its
shape and dtype. Consequences for our tests:

* Runs with the same ``--tp/--ep-size`` get bit-identical weights (good), but
* the MoE weight tensor of each EP rank is ``[num_local_physical_experts, ...]`` and
  every rank gets the same values, so an expert's weights depend on its *physical
  slot*, not on the logical expert: two replicas of one logical expert hold
  different weights, and moving a token to another replica (which is exactly what
  dispatch-time load balancing does) changes the output;
* with weights that small the logits are uniform to ~1e-7 (every log-prob is
  ``-log(vocab)``), so greedy argmax is decided by rounding noise.

``reinit_placement_invariant(model)`` (run as an AFTER hook of
``initialize_dummy_weights``, i.e. before SGLang's post-load processing) refills:

* each routed-expert slot from a generator seeded by (layer, *logical* expert id),
  looked up in SGLang's physical-to-logical map, so all replicas are identical and
  any placement, EP size or dispatch choice computes the same function (up to
  float summation order); EPLB's weight moves keep this true;
* norms with 1, biases with 0, the router's correction bias with a fixed per-layer
  skew (so expert loads are uneven, which gives the balancers something to do), and
  every other matrix with U(-a, a), a = sqrt(3 / fan_in), so logits are O(1) and the
  greedy output is decided by real margins.

Selected with ``SGLANG_MOE_LB_CPU_DUMMY_INIT=placement_invariant`` (the harness
default); ``upstream`` keeps SGLang's weights.
"""

from __future__ import annotations

import logging
import math
import os
import zlib

import torch

logger = logging.getLogger(__name__)

ENV = "SGLANG_MOE_LB_CPU_DUMMY_INIT"
MODES = ("placement_invariant", "upstream")
_SEED = 20240611


def mode() -> str:
    value = os.environ.get(ENV, "upstream")
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}; expected one of {MODES}")
    return value


def _generator(key: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(_SEED ^ zlib.crc32(key.encode()))
    return g


def _fill_uniform(t: torch.Tensor, bound: float, key: str) -> None:
    values = torch.empty(t.shape, dtype=torch.float32).uniform_(-bound, bound, generator=_generator(key))
    t.copy_(values.to(t.dtype))


def _fan_in_bound(t: torch.Tensor) -> float:
    return math.sqrt(3.0 / max(1, t.shape[-1]))


def _physical_to_logical(layer_id: int, num_physical: int):
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        meta = get_global_expert_location_metadata()
    except Exception:
        meta = None
    if meta is None:
        return None
    return meta.physical_to_logical_map[layer_id].tolist()[:num_physical] if layer_id < meta.num_layers else None


def _is_fused_moe(module) -> bool:
    return all(hasattr(module, a) for a in ("w13_weight", "w2_weight", "layer_id", "moe_ep_rank", "num_local_experts"))


def _reinit_experts(module, done: set) -> None:
    num_local = int(module.num_local_experts)
    num_shared = int(getattr(module, "num_fused_shared_experts", 0) or 0)
    num_local_routed = int(getattr(module, "_num_local_routed", num_local - num_shared))
    rank = int(getattr(module, "_expert_storage_rank", module.moe_ep_rank))
    layer_id = int(module.layer_id)
    num_physical_routed = num_local_routed * int(getattr(module, "moe_ep_size", 1))
    p2l = _physical_to_logical(layer_id, num_physical_routed)
    for name in ("w13_weight", "w2_weight"):
        weight = getattr(module, name)
        if not torch.is_floating_point(weight):
            raise RuntimeError(f"{ENV}: expected float expert weights, got {weight.dtype} (quantized models unsupported)")
        with torch.no_grad():
            for slot in range(weight.shape[0]):
                if slot < num_local_routed:
                    physical = rank * num_local_routed + slot
                    logical = p2l[physical] if p2l is not None else physical
                    key = f"layer{layer_id}.expert{logical}.{name}"
                else:
                    key = f"layer{layer_id}.shared{slot - num_local_routed}.{name}"
                _fill_uniform(weight.data[slot], _fan_in_bound(weight.data[slot]), key)
        done.add(id(weight))
        for bias_name in (f"{name}_bias",):
            bias = getattr(module, bias_name, None)
            if bias is not None:
                bias.data.zero_()
                done.add(id(bias))


def _shard_tag(module) -> str:
    """A tag that differs between the TP shards of a sharded parameter and is empty for replicated ones.

    Replicated tensors (router, norms, ``ReplicatedLinear``) must get the same values on every
    rank; the shards of a TP-sharded tensor should not all repeat the same values.
    """
    if hasattr(module, "tp_group"):
        group = module.tp_group
        size = int(getattr(group, "world_size", 1)) if group is not None else 1
        return f"@shard{int(getattr(group, 'rank_in_group', 0))}of{size}" if size > 1 else ""
    return ""


def reinit_placement_invariant(model: torch.nn.Module) -> None:
    done: set = set()
    num_moe = 0
    for module in model.modules():
        if _is_fused_moe(module):
            _reinit_experts(module, done)
            num_moe += 1
    with torch.no_grad():
        for prefix, module in model.named_modules():
            tag = _shard_tag(module)
            for leaf, param in module.named_parameters(recurse=False):
                if id(param) in done or not torch.is_floating_point(param):
                    continue
                done.add(id(param))
                name = f"{prefix}.{leaf}" if prefix else leaf
                if name.endswith(("weight_scale_inv", "weight_scale_2")):
                    continue
                data = param.data
                if "e_score_correction_bias" in name:
                    _fill_uniform(data, 0.25, name)
                elif data.dim() == 1 and ("norm" in name or leaf == "weight"):
                    data.fill_(1.0)
                elif data.dim() == 1:
                    data.zero_()
                else:
                    _fill_uniform(data, _fan_in_bound(data), name + tag)
    logger.info("sglang_moe_lb CPU shims: placement-invariant dummy weights (%d MoE layers)", num_moe)


def after_initialize_dummy_weights(result, model, *args, **kwargs):
    """AFTER hook for ``sglang.srt.model_loader.weight_utils.initialize_dummy_weights``."""
    if mode() == "placement_invariant":
        reinit_placement_invariant(model)
    return None
