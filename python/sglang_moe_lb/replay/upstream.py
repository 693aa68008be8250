"""SGLang's own EPLB placement, dispatch and Waterfill, called as a package.

Nothing here re-implements SGLang: it builds the inputs SGLang's functions expect and
calls them.

* Placement: ``sglang.srt.eplb.eplb_algorithms.rebalance_experts`` with the algorithm
  ``compute_algorithm`` picks, exactly as ``ExpertLocationMetadata.init_by_eplb`` does.
* Metadata: ``ExpertLocationMetadata._init_raw`` (what ``init_by_eplb`` and
  ``init_by_mapping`` finish with), and for a given map ``_compute_logical_to_all_physical_map``
  (what ``init_by_mapping`` uses). We skip only their model-config lookup, which needs a
  model directory; the EP size and expert counts come from the replay's options.
* Dispatch: ``ExpertLocationDispatchInfo.init_new(layer)`` on the installed metadata, then
  ``topk_ids_logical_to_physical``. ``static`` needs one metadata per EP rank (each rank has
  its own nearest-copy table); ``dynamic`` picks a copy with ``torch.randint`` (seeded by the
  replay) because with an all-to-all backend ``rank_invariant`` is False.
* Waterfill: ``sglang.srt.layers.moe.waterfill.WaterfillBalancer.expand_topk``, one balancer
  per (rank, layer), on top of the static mapping, like ``prepare_moe_topk`` sets it up. Its
  Triton kernels run in the Triton interpreter on CPU (``TRITON_INTERPRET=1``, which must be
  set before Triton is first imported; ``ensure_triton_interpreter`` does that).

SGLang reads its configuration from a published runtime context. We build a private one
(``create_context`` + ``use_context``) from ``ServerArgs(model_path="dummy", ...)`` with
``--device cpu``, the EP size, the redundant experts, DeepEP as the all-to-all backend and
DP attention, so the process-wide context is left alone.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
import warnings
from dataclasses import dataclass
from unittest import mock

import torch

__all__ = ["ensure_triton_interpreter", "UpstreamSGLang", "UpstreamPlacement", "sglang_version"]


def ensure_triton_interpreter() -> str | None:
    """Make SGLang's Triton kernels runnable here; returns a note when they cannot run.

    Without CUDA, Triton kernels only run in the Triton interpreter, which Triton reads from
    ``TRITON_INTERPRET`` when it is imported.
    """
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if "triton" in sys.modules:
        return "Triton was imported before TRITON_INTERPRET=1 could be set; upstream Triton kernels cannot run on this CPU"
    os.environ["TRITON_INTERPRET"] = "1"
    return None


_CONTEXTS: dict = {}


def sglang_version() -> str:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class UpstreamPlacement:
    """One installed SGLang placement: the map and the dispatch info per (rank, layer)."""

    phy2log: torch.Tensor  # [L, P]
    static_info: list[list]  # [R][L] ExpertLocationDispatchInfo ("static")
    dynamic_info: list[list]  # [R][L] ExpertLocationDispatchInfo ("dynamic")


class UpstreamSGLang:
    """SGLang 0.5.23's EPLB, dispatch and Waterfill for one simulated EP group.

    Args:
        num_logical / num_physical / ep_size / num_layers: the EP layout.
        eplb_algorithm: ``--eplb-algorithm`` ("auto", "deepseek", "deepseek_hierarchical",
            "deepseek_vec", ...).
        num_groups: expert groups of the model (None for models without grouped routing).
        nnodes: nodes of the EP group (hierarchical EPLB and the same-node preference).
    """

    def __init__(
        self,
        *,
        num_logical: int,
        num_physical: int,
        ep_size: int,
        num_layers: int,
        eplb_algorithm: str = "auto",
        num_groups: int | None = None,
        nnodes: int = 1,
    ):
        self.note = ensure_triton_interpreter()
        with warnings.catch_warnings():
            # SGLang warns at import that CUDA-only quantisation methods are unavailable on CPU.
            warnings.simplefilter("ignore")
            from sglang.srt.eplb import eplb_algorithms
            from sglang.srt.eplb.expert_location_dispatch import topk_ids_logical_to_physical  # noqa: F401
            from sglang.srt.layers.moe.waterfill import WaterfillBalancer  # noqa: F401
            from sglang.srt.runtime_context import SpawnRanks, create_context
            from sglang.srt.server_args import ServerArgs

        if num_physical % ep_size:
            raise ValueError(f"{num_physical} physical experts cannot be split over EP size {ep_size}")
        self.E, self.P, self.R, self.L = num_logical, num_physical, ep_size, num_layers
        self.num_groups, self.nnodes = num_groups, nnodes
        self.algorithm = eplb_algorithms.compute_algorithm(
            raw_algorithm=eplb_algorithm, num_groups=num_groups, num_nodes=nnodes
        )
        common = dict(
            model_path="dummy",
            device="cpu",
            tp_size=ep_size,
            ep_size=ep_size,
            dp_size=ep_size,
            enable_dp_attention=True,
            nnodes=nnodes,
            moe_a2a_backend="deepep",
            ep_num_redundant_experts=num_physical - num_logical,
            eplb_algorithm=eplb_algorithm,
        )
        key = tuple(sorted(common.items()))
        if key not in _CONTEXTS:  # building a context takes ~1 s; reuse it for the same layout
            _CONTEXTS[key] = {
                algo: create_context(
                    ServerArgs(**common, ep_dispatch_algorithm=algo), role="test", ranks=SpawnRanks(world_rank=0, dp_rank=0)
                )
                for algo in ("static", "dynamic")
            }
        self._ctx = _CONTEXTS[key]

    @contextlib.contextmanager
    def _use(self, algo: str):
        from sglang.srt.runtime_context import use_context

        with use_context(self._ctx[algo]):
            yield

    # -- placement ---------------------------------------------------------------------------
    def rebalance(self, window_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SGLang's EPLB on a recorded window ``[steps, L, E]``: ``(phy2log [L, P], log2phy [L, E, X])``."""
        from sglang.srt.eplb import eplb_algorithms

        w = window_counts if window_counts.dim() == 3 else window_counts[None]
        with self._use("static"):
            p2l, l2p, _ = eplb_algorithms.rebalance_experts(
                tokens_per_expert=w,
                num_physical_experts=self.P,
                num_local_physical_experts=self.P // self.R,
                num_groups=self.num_groups,
                num_nodes=self.nnodes,
                algorithm=self.algorithm,
            )
        return p2l.to(torch.long), l2p.to(torch.long)

    def install(self, phy2log: torch.Tensor, log2phy: torch.Tensor | None = None) -> UpstreamPlacement:
        """Build SGLang's per-rank dispatch state for a placement.

        ``log2phy`` given (an EPLB result): the ``init_by_eplb`` path, every rank sees every
        copy. ``log2phy`` None (a given map): the ``init_by_mapping`` path, where each rank's
        copy list collapses to its nearest copy when one is local or on its node.
        """
        from sglang.srt.eplb import expert_location as el
        from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo

        p2l = phy2log.to(torch.long)
        infos = {}
        for algo in ("static", "dynamic"):
            per_rank = []
            with self._use(algo):
                for r in range(self.R):
                    l2p = log2phy
                    if l2p is None:
                        l2p = el._compute_logical_to_all_physical_map(
                            physical_to_logical_map=p2l, num_logical_experts=self.E, ep_size=self.R, moe_ep_rank=r
                        )
                    meta = el.ExpertLocationMetadata._init_raw(
                        ep_size=self.R, physical_to_logical_map=p2l, logical_to_all_physical_map=l2p, moe_ep_rank=r
                    )
                    el.set_global_expert_location_metadata(meta, allow_overwrite=True)
                    per_rank.append([ExpertLocationDispatchInfo.init_new(layer) for layer in range(self.L)])
            infos[algo] = per_rank
        return UpstreamPlacement(p2l, infos["static"], infos["dynamic"])

    # -- dispatch ----------------------------------------------------------------------------
    @staticmethod
    def to_physical(topk: torch.Tensor, info) -> torch.Tensor:
        """``topk_ids_logical_to_physical`` on one rank's ``[T, k]`` ids; ``-1`` entries stay ``-1``."""
        from sglang.srt.eplb.expert_location_dispatch import topk_ids_logical_to_physical

        valid = topk >= 0
        ids = topk.to(torch.int32).clamp(min=0)
        phys = topk_ids_logical_to_physical(ids, info)
        return torch.where(valid, phys.to(torch.long), -1)

    def waterfill(
        self, phys_by_rank: list[torch.Tensor], layer: int, dynamic: bool = False, fast_count: bool = True
    ) -> list[torch.Tensor]:
        """SGLang's ``WaterfillBalancer.expand_topk`` for every source rank of one layer.

        Args:
            phys_by_rank: per rank ``[T_r, k]`` physical routed ids.
            dynamic: upstream's dynamic Waterfill (``SGLANG_DISABLE_STATIC_WATERFILL=1``); its
                one EP all-reduce is answered with the sum of all ranks' counts.
            fast_count: count each rank's routed tokens per rank with torch instead of upstream's
                Triton histogram kernel (same numbers; the interpreter makes that kernel slow).
        Returns:
            per rank ``[T_r, k + 1]`` ids in the fused layout (``S + 1`` slots per rank; the
            last column is the shared expert, ``-1`` for a token without a routed expert).
        """
        from sglang.srt.layers.moe.topk import StandardTopKOutput
        from sglang.srt.layers.moe.waterfill import WaterfillBalancer

        from ..waterfill import routed_rank_load

        R, S = self.R, self.P // self.R
        ids32 = [p.to(torch.int32).contiguous() for p in phys_by_rank]
        patch = contextlib.nullcontext()
        if dynamic:
            routed = sum(routed_rank_load(p, R, S) for p in phys_by_rank)
            tokens = torch.tensor([p.shape[0] for p in phys_by_rank], dtype=torch.int64)
            patch = mock.patch.object(
                WaterfillBalancer, "_all_reduce_dynamic_rank_load", staticmethod(lambda *_: (routed.clone(), tokens.clone()))
            )
        out = []
        # The small-batch path of upstream Waterfill is torch.compile'd; compiling it on CPU takes
        # seconds and changes nothing, so it runs eagerly here. Its Triton kernel evaluates both
        # sides of a guarded modulo in the interpreter, which numpy reports as a harmless warning.
        import numpy as np
        import torch._dynamo as dynamo

        with self._use("static"), patch, dynamo.config.patch(disable=True), np.errstate(divide="ignore"):
            for r, ids in enumerate(ids32):
                bal = WaterfillBalancer(
                    num_routed_experts=self.P, world_size=R, rank=r, layer_id=layer, shared_weight=1.0
                )
                bal.use_static_waterfill = not dynamic
                if fast_count:
                    # The per-rank routed histogram; equal to upstream's Triton count kernel (tested), at a
                    # fraction of its interpreter cost. The Waterfill policy kernel itself still runs.
                    bal.count_local_routed = lambda t: routed_rank_load(t, R, S)
                w = torch.ones(ids.shape, dtype=torch.float32)
                res = bal.expand_topk(StandardTopKOutput(w, ids, None), ids.shape[0])
                out.append(res.topk_ids.to(torch.long))
        return out
