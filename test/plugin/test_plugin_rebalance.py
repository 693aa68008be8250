"""LPLB tables inside SGLang's real EPLB cycle (``EPLBManager`` with stub collaborators).

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

from sglang_moe_lb import Placement, fractions_to_split
from sglang_moe_lb.lp_split import even_fractions, scenario_split

FLAGS = ["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "table", "--tp", "4", "--ep-size", "4", "--ep-num-redundant-experts", "4", "--enable-eplb",
         "--eplb-rebalance-num-iterations", "2"]
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


def _summed_max_load(pl: Placement, table: torch.Tensor, window_layer: torch.Tensor) -> float:
    """What the scenario LP minimises: the busiest rank's load, summed over the window's steps."""
    return sum(float(pl.rank_loads(fractions_to_split(pl, table, c.double())).max()) for c in window_layer)


def test_rebalance_installs_new_tables_for_new_placements(eplb, caplog):
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    rt, manager, recorder = eplb
    caplog.set_level(logging.INFO, logger="sglang_moe_lb.plugin")
    start_tables = {layer: rt.layers[layer].table.clone() for layer in MOE_LAYERS}
    start_ptrs = {layer: rt.layers[layer].path.table.data_ptr() for layer in MOE_LAYERS}
    assert all(rt.layers[layer].source == "startup-scenario" for layer in MOE_LAYERS)
    recorder.window = window(5)  # traffic moved: EPLB picks a new placement
    _run_one_rebalance(manager)

    md = get_global_expert_location_metadata()
    report = rt.last_report
    assert report["label"] == "rebalance #1" and not report["failed"]
    changed = 0
    for layer in MOE_LAYERS:
        st = rt.layers[layer]
        row = md.physical_to_logical_map_cpu[layer]
        assert torch.equal(st.row, row) and torch.equal(st.placement.phy2log[0].cpu(), row)
        assert torch.equal(st.path.pl.phy2log[0].cpu(), row), "the layer path serves another placement"
        assert st.path.table.data_ptr() == start_ptrs[layer], "the table was replaced, not updated in place"
        assert torch.equal(st.path.table.cpu(), st.table)
        pl = Placement(row, rt.num_ranks, E)
        if pl.has_replicas:
            w = window(5)[:, layer]
            assert st.source == "scenario" and layer in report["installed"]
            assert torch.allclose(st.table, scenario_split(pl, w.double()))
            even = even_fractions(pl)[0]
            assert _summed_max_load(pl, st.table, w) <= _summed_max_load(pl, even, w) + 1e-6, \
                "the scenario LP lost to the even split on its own window"
            assert all(0 < b <= 1 for b in report["balancedness"][layer][1:])
        changed += not torch.equal(st.table, start_tables[layer])
    assert changed, "no table changed"
    assert "[moe-lb] rebalance #1: LPLB tables for" in caplog.text
    assert "Balancedness old->even->lplb: 1:" in caplog.text


def test_failing_solve_keeps_the_old_plan(eplb, monkeypatch, caplog):
    from sglang_moe_lb.plugin import rebalance

    rt, manager, recorder = eplb
    before = {layer: rt.layers[layer].table.clone() for layer in MOE_LAYERS}

    def broken(pl, window_layer, strict=True):
        raise RuntimeError("HiGHS exploded")

    monkeypatch.setattr(rebalance, "solve_table", broken)
    _run_one_rebalance(manager)  # same window -> same placement, so the old tables still apply
    for layer in MOE_LAYERS:
        assert torch.equal(rt.layers[layer].table, before[layer]), f"layer {layer} lost its table"
        assert torch.equal(rt.layers[layer].path.table.cpu(), before[layer])
        assert rt.layers[layer].source == "startup-scenario"
    assert set(rt.last_report["failed"]) >= set(MOE_LAYERS)
    assert "LPLB solve failed on layer 1 (RuntimeError: HiGHS exploded); keeping its current table" in caplog.text


def test_placement_follows_metadata_update_before_tables(eplb):
    """Between the weight move and the install, dispatch must already use the new placement."""
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata, get_global_expert_location_metadata

    rt, manager, _ = eplb
    md = get_global_expert_location_metadata()
    new = ExpertLocationMetadata.init_by_eplb(manager._model_config, window(9))
    path = rt.layers[2].path
    md.update(new, update_layer_ids=[2])
    st = rt.layers[2]
    assert st.path is path, "the placement was not installed in place"
    assert torch.equal(st.row, new.physical_to_logical_map_cpu[2])
    assert torch.equal(st.path.pl.phy2log[0].cpu(), new.physical_to_logical_map_cpu[2])
    assert st.source == "even"  # not yet solved: the even split of the new placement
    assert torch.allclose(st.path.table.cpu(), even_fractions(st.placement)[0].cpu())
    assert torch.equal(rt.layers[1].row, md.physical_to_logical_map_cpu[1])


def test_the_rebalancer_is_a_generator_the_pass_hook_advances(eplb):
    """No install before the rebalance's pass ends; the install happens at that pass's end."""
    rt, manager, recorder = eplb
    reb = rt.rebalancer
    assert reb is not None and hasattr(reb._cycle, "__next__")
    recorder.window = window(5)
    manager.on_forward_pass_end()
    manager.on_forward_pass_end()
    assert reb.count == 0 and rt.last_report["label"] == "start-up"
    manager.on_forward_pass_end()  # the rebalance runs in this pass; our hook then installs
    assert reb.count == 1 and rt.last_report["label"] == "rebalance #1"
