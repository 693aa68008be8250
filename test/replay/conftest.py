"""Fixtures for the replay tests: SGLang recorder dumps written by SGLang's own recorder."""

from __future__ import annotations

import os
import tempfile
import types
from unittest import mock

import pytest
import torch

# Ground truth of the recorded dumps: 2 layers, 3 logical experts, 2 EP ranks, 4 physical slots.
DUMP_P2L = torch.tensor([[0, 1, 0, 2], [1, 2, 0, 1]])
DUMP_RANKS = 2
DUMP_PASSES = 3
DUMP_TOPK = 2


def dump_tokens(pass_id: int, rank: int) -> torch.Tensor:
    """Physical top-2 ids ``[layers, T, 2]`` that rank ``rank`` routes in pass ``pass_id`` (distinct logical ids)."""
    g = torch.Generator().manual_seed(100 * pass_id + rank)
    T = 5 + rank + pass_id
    out = torch.empty(2, T, DUMP_TOPK, dtype=torch.int32)
    for layer in range(2):
        for t in range(T):
            logical = torch.randperm(3, generator=g)[:DUMP_TOPK]
            # Pick one physical copy of each logical expert.
            for j, e in enumerate(logical.tolist()):
                copies = (DUMP_P2L[layer] == e).nonzero().flatten()
                out[layer, t, j] = int(copies[torch.randint(len(copies), (1,), generator=g)])
    return out


def _forward_batch(T: int):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return types.SimpleNamespace(
        input_ids=torch.arange(T), positions=torch.arange(T), extend_seq_lens_cpu=[T],
        forward_mode=ForwardMode.EXTEND, extend_num_tokens=T,
    )


@pytest.fixture(scope="session")
def recorder_dumps(tmp_path_factory):
    """Dumps of all three recorder modes, written by ``ExpertDistributionRecorder`` itself.

    Only the CPU gaps are patched: the recorder asks ``sglang.srt.utils.get_device()`` for an
    accelerator, and ``torch.cpu`` lacks ``is_current_stream_capturing``/``empty_cache``.
    """
    from sglang_moe_lb.replay.upstream import ensure_triton_interpreter

    ensure_triton_interpreter()
    import sglang.srt.eplb.expert_distribution as ed
    import torch.distributed as dist
    from sglang.srt.eplb import expert_location as el
    from sglang.srt.runtime_context import SpawnRanks, create_context, use_context
    from sglang.srt.server_args import ServerArgs

    root = tmp_path_factory.mktemp("recorder")
    created_group = False
    if not dist.is_initialized():
        fd, init_file = tempfile.mkstemp()
        os.close(fd)
        os.unlink(init_file)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
        created_group = True
    patches = [
        mock.patch.object(ed, "get_device", lambda *a: "cpu"),
        mock.patch.object(torch.cpu, "is_current_stream_capturing", lambda: False, create=True),
        mock.patch.object(torch.cpu, "empty_cache", lambda: None, create=True),
    ]
    out = {}
    try:
        for p in patches:
            p.start()
        for mode in ("stat", "per_pass", "per_token"):
            d = root / mode
            d.mkdir()
            sa = ServerArgs(
                model_path="dummy", device="cpu", tp_size=DUMP_RANKS, ep_size=DUMP_RANKS, ep_num_redundant_experts=1,
                expert_distribution_recorder_mode=mode, expert_distribution_recorder_buffer_size=-1,
                chunked_prefill_size=64, moe_a2a_backend="none",
            )
            ctx = create_context(sa, role="test", ranks=SpawnRanks(world_rank=0, dp_rank=0))
            with use_context(ctx), mock.patch.dict(os.environ, {"SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR": str(d)}):
                l2p = el._compute_logical_to_all_physical_map(
                    physical_to_logical_map=DUMP_P2L, num_logical_experts=3, ep_size=DUMP_RANKS, moe_ep_rank=0
                )
                meta = el.ExpertLocationMetadata._init_raw(
                    ep_size=DUMP_RANKS, physical_to_logical_map=DUMP_P2L, logical_to_all_physical_map=l2p, moe_ep_rank=0
                )
                # stat is all-reduced into one file by rank 0: one recorder sees every rank's tokens.
                recs = [ed.ExpertDistributionRecorder.init_new(meta, rank=r) for r in range(DUMP_RANKS)]
                for rec in recs:
                    rec.start_record()
                for pid in range(DUMP_PASSES):
                    # stat: one recorder, one pass with every rank's tokens (the dump is all-reduced anyway).
                    feeds = (
                        [(recs[0], torch.cat([dump_tokens(pid, r) for r in range(DUMP_RANKS)], 1))]
                        if mode == "stat"
                        else [(recs[r], dump_tokens(pid, r)) for r in range(DUMP_RANKS)]
                    )
                    for rec, ids in feeds:
                        with rec.with_forward_pass(pid, _forward_batch(ids.shape[1])):
                            for layer in range(2):
                                with rec.with_current_layer(layer):
                                    rec.on_select_experts(topk_ids=ids[layer])
                for rec in recs if mode != "stat" else recs[:1]:
                    rec.dump_record()
            out[mode] = sorted(d.iterdir())
    finally:
        for p in patches:
            p.stop()
        if created_group:
            dist.destroy_process_group()
    return out
