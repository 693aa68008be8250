"""The kernels' torch reference: the core's one chain with fixed-point split steps.

The kernels match ``reference_layer`` (= ``sglang_moe_lb.chain.balance_layer`` with
``steps=FixedPointSteps(spec)``) bit for bit. Nothing of the chain is re-written here: the
mode logic, dispatch, Waterfill, the tile consolidation and fill and the polish rule are
the core's. What this module supplies is the *arithmetic* of the
per-batch split (a ``SplitSteps``):

* the core's block-coordinate water-filling (``quota_dispatch.integer_block_step``) in
  **fixed point**: integers in units of ``2**-spec.scale_bits`` tokens, so every sum is exact
  in any order and CPU, GPU and the Triton interpreter agree exactly;
* the optimality certificate (the core's prefix lower bound) evaluated exactly in integers,
  after every sweep; the split stops (freezes) at the first certified sweep, at most
  ``spec.max_sweeps`` sweeps;
* largest-remainder rounding on the fixed-point values (``objective.round_fixed``), then the
  core's ``polish`` with the spec's sweep cap and rule.

Everything runs without a host synchronisation or a data-dependent shape (fixed sweep
counts with masks instead of early exits), so the same code is the CPU proof that the
per-batch path is graph-safe (test/kernels/test_graph_safety.py).

Semantics vs. the core's float path: the core solves to 1e-9 and falls back to HiGHS and an
integral max-flow, so its quotas are integer-optimal; here the split is capped and an
uncertified layer is flagged (``certified``), not re-solved. The optimal fractional split
is not unique, so quotas can differ where both are optimal (docs/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_moe_lb import BalanceMode, Placement
from sglang_moe_lb.chain import LayerDispatch, balance_layer
from sglang_moe_lb.cost import CostModel
from sglang_moe_lb.objective import round_fixed
from sglang_moe_lb.quota_dispatch import integer_block_step, polish

__all__ = [
    "FixedSpec",
    "V1_SPEC",
    "SCALE_BITS",
    "TOL_SHIFT",
    "SLACK_UNITS",
    "DEFAULT_SWEEPS",
    "FixedPointSteps",
    "split_fixed",
    "certificate",
    "bound_gap",
    "reference_layer",
]


@dataclass(frozen=True)
class FixedSpec:
    """The fixed-point arithmetic of one kernel set (kernel and reference share it).

    scale_bits: fixed-point unit ``2**-scale_bits`` tokens.
    max_sweeps: split sweep cap (stops at the first certified sweep).
    tol_shift / slack_units: certified when ``max - bound <= (max >> tol_shift) + slack_units``.
    polish_sweeps: integer polish cap; ``polish_at_bound``: also polish layers already optimal.
    """

    name: str
    scale_bits: int = 28
    max_sweeps: int = 16
    tol_shift: int = 30
    slack_units: int = 256
    polish_sweeps: int = 8
    polish_at_bound: bool = False


# The kernel set verified on the H200 (2026-11-27): 2**-28 units, cap 16, 2**-30 relative +
# 256 units (9.5e-7 tokens) tolerance, 8 polish sweeps applied to every layer.
V1_SPEC = FixedSpec("v1", scale_bits=28, max_sweeps=16, tol_shift=30, slack_units=256, polish_sweeps=8,
                    polish_at_bound=True)
SCALE_BITS, TOL_SHIFT, SLACK_UNITS, DEFAULT_SWEEPS = V1_SPEC.scale_bits, V1_SPEC.tol_shift, V1_SPEC.slack_units, V1_SPEC.max_sweeps


def _fixed_loads(pl: Placement, cs: torch.Tensor) -> torch.Tensor:
    """Per-rank load of single-copy experts in fixed point: ``cs [E] -> [R]``."""
    c_slot = cs[pl.phy2log[0]]
    return pl.rank_loads(torch.where(pl.replicated_slot[0], 0, c_slot))


def _prefix_num(pl: Placement, counts: torch.Tensor, load: torch.Tensor, spec: FixedSpec) -> torch.Tensor:
    """Numerators of the prefix lower bound: ``[R]``, entry ``k - 1`` for the ``k`` heaviest ranks
    (order: load desc, rank asc): their fixed load + every expert whose copies all lie among them."""
    R = pl.num_ranks
    dev = load.device
    cs = counts.to(torch.long) << spec.scale_bits
    r = torch.arange(R, device=dev)
    before = (load[None, :] > load[:, None]) | ((load[None, :] == load[:, None]) & (r[None, :] < r[:, None]))
    pos = before.sum(1)
    fixed = _fixed_loads(pl, cs)
    k = torch.arange(1, R + 1, device=dev)
    in_prefix = pos[None, :] < k[:, None]  # [k, r]
    num = (in_prefix * fixed[None, :]).sum(1)
    blocks = pl.replica_blocks
    if blocks.layer.numel():
        last = torch.where(blocks.valid, pos[blocks.flat_rank.clamp(max=R - 1)], -1).max(1).values
        contained = last[None, :] < k[:, None]  # [k, expert]
        num = num + (contained * cs[blocks.expert][None, :]).sum(1)
    return num


def certificate(pl: Placement, counts: torch.Tensor, load: torch.Tensor, spec: FixedSpec = V1_SPEC) -> torch.Tensor:
    """The core's prefix lower bound in exact integers: 0-dim bool tensor.

    ``counts [E]`` units, ``load [R]`` fixed-point rank loads of a feasible split. True when
    some "top-k ranks by load" set (order: load desc, rank asc) has density
    ``>= max(load) - ((max >> tol_shift) + slack_units)``.
    """
    m = load.max()
    thr = m - ((m >> spec.tol_shift) + spec.slack_units)
    k = torch.arange(1, pl.num_ranks + 1, device=load.device)
    return (_prefix_num(pl, counts, load, spec) >= k * thr).any()


def bound_gap(pl: Placement, counts: torch.Tensor, load: torch.Tensor, spec: FixedSpec = V1_SPEC) -> torch.Tensor:
    """``max(load) - max_k floor(num_k / k)``: how far a split's max load may be above the optimum,
    in fixed-point units (0-dim long; the kernels' gap counter)."""
    k = torch.arange(1, pl.num_ranks + 1, device=load.device)
    return load.max() - torch.div(_prefix_num(pl, counts, load, spec), k, rounding_mode="floor").max()


def _even_fixed(pl: Placement, cs: torch.Tensor) -> torch.Tensor:
    """Each expert's fixed-point amount spread evenly over its copies (lower slots get the remainder)."""
    P = pl.num_physical
    p2l = pl.phy2log[0]
    n = pl.num_copies[0][p2l]
    copy_idx = torch.empty(P, dtype=torch.long, device=cs.device)
    order = pl.copy_order[0]
    copy_idx[order] = torch.arange(P, device=cs.device) - pl.copy_start[0][p2l[order]]
    return torch.div(cs[p2l], n, rounding_mode="floor") + (copy_idx < cs[p2l] % n).to(torch.long)


def split_fixed(pl: Placement, counts: torch.Tensor, spec: FixedSpec = V1_SPEC) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-point exact split of one layer (single-layer ``pl``; the fused one for joint modes).

    Args:
        counts: ``[E]`` integer units per logical expert (tokens, or tiles).
    Returns:
        (``q [P]`` long fixed-point units per slot, each expert summing to ``counts[e] <<
        scale_bits``; certified 0-dim bool; sweeps run 0-dim long). Runs exactly
        ``max_sweeps`` sweeps and freezes the state after the first certified one.
    """
    c = counts.to(torch.long).reshape(-1)
    cs = c << spec.scale_bits
    q = _even_fixed(pl, cs)
    blocks = pl.replica_blocks
    if not blocks.colours:
        return q, torch.ones((), dtype=torch.bool, device=c.device), torch.zeros((), dtype=torch.long, device=c.device)
    zero = q.new_zeros(1)
    q_ext = torch.cat([q, zero])
    load_ext = torch.cat([pl.rank_loads(q), zero])
    c_blocks = [cs[col[1]] for col in blocks.colours]
    done = certificate(pl, c, load_ext[:-1], spec) & False  # sweep at least once when there are colours
    sweeps = torch.zeros((), dtype=torch.long, device=c.device)
    for _ in range(spec.max_sweeps):
        q_new, load_new = q_ext.clone(), load_ext.clone()
        for colour, c_blk in zip(blocks.colours, c_blocks):
            integer_block_step(q_new, load_new, c_blk, colour)
        q_ext = torch.where(done, q_ext, q_new)
        load_ext = torch.where(done, load_ext, load_new)
        sweeps = sweeps + (~done).to(torch.long)
        done = done | certificate(pl, c, load_ext[:-1], spec)
    return q_ext[:-1], certificate(pl, c, load_ext[:-1], spec), sweeps


class FixedPointSteps:
    """``objective.SplitSteps`` in the kernels' fixed point (see the module docstring)."""

    def __init__(self, spec: FixedSpec = V1_SPEC):
        self.spec = spec
        self.name = f"fixed-point {spec.name}"

    def split_round(self, pl: Placement, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pl.num_layers != 1:
            raise ValueError("the fixed-point steps solve one layer (use Placement.layer(i))")
        spec = self.spec
        u = units.to(torch.long).reshape(1, -1)
        qf, cert, _ = split_fixed(pl, u[0], spec)
        q = round_fixed(pl, qf[None], u, spec.scale_bits)
        q = polish(pl, q, u, spec.polish_sweeps, early_exit=False, skip_at_bound=not spec.polish_at_bound)
        return q, cert.reshape(1)


def reference_layer(
    pl: Placement,
    topk_ids: torch.Tensor,
    mode: BalanceMode,
    *,
    spec: FixedSpec = V1_SPEC,
    source_rank: int = 0,
    gathered: torch.Tensor | None = None,
    phys_ids: torch.Tensor | None = None,
    cost: CostModel | None = None,
    check: bool = True,
) -> LayerDispatch:
    """What the kernels compute for one layer: the core chain with ``FixedPointSteps(spec)``.

    ``mode`` is ungated and not a plan (a plan runs no kernel); ``check=False`` skips the
    host-side argument checks (the graph-safe form)."""
    return balance_layer(
        pl.layer(0) if not pl.single_layer else pl, topk_ids, mode, source_rank=source_rank,
        gathered=gathered, phys_ids=phys_ids, cost=cost,
        steps=FixedPointSteps(spec), check=check,
    )
