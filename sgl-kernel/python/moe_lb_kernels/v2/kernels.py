"""The v2 kernels: count (K1), gathered-row reduction, solve + dispatch (K2), Waterfill rounds.

Per call (docs/kernels-v2.md has the table):

* ``_count_kernel`` (K1, one program per block of ``BT`` tokens): a register histogram of the
  block (tokens per logical expert, or per rank of the given physical ids), added with
  *relaxed* integer atomics into an accumulator; the block's counts of the replicated experts
  and of its tokens with a route (for the dispatch prefix); the last program to finish
  (an acq_rel ticket) publishes the totals (= this rank's ``chain.local_stats`` row) and
  zeroes the accumulator for the next call. No memset launch.
* ``_greduce_kernel`` (global sync): the all-gathered rows ``[D, W]`` summed over ranks, the
  exclusive prefix below this rank (DP-attention offsets), the tokens per source rank.
* ``_main_kernel`` (K2, same blocks): **every program solves the layer's split itself** (identical
  integer code on identical inputs gives identical bits: no broadcast, no grid barrier), then
  maps its own block. With ``SINGLE`` (decode sizes) it also counts every token itself, so the
  whole call is one launch. Program 0 writes the per-layer outputs (quotas, shared quotas,
  flags, counters).
* ``_round_kernel`` (conservative Waterfill, one launch per top-k round): a token's acceptance
  depends on every earlier token's pick in the same round, so rounds stay separate launches
  (each re-derives the round's totals from the per-block pick histograms).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .solve import (
    _certified,
    _count_less,
    _fill_rows,
    _fill_vec,
    _gather_1d,
    _int_bound,
    _per_copy,
    _pour_rows,
    _pour_vec,
    _prefix_nums,
    _rank_amounts,
    _rep_rank_loads,
    _round_rows,
    _round_vec,
    _shared_quotas_f64,
    _sweep,
)

BIG64 = tl.constexpr(1 << 62)


@triton.jit(do_not_specialize=["T", "nb"])
def _count_kernel(
    src_ptr, T, nb,
    acc_ptr,  # [HB] int32 accumulator, zero between calls
    done_ptr,  # [1] int32 ticket, zero between calls
    totals_ptr,  # [W] int32: the published totals (counts | tokens with a route)
    rep_expert_ptr, rep_colour_ptr, rephist_ptr, vcount_ptr,
    K: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, W: tl.constexpr, HB: tl.constexpr,
    S: tl.constexpr, NEB: tl.constexpr,
    ROUTED: tl.constexpr,  # count ranks of physical ids (Waterfill alone) instead of logical experts
    REP: tl.constexpr,  # store the block's counts of the replicated experts
):
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    kk = tl.arange(0, KB)
    m = (t < T)[:, None] & (kk < K)[None, :]
    x = tl.load(src_ptr + t[:, None] * K + kk[None, :], mask=m, other=-1).to(tl.int32)
    v = m & (x >= 0)
    if ROUTED:
        key = tl.where(v, x // S, HB - 1)
    else:
        key = tl.where(v, x, HB - 1)
    h = tl.histogram(tl.reshape(key, [BT * KB]), HB)
    b = tl.arange(0, HB)
    tl.atomic_add(acc_ptr + b, h, mask=(b < W - 1) & (h > 0), sem="relaxed")
    nv = tl.sum(tl.max(v.to(tl.int32), axis=1), axis=0)
    tl.atomic_add(acc_ptr + (W - 1), nv, sem="relaxed")
    if REP:
        row = tl.arange(0, NEB)
        rep_e = tl.load(rep_expert_ptr + row)
        rowvalid = tl.load(rep_colour_ptr + row) >= 0
        tl.store(rephist_ptr + pid * NEB + row, tl.where(rowvalid, tl.gather(h, rep_e, 0), 0))
    tl.store(vcount_ptr + pid, nv)
    tl.debug_barrier()  # every thread's atomics before the ticket (the ticket releases them)
    ticket = tl.atomic_add(done_ptr, 1, sem="acq_rel")
    if ticket == nb - 1:  # the last block: every other block's atomics are visible
        tot = tl.load(acc_ptr + b, mask=b < W, other=0, cache_modifier=".cg")
        tl.store(totals_ptr + b, tot, mask=b < W)
        tl.store(acc_ptr + b, tl.zeros([HB], tl.int32), mask=b < W)
        tl.store(done_ptr, 0)


@triton.jit(do_not_specialize=["D", "src_rank"])
def _greduce_kernel(g_ptr, D, src_rank, gtot_ptr, gpre_ptr, toksrc_ptr,
                    W: tl.constexpr, BC: tl.constexpr, DB: tl.constexpr):
    """Columns ``[pid * BC, (pid + 1) * BC)`` of the gathered rows: sum, prefix below ``src_rank``."""
    pid = tl.program_id(0)
    c = pid * BC + tl.arange(0, BC)
    cm = c < W
    d = tl.arange(0, DB)
    v = tl.load(g_ptr + d[:, None] * W + c[None, :], mask=(d < D)[:, None] & cm[None, :], other=0)
    tl.store(gtot_ptr + c, tl.sum(v, axis=0), mask=cm)
    tl.store(gpre_ptr + c, tl.sum(tl.where((d < src_rank)[:, None], v, 0), axis=0), mask=cm)
    if pid == 0:
        tl.store(toksrc_ptr + d, tl.load(g_ptr + d * W + (W - 1), mask=d < D, other=0))


@triton.jit
def _block_prefix(ptr, pid, n_rows, WID: tl.constexpr, WB: tl.constexpr, NBMAX: tl.constexpr, CHB: tl.constexpr):
    """(sum of rows < pid, sum of rows < n_rows) of ``[rows, WID]`` int32; unrolled so every
    load is independent and in flight together (masked rows cost no traffic)."""
    w = tl.arange(0, WB)
    pre = tl.zeros([WB], tl.int32)
    tot = tl.zeros([WB], tl.int32)
    for b0 in tl.static_range(0, NBMAX, CHB):
        b = b0 + tl.arange(0, CHB)
        v = tl.load(ptr + b[:, None] * WID + w[None, :], mask=(b < n_rows)[:, None] & (w < WID)[None, :], other=0)
        pre += tl.sum(tl.where((b < pid)[:, None], v, 0), axis=0)
        tot += tl.sum(v, axis=0)
    return pre, tot


@triton.jit
def _pick(ph, todo, capx, K: tl.constexpr, R: tl.constexpr, S: tl.constexpr, CT: tl.constexpr, KB: tl.constexpr):
    """One conservative round's choice per token: its candidate rank with the most room
    (first column on ties); ``R`` when it has no room or is done (``assign_shared``)."""
    kk = tl.arange(0, KB)
    cand = tl.where(ph >= 0, ph // S, R)
    room = _gather_1d(capx, cand, CT * KB)
    room = tl.where((kk < K)[None, :], room, -2)
    room = tl.where(todo[:, None], room, -1)
    best = tl.argmax(room, axis=1, tie_break_left=True)
    pick = tl.sum(tl.where(kk[None, :] == best[:, None], cand, 0), axis=1)
    ok = todo & (tl.max(room, axis=1) > 0)
    return tl.where(ok, pick, R)


@triton.jit(do_not_specialize=["T", "nb", "src_rank", "max_sweeps", "polish_sweeps", "tile"])
def _main_kernel(
    ids_ptr, phys_in_ptr, out_ptr, shared_ptr, T, nb,
    # tables (V2Tables.solve_args)
    p2l_ptr, log2phys0_ptr, rep_id_ptr, slot_flat_ptr, rep_expert_ptr, rep_colour_ptr, rep_slot_ptr, rep_rank_ptr,
    rep_fr_ptr, rep_next_ptr, rep_mult_ptr, rep_dup_ptr, colour_src_ptr, meta_ptr,
    table_ptr,  # [P] float64 split fractions (table mode)
    # counts in: K1's totals, per-block rows; the reduced gathered rows (global sync)
    totals_ptr, rephist_ptr, vcount_ptr, gtot_ptr, gpre_ptr, toksrc_ptr,
    # per-layer outputs (program 0)
    quotas_ptr, shared_q_ptr, routed_ptr, flags_ptr, counters_ptr, cert_ptr,
    # conservative Waterfill: round-0 room, picks, todo, per-block pick histograms
    caps_ptr, pick_ptr, todo_ptr, hist0_ptr,
    src_rank, max_sweeps, polish_sweeps, tile,
    K: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, CT: tl.constexpr,
    E: tl.constexpr, R: tl.constexpr, S: tl.constexpr, P: tl.constexpr,
    NEB: tl.constexpr, CB: tl.constexpr, RB: tl.constexpr, HB: tl.constexpr, SB: tl.constexpr, PB: tl.constexpr,
    RB1: tl.constexpr, CBITS: tl.constexpr, RBITS: tl.constexpr, LOGNEB: tl.constexpr,
    NBMAX: tl.constexpr, CHB: tl.constexpr, TS: tl.constexpr, CTS: tl.constexpr, UB: tl.constexpr,
    LPLB: tl.constexpr,  # 0 off (Waterfill alone), 1 split table, 2 per-batch split
    TILES: tl.constexpr,  # per-batch split on tile units, then consolidate + fill
    JOINT: tl.constexpr,  # the shared expert is part of the split (per-batch + all_rank)
    WF: tl.constexpr,  # 0 none, 1 conservative, 2 all_rank
    GLOBAL: tl.constexpr,  # counts/offsets/tokens from the reduced gathered rows
    SINGLE: tl.constexpr,  # count every token here (decode sizes: one launch, no K1)
    SCALE_B: tl.constexpr, TOL_SHIFT_C: tl.constexpr, SLACK: tl.constexpr,
    TABLE_BITS: tl.constexpr,  # objective.TABLE_SCALE_BITS: split tables are applied in 2**-28 units
):
    NC: tl.constexpr = NEB * CB
    W: tl.constexpr = (E if LPLB != 0 else R) + 1
    SHARED: tl.constexpr = JOINT and R >= 2
    pid = tl.program_id(0)
    r = tl.arange(0, RB)
    rv = r < R
    hb = tl.arange(0, HB)
    row = tl.arange(0, NEB)
    col = tl.arange(0, CB)
    kk = tl.arange(0, KB)
    rep_e = tl.minimum(tl.load(rep_expert_ptr + row), HB - 1)  # (HB < E when counting ranks: unused then)
    colour = tl.load(rep_colour_ptr + row)
    rowvalid = colour >= 0
    start = pid * BT

    # ---- counts: this batch's (global: the layer's) totals, and this block's prefixes ----------
    if SINGLE:
        hist = tl.zeros([HB], tl.int32)
        hpre = tl.zeros([HB], tl.int32)
        n_valid = tl.sum(hist, axis=0)
        vbase = tl.sum(hist, axis=0)
        for c0 in tl.static_range(0, TS, CTS):
            t = c0 + tl.arange(0, CTS)
            m = (t < T)[:, None] & (kk < K)[None, :]
            if LPLB != 0:
                x = tl.load(ids_ptr + t[:, None] * K + kk[None, :], mask=m, other=-1).to(tl.int32)
            else:
                x = tl.load(phys_in_ptr + t[:, None] * K + kk[None, :], mask=m, other=-1).to(tl.int32)
            v = m & (x >= 0)
            if LPLB != 0:
                key = tl.where(v, x, HB - 1)
            else:
                key = tl.where(v, x // S, HB - 1)
            hist += tl.histogram(tl.reshape(key, [CTS * KB]), HB)
            hpre += tl.histogram(tl.reshape(tl.where((t < start)[:, None], key, HB - 1), [CTS * KB]), HB)
            tv = tl.max(v.to(tl.int32), axis=1)
            n_valid += tl.sum(tv, axis=0)
            vbase += tl.sum(tl.where(t < start, tv, 0), axis=0)
        counts = tl.where(hb < W - 1, hist, 0)
        running = tl.where(rowvalid, tl.gather(hpre, rep_e, 0), 0)
    else:
        if GLOBAL:
            counts = tl.load(gtot_ptr + hb, mask=hb < W - 1, other=0)
        else:
            counts = tl.load(totals_ptr + hb, mask=hb < W - 1, other=0)
        n_valid = tl.load(totals_ptr + (W - 1))
        running, _ = _block_prefix(rephist_ptr, pid, nb, NEB, NEB, NBMAX, CHB)
        vb, _ = _block_prefix(vcount_ptr, pid, nb, 1, 1, NBMAX, CHB)
        vbase = tl.sum(vb, axis=0)
        if GLOBAL:
            if LPLB != 0:  # DP attention: entries of lower ranks come first
                running += tl.where(rowvalid, tl.load(gpre_ptr + rep_e), 0)
    if GLOBAL:
        tok_src = tl.load(toksrc_ptr + r, mask=rv, other=0)
    else:
        tok_src = tl.where(r == src_rank, n_valid, 0)
    n_total = tl.sum(tok_src, axis=0)

    # ---- tables -------------------------------------------------------------------------------
    tix = row[:, None] * CB + col[None, :]
    rank2 = tl.load(rep_rank_ptr + tix)
    valid = rank2 >= 0
    rankc = tl.where(valid, rank2, 0)
    fr = tl.load(rep_fr_ptr + tix)
    nxt = tl.load(rep_next_ptr + tix)
    mult = tl.load(rep_mult_ptr + tix)
    dup = tl.load(rep_dup_ptr + tix)
    slots = tl.load(rep_slot_ptr + tix)
    first = valid & (fr == col[None, :])
    ncopy = tl.sum(valid.to(tl.int32), axis=1)
    G = tl.load(meta_ptr)
    maxm = tl.load(meta_ptr + 3)
    crow = tl.where(rowvalid, tl.gather(counts, rep_e, 0), 0)
    s_idx = tl.arange(0, SB)
    sslot = r[:, None] * S + s_idx[None, :]
    smask = rv[:, None] & (s_idx < S)[None, :]
    sp2l = tl.minimum(tl.load(p2l_ptr + sslot, mask=smask, other=0), HB - 1)
    single = smask & (tl.load(slot_flat_ptr + sslot, mask=smask, other=0) < 0)
    fixed = tl.sum(tl.where(single, _gather_1d(counts, sp2l, RB * SB), 0), axis=1)

    cert = n_total * 0 + 1
    it = n_total * 0
    pit = n_total * 0
    keep_p = n_total * 0
    need = n_total * 0
    gap = n_total.to(tl.int64) * 0
    qsh_t = tl.zeros([RB], tl.int32)
    if LPLB == 2:
        # ---- per-batch split in units (tokens, or tiles), int32 fixed point -------------------
        if TILES:
            units_all = (counts + tile - 1) // tile
            crow_u = tl.where(rowvalid, tl.gather(units_all, rep_e, 0), 0)
            fixed_u = tl.sum(tl.where(single, _gather_1d(units_all, sp2l, RB * SB), 0), axis=1)
            cs_u = (n_total + tile - 1) // tile
        else:
            crow_u = crow
            fixed_u = fixed
            cs_u = n_total
        if JOINT:
            if R == 1:  # the shared expert's one copy is a fixed load
                fixed_u = fixed_u + tl.where(r == 0, cs_u, 0)
        crow_s = crow_u << SCALE_B
        fixed_s = fixed_u << SCALE_B
        cs_s = cs_u << SCALE_B
        nc1 = tl.maximum(ncopy, 1)
        q0 = tl.where(valid, (crow_s // nc1)[:, None] + (col[None, :] < (crow_s % nc1)[:, None]).to(tl.int32), 0)
        ra = _rank_amounts(q0, nxt, first, maxm)
        qs = tl.zeros([RB], tl.int32)
        if SHARED:
            qs = tl.where(rv, cs_s // R + (r < cs_s % R).to(tl.int32), 0)
            has = G >= 0
        else:
            has = G > 0
        load = fixed_s + _rep_rank_loads(ra, colour_src_ptr, G, RB, NC) + qs
        cert = tl.where(has, 0, 1)
        n_sweeps = tl.where(has, max_sweeps, 0)
        while (it < n_sweeps) & (cert == 0):
            ra, qs, load = _sweep(ra, qs, load, crow_s, cs_s, colour, colour_src_ptr, G, rankc, first,
                                  R, RB, NC, CB, SHARED)
            num = _prefix_nums(load, fixed_s, crow_s, rowvalid, rankc, valid, cs_s, R, RB, RBITS, NEB, LOGNEB, NC, SHARED)
            cert = _certified(num, load, R, RB, TOL_SHIFT_C, SLACK)
            it += 1
        if has & (it == 0):
            num = _prefix_nums(load, fixed_s, crow_s, rowvalid, rankc, valid, cs_s, R, RB, RBITS, NEB, LOGNEB, NC, SHARED)
            cert = _certified(num, load, R, RB, TOL_SHIFT_C, SLACK)
        q = _per_copy(ra, fr, mult, dup, valid)
        # ---- largest remainder, then the polish rule (skip layers at the integer bound) -------
        qi = _round_rows(q, crow_u, valid, col, SCALE_B, CBITS)
        qsi = tl.zeros([RB], tl.int32)
        if SHARED:
            qsi = _round_vec(qs, cs_u, rv, r, SCALE_B, RBITS)
        ra_i = _rank_amounts(qi, nxt, first, maxm)
        load_i = fixed_u + _rep_rank_loads(ra_i, colour_src_ptr, G, RB, NC) + qsi
        num_i = _prefix_nums(load_i, fixed_u, crow_u, rowvalid, rankc, valid, cs_u, R, RB, RBITS, NEB, LOGNEB, NC, SHARED)
        m_i = tl.max(tl.where(rv, load_i, 0), axis=0)
        bound = _int_bound(num_i, R, RB)
        need = (m_i.to(tl.int64) > bound).to(tl.int32)
        ra_p = ra_i
        qs_p = qsi
        load_p = load_i
        q_prev = qi
        changed = need * (polish_sweeps > 0).to(tl.int32)
        while (pit < polish_sweeps) & (changed != 0):
            qs_old = qs_p
            ra_p, qs_p, load_p = _sweep(ra_p, qs_p, load_p, crow_u, cs_u, colour, colour_src_ptr, G, rankc, first,
                                        R, RB, NC, CB, SHARED)
            q_now = _per_copy(ra_p, fr, mult, dup, valid)
            changed = tl.max(tl.max((q_now != q_prev).to(tl.int32), axis=1), axis=0) | \
                tl.max((qs_p != qs_old).to(tl.int32), axis=0)
            q_prev = q_now
            pit += 1
        keep_p = need * (tl.max(tl.where(rv, load_p, 0), axis=0) <= m_i).to(tl.int32)
        qf = tl.where(keep_p != 0, q_prev, qi)
        qsf = tl.where(keep_p != 0, qs_p, qsi)
        ra_f = tl.where(keep_p != 0, ra_p, ra_i)
        load_f = tl.where(keep_p != 0, load_p, load_i)
        gap = tl.max(tl.where(rv, load_f, 0), axis=0).to(tl.int64) - bound
        if TILES:
            # ---- consolidate_tiles, then fill_tiles ---------------------------------------------
            top = tl.max(tl.where(rv, load_f, 0), axis=0)
            for g in range(0, G):
                csrc = tl.load(colour_src_ptr + g * RB + r)
                ra_f, load_f = _pour_rows(ra_f, load_f, crow_u, colour == g, csrc, rankc, first, top, col, NC, CBITS,
                                          UB + CBITS)
            if SHARED:
                qsf, load_f = _pour_vec(qsf, load_f, cs_u, top, R, RB, RBITS, UB + RBITS)
            n_t = tl.where(first, ra_f, 0)
            lfull = load_f * tile
            qt = _fill_rows(n_t, crow_u, crow, valid, slots, _gather_1d(lfull, rankc, NC), tile, PB)
            if JOINT:
                if SHARED:
                    qsh_t = _fill_vec(qsf, cs_u, n_total, lfull, tile, R, RB)
                else:
                    qsh_t = tl.where(r == 0, n_total, 0)
        else:
            qt = qf
            if JOINT:
                if SHARED:
                    qsh_t = qsf
                else:
                    qsh_t = tl.where(r == 0, n_total, 0)
    elif LPLB == 1:
        # ---- split table: objective.table_units + round_fixed in 2**-28 units (int64) ---------------
        crow64 = crow.to(tl.int64) << TABLE_BITS
        f = tl.load(table_ptr + tl.maximum(slots, 0), mask=valid, other=0.0)
        x = tl.where(valid, tl.maximum(tl.floor(f * crow64.to(tl.float64)[:, None]).to(tl.int64), 0), 0)
        resid = crow64 - tl.sum(x, axis=1)
        big = tl.argmax(tl.where(valid, x, -1), axis=1, tie_break_left=True)
        x = tl.where(valid, tl.maximum(x + tl.where(col[None, :] == big[:, None], resid[:, None], 0), 0), 0)
        qt = _round_rows(x, crow.to(tl.int64), valid, col, TABLE_BITS, CBITS).to(tl.int32)
    else:
        qt = tl.zeros([NEB, CB], tl.int32)

    if LPLB != 0:
        routed = fixed + _rep_rank_loads(_rank_amounts(qt, nxt, first, maxm), colour_src_ptr, G, RB, NC)
        qcum = tl.cumsum(qt, axis=1)
        qcum = tl.reshape(tl.where(col[None, :] >= (ncopy - 1)[:, None], 2147483647, qcum), [NC])
        slot_t = tl.reshape(slots, [NC])
    else:
        routed = tl.where(rv, tl.gather(counts, tl.minimum(r, HB - 1), 0), 0)

    # ---- Waterfill: shared slots per rank, then what assign_shared needs ----------------------------
    if WF != 0:
        if JOINT:
            qsh = qsh_t.to(tl.int64)
        else:
            qsh = _shared_quotas_f64(routed, n_total, R, RB)
        tok64 = tok_src.to(tl.int64)
        keep = tl.minimum(tok64, qsh)
        over = tok64 - keep
        spare = qsh - keep
        keep_src = tl.sum(tl.where(r == src_rank, keep, 0), axis=0)
        over_src = tl.sum(tl.where(r == src_rank, over, 0), axis=0)
        excl_over = tl.sum(tl.where(r < src_rank, over, 0), axis=0)
        if WF == 2:
            cumsp = tl.where(rv, tl.cumsum(spare, axis=0), BIG64)
        else:
            w_all = tl.maximum(tl.sum(over, axis=0), 1)
            cap = tl.where(rv, (spare * (excl_over + over_src)) // w_all - (spare * excl_over) // w_all, 0)
            j1 = tl.arange(0, RB1)
            capx = tl.where(j1 < R, tl.gather(cap, tl.minimum(j1, RB - 1), 0), 0)
            phist = tl.zeros([RB1], tl.int32)

    # ---- dispatch this block ----------------------------------------------------------------------
    for c0 in tl.static_range(0, BT, CT):
        t = start + c0 + tl.arange(0, CT)
        tm = t < T
        m = tm[:, None] & (kk < K)[None, :]
        if LPLB != 0:
            ids = tl.load(ids_ptr + t[:, None] * K + kk[None, :], mask=m, other=-1)
            ok = m & (ids >= 0)
            idc = tl.where(ok, ids, 0).to(tl.int32)
            rid = tl.load(rep_id_ptr + idc, mask=ok, other=-1)
            rflat = tl.reshape(rid, [CT * KB])
            oh = rflat[:, None] == row[None, :]
            csum = tl.cumsum(oh.to(tl.int32), axis=0)
            occ = tl.sum(tl.where(oh, csum, 0), axis=1) - 1 + tl.gather(running, tl.maximum(rflat, 0), 0)
            running += tl.sum(oh.to(tl.int32), axis=0)
            occ = tl.reshape(occ, [CT, KB])
            isrep = rid >= 0
            base_ix = tl.maximum(rid, 0) * CB
            pos = tl.zeros([CT, KB], tl.int32)
            for i in tl.static_range(CBITS):  # copies whose inclusive quota prefix is <= occ
                step = CB >> (i + 1)
                qc = _gather_1d(qcum, base_ix + pos + (step - 1), CT * KB)
                pos += tl.where(qc <= occ, step, 0)
            rep_phys = _gather_1d(slot_t, base_ix + pos, CT * KB)
            one_phys = tl.load(log2phys0_ptr + idc, mask=ok, other=0)
            ph = tl.where(ok, tl.where(isrep, rep_phys, one_phys), -1)
            tl.store(out_ptr + t[:, None] * K + kk[None, :], tl.where(ok, ph, ids).to(out_ptr.dtype.element_ty), mask=m)
        else:
            ph = tl.load(phys_in_ptr + t[:, None] * K + kk[None, :], mask=m, other=-1).to(tl.int32)
        if WF != 0:
            tv = tl.max((m & (ph >= 0)).to(tl.int32), axis=1)
            vpos = vbase + tl.cumsum(tv, axis=0) - tv  # index among this rank's tokens with a route
            vbase += tl.sum(tv, axis=0)
            jj = vpos.to(tl.int64) - keep_src
            go = (tv > 0) & (jj >= 0)
            if WF == 2:
                tgt = tl.minimum(_count_less(cumsp, jj + excl_over + 1, RB, RBITS), R - 1)
                tl.store(shared_ptr + t, tl.where(go, tgt, src_rank).to(tl.int64), mask=tm)
            else:
                pk = _pick(ph, go, capx, K, R, S, CT, KB)
                tl.store(pick_ptr + t, pk, mask=tm)
                tl.store(todo_ptr + t, go.to(tl.int32), mask=tm)
                tl.store(shared_ptr + t, (t * 0 + src_rank).to(tl.int64), mask=tm)
                phist += tl.histogram(tl.where(tm, pk, RB1 - 1), RB1)
    if WF == 1:
        tl.store(hist0_ptr + pid * RB1 + tl.arange(0, RB1), phist)

    # ---- per-layer outputs (program 0) ------------------------------------------------------------
    if pid == 0:
        if LPLB != 0:
            p = tl.arange(0, PB)
            pm = p < P
            pp2l = tl.load(p2l_ptr + p, mask=pm, other=0)
            psf = tl.load(slot_flat_ptr + p, mask=pm, other=-1)
            quota = tl.where(psf >= 0, tl.gather(tl.reshape(qt, [NC]), tl.maximum(psf, 0), 0), tl.gather(counts, pp2l, 0))
            tl.store(quotas_ptr + p, quota.to(tl.int64), mask=pm)
        tl.store(routed_ptr + r, routed.to(tl.int64))
        if WF != 0:
            tl.store(shared_q_ptr + r, qsh)
            if WF == 1:
                tl.store(caps_ptr + tl.arange(0, RB1), capx)
        tl.store(flags_ptr + 0, cert)
        tl.store(flags_ptr + 1, it)
        tl.store(flags_ptr + 2, pit)
        tl.store(flags_ptr + 3, keep_p)
        tl.store(flags_ptr + 4, need)
        tl.store(flags_ptr + 5, gap.to(tl.int32))
        tl.store(cert_ptr, cert != 0)
        tl.atomic_add(counters_ptr + 0, 1, sem="relaxed")
        tl.atomic_add(counters_ptr + 1, (1 - cert).to(tl.int64), sem="relaxed")
        tl.atomic_add(counters_ptr + 2, it.to(tl.int64), sem="relaxed")
        tl.atomic_add(counters_ptr + 3, need.to(tl.int64), sem="relaxed")
        tl.atomic_add(counters_ptr + 4, keep_p.to(tl.int64), sem="relaxed")
        tl.atomic_max(counters_ptr + 5, gap, sem="relaxed")


@triton.jit(do_not_specialize=["T", "nb"])
def _round_kernel(phys_ptr, T, nb, pick_ptr, todo_ptr, hist_prev_ptr, hist_next_ptr, cap_prev_ptr, cap_next_ptr,
                  shared_ptr,
                  K: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, CT: tl.constexpr, R: tl.constexpr,
                  S: tl.constexpr, RB1: tl.constexpr, LAST: tl.constexpr, NBMAX: tl.constexpr, CHB: tl.constexpr):
    """Accept the previous round's picks in token order (``rank_in_pick < room``); unless LAST,
    pick the next round. The room after a round is ``room - min(room, pickers)``."""
    pid = tl.program_id(0)
    j = tl.arange(0, RB1)
    kk = tl.arange(0, KB)
    pre, tot = _block_prefix(hist_prev_ptr, pid, nb, RB1, RB1, NBMAX, CHB)
    cap = tl.load(cap_prev_ptr + j)
    cap_next = cap - tl.minimum(cap, tot.to(tl.int64))
    if not LAST:
        if pid == 0:
            tl.store(cap_next_ptr + j, cap_next)
    running = pre
    hist = tl.zeros([RB1], tl.int32)
    ci = tl.arange(0, CT)
    earlier = ci[None, :] < ci[:, None]
    for c0 in tl.static_range(0, BT, CT):
        t = pid * BT + c0 + ci
        tm = t < T
        pick = tl.load(pick_ptr + t, mask=tm, other=R)
        todo = tl.load(todo_ptr + t, mask=tm, other=0) != 0
        same = tl.sum((earlier & (pick[None, :] == pick[:, None])).to(tl.int32), axis=1)
        rank_in = tl.gather(running, pick, 0) + same
        running += tl.histogram(pick, RB1)
        accept = (pick < R) & (rank_in.to(tl.int64) < tl.gather(cap, pick, 0))
        tl.store(shared_ptr + t, pick.to(tl.int64), mask=tm & accept)
        if not LAST:
            m = tm[:, None] & (kk < K)[None, :]
            ph = tl.load(phys_ptr + t[:, None] * K + kk[None, :], mask=m, other=-1).to(tl.int32)
            npick = _pick(ph, todo & ~accept, cap_next, K, R, S, CT, KB)
            tl.store(pick_ptr + t, npick, mask=tm)
            tl.store(todo_ptr + t, (todo & ~accept).to(tl.int32), mask=tm)
            hist += tl.histogram(tl.where(tm, npick, RB1 - 1), RB1)
    if not LAST:
        tl.store(hist_next_ptr + pid * RB1 + j, hist)
