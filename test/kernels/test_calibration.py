"""The cost-model calibration (benchmark/calibrate_cost_model.py): the fit recovers a known model,
and the small-m sweep's pieces (cold expert groups, the per-``n`` linear fit, the file merge).

Points are generated from ``max(A W / BW, A ceil(n / tile) tile F / PEAK)`` with known
numbers (no timing), with and without 3% multiplicative noise; the fit must return them.
"""

import importlib.util
import json
import math
import os
import random

import pytest
import torch

from sglang_moe_lb.cost import CALIBRATION_FORMAT, load_calibration

_path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmark", "calibrate_cost_model.py")
_spec = importlib.util.spec_from_file_location("calibrate_cost_model", _path)
cal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cal)

W, F = 3 * 7168 * 2048 * 2.0, 2.0 * 3 * 7168 * 2048  # DeepSeek-V3 expert, bf16


def _points(bw, peak, tile, noise, rng):
    pts = []
    for A in cal.ACTIVES:
        for n in cal.NS:
            us = 1e6 * max(A * W / bw, A * math.ceil(n / tile) * tile * F / peak)
            pts.append({"experts": A, "tokens_per_expert": n, "us": us * (1 + noise * (2 * rng.random() - 1))})
    return pts


@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("noise", [0.0, 0.03])
def test_fit_recovers_the_model(tile, noise):
    bw, peak = 4.3e12, 7.5e14
    bw_f, peak_f, tile_f, err = cal.fit(_points(bw, peak, tile, noise, random.Random(tile)), W, F)
    assert tile_f == tile
    assert abs(bw_f / bw - 1) <= 2 * noise + 1e-9
    assert abs(peak_f / peak - 1) <= 2 * noise + 1e-9
    assert err["mean_rel_error"] <= noise + 1e-9


@pytest.mark.parametrize("A", cal.SMALL_ACTIVES)
def test_cold_groups_read_enough_distinct_experts(A):
    groups = cal.cold_groups(A, pool=32)
    flat = [e for g in groups for e in g]
    assert all(len(g) == A for g in groups) and len(set(flat)) == len(flat) and max(flat) < 32
    assert len(flat) >= min(cal.COLD_EXPERTS, 32) and (len(groups) == 1 or len(flat) < cal.COLD_EXPERTS + A)


def test_linear_fit_recovers_slope_intercept_and_flags_a_bent_curve():
    pts = [{"experts": A, "tokens_per_expert": n, "us": 3.0 + (10.0 + n) * A} for n in (1, 8) for A in (1, 2, 4, 8)]
    pts += [{"experts": A, "tokens_per_expert": 64, "us": 20.0 * A ** 0.5} for A in (1, 2, 4, 8)]
    pts.append({"experts": 1, "tokens_per_expert": 256, "us": 5.0})  # one A only: no fit
    fits = {f["tokens_per_expert"]: f for f in cal.linear_fit(pts)}
    assert sorted(fits) == [1, 8, 64]
    for n in (1, 8):
        assert fits[n]["us_per_expert"] == pytest.approx(10.0 + n) and fits[n]["fixed_us"] == pytest.approx(3.0)
        assert fits[n]["max_rel_dev"] == 0
    assert fits[64]["max_rel_dev"] > 0.05  # sub-linear in A: not "time ∝ active copies"


def test_small_m_sweep_on_cpu_gives_every_point(tmp_path):
    dev = torch.device("cpu")
    for method in ("per-expert", "grouped"):
        pts, stop = cal.small_m_sweep(32, 16, "bf16", method, dev, float("inf"), [1, 3], [1, 2])
        assert stop is None, stop
        assert [(p["tokens_per_expert"], p["experts"]) for p in pts] == [(1, 1), (1, 2), (3, 1), (3, 2)]
        assert all(p["us"] > 0 for p in pts)
    pts, stop = cal.small_m_sweep(32, 16, "bf16", "per-expert", dev, 0.0, [1], [1])  # budget already spent
    assert pts == [] and stop == "time budget"


def test_write_small_m_keeps_the_calibration(tmp_path):
    path = str(tmp_path / "calibration.json")
    header = {"format": CALIBRATION_FORMAT, "gpu": "x", "date": "2026-12-03", "dry_run": True}
    base = dict(header, bandwidth=4e12, peak_flops=7e14, tile_tokens=64, points=[])
    with open(path, "w") as f:
        json.dump(base, f)
    cal.write_small_m(path, {"runs": [1]}, header)
    got = load_calibration(path)  # still a calibration file the cost model reads
    assert got["small_m"] == {"runs": [1]} and got["tile_tokens"] == 64 and got["bandwidth"] == 4e12
    fresh = str(tmp_path / "fresh.json")
    cal.write_small_m(fresh, {"runs": []}, header)
    with open(fresh) as f:
        d = json.load(f)
    assert d["format"] == CALIBRATION_FORMAT and d["small_m"] == {"runs": []} and "bandwidth" not in d
