"""Read SGLang expert-distribution recorder dumps into a ``Trace`` (the *read* stage for dumps).

Formats (``--expert-distribution-recorder-mode`` and ``/dump_expert_distribution_record``):

* ``stat``: one ``.pt`` holding ``{"rank", "logical_count": int[steps, layers, experts],
  "average_utilization_rate_over_window"}`` (all-reduced over ranks, so global counts).
* ``per_pass``: one ``.pt`` per rank, ``{"records": [...], "last_physical_to_logical_map":
  [layers, physical]}``; each record has ``forward_pass_id``, ``rank`` and
  ``global_physical_count [layers, physical]``.
* ``per_token``: like per_pass, and each record also carries ``topk_ids_of_layer
  [layers, tokens, 8]`` (physical ids, ``-1`` = unused).

Every problem is one ``TraceFormatError`` line naming the file. Inputs are never merged
silently: the same file twice, two files of one rank, a forward pass recorded twice in one
file, files of different kinds or maps, and a ``--top-k`` narrower than a per_token dump's
rows are all rejected.

Counts are summed exactly (``exact_sum``: int64 halves, so no sum wraps): a sum that int64
cannot hold, or a step whose tokens would not fit the memory limit of one batch
(``setup.check_batch_memory``'s), is an error naming the file, step and layer, raised before
any batch is built, never a wrapped count or a step dropped as empty.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .sampling import MAX_BATCH_BYTES, draw_bytes, tokens_from_counts
from .sources import Batch, Trace, TraceFormatError, step_generator

__all__ = ["load_recorder", "expand_paths", "read_dump", "exact_sum", "INT64_MAX"]

DEFAULT_TOP_K = 8  # counts-only dumps: the top-k of the model when --top-k is not given
INT64_MAX = 2**63 - 1
_LOW = 0xFFFFFFFF


def _join(hi: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of high and low 32-bit halves -> (int64 total, fits): total = hi * 2^32 + lo exactly
    where ``fits`` (it is <= 2^63 - 1), 0 elsewhere."""
    hi = hi + (lo >> 32)
    fits = hi < 2**31
    return torch.where(fits, (hi << 32) | (lo & _LOW), torch.zeros_like(lo)), fits


def exact_sum(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact sum of non-negative int64 ``x`` over ``dim`` (fewer than 2^31 terms): (total, fits),
    both shaped like ``x.sum(dim)``; ``total`` is 0 where the sum exceeds 2^63 - 1 (``fits`` False)."""
    return _join((x >> 32).sum(dim), (x & _LOW).sum(dim))


@dataclass
class Dump:
    path: Path
    kind: str
    obj: dict


@dataclass
class RankDump:
    """One per-rank file of a per_pass/per_token dump, checked."""

    path: Path
    rank: int
    p2l: torch.Tensor  # [L, P]
    records: list


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files and directories (their ``.pt`` files, sorted) -> files; the same file twice is an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix == ".pt" and q.is_file())
            if not found:
                raise TraceFormatError(f"{p}: directory contains no .pt recorder dumps")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise TraceFormatError(f"{p}: no such file or directory")
    seen: dict[Path, Path] = {}
    for f in out:
        real = f.resolve()
        if real in seen:
            raise TraceFormatError(f"{f}: given twice (also as {seen[real]}); give each dump file once")
        seen[real] = f
    if not out:
        raise TraceFormatError("no recorder dump given")
    return out


def _load(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        msg = str(err).splitlines()[0] if str(err) else ""
        raise TraceFormatError(f"{path}: not a readable torch .pt file ({type(err).__name__}: {msg})") from None
    if not isinstance(obj, dict):
        raise TraceFormatError(f"{path}: expected a dict (an SGLang recorder dump), got {type(obj).__name__}")
    return obj


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


def read_dump(path: Path) -> Dump:
    obj = _load(path)
    return Dump(path, _kind(path, obj), obj)


def _int_tensor(path: Path, key: str, value, dims: int | tuple[int, ...], what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TraceFormatError(f"{path}: '{key}' must be a tensor {what}, got {type(value).__name__}")
    dims = (dims,) if isinstance(dims, int) else dims
    if value.dim() not in dims:
        raise TraceFormatError(f"{path}: '{key}' must be {what}, got shape {list(value.shape)}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TraceFormatError(f"{path}: '{key}' must hold integers, got {value.dtype}")
    return value.to(torch.long)


def _single_kind(dumps: list[Dump]) -> str:
    kinds = {d.kind for d in dumps}
    if len(kinds) > 1:
        first = {k: next(d.path for d in dumps if d.kind == k) for k in sorted(kinds)}
        raise TraceFormatError(
            f"mixed dump kinds {sorted(kinds)} ({', '.join(f'{k}: {p}' for k, p in first.items())}); give one kind"
        )
    return kinds.pop()


# ---------------------------------------------------------------------------------------------
# stat
# ---------------------------------------------------------------------------------------------
def _nonempty(counts: torch.Tensor, where: list[str], drop_empty: bool) -> tuple[torch.Tensor, list[str]]:
    """Steps with any routed entry (counts are >= 0, so no sum is needed: none can wrap)."""
    if not drop_empty:
        return counts, where
    keep = (counts > 0).flatten(1).any(1)
    return counts[keep], [w for w, k in zip(where, keep.tolist()) if k]


def _stat_counts(dumps: list[Dump], drop_empty: bool) -> tuple[torch.Tensor, list[str]]:
    """``logical_count`` of every stat file, concatenated in order: ``[steps, L, E]`` long, and
    where each step came from (``"FILE: step I"``)."""
    parts, shape0, where = [], None, []
    for d in dumps:
        lc = _int_tensor(d.path, "logical_count", d.obj["logical_count"], (2, 3), "int [steps, layers, experts]")
        lc = lc[None] if lc.dim() == 2 else lc
        if bool((lc < 0).any()):
            raise TraceFormatError(f"{d.path}: 'logical_count' has negative entries")
        if shape0 is not None and tuple(lc.shape[1:]) != shape0[1]:
            raise TraceFormatError(
                f"{d.path}: 'logical_count' is [layers, experts] = {list(lc.shape[1:])}, {shape0[0]} has {list(shape0[1])}"
            )
        shape0 = shape0 or (d.path, tuple(lc.shape[1:]))
        parts.append(lc)
        where += [f"{d.path}: step {i}" for i in range(lc.shape[0])]
    counts, where = _nonempty(torch.cat(parts), where, drop_empty)
    if counts.shape[0] == 0:
        raise TraceFormatError(f"{dumps[0].path}: 'logical_count' has no step with any routed token")
    return counts, where


def _layer_totals(counts: torch.Tensor, where: list[str]) -> torch.Tensor:
    """Routed entries per (step, layer) ``[steps, L]``, exact; raises ``TraceFormatError`` naming
    the step and layer whose sum int64 cannot hold."""
    total, fits = exact_sum(counts, -1)
    if not bool(fits.all()):
        s, layer = (int(i) for i in (~fits).nonzero()[0])
        raise TraceFormatError(f"{where[s]}, layer {layer}: the routed entries sum to more than 2**63 - 1 "
                               "(int64); not a recorder count")
    return total


def _step_tokens(counts: torch.Tensor, where: list[str], top_k: int) -> torch.Tensor:
    """Tokens of each step made from counts ``[steps, L, E]`` (``tokens_from_counts``'s ``T``):
    ``[steps]`` long. Raises ``TraceFormatError`` naming the step and layer where the entries'
    sum exceeds int64, or where the batch would not fit ``MAX_BATCH_BYTES``."""
    total = _layer_totals(counts, where)
    per_layer = torch.maximum(-(-total // top_k), counts.amax(-1))  # [steps, L]
    tokens = per_layer.amax(-1)
    L = counts.shape[1]
    too_big = (tokens > MAX_BATCH_BYTES // draw_bytes(L, 1, top_k)).nonzero().flatten()
    if too_big.numel():
        s = int(too_big[0])
        layer, T = int(per_layer[s].argmax()), int(tokens[s])
        raise TraceFormatError(
            f"{where[s]}, layer {layer}: {T} tokens ({int(total[s, layer])} routed entries, largest count "
            f"{int(counts[s, layer].max())}) need ~{draw_bytes(L, T, top_k) / 2**30:.3g} GiB to replay as one batch "
            f"(limit {MAX_BATCH_BYTES / 2**30:.0f} GiB)"
        )
    return tokens


def _counts_trace(counts: torch.Tensor, where: list[str], top_k: int, seed: int, info: dict,
                  placement: torch.Tensor | None) -> Trace:
    """Steps of synthetic tokens with exactly the recorded counts ``[steps, L, E]`` (checked:
    ``_step_tokens``)."""
    S, L, E = counts.shape
    _step_tokens(counts, where, top_k)

    def make(step: int) -> Batch:
        return Batch(tokens_from_counts(counts[step], top_k, step_generator(seed, step, salt=2)), None, "recorded")

    info = dict(info, tokens="synthetic tokens with the recorded per-expert counts (no token ids in this dump)")
    return Trace(E, top_k, L, S, make, recorded_placement=placement, phases=[(0, "recorded")], info=info,
                 step_counts=counts)


def _counts_top_k(path: Path, counts: torch.Tensor, where: list[str], top_k: int | None) -> tuple[int, list[str]]:
    """A counts-only dump knows no top-k: (the one to use, notes). Rejects a ``--top-k`` above
    the dump's experts, and notes a doubtful one."""
    E = counts.shape[-1]
    if top_k is not None and top_k > E:
        raise TraceFormatError(f"{path}: --top-k {top_k} is more than the dump's {E} experts")
    notes = []
    if top_k is None:
        top_k = min(DEFAULT_TOP_K, E)
        notes.append(f"{path}: a counts-only dump records no top-k; assuming {top_k} (set --top-k)")
    uneven = int((_layer_totals(counts, where) % top_k != 0).sum())
    if uneven:
        notes.append(
            f"{path}: {uneven} of {counts.shape[0] * counts.shape[1]} (step, layer) counts are not a multiple of "
            f"--top-k {top_k}: their tokens are filled up with fewer experts (check --top-k)"
        )
    return top_k, notes


# ---------------------------------------------------------------------------------------------
# per_pass / per_token: one file per rank
# ---------------------------------------------------------------------------------------------
def _rank_dump(d: Dump, index: int) -> RankDump:
    p2l = _int_tensor(d.path, "last_physical_to_logical_map", d.obj["last_physical_to_logical_map"], 2,
                      "int [layers, physical]")
    if bool((p2l < 0).any()):
        raise TraceFormatError(f"{d.path}: 'last_physical_to_logical_map' has negative entries")
    need = ["forward_pass_id", "topk_ids_of_layer" if d.kind == "per_token" else "global_physical_count"]
    seen: set[int] = set()
    for i, r in enumerate(d.obj["records"]):
        if not isinstance(r, dict):
            raise TraceFormatError(f"{d.path}: records[{i}] must be a dict, got {type(r).__name__}")
        for key in need:
            if key not in r:
                raise TraceFormatError(f"{d.path}: records[{i}] is missing key '{key}' ({d.kind} dump)")
        pid = r["forward_pass_id"]
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TraceFormatError(f"{d.path}: records[{i}].forward_pass_id must be an int, got {pid!r}")
        if pid in seen:
            raise TraceFormatError(f"{d.path}: forward pass {pid} is recorded twice; give a dump with one record per pass")
        seen.add(pid)
    recs = d.obj["records"]
    rank = recs[0].get("rank", index) if recs else index
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise TraceFormatError(f"{d.path}: records[0].rank must be a non-negative int, got {rank!r}")
    if any(r.get("rank", rank) != rank for r in recs):
        raise TraceFormatError(f"{d.path}: records of more than one rank in one file")
    return RankDump(d.path, rank, p2l, recs)


def _check_rank_files(rds: list[RankDump]) -> torch.Tensor:
    """One map, one file per rank; returns the map ``[L, P]``."""
    first = rds[0]
    by_rank: dict[int, Path] = {}
    for rd in rds:
        if rd.rank in by_rank:
            raise TraceFormatError(f"{rd.path}: rank {rd.rank} again (also {by_rank[rd.rank]}); give one file per rank")
        by_rank[rd.rank] = rd.path
        if tuple(rd.p2l.shape) != tuple(first.p2l.shape) or not torch.equal(rd.p2l, first.p2l):
            raise TraceFormatError(
                f"{rd.path}: 'last_physical_to_logical_map' differs from {first.path}'s; give the files of one dump"
            )
    if not any(rd.records for rd in rds):
        raise TraceFormatError(f"{first.path}: 'records' is empty")
    return first.p2l


def _per_pass_counts(rds: list[RankDump], p2l: torch.Tensor, drop_empty: bool) -> tuple[torch.Tensor, list[str]]:
    """Logical counts per forward pass ``[passes, L, E]``: every rank's physical counts summed
    over ranks and copies, exactly (int64 halves), and where each step came from."""
    L, P = p2l.shape
    E = int(p2l.max()) + 1
    pass_ids = sorted({int(r["forward_pass_id"]) for rd in rds for r in rd.records})
    index = {p: i for i, p in enumerate(pass_ids)}
    hi = torch.zeros(len(pass_ids), L, E, dtype=torch.long)
    lo = torch.zeros(len(pass_ids), L, E, dtype=torch.long)
    for rd in rds:
        for i, r in enumerate(rd.records):
            g = _int_tensor(rd.path, f"records[{i}].global_physical_count", r["global_physical_count"], 2,
                            "int [layers, physical]")
            if tuple(g.shape) != (L, P):
                raise TraceFormatError(
                    f"{rd.path}: records[{i}].global_physical_count has shape {list(g.shape)}, expected {[L, P]}"
                )
            if bool((g < 0).any()):
                raise TraceFormatError(f"{rd.path}: records[{i}].global_physical_count has negative entries")
            i_pass = index[int(r["forward_pass_id"])]
            hi[i_pass].scatter_add_(1, p2l, g >> 32)
            lo[i_pass].scatter_add_(1, p2l, g & _LOW)
    counts, fits = _join(hi, lo)
    files = f"{rds[0].path}" + (f" (+{len(rds) - 1} rank files)" if len(rds) > 1 else "")
    where = [f"{files}: forward pass {p}" for p in pass_ids]
    if not bool(fits.all()):
        s, layer, e = (int(i) for i in (~fits).nonzero()[0])
        raise TraceFormatError(f"{where[s]}, layer {layer}: expert {e}'s count summed over ranks and copies is more "
                               "than 2**63 - 1 (int64); not a recorder count")
    counts, where = _nonempty(counts, where, drop_empty)
    if counts.shape[0] == 0:
        raise TraceFormatError(f"{rds[0].path}: no forward pass with any routed token")
    return counts, where


def _logical_tokens(rd: RankDump, p2l: torch.Tensor) -> dict[int, torch.Tensor]:
    """This rank's tokens per forward pass: ``{pass: [L, T, 8] logical ids}`` (padded rows dropped)."""
    L, P = p2l.shape
    out = {}
    for i, r in enumerate(rd.records):
        ids = _int_tensor(rd.path, f"records[{i}].topk_ids_of_layer", r["topk_ids_of_layer"], 3, "int [layers, tokens, k]")
        if ids.shape[0] != L:
            raise TraceFormatError(f"{rd.path}: records[{i}].topk_ids_of_layer has {ids.shape[0]} layers, the map has {L}")
        if bool((ids >= P).any()) or bool((ids < -1).any()):
            raise TraceFormatError(f"{rd.path}: records[{i}].topk_ids_of_layer has ids outside [-1, {P})")
        logical = torch.where(ids >= 0, p2l.gather(1, ids.clamp(min=0).flatten(1)).reshape(ids.shape), -1)
        out[int(r["forward_pass_id"])] = logical[:, (logical >= 0).any(0).any(-1)]
    return out


def _row_width(tokens: dict[int, torch.Tensor]) -> int:
    return max((int((t >= 0).sum(-1).max()) for t in tokens.values() if t.numel()), default=0)


def _per_token_trace(rds: list[RankDump], p2l: torch.Tensor, num_ranks: int, top_k: int | None,
                     drop_empty: bool, info: dict) -> Trace:
    L, _ = p2l.shape
    E = int(p2l.max()) + 1
    rds = sorted(rds, key=lambda rd: rd.rank)
    tokens = [_logical_tokens(rd, p2l) for rd in rds]
    widths = [_row_width(t) for t in tokens]
    width = max(widths)
    if width < 1:
        raise TraceFormatError(f"{rds[0].path}: per_token records hold no routed token")
    if top_k is not None and top_k < width:
        widest = rds[widths.index(width)].path
        raise TraceFormatError(
            f"{widest}: rows route up to {width} experts per token; --top-k {top_k} would drop routed experts "
            f"(omit --top-k for per_token dumps, or give at least {width})"
        )
    k = top_k or width
    pass_ids = sorted({p for t in tokens for p in t})
    steps = []
    for pid in pass_ids:
        chunks = [t.get(pid, torch.empty(L, 0, k, dtype=torch.long)) for t in tokens]
        chunks = [torch.nn.functional.pad(c[..., :k], (0, k - min(k, c.shape[-1])), value=-1) for c in chunks]
        sizes = [c.shape[1] for c in chunks]
        if drop_empty and sum(sizes) == 0:
            continue
        steps.append((torch.cat(chunks, 1), sizes))
    if not steps:
        raise TraceFormatError(f"{rds[0].path}: no forward pass with any routed token")
    keep_ranks = len(rds) == num_ranks
    info.update(
        source_ranks=len(rds),
        source_split="recorded" if keep_ranks else f"re-split evenly over {num_ranks} ranks (dump has {len(rds)} ranks)",
    )

    def make(step: int) -> Batch:
        ids, sizes = steps[step]
        return Batch(ids, sizes if keep_ranks else None, "recorded")

    return Trace(E, k, L, len(steps), make, recorded_placement=p2l, phases=[(0, "recorded")], info=info)


# ---------------------------------------------------------------------------------------------
# Entry
# ---------------------------------------------------------------------------------------------
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
        top_k: experts per token. Counts-only dumps need it (default: 8, or the experts if fewer,
            with a note); per_token dumps use their widest row and reject a narrower ``top_k``.
        seed: for the synthetic token layout of counts-only dumps.
        drop_empty: skip steps without any routed token (an unfilled circular buffer).
    Raises:
        TraceFormatError: one line naming the file and the problem.
    """
    dumps = [read_dump(f) for f in expand_paths(paths)]
    kind = _single_kind(dumps)
    info = {"kind": kind, "files": [str(d.path) for d in dumps]}
    if kind == "stat":
        counts, where = _stat_counts(dumps, drop_empty)
        k, info["notes"] = _counts_top_k(dumps[0].path, counts, where, top_k)
        return _counts_trace(counts, where, k, seed, info, None)
    rds = [_rank_dump(d, i) for i, d in enumerate(dumps)]
    p2l = _check_rank_files(rds)
    info.update(num_physical=p2l.shape[1], note="physical ids converted to logical ids with last_physical_to_logical_map")
    if kind == "per_pass":
        counts, where = _per_pass_counts(rds, p2l, drop_empty)
        k, info["notes"] = _counts_top_k(rds[0].path, counts, where, top_k)
        return _counts_trace(counts, where, k, seed, info, p2l)
    return _per_token_trace(rds, p2l, num_ranks, top_k, drop_empty, info)
