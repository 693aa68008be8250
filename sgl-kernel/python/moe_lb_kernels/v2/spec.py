"""The v2 kernel set's fixed-point arithmetic, shared by its kernels and its reference.

``V2_SPEC`` is a ``reference.FixedSpec``: the reference (``reference_layer(..., spec=V2_SPEC)``,
the core chain with ``FixedPointSteps(V2_SPEC)``) and the v2 kernels compute the same thing
bit for bit. Choices (shared/notes/kernel-plan.md, "What the corpus says about the solve"):

* ``scale_bits=8``: units of 1/256 token, so the split state fits int32 (8 fractional bits
  behave like 28 on the corpus: same sweeps, same <= 1-token excess). Limit: a layer's
  problem (all counts, plus the shared expert's tokens) below ``2**23`` entries
  (``MAX_TOTAL``), checked when a layer path is built.
* stop at half a token: certified when ``max - lower bound <= 128 units`` (``slack_units =
  2**(scale_bits - 1)``; ``tol_shift=62`` makes the relative term ``max >> 62`` zero for
  every int32 load), cap 8 sweeps (p90 of the corpus).
* polish only layers above the integer lower bound (the core's rule, ``polish_at_bound=False``),
  at most 2 sweeps: the rounded max is within one token of ``ceil(M*)`` on the corpus, and
  each polish sweep costs a full sweep of block steps.
"""

from __future__ import annotations

from ..reference import FixedSpec

__all__ = ["V2_SPEC", "MAX_TOTAL"]

V2_SPEC = FixedSpec("v2", scale_bits=8, max_sweeps=8, tol_shift=62, slack_units=128, polish_sweeps=2,
                    polish_at_bound=False)
# The split's sums (a rank's load, a water level's numerator) stay below the layer's total in
# units; int32 holds them while total << scale_bits < 2**31.
MAX_TOTAL = (1 << (31 - V2_SPEC.scale_bits)) - 1
