"""Where replayed traffic comes from: SGLang recorder dumps, the bundled OLMoE data, or a generator.

Every source yields a ``Trace``: a fixed number of steps (forward passes), each a ``Batch`` of
logical top-k ids ``[layers, tokens, k]`` whose tokens are grouped by source rank (DP-attention
rank). Batches are built on demand and are reproducible: ``trace.batch(t)`` always returns the
same tensor for the same arguments.

Recorder dumps (``--expert-distribution-recorder-mode`` and ``/dump_expert_distribution_record``):

* ``stat``: one ``.pt`` holding ``{"rank", "logical_count": int[steps, layers, experts],
  "average_utilization_rate_over_window"}`` (all-reduced over ranks, so global counts).
* ``per_pass``: one ``.pt`` per rank, ``{"records": [...], "last_physical_to_logical_map":
  [layers, physical]}``; each record has ``forward_pass_id``, ``rank`` and
  ``global_physical_count [layers, physical]``.
* ``per_token``: like per_pass, and each record also carries ``topk_ids_of_layer
  [layers, tokens, 8]`` (physical ids, ``-1`` = unused).

Counts-only dumps (stat, per_pass) carry no token ids, so their batches are made of synthetic
tokens with exactly the recorded per-expert counts (``tokens_from_counts``) split evenly over
the source ranks. Only per_token dumps give real tokens, real co-occurrence and the real
source rank of every token, which conservative Waterfill and static dispatch depend on.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import torch

from .sampling import inclusion_probabilities, sample_topk, tokens_from_counts

__all__ = [
    "Batch",
    "Trace",
    "TraceFormatError",
    "bundled_trace",
    "synthetic_trace",
    "load_recorder",
    "load_bundled_data",
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
        info: JSON-able description (kind, files, knobs, provenance).
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

    def batch(self, step: int) -> Batch:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} out of range for a trace of {self.num_steps} steps")
        return self.make_batch(step)


def _step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
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
        gen = _step_generator(seed, step)
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
    return Trace(E, k, L, steps, make, calibration=counts[calibration], phases=phases, info=info)


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
    if skew < 0 or drift < 0:
        raise ValueError(f"skew and drift must be >= 0, got skew={skew}, drift={drift}")
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
        g = _step_generator(seed, step, salt=1)
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
    return Trace(experts, top_k, layers, steps, make, calibration=calib, phases=phases, info=info)


# -------------------------------------------------------------------------------------------
# SGLang recorder dumps
# -------------------------------------------------------------------------------------------
def _expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix == ".pt")
            if not found:
                raise TraceFormatError(f"{p}: directory contains no .pt recorder dumps")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise TraceFormatError(f"{p}: no such file or directory")
    return out


def _load(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise TraceFormatError(f"{path}: not a readable torch .pt file ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise TraceFormatError(f"{path}: expected a dict (an SGLang recorder dump), got {type(obj).__name__}")
    return obj


def _int_tensor(path: Path, key: str, value, dims: int | tuple[int, ...], what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TraceFormatError(f"{path}: '{key}' must be a tensor {what}, got {type(value).__name__}")
    dims = (dims,) if isinstance(dims, int) else dims
    if value.dim() not in dims:
        raise TraceFormatError(f"{path}: '{key}' must be {what}, got shape {list(value.shape)}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TraceFormatError(f"{path}: '{key}' must hold integers, got {value.dtype}")
    return value.to(torch.long)


def _kind(path: Path, obj: dict) -> str:
    if "logical_count" in obj:
        return "stat"
    if "records" in obj:
        if "last_physical_to_logical_map" not in obj:
            raise TraceFormatError(f"{path}: per-pass/per-token dump is missing key 'last_physical_to_logical_map'")
        recs = obj["records"]
        if not isinstance(recs, list):
            raise TraceFormatError(f"{path}: 'records' must be a list, got {type(recs).__name__}")
        if recs and isinstance(recs[0], dict) and "topk_ids_of_layer" in recs[0]:
            return "per_token"
        return "per_pass"
    raise TraceFormatError(
        f"{path}: not an SGLang expert-distribution dump: missing key 'logical_count' (stat mode) "
        f"or 'records' (per_pass/per_token mode); found keys {sorted(map(str, obj))}"
    )


def _counts_trace(
    counts: torch.Tensor, top_k: int, num_ranks: int, seed: int, info: dict, placement: torch.Tensor | None
) -> Trace:
    """Steps of synthetic tokens with exactly the recorded counts ``[steps, L, E]``."""
    S, L, E = counts.shape

    def make(step: int) -> Batch:
        return Batch(tokens_from_counts(counts[step], top_k, _step_generator(seed, step, salt=2)), None, "recorded")

    info = dict(info, tokens="synthetic tokens with the recorded per-expert counts (no token ids in this dump)")
    return Trace(E, top_k, L, S, make, recorded_placement=placement, phases=[(0, "recorded")], info=info)


def load_recorder(
    paths: Sequence[str | os.PathLike],
    *,
    num_ranks: int,
    top_k: int | None = None,
    seed: int = 0,
    drop_empty: bool = True,
) -> Trace:
    """Read SGLang expert-distribution recorder dumps (stat, per_pass or per_token).

    Args:
        paths: ``.pt`` files or directories of them. One stat file, several stat files
            (concatenated in order), or the per-rank files of one per_pass/per_token dump.
        num_ranks: simulated EP size; per_token dumps keep their source ranks when they have
            exactly this many, otherwise their tokens are re-split evenly.
        top_k: experts per token. Needed for counts-only dumps (default 8); per_token dumps
            infer it from the widest row.
        seed: for the synthetic token layout of counts-only dumps.
        drop_empty: skip steps without any routed token (an unfilled circular buffer).
    Raises:
        TraceFormatError: naming the file and the missing key or bad shape.
    """
    files = _expand_paths(paths)
    if not files:
        raise TraceFormatError("no recorder dump given")
    objs = [(f, _load(f)) for f in files]
    kinds = {_kind(f, o) for f, o in objs}
    if len(kinds) > 1:
        raise TraceFormatError(f"mixed dump kinds {sorted(kinds)} in {[str(f) for f in files]}; give one kind")
    kind = kinds.pop()
    info = {"kind": kind, "files": [str(f) for f in files]}
    if kind == "stat":
        parts = []
        for f, o in objs:
            lc = _int_tensor(f, "logical_count", o["logical_count"], (2, 3), "int [steps, layers, experts]")
            parts.append(lc[None] if lc.dim() == 2 else lc)
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise TraceFormatError(f"stat dumps disagree on [layers, experts]: {sorted(shapes)}")
        counts = torch.cat(parts)
        if bool((counts < 0).any()):
            raise TraceFormatError(f"{files[0]}: 'logical_count' has negative entries")
        if drop_empty:
            counts = counts[counts.flatten(1).sum(1) > 0]
        if counts.shape[0] == 0:
            raise TraceFormatError(f"{files[0]}: 'logical_count' has no step with any routed token")
        return _counts_trace(counts, top_k or 8, num_ranks, seed, info, None)

    # per_pass / per_token: one file per rank.
    maps, per_rank = [], []
    for f, o in objs:
        p2l = _int_tensor(f, "last_physical_to_logical_map", o["last_physical_to_logical_map"], 2, "int [layers, physical]")
        maps.append(p2l)
        recs = o["records"]
        for i, r in enumerate(recs):
            if not isinstance(r, dict):
                raise TraceFormatError(f"{f}: records[{i}] must be a dict, got {type(r).__name__}")
            need = ["forward_pass_id", "topk_ids_of_layer" if kind == "per_token" else "global_physical_count"]
            for key in need:
                if key not in r:
                    raise TraceFormatError(f"{f}: records[{i}] is missing key '{key}' ({kind} dump)")
        per_rank.append((f, recs, p2l))
    if len({tuple(m.shape) for m in maps}) > 1 or any(not torch.equal(maps[0], m) for m in maps):
        raise TraceFormatError("per-rank dumps disagree on 'last_physical_to_logical_map'; give files of one dump")
    p2l = maps[0]
    L, P = p2l.shape
    E = int(p2l.max()) + 1
    if bool((p2l < 0).any()):
        raise TraceFormatError(f"{files[0]}: 'last_physical_to_logical_map' has negative entries")
    info.update(num_physical=P, note="physical ids converted to logical ids with last_physical_to_logical_map")
    pass_ids = sorted({int(r["forward_pass_id"]) for _, recs, _ in per_rank for r in recs})
    if not pass_ids:
        raise TraceFormatError(f"{files[0]}: 'records' is empty")

    if kind == "per_pass":
        counts = torch.zeros(len(pass_ids), L, E, dtype=torch.long)
        index = {p: i for i, p in enumerate(pass_ids)}
        for f, recs, _ in per_rank:
            for i, r in enumerate(recs):
                g = _int_tensor(f, f"records[{i}].global_physical_count", r["global_physical_count"], 2, "int [layers, physical]")
                if tuple(g.shape) != (L, P):
                    raise TraceFormatError(
                        f"{f}: records[{i}].global_physical_count has shape {list(g.shape)}, expected {[L, P]}"
                    )
                counts[index[int(r["forward_pass_id"])]].scatter_add_(1, p2l, g)
        keep = counts.flatten(1).sum(1) > 0 if drop_empty else torch.ones(len(pass_ids), dtype=torch.bool)
        if not bool(keep.any()):
            raise TraceFormatError(f"{files[0]}: no forward pass with any routed token")
        return _counts_trace(counts[keep], top_k or 8, num_ranks, seed, info, p2l)

    # per_token: real tokens.
    ranks = []
    by_rank: list[dict[int, torch.Tensor]] = []
    width = 0
    for j, (f, recs, _) in enumerate(per_rank):
        rank = int(recs[0].get("rank", j)) if recs else j
        ranks.append(rank)
        passes: dict[int, torch.Tensor] = {}
        for i, r in enumerate(recs):
            ids = _int_tensor(f, f"records[{i}].topk_ids_of_layer", r["topk_ids_of_layer"], 3, "int [layers, tokens, k]")
            if ids.shape[0] != L:
                raise TraceFormatError(
                    f"{f}: records[{i}].topk_ids_of_layer has {ids.shape[0]} layers, the map has {L}"
                )
            if bool((ids >= P).any()) or bool((ids < -1).any()):
                raise TraceFormatError(f"{f}: records[{i}].topk_ids_of_layer has ids outside [-1, {P})")
            logical = torch.where(ids >= 0, p2l.gather(1, ids.clamp(min=0).flatten(1)).reshape(ids.shape), -1)
            logical = logical[:, (logical >= 0).any(0).any(-1)]  # drop padded token rows
            width = max(width, int((logical >= 0).sum(-1).max()) if logical.numel() else 0)
            pid = int(r["forward_pass_id"])
            passes[pid] = torch.cat([passes[pid], logical], 1) if pid in passes else logical
        by_rank.append(passes)
    if len(set(ranks)) != len(ranks):
        raise TraceFormatError(f"per_token files carry duplicate ranks {ranks}; give one file per rank")
    k = top_k or width
    if k < 1:
        raise TraceFormatError(f"{files[0]}: per_token records hold no routed token")
    order = sorted(range(len(ranks)), key=lambda j: ranks[j])
    steps = []
    for pid in pass_ids:
        chunks = [by_rank[j].get(pid, torch.empty(L, 0, k, dtype=torch.long))[..., :k] for j in order]
        chunks = [torch.nn.functional.pad(c, (0, k - c.shape[-1]), value=-1) for c in chunks]
        sizes = [c.shape[1] for c in chunks]
        if drop_empty and sum(sizes) == 0:
            continue
        steps.append((torch.cat(chunks, 1), sizes))
    if not steps:
        raise TraceFormatError(f"{files[0]}: no forward pass with any routed token")
    keep_ranks = len(ranks) == num_ranks
    info.update(
        source_ranks=len(ranks),
        source_split="recorded" if keep_ranks else f"re-split evenly over {num_ranks} ranks "
        f"(dump has {len(ranks)} ranks)",
    )

    def make(step: int) -> Batch:
        ids, sizes = steps[step]
        return Batch(ids, sizes if keep_ranks else None, "recorded")

    return Trace(E, k, L, len(steps), make, recorded_placement=p2l, phases=[(0, "recorded")], info=info)
