"""One program per layer: counts -> exact split -> integer quotas (-> Waterfill shared quotas).

Kernel B of the hot path (see docs/kernels.md). A single CTA holds the whole layer's
problem in registers: replicated experts as ``[NEB, CB]`` tiles (row = expert, column =
copy), rank loads as ``[RB]``. It mirrors, step for step:

* ``reference.split_fixed``: the core's block-coordinate water-filling
  (``quota_dispatch.integer_block_step`` in fixed point), colours in the core's order,
  stopping after the first sweep whose integer certificate (the core's prefix lower bound)
  holds, at most ``max_sweeps`` sweeps;
* ``objective.round_fixed`` (largest remainder in fixed point) and the core's ``polish``
  with every sweep applied and keep-if-not-worse (``reference.FixedPointSteps``);
* ``waterfill.shared_quotas`` (float64, same operations in the same order) and the
  per-rank numbers ``assign_shared`` derives from the quotas.

It also accumulates diagnostic counters (calls, solves, uncertified solves, sweeps, the
largest certificate gap) in ``scalars[2:8]`` on the device; the host reads them off the
critical path (``LayerBalancer.counters``).

All integer arithmetic is exact in any reduction order, so results are bit-identical on
any GPU and in the Triton interpreter. Nothing here reads a host value at run time: the
colour count and the tables live in device memory, sweep caps are kernel arguments.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .reference import SCALE_BITS, SLACK_UNITS, TOL_SHIFT

BIG = tl.constexpr(1 << 62)  # larger than any (count + loads) // k
PADK = tl.constexpr(1 << 60)  # sorts after every real fixed-point load (< 2**53)
# Certificate keys: (KEYPAD - load) << RBITS | rank. KEYPAD must exceed every load (< 2**53)
# and keep every real key below BIGKEY for RBITS <= 8 (R <= 256): (2**53 << 8) | 255 < 2**62.
# (With KEYPAD = 2**54 a rank of load 0 at RBITS = 8 had key 2**62 | rank >= BIGKEY, so for R in
# 129..255 it sorted behind the padding lanes and the prefixes counted padding as rank 0.)
KEYPAD = tl.constexpr(1 << 53)
BIGKEY = tl.constexpr(1 << 62)  # sorts after every real key


@triton.jit
def _gather_1d(src, idx, N: tl.constexpr):
    """``src[idx]`` for a 1-D register tensor ``src`` and an index tile of N elements (any shape)."""
    flat = tl.reshape(idx, [N])
    return tl.reshape(tl.gather(src, flat, 0), idx.shape)


@triton.jit
def _per_copy(ra, fr, mult, dup, valid):
    """Tokens per copy from the amount on each copy's rank (stored at the rank's first copy):
    copies sharing a rank split it as evenly as possible, earlier copies first (the core's rule)."""
    rf = tl.gather(ra, tl.maximum(fr, 0), 1)
    return tl.where(valid, rf // mult + (dup < rf % mult).to(tl.int64), 0)


@triton.jit
def _rank_amounts(q, nxt, first, maxm):
    """Per-copy tokens -> amount per (expert, rank), stored at the rank's first copy."""
    acc = q
    idx = nxt
    for _ in range(1, maxm):
        acc += tl.where(idx >= 0, tl.gather(q, tl.maximum(idx, 0), 1), 0)
        idx = tl.where(idx >= 0, tl.gather(nxt, tl.maximum(idx, 0), 1), -1)
    return tl.where(first, acc, 0)


@triton.jit
def _rep_rank_loads(ra, colour_src_ptr, G, RB: tl.constexpr, NC: tl.constexpr):
    """Load of every rank from the replicated experts: ``[NEB, CB] -> [RB]`` (exact)."""
    r = tl.arange(0, RB)
    flat = tl.reshape(ra, [NC])
    tot = tl.zeros([RB], tl.int64)
    for g in range(0, G):
        src = tl.load(colour_src_ptr + g * RB + r)
        tot += tl.where(src >= 0, tl.gather(flat, tl.maximum(src, 0), 0), 0)
    return tot


@triton.jit
def _block_step(ra, load, crow, act, csrc, rankc, first, nfirst,
                NEB: tl.constexpr, CB: tl.constexpr, NC: tl.constexpr):
    """The core's integer water-fill block step for the experts of one colour (``act`` rows).

    ``ra`` holds each expert's amount per rank at the rank's first copy (the core's
    ``own_rank``); the step re-pours the expert onto its ranks, lowest level first.
    """
    col = tl.arange(0, CB)
    base = _gather_1d(load, rankc, NC) - ra
    sk = tl.sort(tl.where(first, base, PADK), dim=1)
    sk = tl.where(col[None, :] < nfirst[:, None], sk, 0)
    cs = tl.cumsum(sk, axis=1)
    kk = (col + 1).to(tl.int64)
    lev = tl.where(col[None, :] < nfirst[:, None], (crow[:, None] + cs) // kk[None, :], BIG)
    level = tl.min(lev, axis=1)
    amt = tl.where(first, tl.maximum(level[:, None] - base, 0), 0)
    short = crow - tl.sum(amt, axis=1)
    atl = first & (base <= level[:, None])
    cnt = tl.cumsum(atl.to(tl.int64), axis=1)
    amt = amt + (atl & (cnt <= short[:, None])).to(tl.int64)
    upd = act[:, None] & first
    delta = tl.reshape(tl.where(upd, amt - ra, 0), [NC])
    ra = tl.where(upd, amt, ra)
    dr = tl.gather(delta, tl.maximum(csrc, 0), 0)
    load = load + tl.where(csrc >= 0, dr, 0)
    return ra, load


@triton.jit
def _shared_step(qs, load, cs, R: tl.constexpr, RB: tl.constexpr):
    """The same block step for the shared expert (one copy on every rank, copy order = rank order)."""
    r = tl.arange(0, RB)
    rv = r < R
    base = load - qs
    sk = tl.sort(tl.where(rv, base, PADK), dim=0)
    sk = tl.where(rv, sk, 0)
    csum = tl.cumsum(sk, axis=0)
    lev = tl.where(rv, (cs + csum) // (r + 1).to(tl.int64), BIG)
    level = tl.min(lev, axis=0)
    amt = tl.where(rv, tl.maximum(level - base, 0), 0)
    short = cs - tl.sum(amt, axis=0)
    atl = rv & (base <= level)
    cnt = tl.cumsum(atl.to(tl.int64), axis=0)
    amt = amt + (atl & (cnt <= short)).to(tl.int64)
    return amt, base + amt


@triton.jit
def _sweep(ra, qs, load, crow, cs_sh, colour, colour_src_ptr, G, rankc, first, nfirst,
           R: tl.constexpr, RB: tl.constexpr, NEB: tl.constexpr, CB: tl.constexpr, SHARED_BLOCK: tl.constexpr):
    r = tl.arange(0, RB)
    for g in range(0, G):
        csrc = tl.load(colour_src_ptr + g * RB + r)
        ra, load = _block_step(ra, load, crow, colour == g, csrc, rankc, first, nfirst, NEB, CB, NEB * CB)
    if SHARED_BLOCK:
        qs, load = _shared_step(qs, load, cs_sh, R, RB)
    return ra, qs, load


@triton.jit
def _rank_keys(load, R: tl.constexpr, RB: tl.constexpr, RBITS: tl.constexpr):
    """Sort keys of the rank order "load desc, rank asc": ``[RB]`` int64, padding lanes last.

    ``key & (RB - 1)`` is the rank; every real key is below ``BIGKEY`` (see ``KEYPAD``)."""
    r = tl.arange(0, RB)
    return tl.where(r < R, ((KEYPAD - load) << RBITS) | r.to(tl.int64), BIGKEY)


@triton.jit
def _prefix_num(load, fixed_s, crow_s, rowvalid, rankc, valid, cs_sh,
                R: tl.constexpr, RB: tl.constexpr, RBITS: tl.constexpr, NEB: tl.constexpr, CB: tl.constexpr,
                SHARED_BLOCK: tl.constexpr):
    """Numerators of the core's prefix lower bound: ``[RB]``, entry ``k - 1`` = fixed load of the
    ``k`` heaviest ranks (load desc, rank asc; one sort) + every expert whose copies all lie among
    them. ``num[k - 1] / k`` bounds the max load of any split from below (exact integers)."""
    r = tl.arange(0, RB)
    rv = r < R
    key = _rank_keys(load, R, RB, RBITS)
    sk = tl.sort(key, dim=0)  # sk[k-1] = key of the k-th rank in the order
    sr = (sk & (RB - 1)).to(tl.int32)
    num = tl.cumsum(tl.where(rv, tl.gather(fixed_s, sr, 0), 0), axis=0)
    mk = tl.max(tl.where(valid, _gather_1d(key, rankc, NEB * CB), -1), axis=1)  # last rank of each expert
    cont = (mk[None, :] <= sk[:, None]) & rowvalid[None, :]
    num = num + tl.sum(tl.where(cont, crow_s[None, :], 0), axis=1)
    if SHARED_BLOCK:
        num = num + tl.where(r == R - 1, cs_sh, 0)
    return num


@triton.jit
def _certify(load, fixed_s, crow_s, rowvalid, rankc, valid, cs_sh,
             R: tl.constexpr, RB: tl.constexpr, RBITS: tl.constexpr, NEB: tl.constexpr, CB: tl.constexpr,
             SHARED_BLOCK: tl.constexpr, TOL_SHIFT_C: tl.constexpr, SLACK: tl.constexpr):
    """1 when some "top-k ranks by load" set proves max(load) optimal within tolerance (exact
    integers; ``reference.certificate``)."""
    r = tl.arange(0, RB)
    rv = r < R
    m = tl.max(tl.where(rv, load, -1), axis=0)
    thr = m - ((m >> TOL_SHIFT_C) + SLACK)
    num = _prefix_num(load, fixed_s, crow_s, rowvalid, rankc, valid, cs_sh, R, RB, RBITS, NEB, CB, SHARED_BLOCK)
    ok = rv & (num >= (r + 1).to(tl.int64) * thr)
    return tl.max(ok.to(tl.int32), axis=0)


@triton.jit
def _gap(load, fixed_s, crow_s, rowvalid, rankc, valid, cs_sh,
         R: tl.constexpr, RB: tl.constexpr, RBITS: tl.constexpr, NEB: tl.constexpr, CB: tl.constexpr,
         SHARED_BLOCK: tl.constexpr):
    """``max(load) - max_k floor(num_k / k)``: how far the split may be above the optimum, in
    fixed-point units (``reference.bound_gap``; >= 0, ~0 when certified)."""
    r = tl.arange(0, RB)
    rv = r < R
    m = tl.max(tl.where(rv, load, -1), axis=0)
    num = _prefix_num(load, fixed_s, crow_s, rowvalid, rankc, valid, cs_sh, R, RB, RBITS, NEB, CB, SHARED_BLOCK)
    best = tl.max(tl.where(rv, num // (r + 1).to(tl.int64), 0), axis=0)
    return m - best


@triton.jit(do_not_specialize=["src_rank", "max_sweeps", "polish_sweeps"])
def _split_kernel(
    # tables (LayerTables)
    p2l_ptr, rep_expert_ptr, rep_rank_ptr, rep_colour_ptr, colour_src_ptr, slot_flat_ptr,
    rep_fr_ptr, rep_next_ptr, rep_mult_ptr, rep_dup_ptr, meta_ptr,
    # accumulators [EB + 2 * RB + 8] int32 (counts | routed | tokens per source | valid tokens), zeroed here
    acc_ptr,
    # outputs
    counts_ptr,  # [E] int64
    quotas_ptr,  # [P] int64
    qcum_ptr,  # [NEB, CB] int32: inclusive quota prefix per copy; the last copy holds INT32_MAX
    shared_q_ptr,  # [RB] int64
    flags_ptr,  # [8] int32: certified, sweeps, polish sweeps, polished kept
    wf_ptr,  # [8] int64 scalars: [0] keep[src], [1] exclusive overflow prefix at src (Waterfill);
    #          [2:8] counters, accumulated: calls, solves, uncertified, sweeps, max gap units, gaps >= 1 token
    wf_vec_ptr,  # [RB + 1] int64: inclusive cumsum of spare (all_rank) or cap (conservative)
    routed_ptr,  # [RB] int64: routed load per rank
    src_rank, max_sweeps, polish_sweeps,
    E: tl.constexpr, R: tl.constexpr, S: tl.constexpr, P: tl.constexpr,
    NEB: tl.constexpr, CB: tl.constexpr, RB: tl.constexpr, EB: tl.constexpr, SB: tl.constexpr, PB: tl.constexpr,
    CBITS: tl.constexpr, RBITS: tl.constexpr,
    LPLB: tl.constexpr,  # split + quotas
    JOINT: tl.constexpr,  # the shared expert is part of the split (waterfill all_rank + lplb)
    WF: tl.constexpr,  # 0 none, 1 conservative, 2 all_rank
    DYNAMIC: tl.constexpr,  # tokens per source from the gathered stats (else one-hot at src_rank)
    SCALE_B: tl.constexpr, TOL_SHIFT_C: tl.constexpr, SLACK: tl.constexpr,
):
    NC: tl.constexpr = NEB * CB
    SHARED_BLOCK: tl.constexpr = JOINT and R >= 2
    MASK: tl.constexpr = (1 << SCALE_B) - 1
    e_idx = tl.arange(0, EB)
    r = tl.arange(0, RB)
    rv = r < R
    counts = tl.load(acc_ptr + e_idx, mask=e_idx < E, other=0).to(tl.int64)
    routed_acc = tl.load(acc_ptr + EB + r, mask=rv, other=0).to(tl.int64)
    tok_src_acc = tl.load(acc_ptr + EB + RB + r, mask=rv, other=0).to(tl.int64)
    n_local = tl.load(acc_ptr + EB + 2 * RB).to(tl.int64)
    tl.debug_barrier()
    # self-cleaning accumulators: the next layer/call starts from zeros without a memset
    tl.store(acc_ptr + e_idx, tl.zeros([EB], tl.int32))
    tl.store(acc_ptr + EB + r, tl.zeros([RB], tl.int32))
    tl.store(acc_ptr + EB + RB + r, tl.zeros([RB], tl.int32))
    tl.store(acc_ptr + EB + 2 * RB + tl.arange(0, 8), tl.zeros([8], tl.int32))
    tl.store(counts_ptr + e_idx, counts, mask=e_idx < E)
    one = tl.full([1], 1, tl.int64)
    tl.store(wf_ptr + 2 + tl.arange(0, 1), tl.load(wf_ptr + 2 + tl.arange(0, 1)) + one)  # calls
    if DYNAMIC:
        tok_src = tok_src_acc
    else:
        tok_src = tl.where(r == src_rank, n_local, 0)
    n_total = tl.sum(tok_src, axis=0)

    routed = routed_acc
    qs_final = tl.zeros([RB], tl.int64)
    if LPLB:
        # ---- tables ---------------------------------------------------------------------------
        row = tl.arange(0, NEB)
        col = tl.arange(0, CB)
        tix = row[:, None] * CB + col[None, :]
        G = tl.load(meta_ptr)
        maxm = tl.load(meta_ptr + 3)
        rank2 = tl.load(rep_rank_ptr + tix)
        valid = rank2 >= 0
        rankc = tl.where(valid, rank2, 0)
        fr = tl.load(rep_fr_ptr + tix)
        nxt = tl.load(rep_next_ptr + tix)
        mult = tl.load(rep_mult_ptr + tix).to(tl.int64)
        dup = tl.load(rep_dup_ptr + tix).to(tl.int64)
        first = valid & (fr == col[None, :])
        nfirst = tl.sum(first.to(tl.int32), axis=1)
        colour = tl.load(rep_colour_ptr + row)
        rowvalid = colour >= 0
        rep_e = tl.load(rep_expert_ptr + row)
        crow = tl.where(rowvalid, tl.gather(counts, rep_e, 0), 0)
        ncopy = tl.sum(valid.to(tl.int64), axis=1)
        # fixed load per rank: single-copy experts
        s_idx = tl.arange(0, SB)
        slot = r[:, None] * S + s_idx[None, :]
        smask = rv[:, None] & (s_idx[None, :] < S)
        sp2l = tl.load(p2l_ptr + slot, mask=smask, other=0)
        sflat = tl.load(slot_flat_ptr + slot, mask=smask, other=0)
        fixed = tl.sum(tl.where(smask & (sflat < 0), _gather_1d(counts, sp2l, RB * SB), 0), axis=1)
        if JOINT:
            if R == 1:
                fixed = fixed + tl.where(r == 0, n_total, 0)
        # ---- fixed-point split -----------------------------------------------------------------
        crow_s = crow << SCALE_B
        cs_sh = n_total << SCALE_B
        qs = tl.zeros([RB], tl.int64)
        it = 0
        cert = tl.zeros([1], tl.int32).sum(axis=0)
        nc1 = tl.maximum(ncopy, 1)
        q0 = tl.where(valid, (crow_s // nc1)[:, None] + (col[None, :] < (crow_s % nc1)[:, None]).to(tl.int64), 0)
        ra = _rank_amounts(q0, nxt, first, maxm)
        if SHARED_BLOCK:
            qs = tl.where(rv, cs_sh // R + (r < cs_sh % R).to(tl.int64), 0)
        fixed_s = fixed << SCALE_B
        load = fixed_s + _rep_rank_loads(ra, colour_src_ptr, G, RB, NC) + qs
        n_sweeps = max_sweeps
        if not SHARED_BLOCK:
            n_sweeps = tl.where(G > 0, max_sweeps, 0)
        while (it < n_sweeps) & (cert == 0):
            ra, qs, load = _sweep(ra, qs, load, crow_s, cs_sh, colour, colour_src_ptr, G, rankc, first, nfirst,
                                  R, RB, NEB, CB, SHARED_BLOCK)
            cert = _certify(load, fixed_s, crow_s, rowvalid, rankc, valid, cs_sh, R, RB, RBITS, NEB, CB,
                            SHARED_BLOCK, TOL_SHIFT_C, SLACK)
            it += 1
        if it == 0:
            cert = _certify(load, fixed_s, crow_s, rowvalid, rankc, valid, cs_sh, R, RB, RBITS, NEB, CB,
                            SHARED_BLOCK, TOL_SHIFT_C, SLACK)
        q = _per_copy(ra, fr, mult, dup, valid)
        # ---- counters (one program: plain read-modify-write) ---------------------------------
        gap = _gap(load, fixed_s, crow_s, rowvalid, rankc, valid, cs_sh, R, RB, RBITS, NEB, CB, SHARED_BLOCK)
        c4 = tl.arange(0, 4)
        ctr = tl.load(wf_ptr + 3 + c4)  # solves, uncertified, sweeps, max gap
        inc = tl.where(c4 == 0, 1, tl.where(c4 == 1, (cert == 0).to(tl.int64), tl.where(c4 == 2, it.to(tl.int64), 0)))
        ctr = tl.where(c4 == 3, tl.maximum(ctr, gap), ctr + inc)
        tl.store(wf_ptr + 3 + c4, ctr)
        big_gap = tl.load(wf_ptr + 7 + tl.arange(0, 1))
        tl.store(wf_ptr + 7 + tl.arange(0, 1), big_gap + (gap >= (1 << SCALE_B)).to(tl.int64))
        # ---- largest remainder on the fixed-point split (larger remainder first, then lower slot) --
        fl = q >> SCALE_B
        short = crow - tl.sum(fl, axis=1)
        key = tl.where(valid, ((MASK - (q & MASK)) << CBITS) | col[None, :].to(tl.int64), BIGKEY)
        thr = tl.gather(tl.sort(key, dim=1), tl.minimum(tl.maximum(short - 1, 0), CB - 1).to(tl.int32)[:, None], 1)
        qi = fl + (valid & (short[:, None] > 0) & (key <= thr)).to(tl.int64)
        qsi = tl.zeros([RB], tl.int64)
        if SHARED_BLOCK:
            sfl = qs >> SCALE_B
            sshort = n_total - tl.sum(sfl, axis=0)
            skey = tl.where(rv, ((MASK - (qs & MASK)) << RBITS) | r.to(tl.int64), BIGKEY)
            sthr = tl.sum(tl.where(r == tl.minimum(tl.maximum(sshort - 1, 0), RB - 1), tl.sort(skey, dim=0), 0), axis=0)
            qsi = tl.where(rv, sfl + ((sshort > 0) & (skey <= sthr)).to(tl.int64), 0)
        # ---- integer polish (the core's ``polish``, every sweep), kept unless it raises the max rank load --
        ra_p = _rank_amounts(qi, nxt, first, maxm)
        load_i = fixed + _rep_rank_loads(ra_p, colour_src_ptr, G, RB, NC) + qsi
        q_prev = qi
        qsp = qsi
        loadp = load_i
        pit = 0
        changed = (polish_sweeps > 0).to(tl.int32)
        while (pit < polish_sweeps) & (changed != 0):
            qs_old = qsp
            ra_p, qsp, loadp = _sweep(ra_p, qsp, loadp, crow, n_total, colour, colour_src_ptr, G, rankc, first,
                                      nfirst, R, RB, NEB, CB, SHARED_BLOCK)
            q_now = _per_copy(ra_p, fr, mult, dup, valid)
            diff = tl.max(tl.max((q_now != q_prev).to(tl.int32), axis=1), axis=0)
            changed = diff | tl.max((qsp != qs_old).to(tl.int32), axis=0)
            q_prev = q_now
            pit += 1
        better = tl.max(tl.where(rv, loadp, -1), axis=0) <= tl.max(tl.where(rv, load_i, -1), axis=0)
        qf = tl.where(better, q_prev, qi)
        qs_final = tl.where(better, qsp, qsi)
        load_f = tl.where(better, loadp, load_i)
        routed = load_f - qs_final
        if JOINT:
            if R == 1:
                qs_final = tl.where(r == 0, n_total, 0)
                routed = load_f - qs_final
        # ---- outputs ------------------------------------------------------------------------------
        p = tl.arange(0, PB)
        pm = p < P
        pp2l = tl.load(p2l_ptr + p, mask=pm, other=0)
        psf = tl.load(slot_flat_ptr + p, mask=pm, other=-1)
        qflat = tl.reshape(qf, [NC])
        quota = tl.where(psf >= 0, tl.gather(qflat, tl.maximum(psf, 0), 0), tl.gather(counts, pp2l, 0))
        tl.store(quotas_ptr + p, quota, mask=pm)
        qc = tl.cumsum(qf, axis=1)
        qc = tl.where(col[None, :] >= (ncopy - 1)[:, None], 2147483647, qc)
        tl.store(qcum_ptr + tix, qc.to(tl.int32))
        tl.store(flags_ptr + tl.arange(0, 1), cert.to(tl.int32) + tl.zeros([1], tl.int32))
        tl.store(flags_ptr + 1 + tl.arange(0, 1), it + tl.zeros([1], tl.int32))
        tl.store(flags_ptr + 2 + tl.arange(0, 1), pit + tl.zeros([1], tl.int32))
        tl.store(flags_ptr + 3 + tl.arange(0, 1), better.to(tl.int32) + tl.zeros([1], tl.int32))
    tl.store(routed_ptr + r, routed)

    if WF != 0:
        # ---- Waterfill: shared slots per rank, then what assign_shared needs -------------------------
        if JOINT:
            qsh = qs_final
        else:
            # waterfill.shared_quotas in float64, same operations as the core
            sk = tl.sort(tl.where(rv, routed, PADK), dim=0)
            csum = tl.cumsum(tl.where(rv, sk, 0), axis=0)
            levk = (n_total + csum).to(tl.float64) / (r + 1).to(tl.float64)
            level = tl.min(tl.where(rv, levk, float("inf")), axis=0)
            y = tl.maximum(level - routed.to(tl.float64), 0.0)
            yfl = tl.floor(y)
            yfr = y - yfl
            sshort = n_total - tl.sum(tl.where(rv, yfl.to(tl.int64), 0), axis=0)
            sahead = rv[None, :] & ((yfr[None, :] > yfr[:, None]) | ((yfr[None, :] == yfr[:, None]) & (r[None, :] < r[:, None])))
            qsh = tl.where(rv, yfl.to(tl.int64) + (tl.sum(sahead.to(tl.int64), axis=1) < sshort).to(tl.int64), 0)
        tl.store(shared_q_ptr + r, qsh)
        keep = tl.minimum(tok_src, qsh)
        over = tok_src - keep
        spare = qsh - keep
        keep_src = tl.sum(tl.where(r == src_rank, keep, 0), axis=0)
        over_src = tl.sum(tl.where(r == src_rank, over, 0), axis=0)
        excl_over = tl.sum(tl.where(r < src_rank, over, 0), axis=0)
        tl.store(wf_ptr + tl.arange(0, 1), keep_src + tl.zeros([1], tl.int64))
        tl.store(wf_ptr + 1 + tl.arange(0, 1), excl_over + tl.zeros([1], tl.int64))
        if WF == 2:
            tl.store(wf_vec_ptr + r, tl.cumsum(spare, axis=0))
        else:
            # _apportion(spare, over)[src]
            w_all = tl.maximum(tl.sum(over, axis=0), 1)
            hi = excl_over + over_src
            cap = (spare * hi) // w_all - (spare * excl_over) // w_all
            tl.store(wf_vec_ptr + r, tl.where(rv, cap, 0))
        tl.store(wf_vec_ptr + RB + tl.arange(0, 1), tl.zeros([1], tl.int64))


@triton.jit
def _stats_kernel(acc_ptr, stats_ptr, E: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, EB: tl.constexpr,
                  ROUTED: tl.constexpr):
    """``chain.local_stats`` row from the count accumulators, int32 ``[H + 1]``: H = E counts
    per logical expert, or (``ROUTED``, Waterfill alone) R routed loads; then the tokens with a
    valid route. Zeroes the accumulators."""
    e_idx = tl.arange(0, EB)
    r = tl.arange(0, RB)
    counts = tl.load(acc_ptr + e_idx, mask=e_idx < E, other=0)
    routed = tl.load(acc_ptr + EB + r, mask=r < R, other=0)
    n = tl.load(acc_ptr + EB + 2 * RB + tl.arange(0, 1))
    tl.debug_barrier()
    tl.store(acc_ptr + e_idx, tl.zeros([EB], tl.int32))
    tl.store(acc_ptr + EB + r, tl.zeros([RB], tl.int32))
    tl.store(acc_ptr + EB + RB + r, tl.zeros([RB], tl.int32))
    tl.store(acc_ptr + EB + 2 * RB + tl.arange(0, 8), tl.zeros([8], tl.int32))
    if ROUTED:
        tl.store(stats_ptr + r, routed, mask=r < R)
        tl.store(stats_ptr + R + tl.arange(0, 1), n)
    else:
        tl.store(stats_ptr + e_idx, counts, mask=e_idx < E)
        tl.store(stats_ptr + E + tl.arange(0, 1), n)


@triton.jit(do_not_specialize=["D", "src_rank"])
def _gathered_kernel(g_ptr, D, acc_ptr, dp_off_ptr, src_rank,
                     E: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, EB: tl.constexpr, BC: tl.constexpr,
                     BD: tl.constexpr, ROUTED: tl.constexpr):
    """Reduce all-gathered int32 ``chain.local_stats`` rows ``[D, H + 1]`` (H = E, or R with
    ``ROUTED``) into the accumulators: global counts and this rank's DP-attention offsets
    (exclusive prefix over lower ranks) per expert, or global routed loads; tokens per source."""
    H: tl.constexpr = R if ROUTED else E
    W: tl.constexpr = H + 1
    pid = tl.program_id(0)
    c = pid * BC + tl.arange(0, BC)
    cm = c < H
    tot = tl.zeros([BC], tl.int64)
    off = tl.zeros([BC], tl.int64)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        m = (d < D)[:, None] & cm[None, :]
        v = tl.load(g_ptr + d[:, None] * W + c[None, :], mask=m, other=0).to(tl.int64)
        tot += tl.sum(v, axis=0)
        off += tl.sum(tl.where((d < src_rank)[:, None], v, 0), axis=0)
    if ROUTED:
        tl.store(acc_ptr + EB + c, tot.to(tl.int32), mask=cm)
    else:
        tl.store(acc_ptr + c, tot.to(tl.int32), mask=cm)
        tl.store(dp_off_ptr + c, off.to(tl.int32), mask=cm)
    # tokens per source rank: column H of row d -> acc[EB + RB + d]
    if pid == 0:
        d = tl.arange(0, RB)
        nt = tl.load(g_ptr + d * W + H, mask=(d < D) & (d < R), other=0)
        tl.store(acc_ptr + EB + RB + d, nt.to(tl.int32))


def split_quotas(pl, counts, *, shared_tokens: int | None = None, max_sweeps: int = 16,
                polish_sweeps: int = 8, num_warps: int = 4) -> dict:
    """Run kernel B alone on given counts (allocates; for tests).

    ``pl`` single-layer placement, ``counts [E]``. With ``shared_tokens`` the shared expert
    joins the split (joint waterfill+lplb, all_rank). Returns quotas ``[P]``, shared quotas
    ``[R]``, flags (certified, sweeps, polish sweeps, polished kept), routed load ``[R]``, the
    scalars (``wf``: ``[2:8]`` are the counters) and the accumulators after the call.
    """
    import torch

    from ._launch import launch
    from ._tables import LayerTables, next_pow2

    tb = LayerTables.build(pl)
    dev = pl.device
    EB, RB = tb.EB, tb.RB
    acc = torch.zeros(EB + 2 * RB + 8, dtype=torch.int32, device=dev)
    acc[: tb.E] = counts.to(torch.int32)
    joint = shared_tokens is not None
    if joint:
        acc[EB + 2 * RB] = int(shared_tokens)
    i64 = dict(dtype=torch.int64, device=dev)
    out = dict(
        counts=torch.zeros(tb.E, **i64), quotas=torch.zeros(pl.num_physical, **i64),
        qcum=torch.zeros(tb.NEB, tb.CB, dtype=torch.int32, device=dev), shared_q=torch.zeros(RB, **i64),
        flags=torch.zeros(8, dtype=torch.int32, device=dev), wf=torch.zeros(8, **i64),
        wf_vec=torch.zeros(RB + 1, **i64), routed=torch.zeros(RB, **i64),
    )
    launch(
        _split_kernel, (1,),
        *tb.split_args(), acc,
        out["counts"], out["quotas"], out["qcum"], out["shared_q"], out["flags"], out["wf"], out["wf_vec"],
        out["routed"], 0, max_sweeps, polish_sweeps,
        E=tb.E, R=tb.R, S=tb.S, P=pl.num_physical, NEB=tb.NEB, CB=tb.CB, RB=RB, EB=EB,
        SB=next_pow2(tb.S), PB=next_pow2(pl.num_physical), CBITS=tb.CB.bit_length() - 1, RBITS=max(RB.bit_length() - 1, 1),
        LPLB=True, JOINT=joint, WF=2 if joint else 0,
        DYNAMIC=False, SCALE_B=SCALE_BITS, TOL_SHIFT_C=TOL_SHIFT, SLACK=SLACK_UNITS, num_warps=num_warps,
    )
    out["shared_q"] = out["shared_q"][: tb.R]
    out["routed"] = out["routed"][: tb.R]
    out["acc_after"] = acc
    return out
