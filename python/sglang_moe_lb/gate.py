"""The gate: balance a layer only where the cost model predicts more gain than overhead.

A balancing mode pays its hot path (kernels) and, with global sync, one all-gather per MoE
layer; it gains the busiest rank's time it takes off. The gate compares the two per batch
and per layer, and falls back to SGLang's static dispatch where balancing would not pay.

The decision must be the same on every rank of a collective, so it is taken *before* the
collective from what every rank already shares: the batch size, ``tokens_per_rank`` (the
largest DP rank's tokens; under CUDA graphs, the captured batch bucket, which SGLang picks
from the same number on every rank). The gate chooses between a mode's ``opened`` form (its
per-batch work) and its ``closed`` form (SGLang's static dispatch, or for a plan schedule the
plan, which costs a gather). The prediction at size N is::

    gain(N) = expected_gain * layer_time(N)     overhead(N) = opened's (hot path + collective) - closed's

``layer_time(N)`` is the cost model's busiest-rank time with N tokens per rank routed
evenly (``uniform_layer_time``) and ``expected_gain`` the share of it the opened form takes
off the closed one (``default_expected_gain``: measured by ``replay --batch-sweep``;
docs/defaults.md). The gate opens from the smallest N where the gain exceeds the overhead
(``Gate.min_tokens``), so it is a threshold on the batch size: rank-consistent by
construction, and one decision per captured graph.

Overheads come from the measured kernel table (``Overheads.measured()``,
``data/overheads_h200.json``: the H200 numbers in docs/gpu/) and a documented collective
latency; both can be overridden. A plan's overhead is its gather minus SGLang's static
gather (the ``lplb/plan`` entry): 0 until measured (``benchmark/gpu_check.sh``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources

import torch

from .cost import CostModel
from .cost_files import check_overheads, read_json_object
from .mode import BalanceMode

__all__ = ["Overheads", "Gate", "uniform_layer_time", "DEFAULT_EXPECTED_GAIN", "PLAN_EXPECTED_GAIN",
           "default_expected_gain"]

DEFAULT_EXPECTED_GAIN = 0.05  # share of the layer time per-batch work takes off static; replay measures it
PLAN_EXPECTED_GAIN = 0.02  # ... and takes off a plan (docs/defaults.md: the hybrid's threshold)


def default_expected_gain(mode: BalanceMode) -> float:
    """The gate's expected gain when none is given: over a plan for a plan schedule, else over static."""
    return PLAN_EXPECTED_GAIN if mode.plan else DEFAULT_EXPECTED_GAIN


def _interp_log(points: dict[int, float], n: float) -> float:
    """Piecewise-linear in log(n) through the measured points, constant beyond them."""
    xs = sorted(points)
    if n <= xs[0]:
        return points[xs[0]]
    if n >= xs[-1]:
        return points[xs[-1]]
    for a, b in zip(xs, xs[1:]):
        if a <= n <= b:
            w = (math.log(n) - math.log(a)) / (math.log(b) - math.log(a))
            return points[a] + w * (points[b] - points[a])
    return points[xs[-1]]  # unreachable


@dataclass(frozen=True)
class Overheads:
    """µs per MoE layer a mode adds: its hot path plus, with global sync, one collective.

    ``hot_path`` maps a mode key (``lplb/per-batch``, ``waterfill/all_rank``, ...; see
    ``key``) to measured ``{tokens per rank: µs}``; a key measured at one size only follows
    the shape of the ``lplb/per-batch`` curve. ``fixed_us`` overrides every hot path.
    """

    hot_path: dict = field(default_factory=dict)
    collective_intra_us: float = 10.0
    collective_inter_us: float = 25.0
    ranks_per_node: int = 8
    fixed_us: float | None = None
    source: str = ""

    @classmethod
    def measured(cls, path: str | None = None) -> "Overheads":
        """The measured table shipped with the package (or another file of the same format);
        ``cost_files.CostFileError`` names the file and what is wrong with it."""
        if path is None:
            where = "data/overheads_h200.json"
            d = json.loads(resources.files("sglang_moe_lb").joinpath(where).read_text())
        else:
            where, d = str(path), read_json_object(path, "overheads table")
        v = check_overheads(d, where)
        return cls(v["hot_path"], v["intra"], v["inter"], v["ranks_per_node"], source=v["source"])

    @staticmethod
    def key(mode: BalanceMode) -> str:
        """The table key of an ungated mode: flag, LPLB schedule, Waterfill candidates (sync and
        objective do not change the kernels' work). A plan with Waterfill is priced as the plan
        plus Waterfill alone (``hot_path_us``)."""
        parts = [mode.flag]
        if mode.lplb != "off":
            parts.append(mode.lplb)
        if mode.waterfill is not None:
            parts.append(mode.waterfill)
        return "/".join(parts)

    def plan_us(self, tokens_per_rank: float) -> float:
        """A plan's gather minus SGLang's static gather (the ``lplb/plan`` entry; 0 until measured)."""
        return self._lookup("lplb/plan", tokens_per_rank) if "lplb/plan" in self.hot_path else 0.0

    def hot_path_us(self, mode: BalanceMode | str, tokens_per_rank: float) -> float:
        """µs per layer the hot path of ``mode`` (an ungated ``BalanceMode`` or a table key) adds at
        this batch size, over SGLang's static dispatch."""
        if isinstance(mode, BalanceMode):
            if mode.gate:
                raise ValueError(f"{mode.name} is gated: price its .opened or .closed form")
            if not mode.active:
                return 0.0
            if mode.plan:
                wf = BalanceMode(waterfill=mode.waterfill) if mode.waterfill is not None else None
                return self.plan_us(tokens_per_rank) + (self.hot_path_us(wf, tokens_per_rank) if wf else 0.0)
        if self.fixed_us is not None:
            return self.fixed_us
        return self._lookup(self.key(mode) if isinstance(mode, BalanceMode) else mode, tokens_per_rank)

    def _lookup(self, key: str, tokens_per_rank: float) -> float:
        if key not in self.hot_path:
            raise KeyError(f"no measured hot-path time for {key!r} (known: {', '.join(sorted(self.hot_path))})")
        pts = self.hot_path[key]
        n = max(1.0, float(tokens_per_rank))
        if len(pts) > 1:
            return _interp_log(pts, n)
        (t0, v0), = pts.items()
        ref = self.hot_path.get("lplb/per-batch")
        if not ref or len(ref) < 2:
            return v0
        return v0 * _interp_log(ref, n) / _interp_log(ref, t0)

    def collective_us(self, num_ranks: int) -> float:
        """One small all-gather over ``num_ranks`` EP ranks."""
        return self.collective_intra_us if num_ranks <= self.ranks_per_node else self.collective_inter_us

    def mode_us(self, mode: BalanceMode | None, tokens_per_rank: float, num_ranks: int) -> float:
        """Everything an ungated ``mode`` (None: SGLang static) adds per layer at this batch size."""
        if mode is None or not mode.active:
            return 0.0
        return self.hot_path_us(mode, tokens_per_rank) + (self.collective_us(num_ranks) if mode.collective else 0.0)


def uniform_layer_time(cost: CostModel, tokens_per_rank: float, top_k: int, slots_per_rank: int,
                       shared: bool = False) -> float:
    """Busiest-rank µs when every rank gets ``tokens_per_rank * top_k`` routed entries spread
    as evenly as possible over its ``slots_per_rank`` copies (plus one shared slot with its
    tokens if ``shared``)."""
    base, extra = divmod(int(round(tokens_per_rank * top_k)), slots_per_rank)
    q = [base + 1] * extra + [base] * (slots_per_rank - extra) + ([int(tokens_per_rank)] if shared else [])
    return float(cost.rank_time(torch.tensor(q), len(q)).max())


@dataclass(frozen=True)
class Gate:
    """The batch-size threshold of one mode (module docstring).

    Args: mode, cost model, overheads, top_k, slots_per_rank, num_ranks, expected_gain (None:
    ``default_expected_gain(mode)``).
    """

    mode: BalanceMode
    cost: CostModel
    overheads: Overheads
    top_k: int
    slots_per_rank: int
    num_ranks: int
    expected_gain: float | None = None

    @property
    def gain_share(self) -> float:
        return default_expected_gain(self.mode) if self.expected_gain is None else self.expected_gain

    def predicted_gain_us(self, tokens_per_rank: float) -> float:
        shared = self.mode.waterfill is not None
        return self.gain_share * uniform_layer_time(self.cost, tokens_per_rank, self.top_k, self.slots_per_rank, shared)

    def overhead_us(self, tokens_per_rank: float) -> float:
        """What opening adds over staying closed (opened's overhead minus closed's)."""
        ov, n, R = self.overheads, tokens_per_rank, self.num_ranks
        return ov.mode_us(self.mode.opened, n, R) - ov.mode_us(self.mode.closed, n, R)

    def open(self, tokens_per_rank: float) -> bool:
        """Balance this batch? ``tokens_per_rank``: the largest DP rank's tokens (shared by all ranks)."""
        if not self.mode.gate:
            return True
        return self.predicted_gain_us(tokens_per_rank) > self.overhead_us(tokens_per_rank)

    def min_tokens(self, limit: int = 1 << 20) -> int | None:
        """The smallest batch (tokens per rank, in powers of two) where the gate opens; None if never up to ``limit``."""
        n = 1
        while n <= limit:
            if self.open(n):
                return n
            n *= 2
        return None
