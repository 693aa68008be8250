"""Kernel A: token counting, parallel over blocks of tokens.

Each program histograms its block of ``topk_ids`` in registers (``tl.histogram``), then adds
the block's non-zero bins to the global accumulators: one atomic per (block, expert), so the
contention is bounded by the number of blocks, not by the 16k x 8 entries. Integer atomics
commute, so the totals are exact and deterministic. For the deterministic dispatch it also
stores each block's counts of the replicated experts (``rephist [blocks, NEB]``) and, for
Waterfill, the block's number of tokens with a valid route (``vcount [blocks]``): the
dispatch kernel turns them into exclusive prefixes over blocks.

References: ``quota_dispatch.count_experts`` (per-expert counts) and
``waterfill.routed_rank_load`` (per-rank counts of physical ids).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tables import next_pow2


@triton.jit(do_not_specialize=["T"])
def _count_kernel(
    ids_ptr, phys_ptr, T,
    acc_ptr,  # [EB + 2 * RB + 8] int32 accumulators (counts | routed | tokens per source | valid tokens)
    rep_expert_ptr, rep_colour_ptr, rephist_ptr, vcount_ptr,
    K: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr,
    E: tl.constexpr, EB: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, S: tl.constexpr, NEB: tl.constexpr,
    COUNT: tl.constexpr,  # per-expert counts from ids
    REP: tl.constexpr,  # per-block counts of replicated experts
    ROUTED: tl.constexpr,  # per-rank counts of phys ids
    VALID: tl.constexpr,  # tokens with a valid route (per block and total)
):
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    k = tl.arange(0, KB)
    m = (t < T)[:, None] & (k < K)[None, :]
    ids = tl.load(ids_ptr + t[:, None] * K + k[None, :], mask=m, other=-1).to(tl.int32)
    valid = m & (ids >= 0)
    if COUNT:
        key = tl.reshape(tl.where(valid, ids, E), [BT * KB])
        h = tl.histogram(key, EB)
        e_idx = tl.arange(0, EB)
        tl.atomic_add(acc_ptr + e_idx, h, mask=(e_idx < E) & (h > 0))
        if REP:
            row = tl.arange(0, NEB)
            rep_e = tl.load(rep_expert_ptr + row)
            rowvalid = tl.load(rep_colour_ptr + row) >= 0
            tl.store(rephist_ptr + pid * NEB + row, tl.where(rowvalid, tl.gather(h, rep_e, 0), 0))
    if ROUTED:
        ph = tl.load(phys_ptr + t[:, None] * K + k[None, :], mask=m, other=-1).to(tl.int32)
        rk = tl.reshape(tl.where(m & (ph >= 0), ph // S, R), [BT * KB])
        hr = tl.histogram(rk, 2 * RB)
        r2 = tl.arange(0, 2 * RB)
        tl.atomic_add(acc_ptr + EB + r2, hr, mask=(r2 < R) & (hr > 0))
    if VALID:
        if ROUTED:
            src_ids = tl.load(phys_ptr + t[:, None] * K + k[None, :], mask=m, other=-1)
        else:
            src_ids = ids
        tv = tl.max((m & (src_ids >= 0)).to(tl.int32), axis=1)
        nv = tl.sum(tv, axis=0)
        tl.store(vcount_ptr + pid + tl.arange(0, 1), nv + tl.zeros([1], tl.int32))
        tl.atomic_add(acc_ptr + EB + 2 * RB + tl.arange(0, 1), nv + tl.zeros([1], tl.int32), mask=nv > 0)


def block_tokens(max_tokens: int, topk: int) -> int:
    """Tokens per block of kernels A/C/D: <= 256 blocks at ``max_tokens``, 16..128 tokens."""
    bt = next_pow2(max(1, -(-max_tokens // 256)))
    return int(min(max(bt, 16), 128))


def count_experts(topk_ids: torch.Tensor, num_experts: int, block: int = 32) -> torch.Tensor:
    """Kernel version of ``quota_dispatch.count_experts`` (allocates; for tests and one-off use)."""
    T, K = topk_ids.shape
    EB = next_pow2(num_experts + 1)
    acc = torch.zeros(EB + 2 + 8, dtype=torch.int32, device=topk_ids.device)
    nb = max(1, -(-T // block))
    dummy = torch.zeros(1, dtype=torch.int32, device=topk_ids.device)
    _count_kernel[(nb,)](
        topk_ids, topk_ids, T, acc, dummy, dummy, dummy, dummy,
        K=K, KB=next_pow2(K), BT=block, E=num_experts, EB=EB, R=1, RB=1, S=1, NEB=1,
        COUNT=True, REP=False, ROUTED=False, VALID=False,
    )
    return acc[:num_experts].to(torch.long)


def routed_rank_load(phys_topk_ids: torch.Tensor, num_ranks: int, slots_per_rank: int, block: int = 32) -> torch.Tensor:
    """Kernel version of ``waterfill.routed_rank_load`` (allocates; for tests and one-off use)."""
    T, K = phys_topk_ids.shape
    RB = next_pow2(num_ranks)
    EB = 1
    acc = torch.zeros(EB + 2 * RB + 8, dtype=torch.int32, device=phys_topk_ids.device)
    nb = max(1, -(-T // block))
    dummy = torch.zeros(1, dtype=torch.int32, device=phys_topk_ids.device)
    _count_kernel[(nb,)](
        phys_topk_ids, phys_topk_ids, T, acc, dummy, dummy, dummy, dummy,
        K=K, KB=next_pow2(K), BT=block, E=1, EB=EB, R=num_ranks, RB=RB, S=slots_per_rank, NEB=1,
        COUNT=False, REP=False, ROUTED=True, VALID=False,
    )
    return acc[EB : EB + num_ranks].to(torch.long)
