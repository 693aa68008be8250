"""The one validator of cost-model and gate files (``cost_files``): every damaged file is one
``CostFileError`` naming the file and the problem, never a traceback from deeper down or a
value taken silently (a negative overhead once made replay call a mode "x-0.19 of static")."""

from __future__ import annotations

import pytest

from sglang_moe_lb.cost import CostModelError, load_calibration
from sglang_moe_lb.cost_files import CostFileError
from sglang_moe_lb.gate import Overheads
from sglang_moe_lb.testing.bad_cost_files import GOOD_CALIBRATION, GOOD_OVERHEADS, bad_files


@pytest.mark.parametrize("kind", ["calibration", "overheads"])
def test_every_damaged_file_is_one_clear_error(tmp_path, kind):
    cases = bad_files(tmp_path, kind)
    assert len(cases) >= 14
    for name, path, message in cases:
        with pytest.raises((CostFileError, CostModelError)) as info:
            load_calibration(path) if kind == "calibration" else Overheads.measured(path)
        text = str(info.value)
        assert "\n" not in text, name
        assert text.startswith(f"{path}: ") and message in text, f"{name}: {text}"


def test_the_good_files_load(tmp_path):
    import json

    cal, ov = tmp_path / "cal.json", tmp_path / "ov.json"
    cal.write_text(json.dumps(GOOD_CALIBRATION))
    ov.write_text(json.dumps(GOOD_OVERHEADS))
    assert load_calibration(cal)["bandwidth"] == 1e12
    o = Overheads.measured(ov)
    assert o.hot_path["lplb/per-batch"] == {1: 30.0, 4096: 50.0} and o.collective_intra_us == 1.0 and o.ranks_per_node == 8


def test_an_empty_path_is_an_error_not_the_current_directory():
    with pytest.raises(CostFileError, match="an empty path was given for the overheads table"):
        Overheads.measured("")
