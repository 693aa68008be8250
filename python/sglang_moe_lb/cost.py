"""What a MoE layer's time is: grouped-GEMM tiles per copy and a roofline per rank.

A grouped GEMM runs each expert copy's tokens in M-tiles of ``tile_tokens`` tokens: a copy
with ``q > 0`` tokens costs ``ceil(q / tile)`` tiles, a copy with none costs nothing. A
rank's time is the larger of reading its active copies' weights and computing its tiles::

    time_r = 1e6 * max(A_r * W / BW, T_r * tile * F / PEAK)   µs

``A_r`` active copies and ``T_r`` tiles on rank r, ``W`` bytes of one expert's weights,
``F`` FLOP per token through one expert (2 x its parameters), ``BW`` memory bandwidth and
``PEAK`` the matrix rate. A layer waits for its busiest rank. Decode (few tokens per copy)
is bound by the first term, prefill by the second.

``CostModel.for_model`` reads an HF/SGLang model config and a documented GPU table
(``GPUS``: vendor datasheet numbers, dense); a calibration file measured on the GPU
(``load_calibration``; format in docs/cost-model.md) overrides the bandwidth, the matrix
rate and the tile. The shared expert of the fused layout is modelled as one more expert of
the same shape (true for DeepSeek-V3/R1).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .cost_files import CALIBRATION_FORMAT, CostFileError, check_calibration, read_json_object

__all__ = ["CostModel", "GPUS", "DTYPE_BYTES", "expert_shape", "load_calibration", "CALIBRATION_FORMAT", "CostModelError"]



class CostModelError(ValueError):
    """A model config, GPU name or calibration file the cost model cannot use."""


# Datasheet numbers, dense (no sparsity): memory bandwidth in B/s, matrix FLOP/s per dtype.
# Sources: NVIDIA H200 / H100 SXM / A100 SXM / B200 datasheets; AMD Instinct MI300X datasheet.
GPUS: dict[str, dict] = {
    "H200": {"bandwidth": 4.8e12, "flops": {"fp8": 1979e12, "bf16": 989.5e12, "fp16": 989.5e12}},
    "H100": {"bandwidth": 3.35e12, "flops": {"fp8": 1979e12, "bf16": 989.5e12, "fp16": 989.5e12}},
    "A100": {"bandwidth": 2.039e12, "flops": {"bf16": 312e12, "fp16": 312e12}},
    "B200": {"bandwidth": 8.0e12, "flops": {"fp8": 4500e12, "bf16": 2250e12, "fp16": 2250e12}},
    "MI300X": {"bandwidth": 5.3e12, "flops": {"fp8": 2614.9e12, "bf16": 1307.4e12, "fp16": 1307.4e12}},
}
DTYPE_BYTES: dict[str, float] = {"fp8": 1.0, "bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "int4": 0.5}


def _tile_tensor(q: torch.Tensor, tile: int) -> torch.Tensor:
    q = q.to(torch.long)
    return torch.div(q + tile - 1, tile, rounding_mode="floor")


@dataclass(frozen=True)
class CostModel:
    """Roofline time of a MoE layer's grouped GEMM (module docstring).

    Args:
        weight_bytes: bytes of one expert's weights (W).
        flops_per_token: FLOP per token through one expert (F).
        bandwidth: memory bandwidth, B/s (BW).
        peak_flops: matrix rate, FLOP/s (PEAK).
        tile_tokens: M-tile of the grouped GEMM, tokens (64 or 128 in DeepGEMM / fused_moe).
        source: where the numbers came from (for reports).
    """

    weight_bytes: float
    flops_per_token: float
    bandwidth: float
    peak_flops: float
    tile_tokens: int = 128
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("weight_bytes", "flops_per_token", "bandwidth", "peak_flops"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise CostModelError(f"CostModel {name} must be a positive finite number, got {v!r}")
        if not isinstance(self.tile_tokens, int) or isinstance(self.tile_tokens, bool) or self.tile_tokens < 1:
            raise CostModelError(f"CostModel tile_tokens must be a positive int, got {self.tile_tokens!r}")

    # -- per copy / per rank -------------------------------------------------------------------
    @property
    def weight_read_us(self) -> float:
        """µs to read one active copy's weights."""
        return 1e6 * self.weight_bytes / self.bandwidth

    @property
    def tile_us(self) -> float:
        """µs of one full tile's matrix work."""
        return 1e6 * self.tile_tokens * self.flops_per_token / self.peak_flops

    def tiles(self, q: torch.Tensor) -> torch.Tensor:
        """Tokens per slot ``[..., P]`` -> long tiles per slot: ``ceil(q / tile)``, 0 where ``q == 0``."""
        return _tile_tensor(q, self.tile_tokens)

    def rank_time(self, q: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
        """Tokens per slot ``[..., P]`` -> float64 ``[..., R]`` µs per rank (slot p on rank p // S)."""
        if q.shape[-1] % slots_per_rank:
            raise CostModelError(f"{q.shape[-1]} slots do not split into ranks of {slots_per_rank}")
        per = q.reshape(*q.shape[:-1], -1, slots_per_rank)
        active = (per > 0).sum(-1).to(torch.float64)
        tiles = self.tiles(per).sum(-1).to(torch.float64)
        return torch.maximum(active * self.weight_read_us, tiles * self.tile_us)

    def layer_time(self, q: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
        """The busiest rank's µs: ``[..., P] -> [...]`` float64."""
        return self.rank_time(q, slots_per_rank).amax(-1)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def for_model(
        cls,
        config,
        gpu: str = "H200",
        dtype: str = "bf16",
        *,
        calibration: str | os.PathLike | dict | None = None,
        tile_tokens: int | None = None,
    ) -> "CostModel":
        """From a model config and a GPU of ``GPUS`` (a calibration file overrides the datasheet).

        Args:
            config: an HF ``config.json`` path or directory, a dict of its fields, or an object
                with those attributes (``transformers`` config, SGLang ``ModelConfig``).
            gpu: a key of ``GPUS``.
            dtype: expert weight/matmul dtype, a key of ``DTYPE_BYTES`` (``fp8`` uses the FP8 rate).
            calibration: a calibration JSON file (or its dict) measured on this GPU.
            tile_tokens: M-tile (default: the calibration's, else 128).
        """
        hidden, inter = expert_shape(config)
        if gpu not in GPUS:
            raise CostModelError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)} (or give a calibration file)")
        if dtype not in DTYPE_BYTES:
            raise CostModelError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
        spec = GPUS[gpu]
        rate_dtype = dtype if dtype in spec["flops"] else "bf16"
        params = 3 * hidden * inter  # gate, up and down projections
        cm = cls(
            weight_bytes=params * DTYPE_BYTES[dtype],
            flops_per_token=2.0 * params,
            bandwidth=spec["bandwidth"],
            peak_flops=spec["flops"][rate_dtype],
            tile_tokens=tile_tokens or 128,
            source=f"{gpu} datasheet ({rate_dtype} matrix rate), expert {hidden}x{inter} in {dtype}",
        )
        if calibration is not None:
            cal = load_calibration(calibration)
            cm = replace(
                cm,
                bandwidth=float(cal["bandwidth"]),
                peak_flops=float(cal["peak_flops"]),
                tile_tokens=tile_tokens or int(cal.get("tile_tokens", cm.tile_tokens)),
                source=f"calibration {cal.get('_path', 'dict')} ({cal.get('gpu', '?')}), expert {hidden}x{inter} in {dtype}",
            )
        return cm


def _config_dict(config) -> dict:
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        try:
            return read_json_object(path, "model config file")
        except CostFileError as err:
            raise CostModelError(str(err)) from None
    hf = getattr(config, "hf_config", None)  # SGLang ModelConfig
    obj = hf if hf is not None else config
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return {k: getattr(obj, k) for k in dir(obj) if not k.startswith("_")}


def expert_shape(config) -> tuple[int, int]:
    """(hidden size, one routed expert's intermediate size) of a MoE model config.

    The expert size is ``moe_intermediate_size`` (DeepSeek, Qwen-MoE) when present, else
    ``intermediate_size`` (Mixtral, OLMoE, whose dense FFN is the expert).
    """
    d = _config_dict(config)
    hidden = d.get("hidden_size")
    inter = d.get("moe_intermediate_size") or d.get("intermediate_size")
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in (hidden, inter)):
        raise CostModelError(
            "model config needs positive integer hidden_size and moe_intermediate_size (or intermediate_size); "
            f"got hidden_size={hidden!r}, moe_intermediate_size/intermediate_size={inter!r}"
        )
    return hidden, inter


def load_calibration(source: str | os.PathLike | dict) -> dict:
    """Read and check a calibration file (docs/cost-model.md; ``cost_files.check_calibration``)."""
    try:
        if isinstance(source, dict):
            return check_calibration(dict(source), "calibration dict")
        cal = read_json_object(source, "calibration file")
        cal["_path"] = str(source)
        return check_calibration(cal, str(source))
    except CostFileError as err:
        raise CostModelError(str(err)) from None
