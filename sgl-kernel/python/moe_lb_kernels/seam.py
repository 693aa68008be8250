"""The kernels' side of the per-layer hot-path contract: ``make_layer_path`` -> ``LayerPath``.

The plugin (``sglang_moe_lb.plugin.hot_path``) builds one layer path per MoE layer at start-up
(after model load, before CUDA-graph capture), updates it in place at every rebalance and
calls it per batch. A kernel path owns one preallocated ``LayerBalancer``: a call launches
kernels only (no host sync, no allocation, outputs are views of fixed buffers), so captured
graphs replay it, and placements and split tables are written into the same addresses.

Kernel sets: several may be installed; ``SGLANG_MOE_LB_KERNELS`` (env) picks one by version,
default ``DEFAULT_SET``, the set the last GPU run verified (``VERIFIED_VERSIONS``). A set is a
module with ``KERNELS_VERSION``, ``CUDA_GRAPH_SAFE``, ``make_layer_path(...)`` and (optional)
``supports(mode) -> (bool, reason)``; this module is the v1 set and the dispatcher. An unverified set
selected explicitly runs with a warning; one that is not installed fails with one clear error
when a path is built (``supports`` gives the same reason).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from types import ModuleType, SimpleNamespace

import torch

from sglang_moe_lb import BalanceMode, Placement
from sglang_moe_lb.chain import LayerDispatch
from sglang_moe_lb.cost import CostModel

from .balancer import COUNTERS, LayerBalancer, unsupported
from .reference import SCALE_BITS, V1_SPEC

__all__ = [
    "ENV",
    "DEFAULT_SET",
    "KERNEL_SETS",
    "VERIFIED_VERSIONS",
    "DERIVED_FROM",
    "KERNELS_VERSION",
    "CUDA_GRAPH_SAFE",
    "KernelSetError",
    "V1LayerPath",
    "supports",
    "make_layer_path",
    "kernel_set",
]

ENV = "SGLANG_MOE_LB_KERNELS"
DEFAULT_SET = "v1.1"
# version -> module implementing it (imported only when selected)
KERNEL_SETS: dict[str, str] = {"v1.1": __name__, "v2": "moe_lb_kernels.v2"}
# version -> the GPU run that verified it (compiles, bit-exact against the reference, graph replay)
VERIFIED_VERSIONS: dict[str, str] = {"v1": "H200 2026-11-27 docs/gpu/h200_results.md"}
# A set derived from a verified one by changes checked on the CPU only (docs/kernels.md lists
# them): the default until a GPU run verifies it or another set.
DERIVED_FROM: dict[str, str] = {
    "v1.1": "v1 + int32 global-sync rows, the certificate-key fix, device-side counters, table mode "
            "without polish (interpreter-exact and sm_90-compiled on the CPU; not yet run on a GPU)",
}


class KernelSetError(ValueError):
    """The selected kernel set is unknown or not installed."""


# ------------------------------------------------------------------------------------------------
# The v1 set
# ------------------------------------------------------------------------------------------------
def _v1_supports(mode: BalanceMode) -> tuple[bool, str]:
    why = unsupported(mode)
    return (why is None, why or "")


class V1LayerPath:
    """One MoE layer on one rank over the v1 kernels (the ``LayerPath`` contract).

    Built by ``make_layer_path``. ``__call__`` and ``stats`` launch kernels only; their
    outputs are views of buffers allocated here (phys ids in the dtype of ``topk_ids``:
    one buffer per dtype, made by the first call that uses it, i.e. at warm-up).
    """

    version = "v1.1"

    def __init__(self, pl: Placement, mode: BalanceMode, *, max_tokens: int, topk: int, source_rank: int,
                 device, split_table: torch.Tensor | None = None):
        self.mode = mode
        self.max_tokens, self.topk, self.source_rank = max_tokens, topk, source_rank
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # tensors report cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        P, E = pl.num_physical, pl.num_logical
        # Capacities for later placements of the same shape: every replicated expert of any
        # placement with P slots fits (at most min(E, P - E) of them, each in at most one colour
        # of its own); copies per expert keep the build's power of two.
        rows = max(1, min(E, P - E))
        self.balancer = LayerBalancer(pl.to(self.device), max_tokens, topk, mode, self.device, source_rank=source_rank,
                                      max_sweeps=V1_SPEC.max_sweeps, max_rows=rows, max_colours=rows)
        # certified: flags[0] is 0/1 in an int32; its low byte read as a bool is a view, so the
        # result needs no op per call (little-endian, as every CUDA device and host we target).
        if sys.byteorder != "little":
            raise RuntimeError("the v1 kernel seam assumes a little-endian host")
        flags = self.balancer.flags
        self._certified = flags.view(torch.bool)[0] if mode.per_batch else torch.ones((), dtype=torch.bool, device=self.device)
        self._phys: dict[torch.dtype, torch.Tensor] = {}
        if split_table is not None:
            self.set_split_table(split_table)

    @property
    def placement(self) -> Placement:
        return self.balancer.placement

    # -- per batch ----------------------------------------------------------------------------------
    def stats(self, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's int32 ``chain.local_stats`` row ``[stats_width]`` (a view; global sync only)."""
        self._check(topk_ids, phys_ids)
        return self.balancer.local_stats(topk_ids, phys_ids)

    def __call__(self, topk_ids: torch.Tensor, *, gathered: torch.Tensor | None = None,
                 phys_ids: torch.Tensor | None = None) -> LayerDispatch:
        """``chain.balance_layer`` for this mode and rank; every tensor returned is a view of a fixed buffer."""
        self._check(topk_ids, phys_ids)
        out = None
        if self.balancer.lplb:
            buf = self._phys.get(topk_ids.dtype)
            if buf is None:  # first call with this dtype (warm-up, before any capture)
                buf = self._phys[topk_ids.dtype] = torch.zeros(max(self.max_tokens, 1), self.topk,
                                                              dtype=topk_ids.dtype, device=self.device)
            out = buf[: topk_ids.shape[0]]
        res = self.balancer(topk_ids, out, phys_ids=phys_ids, gathered=gathered)
        return LayerDispatch(res.phys_ids, res.shared_rank, res.quotas, self._certified)

    # -- at rebalance (host work; between replays, never inside a capture) ------------------------------
    def update_placement(self, pl: Placement) -> None:
        """Write a new single-layer placement into the existing buffers (ValueError if it does not fit).

        In table mode the split table returns to the even split until ``set_split_table``."""
        if not isinstance(pl, Placement):
            raise ValueError(f"placement must be a Placement, got {type(pl).__name__}")
        if pl.num_layers != 1:
            raise ValueError(f"a layer path takes a single-layer placement (use Placement.layer(i)), got {pl.num_layers} layers")
        tb = self.balancer.tables
        if (pl.num_ranks, pl.num_logical, pl.slots_per_rank) != (tb.R, tb.E, tb.S):
            raise ValueError(f"placement has {pl.num_ranks} ranks x {pl.slots_per_rank} slots, {pl.num_logical} experts; "
                             f"this layer path was built for {tb.R} x {tb.S}, {tb.E}")
        if not tb.fits(pl):
            raise ValueError(f"placement needs more replicated experts, copies or colours than this layer path "
                             f"holds (rows {tb.NEB}, copies {tb.CB}, colours {tb.GB}); build a new path")
        self.balancer.update_placement(pl)

    def set_split_table(self, fractions: torch.Tensor) -> None:
        """Install split fractions ``[P]`` (float, each expert's copies summing to 1) in place."""
        if self.mode.lplb != "table":
            raise ValueError(f"mode {self.mode.name} has no split table (lplb schedule 'table' only)")
        P = self.balancer.split_table.numel()
        if not isinstance(fractions, torch.Tensor) or fractions.numel() != P or fractions.dim() > 2:
            raise ValueError(f"split_table must be a [{P}] tensor of fractions per copy, got "
                             f"{list(fractions.shape) if isinstance(fractions, torch.Tensor) else type(fractions).__name__}")
        f = fractions.reshape(-1).to(torch.float64)
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError("split_table has NaN, inf or negative entries")
        self.balancer.set_split_table(f.to(self.device))

    def counters(self) -> dict:
        """Device-side counters since the path was built (reads the device: off the critical path).

        calls; solves (per-batch splits); uncertified (splits stopped at the sweep cap without a
        certificate); sweeps (total); max_gap_units / max_gap_tokens (largest ``max load - prefix
        bound`` of a split, 2**-28-token units / tokens); gaps_over_one_token."""
        c = self.balancer.counters()
        c["max_gap_tokens"] = c["max_gap_units"] / float(1 << SCALE_BITS)
        c["kernels"] = self.version
        return c

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every device tensor the path owns, by name (for the graph-safety checks)."""
        own = {f"balancer.{k}": v for k, v in self.balancer.buffers().items()}
        own.update({f"phys.{d}": v for d, v in self._phys.items()})
        own["certified"] = self._certified
        return own

    def _check(self, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None) -> None:
        # Host-side metadata checks only (no values: that would sync with the device).
        if topk_ids.device != self.device:
            raise ValueError(f"topk_ids is on {topk_ids.device}, this layer path on {self.device}")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
        if phys_ids is not None and phys_ids.device != self.device:
            raise ValueError(f"phys_ids is on {phys_ids.device}, this layer path on {self.device}")


def _v1_make_layer_path(pl: Placement, mode: BalanceMode, *, max_tokens: int, topk: int, source_rank: int,
                        device, cost: CostModel | None = None, split_table: torch.Tensor | None = None) -> V1LayerPath:
    ok, why = _v1_supports(mode)
    if not ok:
        raise ValueError(why)
    if not isinstance(pl, Placement) or pl.num_layers != 1:
        raise ValueError("make_layer_path takes a single-layer Placement (use Placement.layer(i))")
    if not isinstance(max_tokens, int) or max_tokens < 1 or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"max_tokens and topk must be positive ints, got {max_tokens!r}, {topk!r}")
    dev = torch.device(device)
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the v1 kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1), not {dev}")
    return V1LayerPath(pl, mode, max_tokens=max_tokens, topk=topk, source_rank=source_rank, device=dev,
                       split_table=split_table)


_V1 = SimpleNamespace(KERNELS_VERSION="v1.1", CUDA_GRAPH_SAFE=True, supports=_v1_supports,
                      make_layer_path=_v1_make_layer_path)


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------
def selected_version() -> str:
    """The kernel set ``SGLANG_MOE_LB_KERNELS`` names (default ``DEFAULT_SET``)."""
    name = os.environ.get(ENV, "").strip() or DEFAULT_SET
    if name not in KERNEL_SETS:
        raise KernelSetError(f"{ENV}={name!r}: unknown kernel set (one of {', '.join(KERNEL_SETS)})")
    return name


def kernel_set(version: str | None = None) -> ModuleType | SimpleNamespace:
    """The module of a kernel set (imported on first use); ``KernelSetError`` when it is absent."""
    version = version or selected_version()
    if version not in KERNEL_SETS:
        raise KernelSetError(f"unknown kernel set {version!r} (one of {', '.join(KERNEL_SETS)})")
    if version == "v1.1":
        return _V1
    try:
        mod = importlib.import_module(KERNEL_SETS[version])
    except ImportError as err:
        raise KernelSetError(f"{ENV}={version}: kernel set {version!r} is not installed "
                             f"({KERNEL_SETS[version]}: {err}); unset {ENV} to use {DEFAULT_SET}") from None
    missing = [n for n in ("KERNELS_VERSION", "CUDA_GRAPH_SAFE", "make_layer_path") if not hasattr(mod, n)]
    if missing:
        raise KernelSetError(f"{ENV}={version}: {KERNEL_SETS[version]} lacks {', '.join(missing)}")
    return mod


def _supports_of(mod):
    """A set without ``supports`` is taken to run every mode; its ``make_layer_path`` then
    refuses the ones it cannot (at start-up, with its own message)."""
    return getattr(mod, "supports", lambda mode: (True, ""))


def _selected() -> tuple[str, ModuleType | SimpleNamespace | None, str]:
    try:
        version = selected_version()
        mod = kernel_set(version)
    except KernelSetError as err:
        return os.environ.get(ENV, DEFAULT_SET), None, str(err)
    if version not in VERIFIED_VERSIONS and version not in DERIVED_FROM:
        warnings.warn(f"{ENV}={version}: kernel set {version!r} has not been verified on a GPU "
                      f"(verified: {', '.join(VERIFIED_VERSIONS)})", stacklevel=2)
    return version, mod, ""


_VERSION, _MOD, _ERROR = _selected()
KERNELS_VERSION: str = _VERSION  # the kernel set in use
CUDA_GRAPH_SAFE: bool = bool(_MOD is not None and _MOD.CUDA_GRAPH_SAFE)


def supports(mode: BalanceMode) -> tuple[bool, str]:
    """Whether the selected kernel set runs ``mode``: (True, "") or (False, the reason)."""
    if _MOD is None:
        return False, _ERROR
    return _supports_of(_MOD)(mode)


def make_layer_path(pl: Placement, mode: BalanceMode, *, max_tokens: int, topk: int, source_rank: int, device,
                    cost: CostModel | None = None, split_table: torch.Tensor | None = None):
    """The selected kernel set's ``LayerPath`` for one layer on one rank (see the module docstring)."""
    if _MOD is None:
        raise KernelSetError(_ERROR)
    return _MOD.make_layer_path(pl, mode, max_tokens=max_tokens, topk=topk, source_rank=source_rank,
                                device=device, cost=cost, split_table=split_table)


__all__ += ["COUNTERS", "selected_version"]
