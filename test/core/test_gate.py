"""The gate and the overhead table against hand-computed values."""

import math

import pytest

from sglang_moe_lb import BalanceMode, CostModel
from sglang_moe_lb.gate import Gate, Overheads, uniform_layer_time

CM = CostModel(weight_bytes=44e6, flops_per_token=1e6, bandwidth=4.4e12, peak_flops=1.28e12, tile_tokens=128)  # 10 µs/copy, 100 µs/tile


def test_measured_table_reads_the_recorded_h200_numbers():
    ov = Overheads.measured()
    m = BalanceMode(lplb="per-batch", lplb_sync="local")
    assert ov.hot_path_us(m, 256) == pytest.approx(36.5)  # docs/gpu/h200_results.md, goal shape
    assert ov.hot_path_us(m, 16384) == pytest.approx(58.2)
    assert ov.hot_path_us(m, 100000) == pytest.approx(58.2)  # constant beyond the measured sizes
    # between two points: linear in log(T)
    w = (math.log(1024) - math.log(256)) / (math.log(4096) - math.log(256))
    assert ov.hot_path_us(m, 1024) == pytest.approx(36.5 + w * (50.2 - 36.5))
    # Waterfill is measured at one size and follows the LPLB curve's shape
    wf = BalanceMode(waterfill="all_rank")
    assert ov.hot_path_us(wf, 4096) == pytest.approx(10.9)
    assert ov.hot_path_us(wf, 16384) == pytest.approx(10.9 * 58.2 / 50.2)
    assert ov.hot_path_us(BalanceMode(), 4096) == 0.0


def test_collective_only_for_global_sync():
    ov = Overheads(hot_path={"lplb/per-batch": {1: 5.0}}, collective_intra_us=7.0, collective_inter_us=30.0, ranks_per_node=8)
    local = BalanceMode(lplb="per-batch", lplb_sync="local")
    glob = BalanceMode(lplb="per-batch", lplb_sync="global")
    assert ov.mode_us(local, 100, 16) == 5.0
    assert ov.mode_us(glob, 100, 8) == 12.0
    assert ov.mode_us(glob, 100, 16) == 35.0


def test_uniform_layer_time_by_hand():
    # 1 token x top-8 over 18 slots: 8 active copies, 8 tiles -> max(80, 800) µs
    assert uniform_layer_time(CM, 1, 8, 18) == pytest.approx(800.0)
    # 256 tokens x 8 = 2048 entries over 16 slots: 128 each, one tile per copy -> max(160, 1600)
    assert uniform_layer_time(CM, 256, 8, 16) == pytest.approx(1600.0)
    # with the shared slot: 17 copies, 16 + 2 tiles
    assert uniform_layer_time(CM, 256, 8, 16, shared=True) == pytest.approx(1800.0)


def test_gate_opens_where_gain_beats_overhead():
    ov = Overheads(fixed_us=100.0)
    g = Gate(BalanceMode(lplb="per-batch", lplb_sync="local", gate=True), CM, ov, top_k=8, slots_per_rank=16,
             num_ranks=8, expected_gain=0.05)
    # gain = 0.05 x layer time; 1 token: 8 tiles = 800 µs -> 40 < 100; 256 tokens: 1600 -> 80; 512: 3200 -> 160
    assert not g.open(1) and not g.open(256) and g.open(512)
    assert g.min_tokens() == 512
    ungated = Gate(BalanceMode(lplb="per-batch", lplb_sync="local"), CM, ov, 8, 16, 8)
    assert ungated.open(1)


def test_overheads_file_errors(tmp_path):
    bad = tmp_path / "o.json"
    bad.write_text('{"format": "x"}')
    with pytest.raises(ValueError, match="not an overheads table"):
        Overheads.measured(str(bad))
    with pytest.raises(KeyError, match="no measured hot-path time"):
        Overheads(hot_path={}).hot_path_us(BalanceMode(lplb="per-batch"), 10)
