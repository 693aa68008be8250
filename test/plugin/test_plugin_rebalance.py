"""Dispatch plans inside SGLang's real EPLB cycle (``EPLBManager`` with stub collaborators).

SGLang's ``EPLBManager`` runs unmodified: every ``eplb_rebalance_num_iterations`` forward
passes it dumps the recorder window, computes a placement with ``init_by_eplb``, has the
updater move weights and update the metadata, and finishes. The stubs stand in for what
needs GPUs or a model: the recorder returns a fixed window, and the updater only applies the
metadata update (which is all the real one does after moving the weights).
"""

from __future__ import annotations

import logging

import pytest
import torch
from plugin_helpers import E, window

from sglang_moe_lb import Placement
from sglang_moe_lb.plan import plan_maps, solve_layer_plan, static_like_weights, window_shares

FLAGS = ["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "plan", "--moe-lb-gate", "off", "--tp", "4", "--ep-size", "4",
         "--ep-num-redundant-experts", "4", "--enable-eplb", "--eplb-rebalance-num-iterations", "2",
         "--moe-lb-plan-refresh", "0", "--moe-lb-plan-solver", "thread"]
MOE_LAYERS = (1, 2, 3)


class _Recorder:
    recording = True

    def __init__(self, window):
        self.window = window

    def start_record(self):
        pass

    def dump_record(self, output_mode="file"):
        return {"logical_count": self.window, "average_utilization_rate_over_window": None}


class _Updater:
    def update(self, routed_experts_weights_of_layer, new_expert_location_metadata, update_layer_ids, **kwargs):
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        get_global_expert_location_metadata().update(new_expert_location_metadata, update_layer_ids=update_layer_ids)
        return {}


class _Model(torch.nn.Module):
    routed_experts_weights_of_layer = {layer: [] for layer in MOE_LAYERS}


class _WeightUpdater:
    def update_weights_from_disk(self, *args, **kwargs):
        raise AssertionError("no weights are missing in this test")


@pytest.fixture
def eplb(rank0):
    """(runtime, manager, recorder) after start-up with the window of seed 0."""
    from sglang.srt.eplb import eplb_manager, expert_distribution
    from sglang.srt.model_executor.model_runner_components import moe_ep_setup

    from sglang_moe_lb.plugin.runtime import get_runtime

    sa, md, mc = rank0(*FLAGS)
    moe_ep_setup.prepare_moe_topk(model=torch.nn.ModuleList(), model_config=mc)
    recorder = _Recorder(window(0))
    old = expert_distribution.get_global_expert_distribution_recorder()
    expert_distribution.set_global_expert_distribution_recorder(recorder)
    model = _Model()
    manager = eplb_manager.EPLBManager(
        model_config=mc, get_model=lambda: model, get_expert_location_updater=lambda: _Updater(),
        get_expert_backup_client=lambda: None, get_weight_updater=lambda: _WeightUpdater(),
    )
    yield get_runtime(), manager, recorder
    expert_distribution.set_global_expert_distribution_recorder(old)


def _run_one_rebalance(manager):
    # Two passes of counting, then the pass that runs the rebalance (and, after it, our install).
    for _ in range(3):
        manager.on_forward_pass_end()


def _core_plan(rt, row: torch.Tensor, window_: torch.Tensor, layer: int) -> torch.Tensor:
    """The core's plan for one layer (what the plugin must install): ``[levels, E, W]``."""
    pl = Placement(row, rt.num_ranks, E)
    lp = solve_layer_plan(pl, window_shares(window_, window_.shape[1], E)[layer], rt.cost, top_k=rt.topk,
                          levels=rt.levels, hash_slots=rt.hash_slots)
    return plan_maps(pl, lp.weights[:, None], rt.hash_slots)[:, 0].to(torch.int32)


def test_start_up_solves_from_the_init_window(eplb):
    rt, _, _ = eplb
    for layer in MOE_LAYERS:
        st = rt.layers[layer]
        assert st.source == "start-up"
        assert torch.equal(st.maps.cpu(), _core_plan(rt, st.row, window(0), layer))


def test_rebalance_installs_new_plans_in_place(eplb, caplog):
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    rt, manager, recorder = eplb
    caplog.set_level(logging.INFO, logger="sglang_moe_lb.plugin")
    ptrs = {layer: rt.layers[layer].maps.data_ptr() for layer in MOE_LAYERS}
    recorder.window = window(5)  # traffic moved: EPLB picks a new placement
    _run_one_rebalance(manager)

    md = get_global_expert_location_metadata()
    report = rt.last_report
    assert report["label"] == "rebalance #1" and not report["failed"]
    for layer in MOE_LAYERS:
        st = rt.layers[layer]
        row = md.physical_to_logical_map_cpu[layer]
        assert torch.equal(st.row, row) and torch.equal(st.placement.phy2log[0].cpu(), row)
        assert st.maps.data_ptr() == ptrs[layer], "the maps were replaced, not updated in place"
        assert st.source == "rebalance #1" and layer in report["installed"]
        assert torch.equal(st.maps.cpu(), _core_plan(rt, row, window(5), layer))
        # every entry of every level's map holds its expert
        assert bool((st.placement.phy2log[0][st.maps.long()] == torch.arange(E)[None, :, None]).all())
    assert "[moe-lb] rebalance #1: plans installed for 3 layers x 13 levels" in caplog.text


def test_failing_solve_keeps_the_plan(eplb, monkeypatch, caplog):
    from sglang_moe_lb import plan

    rt, manager, recorder = eplb
    before = {layer: rt.layers[layer].maps.clone() for layer in MOE_LAYERS}

    def broken(*args, **kwargs):
        raise RuntimeError("HiGHS exploded")

    monkeypatch.setattr(plan, "solve_layer_plan", broken)
    _run_one_rebalance(manager)  # same window -> same placement, so the old plans still apply
    for layer in MOE_LAYERS:
        assert torch.equal(rt.layers[layer].maps, before[layer]), f"layer {layer} lost its plan"
        assert rt.layers[layer].source == "start-up"
    assert set(rt.last_report["failed"]) >= set(MOE_LAYERS)
    assert "rebalance #1: plan solve failed on layers [0, 1, 2, 3] (first: layer 0, RuntimeError: HiGHS exploded)" \
        in caplog.text


def test_placement_follows_metadata_update_before_plans(eplb):
    """Between the weight move and the install, dispatch must already use the new placement:
    the new row's even plan, in the same storage."""
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata, get_global_expert_location_metadata

    rt, manager, _ = eplb
    md = get_global_expert_location_metadata()
    new = ExpertLocationMetadata.init_by_eplb(manager._model_config, window(9))
    ptr = rt.layers[2].maps.data_ptr()
    md.update(new, update_layer_ids=[2])
    st = rt.layers[2]
    row = new.physical_to_logical_map_cpu[2]
    assert torch.equal(st.row, row) and st.maps.data_ptr() == ptr and st.source == "even"
    pl = Placement(row, rt.num_ranks, E)
    even = plan_maps(pl, static_like_weights(pl, rt.levels, rt.hash_slots), rt.hash_slots)[:, 0]
    assert torch.equal(st.maps.cpu().long(), even)
    assert torch.equal(rt.layers[1].row, md.physical_to_logical_map_cpu[1])


def test_the_rebalancer_is_a_generator_the_pass_hook_advances(eplb):
    """No install before the rebalance's pass ends; the install happens at that pass's end (no a2a
    backend: every rank must switch at the same pass)."""
    rt, manager, recorder = eplb
    reb = rt.rebalancer
    assert reb is not None and hasattr(reb._cycle, "__next__")
    recorder.window = window(5)
    manager.on_forward_pass_end()
    manager.on_forward_pass_end()
    assert reb.count == 0 and rt.last_report["label"] == "start-up"
    manager.on_forward_pass_end()  # the rebalance runs in this pass; our hook then installs
    assert reb.count == 1 and rt.last_report["label"] == "rebalance #1"
