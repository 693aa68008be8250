"""Fixtures for the SGLang plugin tests (CPU, real sglang==0.5.23).

* ``plugin``: registers our hooks exactly as ``load_plugins()`` would and, afterwards, puts
  every SGLang attribute back (``HookRegistry.reset()`` does not undo patches); the fixture
  asserts the originals are restored.
* ``gloo_world``: a one-rank gloo group (``init_by_eplb`` reads ``torch.distributed.get_rank()``).
* ``rank0``: parse, resolve and publish a configuration as EP rank 0 of a simulated EP group,
  with an EPLB placement on the tiny DeepSeek-V3 config.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY = Path(__file__).parent / "data" / "tiny_dsv3"
E, K = 16, 4  # tiny_dsv3: routed experts, experts per token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_argv(*extra: str) -> list[str]:
    return ["--model-path", str(TINY), "--device", "cpu", "--load-format", "dummy", *extra]


def all_targets() -> list[str]:
    from sglang_moe_lb.plugin.hooks import LIGHT_HOOKS, runtime_hook_specs
    from sglang_moe_lb.plugin.options import MoeLbOptions

    full = MoeLbOptions(mode="waterfill+lplb", requested="waterfill+lplb", waterfill_sync="dynamic")
    specs = runtime_hook_specs(dataclasses.replace(full, lplb_schedule="per-batch"), rank_invariant=False)
    specs += runtime_hook_specs(full, rank_invariant=False)
    return sorted({t for t, _, _ in list(LIGHT_HOOKS) + specs})


def _raw(target: str):
    from sglang_moe_lb.plugin.hooks import _resolve

    return _resolve(target)[2]


@pytest.fixture
def plugin():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_moe_lb.plugin import hooks, register

    targets = all_targets()
    before = {t: _raw(t) for t in targets}
    register()
    HookRegistry.apply_hooks()
    try:
        yield hooks
    finally:
        hooks.uninstall()
        changed = [t for t in targets if _raw(t) is not before[t]]
        assert not changed, f"not restored: {changed}"


@pytest.fixture(scope="session")
def gloo_world():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def window(seed: int = 0, steps: int = 8, layers: int = 4) -> torch.Tensor:
    """A skewed recorded window ``[steps, layers, E]`` so EPLB replicates the hot experts."""
    g = torch.Generator().manual_seed(seed)
    skew = torch.linspace(3.0, 0.2, E)[torch.randperm(E, generator=g)]
    return (torch.rand(steps, layers, E, generator=g) * 100 * skew).to(torch.int64)


@pytest.fixture
def rank0(plugin, gloo_world):
    """``setup(*flags)`` -> (server_args, metadata, model_config) published as EP rank 0."""

    def setup(*flags: str, seed: int = 0):
        from sglang.srt.arg_groups.overrides import model_config_of
        from sglang.srt.eplb.expert_location import ExpertLocationMetadata, set_global_expert_location_metadata
        from sglang.srt.runtime_context import SpawnRanks, publish
        from sglang.srt.server_args import prepare_server_args

        sa = prepare_server_args(base_argv(*flags))
        sa.resolve_once()
        publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0))
        mc = model_config_of(sa)
        md = ExpertLocationMetadata.init_by_eplb(mc, window(seed))
        set_global_expert_location_metadata(md, allow_overwrite=True)
        return sa, md, mc

    yield setup
    from sglang.srt.eplb.expert_location import set_global_expert_location_metadata

    set_global_expert_location_metadata(None, allow_overwrite=True)


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
