"""The cost model against hand-computed roofline values."""

import json

import pytest
import torch

from sglang_moe_lb import CostModel
from sglang_moe_lb.cost import CALIBRATION_FORMAT, CostModelError, expert_shape

# Round numbers: 10 µs to read one copy, 100 µs per 128-token tile.
CM = CostModel(weight_bytes=44e6, flops_per_token=1e6, bandwidth=4.4e12, peak_flops=1.28e12, tile_tokens=128)


def test_tiles_and_rank_time_by_hand():
    q = torch.tensor([0, 1, 128, 129])
    assert CM.tiles(q).tolist() == [0, 1, 1, 2]
    assert CM.weight_read_us == pytest.approx(10.0)
    assert CM.tile_us == pytest.approx(100.0)
    # rank 0: 1 active copy, 1 tile -> max(10, 100); rank 1: 2 copies, 3 tiles -> max(20, 300)
    assert CM.rank_time(q, 2).tolist() == pytest.approx([100.0, 300.0])
    assert float(CM.layer_time(q, 2)) == pytest.approx(300.0)


def test_memory_bound_when_tiles_are_cheap():
    cm = CostModel(weight_bytes=44e6, flops_per_token=1e3, bandwidth=4.4e12, peak_flops=1.28e12, tile_tokens=64)
    # tile = 64 * 1e3 / 1.28e12 s = 0.05 µs; 3 active copies read 30 µs, 5 tiles cost 0.25 µs
    q = torch.tensor([[5, 70, 1, 0]])
    assert cm.rank_time(q, 4)[0].tolist() == pytest.approx([30.0])


def test_for_model_deepseek_v3_fp8_on_h200():
    cm = CostModel.for_model({"hidden_size": 7168, "moe_intermediate_size": 2048}, "H200", "fp8")
    assert cm.weight_bytes == 44040192  # 3 * 7168 * 2048 parameters, one byte each
    assert cm.flops_per_token == 88080384
    assert cm.weight_read_us == pytest.approx(44040192 / 4.8e12 * 1e6)
    assert cm.tile_us == pytest.approx(128 * 88080384 / 1979e12 * 1e6)
    bf = CostModel.for_model({"hidden_size": 7168, "moe_intermediate_size": 2048}, "H200", "bf16")
    assert bf.weight_bytes == 2 * 44040192 and bf.peak_flops == 989.5e12


def test_for_model_reads_files_and_objects(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 2048, "intermediate_size": 1024}))
    assert expert_shape(tmp_path) == (2048, 1024)
    assert expert_shape(tmp_path / "config.json") == (2048, 1024)

    class Hf:
        hidden_size, moe_intermediate_size, intermediate_size = 4096, 1408, 11008

    assert expert_shape(Hf()) == (4096, 1408)  # the expert size wins over the dense FFN


def test_calibration_overrides_the_datasheet(tmp_path):
    cal = {"format": CALIBRATION_FORMAT, "gpu": "NVIDIA H200", "bandwidth": 4.0e12, "peak_flops": 600e12, "tile_tokens": 64}
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    cm = CostModel.for_model({"hidden_size": 7168, "moe_intermediate_size": 2048}, "H200", "bf16", calibration=path)
    assert (cm.bandwidth, cm.peak_flops, cm.tile_tokens) == (4.0e12, 600e12, 64)
    assert "calibration" in cm.source


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(config={"hidden_size": 7168}), "moe_intermediate_size"),
        (dict(config={"hidden_size": 1, "intermediate_size": 1}, gpu="V100"), "unknown GPU 'V100'"),
        (dict(config={"hidden_size": 1, "intermediate_size": 1}, dtype="fp4"), "unknown dtype 'fp4'"),
        (dict(config="/nonexistent/model"), "no such model config"),
    ],
)
def test_for_model_errors(kwargs, msg):
    with pytest.raises(CostModelError, match=msg):
        CostModel.for_model(**kwargs)


def test_calibration_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CostModelError, match="not a JSON calibration file"):
        CostModel.for_model({"hidden_size": 1, "intermediate_size": 1}, calibration=bad)
    bad.write_text(json.dumps({"format": CALIBRATION_FORMAT, "bandwidth": -1, "peak_flops": 1}))
    with pytest.raises(CostModelError, match="'bandwidth' must be a number > 0, got -1"):
        CostModel.for_model({"hidden_size": 1, "intermediate_size": 1}, calibration=bad)
    bad.write_text(json.dumps({"bandwidth": 1, "peak_flops": 1}))
    with pytest.raises(CostModelError, match="not a calibration file"):
        CostModel.for_model({"hidden_size": 1, "intermediate_size": 1}, calibration=bad)


def test_constructor_errors():
    with pytest.raises(CostModelError, match="bandwidth must be a positive finite number"):
        CostModel(weight_bytes=1, flops_per_token=1, bandwidth=0, peak_flops=1)
    with pytest.raises(CostModelError, match="tile_tokens must be a positive int"):
        CostModel(weight_bytes=1, flops_per_token=1, bandwidth=1, peak_flops=1, tile_tokens=0)
