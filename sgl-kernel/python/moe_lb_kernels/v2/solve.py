"""The v2 split, rounding, polish and tile steps as Triton device functions (int32 fixed point).

Each function mirrors one piece of the core chain with ``FixedPointSteps(V2_SPEC)`` and is
exact: integer arithmetic only (the shared-expert quotas: the core's float64 operations,
correctly rounded on every IEEE target), so every CTA that runs it on the same inputs gets
the same bits, on any GPU and in the interpreter. No ``tl.sort`` in the block step:

* water level of a block (``integer_block_step``'s ``min_k floor((c + k lowest bases) / k)``):
  the classic water-filling iteration on the set ``A = {bases <= level}`` (``_level_rows``).
  ``min_k (c + S_k) / k`` is the exact water level ``L*``; starting from all ranks, ``A_{t+1} =
  {b <= floor((c + S_A) / |A|)}`` shrinks monotonically and stops at ``{b <= L*}``, whose
  ``floor((c + S_A) / |A|)`` is ``floor(L*)``. Typically 2-3 row reductions, at most one per rank;
* largest remainder (``objective.round_fixed``): the ``short``-th smallest (remainder desc,
  column) key per row by a bitwise search over the key bits (``_kth_rows``);
* tile consolidation (``objective.consolidate_tiles``): the pour-in-(base, column)-order cut
  by the same bitwise search (``_pour_rows``).

The certificate and the integer lower bound (the core's prefix bound over ranks in (load
desc, rank asc) order) sort 1-D int64 keys ``(2**31 - 1 - load) << RBITS | rank`` (< 2**40:
no collision with the padding key at any R, see test_v2_certificate_key) once per sweep.
"""

from __future__ import annotations

import triton
import triton.language as tl

BIGKEY = tl.constexpr(1 << 62)  # sorts after every real int64 key


@triton.jit
def _gather_1d(src, idx, N: tl.constexpr):
    """``src[idx]`` for a 1-D register tensor ``src`` and an index tensor of N elements (any shape)."""
    flat = tl.reshape(idx, [N])
    return tl.reshape(tl.gather(src, flat, 0), idx.shape)


@triton.jit
def _count_less(a, q, N: tl.constexpr, LOGN: tl.constexpr):
    """For 1-D ascending ``a [N]`` (N a power of two) and 1-D queries ``q``: ``#(a < q)`` (int32)."""
    pos = (q * 0).to(tl.int32)
    for i in tl.static_range(LOGN):
        step = N >> (i + 1)
        v = tl.gather(a, pos + (step - 1), 0)
        pos = tl.where(v < q, pos + step, pos)
    v = tl.gather(a, pos, 0)
    return tl.where(v < q, pos + 1, pos)


# ---------------------------------------------------------------------------------------------
# Water levels and block steps (quota_dispatch.integer_block_step)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _level_rows(base, fa, crow, CB: tl.constexpr):
    """Per row: ``floor`` of the water level of ``crow`` poured onto the bases at ``fa``."""
    den = tl.sum(fa.to(tl.int32), axis=1)
    num = crow + tl.sum(tl.where(fa, base, 0), axis=1)
    changed = tl.max(den, axis=0) * 0 + 1
    it = 0
    while (changed != 0) & (it <= CB):
        lvl = num // tl.maximum(den, 1)
        a = fa & (base <= lvl[:, None])
        den_new = tl.sum(a.to(tl.int32), axis=1)
        num = crow + tl.sum(tl.where(a, base, 0), axis=1)
        changed = tl.max((den_new != den).to(tl.int32), axis=0)
        den = den_new
        it += 1
    return num // tl.maximum(den, 1)


@triton.jit
def _level_vec(base, m, c, RB: tl.constexpr):
    """``_level_rows`` for one block over a ``[RB]`` vector (the shared expert: a copy on every rank)."""
    den = tl.sum(m.to(tl.int32), axis=0)
    num = c + tl.sum(tl.where(m, base, 0), axis=0)
    changed = den * 0 + 1
    it = 0
    while (changed != 0) & (it <= RB):
        lvl = num // tl.maximum(den, 1)
        a = m & (base <= lvl)
        den_new = tl.sum(a.to(tl.int32), axis=0)
        num = c + tl.sum(tl.where(a, base, 0), axis=0)
        changed = (den_new != den).to(tl.int32)
        den = den_new
        it += 1
    return num // tl.maximum(den, 1)


@triton.jit
def _block_step(ra, load, crow, act, csrc, rankc, first, NC: tl.constexpr, CB: tl.constexpr):
    """The core's integer block step for the rows ``act`` of one colour.

    ``ra [NEB, CB]``: each expert's amount per rank, held at the rank's first copy (the core's
    ``own_rank``); ``load [RB]`` rank loads; ``csrc [RB]`` the colour's first copy per rank.
    """
    fa = first & act[:, None]
    base = _gather_1d(load, rankc, NC) - ra
    level = _level_rows(base, fa, crow, CB)
    amt = tl.where(fa, tl.maximum(level[:, None] - base, 0), 0)
    short = crow - tl.sum(amt, axis=1)
    atl = fa & (base <= level[:, None])
    cnt = tl.cumsum(atl.to(tl.int32), axis=1)
    amt = amt + (atl & (cnt <= short[:, None])).to(amt.dtype)
    delta = tl.reshape(tl.where(fa, amt - ra, 0), [NC])
    ra = tl.where(fa, amt, ra)
    dr = tl.gather(delta, tl.maximum(csrc, 0), 0)
    return ra, load + tl.where(csrc >= 0, dr, 0)


@triton.jit
def _shared_step(qs, load, cs, R: tl.constexpr, RB: tl.constexpr):
    """The block step of the shared expert (one copy per rank, copy order = rank order)."""
    r = tl.arange(0, RB)
    rv = r < R
    base = load - qs
    level = _level_vec(base, rv, cs, RB)
    amt = tl.where(rv, tl.maximum(level - base, 0), 0)
    short = cs - tl.sum(amt, axis=0)
    atl = rv & (base <= level)
    cnt = tl.cumsum(atl.to(tl.int32), axis=0)
    amt = amt + (atl & (cnt <= short)).to(amt.dtype)
    return amt, base + amt


@triton.jit
def _rank_amounts(q, nxt, first, maxm):
    """Per-copy amounts -> amount per (expert, rank), held at the rank's first copy."""
    acc = q
    idx = nxt
    for _ in range(1, maxm):
        acc += tl.where(idx >= 0, tl.gather(q, tl.maximum(idx, 0), 1), 0)
        idx = tl.where(idx >= 0, tl.gather(nxt, tl.maximum(idx, 0), 1), -1)
    return tl.where(first, acc, 0)


@triton.jit
def _per_copy(ra, fr, mult, dup, valid):
    """Amount per copy from its rank's amount: copies sharing a rank split it as evenly as
    possible, earlier copies first (the core's rule)."""
    rf = tl.gather(ra, tl.maximum(fr, 0), 1)
    return tl.where(valid, rf // mult + (dup < rf % mult).to(ra.dtype), 0)


@triton.jit
def _rep_rank_loads(ra, colour_src_ptr, G, RB: tl.constexpr, NC: tl.constexpr):
    """Load of every rank from the replicated experts: ``[NEB, CB] -> [RB]``."""
    r = tl.arange(0, RB)
    flat = tl.reshape(ra, [NC])
    tot = tl.zeros([RB], ra.dtype)
    for g in range(0, G):
        src = tl.load(colour_src_ptr + g * RB + r)
        tot += tl.where(src >= 0, tl.gather(flat, tl.maximum(src, 0), 0), 0)
    return tot


@triton.jit
def _sweep(ra, qs, load, crow, cs_sh, colour, colour_src_ptr, G, rankc, first,
           R: tl.constexpr, RB: tl.constexpr, NC: tl.constexpr, CB: tl.constexpr, SHARED: tl.constexpr):
    """One sweep: every routed colour in the core's order, then the shared expert (its own last colour)."""
    r = tl.arange(0, RB)
    for g in range(0, G):
        csrc = tl.load(colour_src_ptr + g * RB + r)
        ra, load = _block_step(ra, load, crow, colour == g, csrc, rankc, first, NC, CB)
    if SHARED:
        qs, load = _shared_step(qs, load, cs_sh, R, RB)
    return ra, qs, load


# ---------------------------------------------------------------------------------------------
# The prefix lower bound (certificate, integer_lower_bound)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _prefix_nums(load, fixed, crow, rowvalid, rankc, valid, cs_sh,
                 R: tl.constexpr, RB: tl.constexpr, RBITS: tl.constexpr, NEB: tl.constexpr,
                 LOGNEB: tl.constexpr, NC: tl.constexpr, SHARED: tl.constexpr):
    """``num[p]`` (int64 ``[RB]``): what the ``p + 1`` most loaded ranks (load desc, rank asc)
    must carry: their fixed loads plus every expert with all copies among them."""
    r = tl.arange(0, RB)
    rv = r < R
    key = tl.where(rv, ((2147483647 - load).to(tl.int64) << RBITS) | r.to(tl.int64), BIGKEY)
    sk = tl.sort(key, dim=0)
    sr = (sk & (RB - 1)).to(tl.int32)
    numf = tl.cumsum(tl.where(rv, tl.gather(fixed, sr, 0), 0).to(tl.int64), axis=0)
    mk = tl.max(tl.where(valid, _gather_1d(key, rankc, NC), -1), axis=1)  # an expert's last rank
    pe = _count_less(sk, mk, RB, RBITS)  # ... and its position
    ekey = tl.where(rowvalid, (pe.to(tl.int64) << 32) | crow.to(tl.int64), BIGKEY)
    es = tl.sort(ekey, dim=0)
    ccum = tl.cumsum(tl.where(es < BIGKEY, es & 0xFFFFFFFF, 0), axis=0)
    m = _count_less(es, (r + 1).to(tl.int64) << 32, NEB, LOGNEB)  # experts contained in prefix p
    num = numf + tl.where(m > 0, tl.gather(ccum, tl.maximum(m - 1, 0), 0), 0)
    if SHARED:
        num = num + tl.where(r == R - 1, cs_sh.to(tl.int64), 0)
    return num


@triton.jit
def _certified(num, load, R: tl.constexpr, RB: tl.constexpr, TOL_SHIFT_C: tl.constexpr, SLACK: tl.constexpr):
    """1 when some prefix proves ``max(load)`` optimal within ``(max >> TOL_SHIFT) + SLACK`` units."""
    r = tl.arange(0, RB)
    rv = r < R
    m = tl.max(tl.where(rv, load, 0), axis=0).to(tl.int64)
    if TOL_SHIFT_C < 31:
        thr = m - ((m >> TOL_SHIFT_C) + SLACK)
    else:  # int32 loads: max >> tol_shift is 0
        thr = m - SLACK
    ok = rv & (num - (r + 1).to(tl.int64) * thr >= 0)
    return tl.max(ok.to(tl.int32), axis=0)


@triton.jit
def _int_bound(num, R: tl.constexpr, RB: tl.constexpr):
    """``integer_lower_bound``: max over prefixes of ``ceil(num / size)``."""
    r = tl.arange(0, RB)
    k = (r + 1).to(tl.int64)
    return tl.max(tl.where(r < R, (num + k - 1) // k, 0), axis=0)


# ---------------------------------------------------------------------------------------------
# Largest remainder (objective.round_fixed) and the bitwise order statistic
# ---------------------------------------------------------------------------------------------
@triton.jit
def _kth_rows(key, short, NB: tl.constexpr):
    """Per row: the largest ``t < 2**NB`` with ``#(key < t) <= short``. With unique keys below
    ``2**NB`` and ``short`` < #keys, ``key < t`` selects exactly the ``short`` smallest."""
    th = (short * 0).to(key.dtype)
    for i in tl.static_range(NB):
        t = th + (1 << (NB - 1 - i))
        cnt = tl.sum((key < t[:, None]).to(tl.int32), axis=1)
        th = tl.where(cnt <= short, t, th)
    return th


@triton.jit
def _kth_vec(key, short, NB: tl.constexpr):
    """``_kth_rows`` for one row held as a 1-D vector (``short`` a scalar)."""
    th = (short * 0).to(key.dtype)
    for i in tl.static_range(NB):
        t = th + (1 << (NB - 1 - i))
        cnt = tl.sum((key < t).to(tl.int32), axis=0)
        th = tl.where(cnt <= short, t, th)
    return th


@triton.jit
def _round_rows(q, units, valid, col, SCALE_B: tl.constexpr, CBITS: tl.constexpr):
    """Fixed-point per-copy amounts -> integers summing per row to ``units``: each row's
    shortfall goes to its largest remainders, lower column (= lower slot) first on ties."""
    MASK: tl.constexpr = (1 << SCALE_B) - 1
    NB: tl.constexpr = SCALE_B + CBITS
    fl = q >> SCALE_B
    short = units - tl.sum(tl.where(valid, fl, 0), axis=1)
    key = tl.where(valid, ((MASK - (q & MASK)) << CBITS) | col[None, :], 1 << NB)
    th = _kth_rows(key, short, NB)
    return tl.where(valid, fl + (key < th[:, None]).to(fl.dtype), 0)


@triton.jit
def _round_vec(q, units, m, r, SCALE_B: tl.constexpr, RBITS: tl.constexpr):
    """``_round_rows`` for the shared expert's ``[RB]`` vector (lower rank first on ties)."""
    MASK: tl.constexpr = (1 << SCALE_B) - 1
    NB: tl.constexpr = SCALE_B + RBITS
    fl = q >> SCALE_B
    short = units - tl.sum(tl.where(m, fl, 0), axis=0)
    key = tl.where(m, ((MASK - (q & MASK)) << RBITS) | r, 1 << NB)
    th = _kth_vec(key, short, NB)
    return tl.where(m, fl + (key < th).to(fl.dtype), 0)


# ---------------------------------------------------------------------------------------------
# Tiles (objective.consolidate_tiles, objective.fill_tiles)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pour_rows(ra, load, units, act, csrc, rankc, first, top, col, NC: tl.constexpr, CBITS: tl.constexpr,
               NB: tl.constexpr):
    """One colour of ``consolidate_tiles``: each row's tiles re-poured onto its ranks in (base,
    copy) order, each rank up to ``top``, all on the rank's first copy."""
    fa = first & act[:, None]
    base = _gather_1d(load, rankc, NC) - ra
    room = tl.where(fa, top - base, 0)
    key = tl.where(fa, (base.to(tl.int64) << CBITS) | col[None, :], 1 << NB)
    th = (units * 0).to(tl.int64)
    for i in tl.static_range(NB):  # largest cut key whose earlier room is still short of units
        t = th + (1 << (NB - 1 - i))
        s = tl.sum(tl.where(key < t[:, None], room, 0), axis=1)
        th = tl.where(s < units, t, th)
    s = tl.sum(tl.where(key < th[:, None], room, 0), axis=1)
    take = tl.where(key < th[:, None], room, tl.where(key == th[:, None], units[:, None] - s[:, None], 0))
    take = tl.where(fa, take, 0)
    delta = tl.reshape(tl.where(fa, take - ra, 0), [NC])
    ra = tl.where(fa, take, ra)
    dr = tl.gather(delta, tl.maximum(csrc, 0), 0)
    return ra, load + tl.where(csrc >= 0, dr, 0)


@triton.jit
def _pour_vec(qs, load, units, top, R: tl.constexpr, RB: tl.constexpr, RBITS: tl.constexpr, NB: tl.constexpr):
    """``_pour_rows`` for the shared expert (its copies in rank order)."""
    r = tl.arange(0, RB)
    rv = r < R
    base = load - qs
    room = tl.where(rv, top - base, 0)
    key = tl.where(rv, (base.to(tl.int64) << RBITS) | r, 1 << NB)
    th = (units * 0).to(tl.int64)
    for i in tl.static_range(NB):
        t = th + (1 << (NB - 1 - i))
        s = tl.sum(tl.where(key < t, room, 0), axis=0)
        th = tl.where(s < units, t, th)
    s = tl.sum(tl.where(key < th, room, 0), axis=0)
    take = tl.where(key < th, room, tl.where(key == th, units - s, 0))
    take = tl.where(rv, take, 0)
    return take, base + take


@triton.jit
def _fill_rows(n, units, crow, valid, slots, lfull_c, tile, PB: tl.constexpr):
    """``fill_tiles`` for the replicated rows: tokens per copy, every tile full except the
    row's one partial tile, on its copy with a tile on the rank carrying most tokens when
    full (lower slot on ties). ``lfull_c [NEB, CB]``: each copy's rank load in full tiles."""
    short = units * tile - crow
    score = tl.where(valid & (n > 0), lfull_c.to(tl.int64) * PB + (PB - 1 - slots), -1)
    best = tl.max(score, axis=1)
    chosen = (score == best[:, None]) & valid & (n > 0)
    return tl.where(valid, n * tile - tl.where(chosen, short[:, None], 0), 0)


@triton.jit
def _fill_vec(qs, units, count, lfull, tile, R: tl.constexpr, RB: tl.constexpr):
    """``_fill_rows`` for the shared expert (ties: lower rank)."""
    r = tl.arange(0, RB)
    rv = r < R
    short = units * tile - count
    score = tl.where(rv & (qs > 0), lfull.to(tl.int64) * RB + (RB - 1 - r), -1)
    best = tl.max(score, axis=0)
    chosen = (score == best) & rv & (qs > 0)
    return tl.where(rv, qs * tile - tl.where(chosen, short, 0), 0)


# ---------------------------------------------------------------------------------------------
# Waterfill (waterfill.shared_quotas in float64)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _shared_quotas_f64(routed, n, R: tl.constexpr, RB: tl.constexpr):
    """``waterfill.shared_quotas(routed, n)``: ``[RB]`` int64, bit-identical to the core.

    The core's level is ``min_k fl((n + S_k) / k)`` = ``fl(L*)`` (rounding is monotone), and
    ``L* = (n + S_A) / |A|`` exactly from the integer water-filling iteration: one correctly
    rounded division. ``y = level - load`` is exact for ``load < level < 2**52``, so every
    positive ``y`` has the fractional part of ``level`` and the others 0: the core's
    (remainder desc, rank asc) order needs no sort.
    """
    r = tl.arange(0, RB)
    rv = r < R
    load = routed.to(tl.int64)
    nn = n.to(tl.int64)
    a = rv & (load <= _level_vec(load, rv, nn, RB))  # the iteration's final set: bases <= floor(L*)
    num = nn + tl.sum(tl.where(a, load, 0), axis=0)
    den = tl.sum(a.to(tl.int64), axis=0)
    level = num.to(tl.float64) / tl.maximum(den, 1).to(tl.float64)
    y = tl.where(rv, tl.maximum(level - load.to(tl.float64), 0.0), 0.0)
    yfl = tl.floor(y)
    frac = y - yfl
    short = nn - tl.sum(tl.where(rv, yfl.to(tl.int64), 0), axis=0)
    fmax = tl.max(tl.where(rv, frac, -1.0), axis=0)
    hi = rv & (frac == fmax)
    lo = rv & (frac != fmax)
    pos = tl.where(hi, tl.cumsum(hi.to(tl.int32), axis=0) - 1,
                   tl.sum(hi.to(tl.int32), axis=0) + tl.cumsum(lo.to(tl.int32), axis=0) - 1)
    return tl.where(rv, yfl.to(tl.int64) + (pos.to(tl.int64) < tl.maximum(short, 0)).to(tl.int64), 0)
