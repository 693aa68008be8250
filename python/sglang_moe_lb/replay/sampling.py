"""Token-level top-k ids from expert popularities or from exact per-expert counts.

Two generators, both seeded through a ``torch.Generator`` and both giving every token
*distinct* experts:

* ``sample_topk``: each token independently gets ``k`` distinct experts such that expert
  ``e`` is among them with probability exactly ``pi[e]`` (``sum(pi) == k``, ``pi <= 1``).
  Method: systematic sampling with unequal probabilities (Madow, 1949) over a fresh random
  expert order per token. Lay the experts out in that order on a line, expert ``e`` taking a
  segment of length ``pi[e]`` (total length ``k``); draw ``u ~ U[0, 1)`` and take the experts
  whose segments contain one of the points ``u, u + 1, ..., u + k - 1``. Segments are at
  most 1 long, so no expert is hit twice, and exactly ``k`` are hit.
* ``tokens_from_counts``: tokens whose per-expert counts equal given counts *exactly*
  (used for recorder dumps that carry counts but no token ids). The expert list, in a random
  order of experts, is dealt column by column: with ``T`` tokens, entry ``j`` goes to token
  ``j mod T``. An expert's entries are consecutive, and no expert has more than ``T``, so no
  token gets an expert twice.
"""

from __future__ import annotations

import torch

__all__ = ["inclusion_probabilities", "sample_topk", "tokens_from_counts", "draw_bytes", "MAX_BATCH_BYTES"]

MAX_BATCH_BYTES = 6 << 30  # memory to draw one batch (checked before drawing: setup.check_batch_memory)


def draw_bytes(layers: int, tokens: int, width: int) -> int:
    """Peak bytes to draw one batch: ~6 float64/int64 ``[layers, tokens, width]`` tensors
    (``sample_topk``: width = experts; ``tokens_from_counts``: width = k, with the ids and
    their copies downstream). Python ints: exact at any size."""
    return int(layers) * int(tokens) * int(width) * 8 * 6


def inclusion_probabilities(weights: torch.Tensor, k: int) -> torch.Tensor:
    """Scale non-negative popularity weights ``[..., E]`` to inclusion probabilities.

    Returns float64 ``pi`` with ``sum(pi) == k`` and ``0 <= pi <= 1`` per row: ``pi`` is
    proportional to the weights, except that experts which would exceed 1 are capped at 1
    and the rest rescaled (repeatedly, until none exceeds 1).
    """
    w = weights.to(torch.float64).clamp(min=0.0)
    E = w.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"top-k must be in [1, {E}] for {E} experts, got {k}")
    if bool((w.sum(-1) <= 0).any()):
        raise ValueError("every layer needs a positive total popularity")
    # Experts with zero weight can still be needed to reach k distinct ones: give them a tiny floor.
    w = w / w.amax(-1, keepdim=True)
    w = torch.where(w > 1e-12, w, 1e-12)
    capped = torch.zeros_like(w, dtype=torch.bool)
    for _ in range(E):
        free = torch.where(capped, 0.0, w)
        room = k - capped.sum(-1, keepdim=True).to(torch.float64)
        pi = torch.where(capped, 1.0, free * room / free.sum(-1, keepdim=True))
        over = (pi > 1.0) & ~capped
        if not bool(over.any()):
            return pi
        capped |= over
    return pi


def sample_topk(pi: torch.Tensor, num_tokens: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Distinct top-k expert ids per token with exact inclusion probabilities ``pi``.

    Args:
        pi: ``[L, E]`` float64 inclusion probabilities (``inclusion_probabilities``).
        num_tokens: tokens ``T``.
        k: experts per token.
        generator: seeded CPU generator.
    Returns:
        ``[L, T, k]`` long expert ids (layers are sampled independently).
    """
    L, E = pi.shape
    order = torch.argsort(torch.rand(L, num_tokens, E, generator=generator, dtype=torch.float64), dim=-1)
    seg = pi[:, None, :].expand(L, num_tokens, E).gather(-1, order)
    cum = torch.cumsum(seg, -1)
    cum[..., -1] = float(k)  # remove float drift so that exactly k points fall on the line
    u = torch.rand(L, num_tokens, 1, generator=generator, dtype=torch.float64)
    hits = torch.floor(cum - u) - torch.floor(torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], -1) - u)
    picked = hits > 0
    ids = order[picked].reshape(L, num_tokens, k)
    return ids


def tokens_from_counts(counts: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Token top-k ids whose per-expert counts equal ``counts`` exactly.

    Args:
        counts: ``[L, E]`` non-negative integer routed-entry counts per layer.
        k: slots per token.
        generator: seeded CPU generator (expert order and token shuffle).
    Returns:
        ``[L, T, k]`` long, ``-1`` where a token has fewer than k routed experts. ``T`` is the
        smallest token count that fits every layer: ``max(ceil(sum / k), max count)``.
    """
    c = counts.to(torch.long)
    L, E = c.shape
    if bool((c < 0).any()):
        raise ValueError("counts must be non-negative")
    T = int(max(int((-(-c.sum(-1) // k)).max()), int(c.max()) if c.numel() else 0))
    out = torch.full((L, T, k), -1, dtype=torch.long)
    if T == 0:
        return out
    for layer in range(L):
        order = torch.randperm(E, generator=generator)
        entries = torch.repeat_interleave(order, c[layer, order])
        flat = torch.full((T * k,), -1, dtype=torch.long)
        flat[: entries.numel()] = entries
        # Entry j -> token j % T, slot j // T: an expert's consecutive run never wraps onto a token twice.
        out[layer] = flat.reshape(k, T).t()
        out[layer] = out[layer][torch.randperm(T, generator=generator)]
    return out
