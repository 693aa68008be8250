"""The one collective of a dynamic mode: an all-gather of per-rank stat rows over the EP group."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["EpGroup", "current_ep_group", "all_gather_rows"]


class EpGroup:
    """This process's MoE expert-parallel group: rank, size, and the torch process group.

    The process group is looked up on first use, so static modes (which never communicate)
    work before, or without, SGLang's groups being built.
    """

    def __init__(self, rank: int, size: int, group=None, group_getter=None):
        self.rank = int(rank)
        self.size = int(size)
        self._group = group
        self._getter = group_getter

    @property
    def group(self):
        if self._group is None and self._getter is not None and self.size > 1:
            self._group = self._getter()
        return self._group

    def __repr__(self) -> str:
        return f"EpGroup(rank={self.rank}, size={self.size})"


def current_ep_group() -> EpGroup:
    """SGLang's MoE-EP rank and size (``get_parallel()``); the group itself is read lazily."""
    from sglang.srt.runtime_context import get_parallel

    par = get_parallel()
    return EpGroup(par.moe_ep_rank, par.moe_ep_size, group_getter=lambda: get_parallel().moe_ep_group.device_group)


_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_rows(row: torch.Tensor, ep: EpGroup) -> torch.Tensor:
    """All-gather one row per rank: ``[n] -> [size, n]`` (rank order). One collective."""
    row = row.reshape(-1).contiguous()
    if ep.size == 1:
        return row.reshape(1, -1)
    out = torch.empty(ep.size * row.numel(), dtype=row.dtype, device=row.device)
    _gather(out, row, group=ep.group)
    return out.reshape(ep.size, -1)
