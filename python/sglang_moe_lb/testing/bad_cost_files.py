"""Damaged cost-model and gate files, for the tests that every entry point (replay, the plugin's
flags, ``sglang.Engine`` keywords) rejects each one with the same one-line message."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..cost_files import CALIBRATION_FORMAT, OVERHEADS_FORMAT

__all__ = ["GOOD_CALIBRATION", "GOOD_OVERHEADS", "bad_files"]

GOOD_CALIBRATION = {"format": CALIBRATION_FORMAT, "gpu": "test", "bandwidth": 1e12, "peak_flops": 1e14, "tile_tokens": 64}
GOOD_OVERHEADS = {"format": OVERHEADS_FORMAT, "gpu": "t", "kernels_version": "t", "date": "d",
                  "hot_path_us": {"lplb/per-batch": {"1": 30.0, "4096": 50.0}, "lplb/plan": {"1": 0.0}},
                  "collective_us": {"intra_node": 1.0, "inter_node": 2.0, "ranks_per_node": 8}}


def _edit(base: dict, path: tuple, value) -> dict:
    d = json.loads(json.dumps(base))
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return d


def bad_files(tmp: Path, kind: str) -> list[tuple[str, Path, str]]:
    """(case id, file, what the message must contain after "<file>: ") for ``kind``
    "calibration" or "overheads"; files are written under ``tmp``."""
    what = "calibration file" if kind == "calibration" else "overheads table"
    a = "a" if kind == "calibration" else "an"
    good = GOOD_CALIBRATION if kind == "calibration" else GOOD_OVERHEADS
    cases: list[tuple[str, object, str]] = [
        ("missing", None, f"no such {what}"),
        ("directory", "DIR", f"is a directory, not {a} {what}"),
        ("not-utf8", b"\xff\xfe\x00{", f"not {a} {what} (not UTF-8 text)"),
        ("not-json", "{not json", f"not a JSON {what}"),
        ("array", "[1, 2]", f"not {a} {what} (the JSON is a list, not an object)"),
        ("string", '"x"', f"not {a} {what} (the JSON is a str, not an object)"),
        ("empty-object", "{}", f"not {a} {what} (needs \"format\""),
    ]
    if kind == "calibration":
        cases += [
            ("negative", _edit(good, ("bandwidth",), -1), "'bandwidth' must be a number > 0, got -1"),
            ("zero", _edit(good, ("peak_flops",), 0), "'peak_flops' must be a number > 0, got 0"),
            ("nan", _edit(good, ("bandwidth",), math.nan), "'bandwidth' must be a number > 0, got nan"),
            ("inf", _edit(good, ("bandwidth",), math.inf), "'bandwidth' must be a number > 0, got inf"),
            ("bool", _edit(good, ("bandwidth",), True), "'bandwidth' must be a number > 0, got True"),
            ("string-value", _edit(good, ("bandwidth",), "fast"), "'bandwidth' must be a number > 0, got 'fast'"),
            ("float-tile", _edit(good, ("tile_tokens",), 64.5), "'tile_tokens' must be an integer > 0, got 64.5"),
            ("no-fit", {k: v for k, v in good.items() if k != "bandwidth"}, "'bandwidth' is missing"),
        ]
    else:
        cases += [
            ("negative", _edit(good, ("hot_path_us", "lplb/per-batch", "1"), -5),
             "hot_path_us['lplb/per-batch']['1'] must be a number >= 0, got -5"),
            ("nan", _edit(good, ("hot_path_us", "lplb/per-batch", "1"), math.nan),
             "hot_path_us['lplb/per-batch']['1'] must be a number >= 0, got nan"),
            ("bool", _edit(good, ("hot_path_us", "lplb/per-batch", "1"), True),
             "hot_path_us['lplb/per-batch']['1'] must be a number >= 0, got True"),
            ("empty-hot-path", _edit(good, ("hot_path_us",), {}), "'hot_path_us' must be a non-empty object"),
            ("empty-row", _edit(good, ("hot_path_us", "lplb/per-batch"), {}),
             "hot_path_us['lplb/per-batch'] must be a non-empty object of tokens -> µs"),
            ("bad-size", _edit(good, ("hot_path_us", "lplb/per-batch"), {"0": 1.0}),
             "hot_path_us['lplb/per-batch'] has a batch size '0'; sizes are integers >= 1"),
            ("negative-collective", _edit(good, ("collective_us", "intra_node"), -1),
             "collective_us.intra_node must be a number >= 0, got -1"),
            ("float-ranks", _edit(good, ("collective_us", "ranks_per_node"), 8.5),
             "collective_us.ranks_per_node must be an integer > 0, got 8.5"),
            ("no-collective", {k: v for k, v in good.items() if k != "collective_us"}, "'collective_us' must be an object"),
        ]
    out = []
    for name, content, message in cases:
        path = tmp / f"{kind}-{name}.json"
        if content == "DIR":
            path.mkdir(exist_ok=True)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            path.write_text(json.dumps(content))  # NaN/Infinity: Python's json writes and reads them
        out.append((name, path, message))
    return out
