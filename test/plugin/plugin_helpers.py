"""Shared helpers of the plugin tests (a plain module: spawned ranks import it too)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from sglang_moe_lb.testing.gloo_ranks import free_port  # noqa: F401,E402 (re-exported for tests)
from sglang_moe_lb.testing.windows import skewed_window  # noqa: E402

TINY = Path(__file__).parent / "data" / "tiny_dsv3"
E, K = 16, 4  # tiny_dsv3: routed experts, experts per token


def base_argv(*extra: str) -> list[str]:
    return ["--model-path", str(TINY), "--device", "cpu", "--load-format", "dummy", *extra]


def all_targets() -> list[str]:
    """Every SGLang attribute the plugin may replace: the manifest's hooks and class attributes it sets."""
    from sglang_moe_lb.plugin import manifest

    return sorted({h.target for h in manifest.HOOKS} | {a.target for a in manifest.WRITES if a.kind == "class"})


def raw_attribute(target: str):
    from sglang_moe_lb.plugin.hooks import _resolve

    return _resolve(target)[2]


def window(seed: int = 0, steps: int = 8, layers: int = 4) -> torch.Tensor:
    """A skewed recorded window ``[steps, layers, E]`` so EPLB replicates the hot experts."""
    return skewed_window(E, steps, layers, seed)


def make_topk(layer_id: int, waterfill: bool):
    """A DeepSeek-like ``TopK`` (softmax, renormalised, routed scaling 2.5) built as SGLang would."""
    from sglang.srt.configs.shared_experts import SharedExpertsConfig
    from sglang.srt.layers.moe.topk import TopK, TopKOutputFormat
    from sglang.srt.runtime_context import get_model

    shared = SharedExpertsConfig(num_fused_shared_experts=1 if waterfill else 0, use_waterfill=waterfill)
    with get_model().override(shared_experts=shared):
        tk = TopK(top_k=K, layer_id=layer_id, renormalize=True, routed_scaling_factor=2.5)
    tk.topk_config.output_format = TopKOutputFormat.STANDARD
    return tk
