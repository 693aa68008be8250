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
    K: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, SUB: tl.constexpr,
    E: tl.constexpr, EB: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, S: tl.constexpr, NEB: tl.constexpr,
    COUNT: tl.constexpr,  # per-expert counts from ids
    REP: tl.constexpr,  # per-block counts of replicated experts
    ROUTED: tl.constexpr,  # per-rank counts of phys ids
    VALID: tl.constexpr,  # tokens with a valid route (per block and total)
    ATOMIC: tl.constexpr = True,  # add the totals to the accumulators (False: per-block numbers only)
):
    """One program per SUB consecutive blocks of BT tokens (the dispatch kernel's blocks): the
    per-block numbers are stored per block, the totals go out with one atomic per bin."""
    pid = tl.program_id(0)
    k = tl.arange(0, KB)
    e_idx = tl.arange(0, EB)
    r2 = tl.arange(0, 2 * RB)
    row = tl.arange(0, NEB)
    if REP:
        rep_e = tl.load(rep_expert_ptr + row)
        rowvalid = tl.load(rep_colour_ptr + row) >= 0
    htot = tl.zeros([EB], tl.int32)
    hrt = tl.zeros([2 * RB], tl.int32)
    ntot = tl.zeros([1], tl.int32).sum(axis=0)
    for sb in tl.static_range(SUB):
        blk = pid * SUB + sb
        t = blk * BT + tl.arange(0, BT)
        m = (t < T)[:, None] & (k < K)[None, :]
        ids = tl.load(ids_ptr + t[:, None] * K + k[None, :], mask=m, other=-1).to(tl.int32)
        valid = m & (ids >= 0)
        if COUNT:
            h = tl.histogram(tl.reshape(tl.where(valid, ids, E), [BT * KB]), EB)
            htot += h
            if REP:
                tl.store(rephist_ptr + blk * NEB + row, tl.where(rowvalid, tl.gather(h, rep_e, 0), 0))
        if ROUTED:
            ph = tl.load(phys_ptr + t[:, None] * K + k[None, :], mask=m, other=-1).to(tl.int32)
            hrt += tl.histogram(tl.reshape(tl.where(m & (ph >= 0), ph // S, R), [BT * KB]), 2 * RB)
            src_valid = m & (ph >= 0)
        else:
            src_valid = valid
        if VALID:
            nv = tl.sum(tl.max(src_valid.to(tl.int32), axis=1), axis=0)
            tl.store(vcount_ptr + blk + tl.arange(0, 1), nv + tl.zeros([1], tl.int32))
            ntot += nv
    if ATOMIC:
        if COUNT:
            tl.atomic_add(acc_ptr + e_idx, htot, mask=(e_idx < E) & (htot > 0))
        if ROUTED:
            tl.atomic_add(acc_ptr + EB + r2, hrt, mask=(r2 < R) & (hrt > 0))
        if VALID:
            tl.atomic_add(acc_ptr + EB + 2 * RB + tl.arange(0, 1), ntot + tl.zeros([1], tl.int32), mask=ntot > 0)


def block_tokens(max_tokens: int, topk: int) -> int:
    """Tokens per block of kernels A/C/D: <= 256 blocks at ``max_tokens``, 16..128 tokens."""
    bt = next_pow2(max(1, -(-max_tokens // 256)))
    return int(min(max(bt, 16), 128))


def count_sub_blocks(max_blocks: int, target_programs: int = 64) -> int:
    """Blocks per counting program: about ``target_programs`` programs at the largest batch, so
    each bin sees that many atomics, not one per block."""
    return int(min(16, next_pow2(max(1, -(-max_blocks // target_programs)))))


def count_experts(topk_ids: torch.Tensor, num_experts: int, block: int = 32) -> torch.Tensor:
    """Kernel version of ``quota_dispatch.count_experts`` (allocates; for tests and one-off use)."""
    T, K = topk_ids.shape
    EB = next_pow2(num_experts + 1)
    acc = torch.zeros(EB + 2 + 8, dtype=torch.int32, device=topk_ids.device)
    nb = max(1, -(-T // block))
    dummy = torch.zeros(1, dtype=torch.int32, device=topk_ids.device)
    _count_kernel[(nb,)](
        topk_ids, topk_ids, T, acc, dummy, dummy, dummy, dummy,
        K=K, KB=next_pow2(K), BT=block, SUB=1, E=num_experts, EB=EB, R=1, RB=1, S=1, NEB=1,
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
        K=K, KB=next_pow2(K), BT=block, SUB=1, E=1, EB=EB, R=num_ranks, RB=RB, S=slots_per_rank, NEB=1,
        COUNT=False, REP=False, ROUTED=True, VALID=False,
    )
    return acc[EB : EB + num_ranks].to(torch.long)
