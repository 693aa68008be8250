"""One EP rank of ``test_plugin_multiprocess.py`` (spawned; gloo; real SGLang groups).

The parent parses and resolves the ``ServerArgs`` (as SGLang's launcher does) and hands them
to each rank pickled, exactly like a spawned scheduler receives them. Each rank then, per mode:
publishes (which activates the plugin and hooks the forward path), builds the EPLB placement
from one shared window, and runs a real ``TopK`` per MoE layer on its own tokens for each
batch (the idle rank calls ``empty_topk_output``, or for one layer skips TopK entirely and
only reaches the DeepEP dispatcher, whose hook must then join the collective), and saves what
it dispatched. Before each batch it publishes the batch's per-rank token counts through
SGLang's ``set_dp_buffer_len`` (what a ``ForwardBatch`` under DP attention does), which the
gate decides on.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
import traceback  # noqa: E402


def run(rank: int, world: int, port: int, jobs: list, out_dir: str, idle_rank: int) -> None:
    try:
        _run(rank, world, port, jobs, out_dir, idle_rank)
    except BaseException:
        with open(os.path.join(out_dir, f"error_{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run(rank, world, port, jobs, out_dir, idle_rank):
    import torch
    from sglang.srt.plugins.hook_registry import HookRegistry

    import sglang_moe_lb.plugin.comm as comm
    from sglang_moe_lb.plugin import hooks, register

    sys.path.insert(0, os.path.dirname(__file__))
    register()  # what SGLang's load_plugins() does in a scheduler process
    HookRegistry.apply_hooks()

    from sglang_moe_lb.testing.gloo_ranks import count_all_gathers

    calls = count_all_gathers(comm)

    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from sglang.srt.runtime_context import SpawnRanks, publish

    results = {}
    groups_ready = False
    for name, server_args, batches in jobs:
        publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=rank, dp_rank=rank, gpu_id=rank))
        if not groups_ready:
            init_distributed_environment(backend="gloo", world_size=world, rank=rank, local_rank=rank,
                                         distributed_init_method=f"tcp://127.0.0.1:{port}")
            initialize_model_parallel()
            groups_ready = True
        results[name] = _one_mode(rank, idle_rank, server_args, calls, batches)
        hooks.uninstall()
        register()
        HookRegistry.apply_hooks()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _one_mode(rank, idle_rank, server_args, calls, batches):
    import torch
    from plugin_helpers import E, K, make_topk, window
    from sglang.srt.arg_groups.overrides import model_config_of
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata, set_global_expert_location_metadata
    from sglang.srt.layers.dp_attention import set_dp_buffer_len
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPDispatcher
    from sglang.srt.model_executor.model_runner_components import moe_ep_setup

    from sglang_moe_lb.plugin.runtime import get_runtime

    mode = server_args._moe_lb.mode
    mc = model_config_of(server_args)
    md = ExpertLocationMetadata.init_by_eplb(mc, window(0))
    set_global_expert_location_metadata(md, allow_overwrite=True)
    topks = [make_topk(layer, waterfill=mode.waterfill is not None) for layer in (1, 2, 3)]
    moe_ep_setup.prepare_moe_topk(model=torch.nn.ModuleList(topks), model_config=mc)
    rt = get_runtime()
    dispatchers = {}
    for tk in topks:  # one bare DeepEP dispatcher per layer, tagged like the model walk does
        d = DeepEPDispatcher.__new__(DeepEPDispatcher)
        d._moe_lb_layer = tk.layer_id
        dispatchers[tk.layer_id] = d

    out = {"p2l": md.physical_to_logical_map_cpu.clone(), "S": rt.slots_per_rank, "R": rt.num_ranks,
           "collective": rt.collective, "batches": []}
    for b, sizes in enumerate(batches):
        set_dp_buffer_len(sum(sizes), sizes[rank], False, global_num_tokens=list(sizes))
        calls["n"] = 0
        layers = {}
        for tk in topks:
            layer = tk.layer_id
            g = torch.Generator().manual_seed(1000 * rank + 100 * b + layer)
            n = sizes[rank]
            logits = torch.randn(n, E, generator=g) + torch.linspace(2.0, 0.0, E)
            skip_topk = n == 0 and layer == 3  # a model that returns early on idle ranks
            if skip_topk:
                topk_output = None
            elif n == 0:
                topk_output = tk.empty_topk_output(torch.device("cpu"))
            else:
                topk_output = tk.forward_native(torch.randn(n, 64, generator=g), logits)
            try:  # the DeepEP MoE layer: every rank reaches the dispatcher for every layer
                DeepEPDispatcher.dispatch_a(dispatchers[layer], hidden_states=None, topk_output=topk_output)
            except AttributeError:
                pass  # the bare dispatcher has no DeepEP buffers; our BEFORE hook already ran
            layers[layer] = {
                "logical": torch.topk(torch.softmax(logits, -1), K, dim=-1).indices,
                "ids": None if topk_output is None else topk_output.topk_ids.clone(),
                "weights": None if topk_output is None else topk_output.topk_weights.clone(),
            }
        out["batches"].append({"sizes": list(sizes), "layers": layers, "collectives": calls["n"]})
    out["plans"] = {layer: st.maps.clone() for layer, st in rt.layers.items() if st.maps is not None}
    out["levels"], out["hash_slots"], out["rank"] = rt.levels, rt.hash_slots, rt.ep.rank
    set_dp_buffer_len(0, 0, False, global_num_tokens=None)
    return out
