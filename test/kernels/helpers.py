"""Random placements and routed batches for the kernel tests (small shapes: the interpreter is slow)."""

from __future__ import annotations

import random

import torch

from sglang_moe_lb import Placement, make_layer_path


def kernel_path(pl: Placement, mode, **kw):
    """The kernels' layer path, built as the plugin builds every layer path: the core's one
    factory with ``impl=seam.KernelLayerPath``."""
    from moe_lb_kernels.seam import KernelLayerPath

    return make_layer_path(pl, mode, impl=KernelLayerPath, **kw)


def random_placement(rng: random.Random, max_ranks: int = 5, max_spr: int = 4, min_ranks: int = 1) -> Placement:
    """Every expert has a copy; extra copies drawn at random (often several of one hot expert)."""
    R = rng.randint(min_ranks, max_ranks)
    S = rng.randint(1, max_spr)
    P = R * S
    E = rng.randint(max(1, P // 3), P)
    hot = rng.randrange(E)
    extra = [hot if rng.random() < 0.4 else rng.randrange(E) for _ in range(P - E)]
    ids = list(range(E)) + extra
    rng.shuffle(ids)
    return Placement(torch.tensor(ids), R, E)


def random_ids(rng: random.Random, T: int, K: int, E: int, kind: str | None = None) -> torch.Tensor:
    """Logical top-k ids ``[T, K]`` (distinct per row when E >= K), with padding (-1) rows and entries."""
    kind = kind or rng.choice(["uniform", "skewed", "hot", "padded"])
    w = torch.ones(E, dtype=torch.float64)
    if kind == "skewed":
        w = torch.tensor([rng.random() ** 4 + 1e-3 for _ in range(E)], dtype=torch.float64)
    elif kind == "hot":
        w = torch.full((E,), 1e-3, dtype=torch.float64)
        w[rng.randrange(E)] = 1.0
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    if T == 0:
        return torch.zeros(0, K, dtype=torch.long)
    if E >= K:
        ids = torch.multinomial(w.expand(T, E), K, replacement=False, generator=g)
    else:
        ids = torch.multinomial(w.expand(T, E), K, replacement=True, generator=g)
    if kind == "padded" or rng.random() < 0.3:
        ids[torch.rand(T, generator=g) < 0.2] = -1  # whole padding rows
        ids[torch.rand(T, K, generator=g) < 0.05] = -1  # stray padding entries
    return ids


def upstream_phys(pl: Placement, ids: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Physical ids as some upstream mapping would give: a random copy of each logical id."""
    p2l = pl.phy2log[0].tolist()
    copies: dict[int, list[int]] = {}
    for s, e in enumerate(p2l):
        copies.setdefault(e, []).append(s)
    out = ids.clone()
    flat = out.view(-1)
    for i, e in enumerate(ids.view(-1).tolist()):
        if e >= 0:
            flat[i] = rng.choice(copies[e])
    return out


def kernel_modes() -> list:
    """Every mode the kernels run (``BalanceMode``, gate off): per-batch LPLB with the token
    objective, with or without Waterfill, and Waterfill alone: 10. Written out from the mode
    vocabulary, not from ``seam.supports``, so a test of ``supports`` means something."""
    from sglang_moe_lb.mode import every_mode

    return [m for m in every_mode(gates=(False,)) if (m.per_batch and m.objective == "tokens") or m.lplb == "off"]


def random_placement_like(rng: random.Random, pl: Placement, fits=None, tries: int = 50) -> Placement:
    """Another placement with the same ranks, slots and experts (a rebalance), accepted by ``fits``."""
    E, P = pl.num_logical, pl.num_physical
    for _ in range(tries):
        ids = list(range(E)) + [rng.randrange(E) for _ in range(P - E)]
        rng.shuffle(ids)
        new = Placement(torch.tensor(ids), pl.num_ranks, E)
        if not torch.equal(new.phy2log, pl.phy2log) and (fits is None or fits(new)):
            return new
    raise AssertionError("no fitting placement found")


def batch(rng: random.Random, mode, pl: Placement, ranks: int, K: int, sizes=(0, 3, 17)) -> tuple[list, list]:
    """One batch per source rank: (logical ids ``[T_d, K]``, SGLang-like phys ids or None)."""
    ids = [random_ids(rng, rng.choice(sizes), K, pl.num_logical) for _ in range(ranks)]
    phys = [upstream_phys(pl, x, rng) if mode.lplb == "off" else None for x in ids]
    return ids, phys
