"""TEST AND DEMO ONLY: the token transport of SGLang's DeepEP *normal* dispatcher, over gloo.

SGLang 0.5.23's ``DeepEPDispatcher`` (``srt/layers/moe/token_dispatcher/deepep.py``) keeps
its stage machine, its hooks and the public ``dispatch``/``combine`` calls in Python, and
delegates the data movement to an inner object (``_normal_dispatcher`` /
``_low_latency_dispatcher``) that drives DeepEP's GPU buffers. ``GlooNormalTransport``
is a drop-in for that inner object on CPU: the same four calls and the same output types
(``DeepEPNormalDispatchOutput``, a tensor from ``combine_b``), with the bytes moved by
``torch.distributed.all_to_all_single`` over a gloo group. So the real ``DeepseekV2MoE`` ->
``TopK`` -> ``DeepEPMoE`` -> ``DeepEPDispatcher`` chain runs unchanged around it, including
every hook a plugin put on ``DeepEPDispatcher.dispatch_a``.

Semantics (those of DeepEP normal mode, written from its documented contract):

* ``topk_ids [T, k]`` are global (fused) expert ids; expert ``e`` lives on rank
  ``e // num_local_experts`` (its local id is ``e % num_local_experts``); ``-1`` = no expert.
* dispatch: each token goes once to every rank that holds at least one of its experts. The
  receiver gets the token's hidden row, and its ``topk_ids`` row with *local* ids for the
  experts it holds and ``-1`` elsewhere (weights travel alongside), plus
  ``num_recv_tokens_per_expert``.
* combine: each received row's partial output (already weighted by the expert layer) goes
  back to its source rank and is summed per token, in float32.

Counters (``stats``) record what crossed ranks, so tests can check that work really moved.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["GlooNormalTransport", "install_gloo_transport"]


class GlooNormalTransport:
    """Stands in for ``_DeepEPDispatcherImplNormal`` (the DeepEP buffer calls) on a gloo group."""

    def __init__(self, group, num_local_experts: int, num_shared_per_rank: int = 0):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_local_experts = int(num_local_experts)
        self.num_shared_per_rank = int(num_shared_per_rank)
        self._handle = None
        self.stats = {"calls": 0, "rows_sent": [0] * self.world, "foreign_shared_pairs_run": 0, "shared_pairs_sent_away": 0}

    # -- helpers -----------------------------------------------------------------------------
    def _a2a(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
        dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=self.group)
        return recv

    def _is_shared_local(self, local_ids: torch.Tensor) -> torch.Tensor:
        first_shared = self.num_local_experts - self.num_shared_per_rank
        return local_ids >= first_shared

    # -- DeepEP normal-mode interface -------------------------------------------------------------
    def dispatch_a(self, hidden_states: torch.Tensor, topk_output):
        return hidden_states, topk_output.topk_ids.to(torch.int64), topk_output.topk_weights

    def dispatch_b(self, hidden_states, topk_ids, topk_weights, *_):
        from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPNormalDispatchOutput

        L, R = self.num_local_experts, self.world
        T = topk_ids.shape[0]
        owner = torch.where(topk_ids >= 0, topk_ids // L, torch.full_like(topk_ids, -1))
        # Rows to send: (dest rank, token) pairs where the token has an expert on dest, dest-major.
        dest_mask = torch.stack([(owner == r).any(-1) for r in range(R)]) if T else torch.zeros(R, 0, dtype=torch.bool)
        dest_idx, tok_idx = dest_mask.nonzero(as_tuple=True)
        local = torch.where(owner[tok_idx] == dest_idx[:, None], topk_ids[tok_idx] % L, torch.full_like(topk_ids[tok_idx], -1))
        send_splits = [int((dest_idx == r).sum()) for r in range(R)]
        counts = torch.tensor(send_splits, dtype=torch.int64)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_splits = recv_counts.tolist()

        shared_away = (self._is_shared_local(local) & (local >= 0) & (dest_idx[:, None] != self.rank)).sum()
        self.stats["shared_pairs_sent_away"] += int(shared_away)
        for r in range(R):
            self.stats["rows_sent"][r] += send_splits[r]

        x = self._a2a(hidden_states[tok_idx], send_splits, recv_splits)
        ids = self._a2a(local, send_splits, recv_splits)
        w = self._a2a(topk_weights[tok_idx].to(torch.float32), send_splits, recv_splits)
        src = torch.repeat_interleave(torch.arange(R), torch.tensor(recv_splits, dtype=torch.int64))
        self.stats["foreign_shared_pairs_run"] += int(((ids >= 0) & self._is_shared_local(ids) & (src[:, None] != self.rank)).sum())
        self.stats["calls"] += 1
        self._handle = (tok_idx, send_splits, recv_splits, T, hidden_states.shape[-1], hidden_states.dtype)
        per_expert = torch.bincount(ids[ids >= 0].reshape(-1), minlength=L).tolist()
        return DeepEPNormalDispatchOutput(
            hidden_states=x, hidden_states_scale=None, topk_ids=ids, topk_weights=w, num_recv_tokens_per_expert=per_expert
        )

    def combine_a(self, hidden_states, topk_ids, topk_weights, *_, **__):
        return (hidden_states,)

    def combine_b(self, hidden_states, *_):
        tok_idx, send_splits, recv_splits, T, H, dtype = self._handle
        self._handle = None
        back = self._a2a(hidden_states.to(torch.float32).reshape(-1, H), recv_splits, send_splits)
        out = torch.zeros(T, H, dtype=torch.float32)
        out.index_add_(0, tok_idx, back)
        return out.to(dtype)

    # unused DeepEP knobs the dispatcher may forward
    def set_quant_config(self, *_a, **_k):
        pass

    def set_overlap_args(self, *_a, **_k):
        pass

    def clear_overlap_args(self, *_a, **_k):
        pass


def install_gloo_transport(dispatcher, transport: GlooNormalTransport) -> int:
    """Put ``transport`` under every ``DeepEPDispatcher`` inside ``dispatcher`` (TBO wrapper
    included); returns how many were replaced. Both DeepEP modes get it, so ``auto`` resolves
    to the same transport in prefill and decode."""
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPDispatcher

    n = 0
    for inner in getattr(dispatcher, "_inners", [dispatcher]):
        if isinstance(inner, DeepEPDispatcher):
            inner._normal_dispatcher = transport
            inner._low_latency_dispatcher = transport
            n += 1
    return n
