"""The cost model and overheads replay scores modelled time with (``--cost-model-*`` flags).

A layer's modelled time is the busiest rank's ``cost.CostModel.rank_time`` on the mode's
tokens per slot (the fused layout: each rank's routed copies plus one shared-expert slot,
modelled as one more expert of the same shape), plus the mode's per-layer overhead:
``gate.Overheads.mode_us`` for our modes (measured H200 kernels + one collective with global
sync; a plan's gather minus SGLang's, 0 until measured), SGLang's measured Waterfill for
``upstream-waterfill`` (+ its all-reduce for the dynamic variant), and 0 for SGLang's static
and dynamic dispatch (the reference).

Presets: the expert shape of public model configs (``config.json`` on the Hugging Face hub):

===============  ======  ==============  =====  ==============================================
preset           hidden  expert inter.   dtype  source
===============  ======  ==============  =====  ==============================================
``olmoe``        2048    1024            bf16   allenai/OLMoE-1B-7B-0924 (``intermediate_size``)
``deepseek-v3``  7168    2048            fp8    deepseek-ai/DeepSeek-V3 (``moe_intermediate_size``)
``qwen1.5-moe``  2048    1408            bf16   Qwen/Qwen1.5-MoE-A2.7B (``moe_intermediate_size``)
``mixtral``      4096    14336           bf16   mistralai/Mixtral-8x7B-v0.1 (``intermediate_size``)
===============  ======  ==============  =====  ==============================================

Defaults: the bundled data use the preset of its model (``olmoe``; ``mixtral`` for
``--model mixtral``), the synthetic generator and recorder dumps ``deepseek-v3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from ..cost import DTYPE_BYTES, GPUS, CostModel, CostModelError
from ..cost_files import CostFileError
from ..gate import Overheads
from .mode_names import ReplayMode

__all__ = ["PRESETS", "CostOptions", "default_preset", "build_cost_model", "build_overheads", "mode_overhead_us",
           "check_overheads"]

PRESETS: dict[str, dict] = {
    "olmoe": {"hidden_size": 2048, "intermediate_size": 1024, "dtype": "bf16",
              "source": "allenai/OLMoE-1B-7B-0924 config.json"},
    "deepseek-v3": {"hidden_size": 7168, "moe_intermediate_size": 2048, "dtype": "fp8",
                    "source": "deepseek-ai/DeepSeek-V3 config.json"},
    "qwen1.5-moe": {"hidden_size": 2048, "moe_intermediate_size": 1408, "dtype": "bf16",
                    "source": "Qwen/Qwen1.5-MoE-A2.7B config.json"},
    "mixtral": {"hidden_size": 4096, "intermediate_size": 14336, "dtype": "bf16",
                "source": "mistralai/Mixtral-8x7B-v0.1 config.json"},
}
UPSTREAM_WATERFILL_KEY = "upstream-waterfill"


@dataclass(frozen=True)
class CostOptions:
    """The ``--cost-model-config``, ``--gpu``, ``--dtype``, ``--calibration``, ``--tile-tokens``,
    ``--overheads``, ``--collective-us`` and ``--expected-gain`` flags (None: the default)."""

    config: str | None = None
    gpu: str = "H200"
    dtype: str | None = None
    calibration: str | None = None
    tile_tokens: int | None = None
    overheads: str | None = None
    collective_us: float | None = None
    expected_gain: float | None = None  # None: gate.default_expected_gain per mode

    def validate(self) -> None:
        """Flag values alone (files are read by ``build_*``); raises ``ValueError`` naming the flag."""
        if self.gpu not in GPUS:
            raise ValueError(f"--gpu must be one of {', '.join(GPUS)}; got {self.gpu!r}")
        if self.dtype is not None and self.dtype not in DTYPE_BYTES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}; got {self.dtype!r}")
        if self.tile_tokens is not None and self.tile_tokens < 1:
            raise ValueError(f"--tile-tokens must be >= 1, got {self.tile_tokens}")
        if self.collective_us is not None and not (math.isfinite(self.collective_us) and self.collective_us >= 0):
            raise ValueError(f"--collective-us must be a finite number >= 0, got {self.collective_us}")
        if self.expected_gain is not None and not (math.isfinite(self.expected_gain) and 0 <= self.expected_gain <= 1):
            raise ValueError(f"--expected-gain must be in [0, 1], got {self.expected_gain}")


def default_preset(trace_info: dict) -> str:
    """The preset a trace is scored with when ``--cost-model-config`` is not given."""
    if trace_info.get("kind") == "bundled":
        return "mixtral" if trace_info.get("model") == "mixtral" else "olmoe"
    return "deepseek-v3"


def build_cost_model(opts: CostOptions, trace_info: dict) -> tuple[CostModel, str]:
    """(cost model, one line saying where it came from); raises ``ValueError`` naming the flag."""
    name = opts.config or default_preset(trace_info)
    preset = PRESETS.get(name)
    if preset is None and not Path(name).exists():
        raise ValueError(f"--cost-model-config: {name!r} is neither a preset ({', '.join(PRESETS)}) nor a model config file")
    config = {k: v for k, v in preset.items() if k not in ("dtype", "source")} if preset else name
    dtype = opts.dtype or (preset["dtype"] if preset else "bf16")
    try:
        cm = CostModel.for_model(config, gpu=opts.gpu, dtype=dtype, calibration=opts.calibration,
                                 tile_tokens=opts.tile_tokens)
    except CostModelError as err:
        flag = "--calibration" if opts.calibration and "calibration" in str(err) else "--cost-model-config"
        raise ValueError(f"{flag}: {err}") from None
    where = (f"preset {name} ({preset['source']})" if preset else f"config {name}")
    default = "" if opts.config else " [default for this input]"
    return cm, f"{where}{default}, {cm.source}, tile {cm.tile_tokens}"


def build_overheads(opts: CostOptions) -> Overheads:
    try:
        ov = Overheads.measured(opts.overheads)
    except CostFileError as err:
        raise ValueError(f"--overheads: {err}") from None
    if opts.collective_us is not None:
        ov = replace(ov, collective_intra_us=opts.collective_us, collective_inter_us=opts.collective_us)
    return ov


def mode_overhead_us(ov: Overheads, mode: ReplayMode, tokens_per_rank: float, num_ranks: int) -> float:
    """µs per layer an ungated mode adds at this batch size; SGLang's static/dynamic: 0."""
    if mode.balance is not None:
        return ov.mode_us(mode.balance, tokens_per_rank, num_ranks)
    if mode.upstream_waterfill:
        dyn = mode.sglang == "upstream-waterfill-dyn"  # one EP all-reduce of the rank loads per layer
        return ov.hot_path_us(UPSTREAM_WATERFILL_KEY, tokens_per_rank) + (ov.collective_us(num_ranks) if dyn else 0.0)
    return 0.0


def check_overheads(ov: Overheads, modes: tuple[ReplayMode, ...], num_ranks: int) -> None:
    """Every mode has a measured overhead (before any work); raises ``ValueError`` naming ``--overheads``."""
    for m in modes:
        try:
            for form in (m.ungated, m.closed):
                mode_overhead_us(ov, form, 1, num_ranks)
        except KeyError as err:
            raise ValueError(f"--overheads: mode {m.name}: {err.args[0]}") from None
