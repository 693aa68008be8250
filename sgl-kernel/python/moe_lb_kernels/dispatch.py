"""Kernels C and D: deterministic token -> physical copy mapping, and Waterfill assignment.

Kernel C (one program per block of ``BT`` tokens, same blocks as kernel A):

* LPLB: the occurrence index ``j`` of every ``(token, k)`` entry among the entries of its
  expert in row-major order is ``(entries of that expert in earlier blocks) + (earlier
  entries in this block)``. The first term is an exclusive prefix over kernel A's per-block
  counts, the second a one-hot prefix sum over chunks of the block: deterministic, no
  atomics. Under DP attention the rank's global offset per expert is added. The copy is the
  one whose inclusive quota prefix first exceeds ``j`` (kernel B stores the prefixes with
  the last copy at +inf, which is the core's clamp). Reference: ``quota_dispatch.dispatch``.
* Waterfill, all_rank: each token's index among this rank's tokens with a valid route
  (exclusive prefix over blocks again) gives its overflow index; a search in the
  cumulative spare quotas gives its rank. Reference: ``waterfill.assign_shared``.
* Waterfill, conservative: round 0 of the candidate rounds (each todo token picks its
  candidate rank with the most room), plus the block's histogram of picks.

Kernel D (conservative rounds 1..K, one launch each): the global order of acceptance in a
round is "token order within each picked rank", so a token is accepted iff (picks of its
rank in earlier blocks) + (earlier picks in its block) < that rank's room. Every program
re-derives the round's totals from the per-block histograms, so the room left for the next
round (``room - min(room, pickers)``) needs no extra pass.

The fused shared-expert layout (``waterfill.fuse_topk``) is a separate elementwise kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _block_prefix(hist_ptr, pid, W: tl.constexpr, WB: tl.constexpr, NBMAX: tl.constexpr, CHB: tl.constexpr):
    """Sum of rows ``0..pid-1`` of ``hist [blocks, W]`` (int32) -> ``[WB]`` int32.

    Unrolled over the row capacity with masks, so all loads are independent and in flight
    together (masked rows cost no memory traffic)."""
    w = tl.arange(0, WB)
    acc = tl.zeros([WB], tl.int32)
    for b0 in tl.static_range(0, NBMAX, CHB):
        b = b0 + tl.arange(0, CHB)
        v = tl.load(hist_ptr + b[:, None] * W + w[None, :], mask=(b < pid)[:, None] & (w < W)[None, :], other=0)
        acc += tl.sum(v, axis=0)
    return acc


@triton.jit
def _block_total(hist_ptr, pid, n_blocks, W: tl.constexpr, WB: tl.constexpr, NBMAX: tl.constexpr,
                 CHB: tl.constexpr):
    """(prefix over rows < pid, total over all rows) of ``hist [n_blocks, W]``."""
    w = tl.arange(0, WB)
    pre = tl.zeros([WB], tl.int32)
    tot = tl.zeros([WB], tl.int32)
    for b0 in tl.static_range(0, NBMAX, CHB):
        b = b0 + tl.arange(0, CHB)
        v = tl.load(hist_ptr + b[:, None] * W + w[None, :], mask=(b < n_blocks)[:, None] & (w < W)[None, :], other=0)
        tot += tl.sum(v, axis=0)
        pre += tl.sum(tl.where((b < pid)[:, None], v, 0), axis=0)
    return pre, tot


@triton.jit
def _pick(ph, todo, room_vec, R: tl.constexpr, RB: tl.constexpr, S: tl.constexpr,
          CT: tl.constexpr, KB: tl.constexpr):
    """One conservative round's choice: the candidate rank with the most room (first on ties)."""
    cand = tl.where(ph >= 0, ph // S, R)
    candc = tl.minimum(cand, RB - 1)
    room = tl.reshape(tl.gather(room_vec, tl.reshape(candc, [CT * KB]), 0), [CT, KB])
    room = tl.where(cand < R, room, 0)
    room = tl.where(todo[:, None], room, -1)
    best = tl.argmax(room, axis=1, tie_break_left=True)
    kk = tl.arange(0, KB)
    pick = tl.sum(tl.where(kk[None, :] == best[:, None], cand, 0), axis=1)
    best_room = tl.max(room, axis=1)
    ok = todo & (best_room > 0)
    return tl.where(ok, pick, R)


@triton.jit(do_not_specialize=["T", "src_rank"])
def _dispatch_kernel(
    ids_ptr, out_ptr, phys_in_ptr, T,
    rep_id_ptr, log2phys0_ptr, rep_slot_ptr, rep_expert_ptr, qcum_ptr, rephist_ptr, dp_off_ptr,
    vcount_ptr, wf_ptr, wf_vec_ptr, shared_ptr, pick_ptr, todo_ptr, hist0_ptr,
    src_rank,
    K: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, CT: tl.constexpr,
    E: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, S: tl.constexpr, NEB: tl.constexpr, CB: tl.constexpr,
    CBITS: tl.constexpr,
    LPLB: tl.constexpr,  # 0: phys ids given (phys_in), 1: static map (no replicas), 2: quota dispatch
    DYNAMIC: tl.constexpr, WF: tl.constexpr, NBMAX: tl.constexpr, CHB_REP: tl.constexpr, CHB_V: tl.constexpr,
):
    pid = tl.program_id(0)
    kk = tl.arange(0, KB)
    row = tl.arange(0, NEB)
    r = tl.arange(0, RB)
    if LPLB == 2:
        running = _block_prefix(rephist_ptr, pid, NEB, NEB, NBMAX, CHB_REP)
        if DYNAMIC:
            rep_e = tl.load(rep_expert_ptr + row)
            running += tl.load(dp_off_ptr + rep_e)
    if WF != 0:
        vbase = tl.sum(_block_prefix(vcount_ptr, pid, 1, 2, NBMAX, CHB_V), axis=0)
        keep_src = tl.load(wf_ptr)
        excl_over = tl.load(wf_ptr + 1)
        wvec = tl.load(wf_vec_ptr + r)
        hist = tl.zeros([RB], tl.int32)
    for c0 in tl.static_range(0, BT, CT):
        t = pid * BT + c0 + tl.arange(0, CT)
        tm = t < T
        m = tm[:, None] & (kk < K)[None, :]
        ids = tl.load(ids_ptr + t[:, None] * K + kk[None, :], mask=m, other=-1)
        valid = m & (ids >= 0)
        idc = tl.where(valid, ids, 0).to(tl.int32)
        if LPLB == 2:
            rid = tl.load(rep_id_ptr + idc, mask=valid, other=-1)
            rflat = tl.reshape(rid, [CT * KB])
            oh = rflat[:, None] == row[None, :]
            cs = tl.cumsum(oh.to(tl.int32), axis=0)
            occ = tl.sum(tl.where(oh, cs, 0), axis=1) - 1 + tl.gather(running, tl.maximum(rflat, 0), 0)
            running += tl.sum(oh.to(tl.int32), axis=0)
            occ = tl.reshape(occ, [CT, KB])
            isrep = rid >= 0
            ridc = tl.maximum(rid, 0)
            # number of copies whose inclusive quota prefix is <= occ (binary search, prefixes ascend)
            pos = tl.zeros([CT, KB], tl.int32)
            for i in tl.static_range(CBITS):
                step = CB >> (i + 1)
                qc = tl.load(qcum_ptr + ridc * CB + pos + (step - 1), mask=isrep, other=2147483647)
                pos += tl.where(qc <= occ, step, 0)
            rep_phys = tl.load(rep_slot_ptr + ridc * CB + pos, mask=isrep, other=0)
            one_phys = tl.load(log2phys0_ptr + idc, mask=valid, other=0)
            ph = tl.where(isrep, rep_phys, one_phys)
            ph = tl.where(valid, ph, ids)
            tl.store(out_ptr + t[:, None] * K + kk[None, :], ph.to(out_ptr.dtype.element_ty), mask=m)
        elif LPLB == 1:
            ph = tl.where(valid, tl.load(log2phys0_ptr + idc, mask=valid, other=0), ids)
            tl.store(out_ptr + t[:, None] * K + kk[None, :], ph.to(out_ptr.dtype.element_ty), mask=m)
        else:
            ph = tl.load(phys_in_ptr + t[:, None] * K + kk[None, :], mask=m, other=-1)
        if WF != 0:
            ph32 = tl.where(m, ph, -1).to(tl.int32)
            tv = tl.max((ph32 >= 0).to(tl.int32), axis=1)
            vpos = vbase + tl.cumsum(tv, axis=0) - tv  # index among valid tokens (valid-first order)
            j = vpos.to(tl.int64) - keep_src
            go = (tv > 0) & (j >= 0)
            if WF == 2:
                g = j + excl_over
                hit = (wvec[None, :] <= g[:, None]) & (r < R)[None, :]
                tgt = tl.minimum(tl.sum(hit.to(tl.int32), axis=1), R - 1)
                tl.store(shared_ptr + t, tl.where(go, tgt, src_rank).to(tl.int64), mask=tm)
            else:
                pick = _pick(ph32, go, wvec, R, RB, S, CT, KB)
                tl.store(pick_ptr + t, pick, mask=tm)
                tl.store(todo_ptr + t, go.to(tl.int32), mask=tm)
                tl.store(shared_ptr + t, (src_rank + tl.zeros([CT], tl.int32)).to(tl.int64), mask=tm)
                hist += tl.sum((pick[:, None] == r[None, :]).to(tl.int32), axis=0)
    if WF == 1:
        tl.store(hist0_ptr + pid * RB + r, hist)


@triton.jit(do_not_specialize=["T", "n_blocks"])
def _wf_round_kernel(
    phys_ptr, T, n_blocks, pick_ptr, todo_ptr, hist_prev_ptr, hist_next_ptr, cap_prev_ptr, cap_next_ptr,
    shared_ptr,
    K: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, CT: tl.constexpr,
    R: tl.constexpr, RB: tl.constexpr, S: tl.constexpr, LAST: tl.constexpr, NBMAX: tl.constexpr,
    CHB_R: tl.constexpr,
):
    """Accept the previous round's picks in global token order; unless LAST, pick the next round."""
    pid = tl.program_id(0)
    r = tl.arange(0, RB)
    kk = tl.arange(0, KB)
    pre, tot = _block_total(hist_prev_ptr, pid, n_blocks, RB, RB, NBMAX, CHB_R)
    cap = tl.load(cap_prev_ptr + r)
    cap_next = cap - tl.minimum(cap, tot.to(tl.int64))
    if not LAST:
        if pid == 0:
            tl.store(cap_next_ptr + r, cap_next)
    running = pre
    hist = tl.zeros([RB], tl.int32)
    for c0 in tl.static_range(0, BT, CT):
        t = pid * BT + c0 + tl.arange(0, CT)
        tm = t < T
        pick = tl.load(pick_ptr + t, mask=tm, other=R)
        todo = tl.load(todo_ptr + t, mask=tm, other=0) != 0
        oh = pick[:, None] == r[None, :]
        cs = tl.cumsum(oh.to(tl.int32), axis=0)
        pc = tl.minimum(pick, RB - 1)
        rank_in = tl.sum(tl.where(oh, cs, 0), axis=1) - 1 + tl.gather(running, pc, 0)
        running += tl.sum(oh.to(tl.int32), axis=0)
        accept = (pick < R) & (rank_in.to(tl.int64) < tl.gather(cap, pc, 0))
        tl.store(shared_ptr + t, pick.to(tl.int64), mask=tm & accept)
        todo = todo & ~accept
        if not LAST:
            m = tm[:, None] & (kk < K)[None, :]
            ph = tl.load(phys_ptr + t[:, None] * K + kk[None, :], mask=m, other=-1).to(tl.int32)
            npick = _pick(ph, todo, cap_next, R, RB, S, CT, KB)
            tl.store(pick_ptr + t, npick, mask=tm)
            tl.store(todo_ptr + t, todo.to(tl.int32), mask=tm)
            hist += tl.sum((npick[:, None] == r[None, :]).to(tl.int32), axis=0)
    if not LAST:
        tl.store(hist_next_ptr + pid * RB + r, hist)


@triton.jit(do_not_specialize=["T"])
def _fuse_kernel(phys_ptr, w_ptr, shared_ptr, out_ids_ptr, out_w_ptr, T, shared_weight,
                 K: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, S: tl.constexpr, MARKER: tl.constexpr):
    """``waterfill.fuse_topk``: routed ``p -> p + p // S``, shared column ``r * (S + 1) + S``."""
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    kk = tl.arange(0, KB)
    tm = t < T
    m = tm[:, None] & (kk < K)[None, :]
    ph = tl.load(phys_ptr + t[:, None] * K + kk[None, :], mask=m, other=-1)
    w = tl.load(w_ptr + t[:, None] * K + kk[None, :], mask=m, other=0.0)
    valid = m & (ph >= 0)
    routed = tl.where(valid, ph + ph // S, ph)
    tl.store(out_ids_ptr + t[:, None] * (K + 1) + kk[None, :], routed.to(out_ids_ptr.dtype.element_ty), mask=m)
    tl.store(out_w_ptr + t[:, None] * (K + 1) + kk[None, :], tl.where(valid, w, 0.0).to(out_w_ptr.dtype.element_ty), mask=m)
    has_any = tl.max(valid.to(tl.int32), axis=1) > 0
    sr = tl.load(shared_ptr + t, mask=tm, other=0)
    sid = tl.where(has_any, sr * (S + 1) + S, MARKER)
    tl.store(out_ids_ptr + t * (K + 1) + K, sid.to(out_ids_ptr.dtype.element_ty), mask=tm)
    sw = tl.where(has_any, shared_weight, 0.0)
    tl.store(out_w_ptr + t * (K + 1) + K, sw.to(out_w_ptr.dtype.element_ty), mask=tm)
