"""The cost-model calibration fit (benchmark/calibrate_cost_model.py) recovers a known model.

Points are generated from ``max(A W / BW, A ceil(n / tile) tile F / PEAK)`` with known
numbers (no timing), with and without 3% multiplicative noise; the fit must return them.
"""

import importlib.util
import math
import os
import random

import pytest

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
