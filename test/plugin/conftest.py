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

import pytest  # noqa: E402
from plugin_helpers import all_targets, base_argv, free_port, raw_attribute, window  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: spawns several EP ranks (gloo); slower")


@pytest.fixture
def plugin():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_moe_lb.plugin import hooks, register

    targets = all_targets()
    before = {t: raw_attribute(t) for t in targets}
    register()
    HookRegistry.apply_hooks()
    try:
        yield hooks
    finally:
        hooks.uninstall()
        changed = [t for t in targets if raw_attribute(t) is not before[t]]
        assert not changed, f"not restored: {changed}"


@pytest.fixture(scope="session")
def gloo_world():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


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


