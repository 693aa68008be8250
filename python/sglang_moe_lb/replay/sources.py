"""Where replayed traffic comes from: the bundled OLMoE data, a generator, or recorder dumps.

Every source yields a ``Trace``: a fixed number of steps (forward passes), each a ``Batch`` of
logical top-k ids ``[layers, tokens, k]`` whose tokens are grouped by source rank (DP-attention
rank). Batches are built on demand and are reproducible: ``trace.batch(t)`` always returns the
same tensor for the same arguments.

The generators (``bundled_trace``, ``synthetic_trace``) also know how to redraw the same
traffic at another batch size (``Trace.regenerate``), which ``--batch-sweep`` uses. SGLang
recorder dumps are read by ``dumps.load_recorder``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, Sequence

import torch

from .sampling import inclusion_probabilities, sample_topk

__all__ = [
    "Batch",
    "Trace",
    "TraceFormatError",
    "bundled_trace",
    "synthetic_trace",
    "load_bundled_data",
    "step_generator",
    "BUNDLED_DATA_NOTE",
]

BUNDLED_DATA_NOTE = (
    "OLMoE per-domain expert counts by the OLMoE authors (github.com/allenai/OLMoE, "
    "scripts/routing_output, Apache-2.0); see sglang_moe_lb/data/PROVENANCE.md"
)


class TraceFormatError(ValueError):
    """An input file that is not a usable SGLang expert-distribution recorder dump."""


@dataclass
class Batch:
    """One forward pass.

    topk: ``[L, T, k]`` long logical expert ids, ``-1`` = no expert in that slot. Tokens of
        source rank 0 come first, then rank 1, and so on.
    rank_sizes: tokens per source rank, or None to split the T tokens evenly.
    label: the traffic phase (domain) of this step.
    """

    topk: torch.Tensor
    rank_sizes: list[int] | None
    label: str


@dataclass
class Trace:
    """A replayable stream of batches.

    Attributes:
        num_logical / top_k / num_layers / num_steps: shapes.
        make_batch: ``step -> Batch`` (deterministic).
        calibration: ``[L, E]`` counts that the initial EPLB placement is computed from (the
            "calibration" recording an operator passes to ``--init-expert-location``), or None.
        recorded_placement: ``[L, P]`` physical→logical map found in the input, or None.
        phases: ``(first step, label)`` of each traffic phase, in order.
        info: JSON-able description (kind, files, knobs, provenance); ``info["notes"]``: things
            the reader wants the report to say.
    """

    num_logical: int
    top_k: int
    num_layers: int
    num_steps: int
    make_batch: Callable[[int], Batch]
    calibration: torch.Tensor | None = None
    recorded_placement: torch.Tensor | None = None
    phases: list[tuple[int, str]] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    regenerate: Callable[[int], "Trace"] | None = field(default=None, repr=False)
    """``tokens per rank -> Trace``: the same traffic drawn at that batch size (generators only)."""
    step_counts: torch.Tensor | None = field(default=None, repr=False)
    """``[steps, L, E]`` recorded counts when the batches are made from counts (counts-only dumps)."""

    def batch(self, step: int) -> Batch:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} out of range for a trace of {self.num_steps} steps")
        return self.make_batch(step)


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63))


def _tokens_per_rank(gen: torch.Generator, tokens: tuple[int, int], num_ranks: int) -> int:
    lo = max(1, math.ceil(tokens[0] / num_ranks))
    hi = max(lo, tokens[1] // num_ranks)
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _check_tokens(tokens: tuple[int, int]) -> tuple[int, int]:
    lo, hi = int(tokens[0]), int(tokens[1])
    if lo < 1 or hi < lo:
        raise ValueError(f"tokens per batch must be 1 <= MIN <= MAX, got {lo}:{hi}")
    return lo, hi


# -------------------------------------------------------------------------------------------
# Bundled OLMoE data
# -------------------------------------------------------------------------------------------
def load_bundled_data() -> dict:
    """The bundled ``olmoe_domains.json`` (see data/PROVENANCE.md)."""
    text = resources.files("sglang_moe_lb").joinpath("data/olmoe_domains.json").read_text()
    return json.loads(text)


def bundled_trace(
    *,
    steps: int = 150,
    tokens: tuple[int, int] = (512, 4096),
    num_ranks: int = 8,
    model: str = "olmoe",
    calibration: str = "c4",
    serving: Sequence[str] = ("github", "arxiv"),
    seed: int = 0,
) -> Trace:
    """Batches drawn from the OLMoE authors' per-domain expert popularity.

    The initial placement is calibrated on ``calibration``; the served traffic is
    ``serving[0]``, switching to ``serving[1]`` after ``steps / len(serving)`` steps, and so
    on (the domain shift). Each step draws a per-rank batch size uniformly from
    ``[ceil(MIN / R), MAX // R]``; every rank serves that many tokens (``T = R * size``).
    Every token gets ``top_k`` distinct experts per layer, independently per layer, with
    expert ``e``'s probability of being picked equal to its measured share
    ``count[e] / tokens`` in the current domain (``sample_topk``). Seeded per step.
    """
    data = load_bundled_data()
    models = data["models"]
    if model not in models:
        raise ValueError(f"unknown bundled model {model!r}; choose from {sorted(models)}")
    m = models[model]
    domains = m["domains"]
    for d in (calibration, *serving):
        if d not in domains:
            raise ValueError(f"model {model!r} has no domain {d!r}; choose from {sorted(domains)}")
    if not serving:
        raise ValueError("at least one serving domain is needed")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    lo, hi = _check_tokens(tokens)
    k, E = int(m["top_k"]), int(m["num_experts"])
    counts = {d: torch.tensor(domains[d], dtype=torch.float64) for d in domains}
    pis = {d: inclusion_probabilities(counts[d], k) for d in (calibration, *serving)}
    L = counts[calibration].shape[0]
    phases = [(round(i * steps / len(serving)), d) for i, d in enumerate(serving)]

    def label_of(step: int) -> str:
        return [d for start, d in phases if start <= step][-1]

    def make(step: int) -> Batch:
        gen = step_generator(seed, step)
        per_rank = _tokens_per_rank(gen, (lo, hi), num_ranks)
        d = label_of(step)
        return Batch(sample_topk(pis[d], per_rank * num_ranks, k, gen), [per_rank] * num_ranks, d)

    info = {
        "kind": "bundled",
        "data": "sglang_moe_lb/data/olmoe_domains.json",
        "provenance": BUNDLED_DATA_NOTE,
        "model": model,
        "layers_of_model": data.get("layers"),
        "calibration_domain": calibration,
        "serving_domains": list(serving),
        "tokens_per_batch": [lo, hi],
        "seed": seed,
        "sampling": "per token, top-k distinct experts per layer; Madow systematic sampling with "
        "exact per-expert inclusion probabilities = measured share; layers independent",
    }

    def at_size(per_rank: int) -> Trace:
        return bundled_trace(steps=steps, tokens=(per_rank * num_ranks, per_rank * num_ranks), num_ranks=num_ranks,
                             model=model, calibration=calibration, serving=serving, seed=seed)

    return Trace(E, k, L, steps, make, calibration=counts[calibration], phases=phases, info=info, regenerate=at_size)


# -------------------------------------------------------------------------------------------
# Synthetic generator
# -------------------------------------------------------------------------------------------
def synthetic_trace(
    *,
    steps: int = 100,
    tokens: tuple[int, int] = (4096, 4096),
    num_ranks: int = 8,
    experts: int = 256,
    top_k: int = 8,
    layers: int = 2,
    skew: float = 1.0,
    drift: float = 0.05,
    shift_at: int | None = None,
    seed: int = 0,
) -> Trace:
    """A generator for scale tests.

    Popularity of expert ``e`` in layer ``l`` starts Zipf-like: ``w = (1 + rank)^-skew`` over
    a random ranking of the experts (``skew = 0`` is uniform). Each step the log-popularity
    takes a Gaussian random-walk step of size ``drift`` per expert. At ``shift_at`` the
    ranking is redrawn (a domain shift). Tokens are drawn as for the bundled data. The
    calibration (initial placement) is the step-0 popularity.
    """
    if experts < 2 or not 1 <= top_k <= experts:
        raise ValueError(f"need experts >= 2 and 1 <= top_k <= experts, got experts={experts}, top_k={top_k}")
    if layers < 1 or steps < 1:
        raise ValueError(f"layers and steps must be >= 1, got layers={layers}, steps={steps}")
    if not (math.isfinite(skew) and math.isfinite(drift) and skew >= 0 and drift >= 0):
        raise ValueError(f"skew and drift must be finite and >= 0, got skew={skew}, drift={drift}")
    lo, hi = _check_tokens(tokens)
    gen = torch.Generator().manual_seed(seed)
    zipf = -skew * torch.log1p(torch.arange(experts, dtype=torch.float64))

    def ranking() -> torch.Tensor:
        return torch.stack([zipf[torch.randperm(experts, generator=gen)] for _ in range(layers)])

    logw = torch.empty(steps, layers, experts, dtype=torch.float64)
    cur = ranking()
    for t in range(steps):
        if shift_at is not None and t == shift_at:
            cur = ranking()
        elif t > 0 and drift > 0:
            cur = cur + drift * torch.randn(layers, experts, generator=gen, dtype=torch.float64)
        logw[t] = cur
    pis = inclusion_probabilities(torch.exp(logw - logw.amax(-1, keepdim=True)), top_k)  # [steps, L, E]
    phases = [(0, "synthetic")] + ([(shift_at, "synthetic-shifted")] if shift_at else [])

    def make(step: int) -> Batch:
        g = step_generator(seed, step, salt=1)
        per_rank = _tokens_per_rank(g, (lo, hi), num_ranks)
        label = "synthetic-shifted" if shift_at is not None and step >= shift_at else "synthetic"
        return Batch(sample_topk(pis[step], per_rank * num_ranks, top_k, g), [per_rank] * num_ranks, label)

    info = {
        "kind": "synthetic",
        "experts": experts,
        "top_k": top_k,
        "layers": layers,
        "skew": skew,
        "drift": drift,
        "shift_at": shift_at,
        "tokens_per_batch": [lo, hi],
        "seed": seed,
    }
    calib = pis[0] * (hi * 1.0)

    def at_size(per_rank: int) -> Trace:
        return synthetic_trace(steps=steps, tokens=(per_rank * num_ranks, per_rank * num_ranks), num_ranks=num_ranks,
                               experts=experts, top_k=top_k, layers=layers, skew=skew, drift=drift, shift_at=shift_at,
                               seed=seed)

    return Trace(experts, top_k, layers, steps, make, calibration=calib, phases=phases, info=info, regenerate=at_size)

