"""One EP rank of ``test_waterfill_gloo.py`` (spawned; gloo; SGLang's own process groups).

Per mode, the rank publishes the ``ServerArgs`` the parent resolved (which activates our
plugin in this "scheduler"), builds the real ``DeepseekV2MoE`` of layer 1 of the tiny
DeepSeek-V3 the way SGLang's loader does (``resolve_shared_experts_config`` +
``get_model().override``), with SGLang's fused shared-expert layout (``--moe-a2a-backend
deepep``, S routed slots + 1 shared slot per rank). DeepEP itself is replaced by
``sglang_moe_lb.testing.gloo_deepep.GlooNormalTransport`` under the real
``DeepEPDispatcher``; the expert math is SGLang's ``moe_forward_native`` on the layer's own
weights. Then ``prepare_moe_topk`` (where SGLang installs its Waterfill balancer and our plugin
swaps in its own) and one ``DeepseekV2MoE.forward`` per batch.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import traceback  # noqa: E402


def run(rank: int, world: int, port: int, jobs: list, out_dir: str, batches: list) -> None:
    try:
        _run(rank, world, port, jobs, out_dir, batches)
    except BaseException:
        with open(os.path.join(out_dir, f"error_{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _window(E: int, layers: int):
    import torch

    g = torch.Generator().manual_seed(7)
    skew = torch.linspace(4.0, 0.2, E)[torch.randperm(E, generator=g)]
    return (torch.rand(8, layers, E, generator=g) * 100 * skew).to(torch.int64)


def _run(rank, world, port, jobs, out_dir, batches):
    import sglang.srt.runtime_context as runtime_context
    import torch
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from sglang.srt.layers.moe.utils import initialize_moe_config
    from sglang.srt.plugins.hook_registry import HookRegistry

    import sglang_moe_lb.plugin.comm as comm
    from sglang_moe_lb.plugin import hooks, register

    torch.set_num_threads(1)
    register()  # what load_plugins() does in a scheduler process
    HookRegistry.apply_hooks()
    from sglang_moe_lb.testing.gloo_ranks import count_all_gathers

    calls = count_all_gathers(comm)

    results = {}
    groups_ready = False
    for name, server_args in jobs:
        # Looked up on the module each time: our hook on publish is (re)applied there.
        runtime_context.publish(server_args, role="scheduler",
                                ranks=runtime_context.SpawnRanks(world_rank=rank, dp_rank=rank, gpu_id=rank))
        initialize_moe_config()  # the scheduler's next step: MoE backend flags from the published config
        if not groups_ready:
            init_distributed_environment(backend="gloo", world_size=world, rank=rank, local_rank=rank,
                                         distributed_init_method=f"tcp://127.0.0.1:{port}")
            initialize_model_parallel()
            groups_ready = True
        calls["n"] = 0
        results[name] = _one_mode(rank, server_args, batches, calls)
        hooks.uninstall()
        register()
        HookRegistry.apply_hooks()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _build_moe(mc, layer_id: int):
    """The real DeepseekV2MoE, built under the shared-expert layout SGLang's loader resolves."""
    from unittest import mock

    import torch
    from sglang.srt.layers.moe.token_dispatcher import deepep as deepep_mod
    from sglang.srt.layers.moe.utils import resolve_shared_experts_config
    from sglang.srt.models.deepseek_v2 import DeepseekV2MoE, DeepseekV3ForCausalLM
    from sglang.srt.runtime_context import get_model

    shared = resolve_shared_experts_config(DeepseekV3ForCausalLM, mc.hf_config, None)
    # DeepEP's Python wrapper refuses to build without the deep_ep package; its buffers are
    # never touched here (the gloo transport replaces the inner implementation below).
    with get_model().override(shared_experts=shared), mock.patch.object(deepep_mod, "use_deepep", True), \
            torch.device("cpu"):
        moe = DeepseekV2MoE(config=mc.hf_config, layer_id=layer_id, quant_config=None, prefix=f"model.layers.{layer_id}.mlp")
    return moe, shared


class HomeRankShared:
    """``off`` for the fused layout: every token's shared expert on its own (home) rank.

    Stands where SGLang's ``WaterfillBalancer`` sits on ``TopK`` (SGLang built the layout and
    the balancer from ``--enable-waterfill``; we keep its shared weight). The fused ids come
    from the core's ``fuse_topk`` with ``shared_rank = this rank``, and every call is checked
    against SGLang's own home-rank layout, ``remap_topk_for_per_rank_shared_slots`` (the path
    SGLang takes on GPU without Waterfill). SGLang's *CPU* branch of ``_post_process_topk_ids``
    cannot be the reference: with per-rank shared slots it treats the last routed column as a
    shared column and leaves it unmapped (logical id), so it is not used.
    """

    def __init__(self, topk, rank: int, slots_per_rank: int, num_physical_routed: int):
        self.topk = topk
        self.rank = rank
        self.S = slots_per_rank
        self.num_physical_routed = num_physical_routed
        self.shared_weight = float(topk.waterfill_balancer.shared_weight)
        self.matches = []

    def expand_topk(self, topk_output, num_tokens: int):
        import torch
        from sglang.srt.layers.moe.topk import StandardTopKOutput, remap_topk_for_per_rank_shared_slots

        from sglang_moe_lb.waterfill import fuse_topk

        phys, w = topk_output.topk_ids, topk_output.topk_weights
        ids, weights = fuse_topk(phys, w, torch.full((phys.shape[0],), self.rank), self.S, self.shared_weight)
        ref_ids, ref_w = remap_topk_for_per_rank_shared_slots(phys, w, 1, self.num_physical_routed, self.topk.topk_config)
        self.matches.append(bool(torch.equal(ids.to(ref_ids.dtype), ref_ids) and torch.equal(weights, ref_w)))
        return StandardTopKOutput(topk_weights=weights, topk_ids=ids.to(phys.dtype), router_logits=topk_output.router_logits)


def _one_mode(rank, server_args, batches, calls):
    import torch
    from sglang.srt.arg_groups.overrides import model_config_of
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata, set_global_expert_location_metadata
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPNormalCombineInput
    from sglang.srt.layers.moe.topk import StandardTopKOutput
    from sglang.srt.model_executor.model_runner_components import moe_ep_setup
    from sglang.srt.runtime_context import get_parallel

    from sglang_moe_lb.plugin.runtime import get_runtime
    from sglang_moe_lb.testing.cpu_serving.dummy_weights import reinit_placement_invariant
    from sglang_moe_lb.testing.cpu_serving.ep_moe import moe_forward_native_ep
    from sglang_moe_lb.testing.gloo_deepep import GlooNormalTransport, install_gloo_transport

    torch.set_default_dtype(torch.float32)
    mc = model_config_of(server_args)
    hf = mc.hf_config
    md = ExpertLocationMetadata.init_by_eplb(mc, _window(hf.n_routed_experts, hf.num_hidden_layers))
    set_global_expert_location_metadata(md, allow_overwrite=True)

    layer_id = 1
    moe, shared = _build_moe(mc, layer_id)
    experts = moe.experts
    # Every replica of a logical expert, and every rank's shared slot, gets the same weights
    # (keyed by logical id), so moving a (token, expert) pair must not change the output.
    reinit_placement_invariant(moe)
    transport = GlooNormalTransport(
        get_parallel().moe_ep_group.device_group, experts.num_local_experts, experts.num_fused_shared_experts
    )
    replaced = install_gloo_transport(experts.dispatcher, transport)
    assert replaced >= 1, f"no DeepEPDispatcher under {type(experts).__name__}.dispatcher ({type(experts.dispatcher).__name__})"

    def run_moe_core(dispatch_output):
        # DeepEPMoE's own run_moe_core has no unquantized normal-mode path (GPU kernels only);
        # this is SGLang's native expert math on the layer's weights, -1 (not here) -> 0.
        ids, w = dispatch_output.topk_ids, dispatch_output.topk_weights
        out = moe_forward_native_ep(
            moe_forward_native, experts, dispatch_output.hidden_states, StandardTopKOutput(w, ids, None),
            experts.moe_runner_config,
        )
        return DeepEPNormalCombineInput(hidden_states=out, topk_ids=ids, topk_weights=w)

    experts.run_moe_core = run_moe_core
    moe_ep_setup.prepare_moe_topk(model=torch.nn.ModuleList([moe]), model_config=mc)
    rt = get_runtime()
    home = None
    if rt is None:  # "off": SGLang's --enable-waterfill layout, shared expert kept on the home rank
        home = HomeRankShared(moe.topk, rank, experts.num_local_experts - experts.num_fused_shared_experts,
                              md.num_physical_experts)
        moe.topk.waterfill_balancer = home

    out = {
        "shared": (shared.num_fused_shared_experts, shared.use_waterfill),
        "balancer": type(moe.topk.waterfill_balancer).__name__ if moe.topk.waterfill_balancer is not None else None,
        "num_local_experts": experts.num_local_experts,
        "batches": [],
        "mode": rt.opts.describe() if rt is not None else "off",
    }
    topk_ids_seen = []
    orig_topk_forward = moe.topk.forward

    def recording_topk(*a, **k):
        res = orig_topk_forward(*a, **k)
        topk_ids_seen.append((res.topk_ids.clone(), res.topk_weights.clone()))
        return res

    moe.topk.forward = recording_topk
    for b, sizes in enumerate(batches):
        n = sizes[rank]
        g = torch.Generator().manual_seed(100 * b + rank)
        x = torch.randn(n, hf.hidden_size, generator=g)
        topk_ids_seen.clear()
        with torch.no_grad():
            y = moe(x, None)
        out["batches"].append({
            "x": x, "y": y.clone(),
            "fused_ids": topk_ids_seen[0][0] if topk_ids_seen else None,
            "fused_weights": topk_ids_seen[0][1] if topk_ids_seen else None,
        })
    out["transport"] = dict(transport.stats)
    out["home_matches_sglang_remap"] = None if home is None else home.matches
    out["collectives"] = calls["n"]
    out["S"] = experts.num_local_experts - experts.num_fused_shared_experts
    return out
