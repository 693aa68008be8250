"""The one reader and checker of the files the cost model and the gate take.

Three kinds, each read by ``replay`` (``--cost-model-config``, ``--calibration``,
``--overheads``), the plugin (``--moe-lb-calibration``, ``--moe-lb-overheads``, the model's
config) and ``sglang.Engine(moe_lb_...=...)`` through the same functions here:

* a model config (``config.json``: ``hidden_size`` and the expert's intermediate size);
* a calibration file (``sglang-moe-lb-calibration/1``: measured bandwidth, matrix rate, tile);
* an overheads table (``sglang-moe-lb-overheads/1``: hot-path µs per mode and batch size,
  collective µs).

Every problem is one ``CostFileError`` (a ``ValueError``) whose message starts with the file and
says what is wrong: missing, a directory, unreadable, not UTF-8, not JSON, not a JSON object,
the wrong format, or a value that is missing, of the wrong type (a boolean is not a number),
negative, zero where it must be positive, NaN or infinite. Callers prefix the flag.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["CostFileError", "read_json_object", "check_calibration", "check_overheads", "CALIBRATION_FORMAT",
           "OVERHEADS_FORMAT"]

CALIBRATION_FORMAT = "sglang-moe-lb-calibration/1"
OVERHEADS_FORMAT = "sglang-moe-lb-overheads/1"


class CostFileError(ValueError):
    """A cost-model or gate file that cannot be used; the message names the file and the problem."""


def _a(what: str) -> str:
    return ("an " if what[:1] in "aeiou" else "a ") + what


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in ``path``; ``what`` names the kind of file in messages ("calibration file")."""
    p = Path(path)
    where = str(path)
    if not where:
        raise CostFileError(f"an empty path was given for the {what}")
    if not p.exists():
        raise CostFileError(f"{where}: no such {what}")
    if p.is_dir():
        raise CostFileError(f"{where}: is a directory, not {_a(what)}")
    try:
        text = p.read_bytes().decode("utf-8")
    except PermissionError:
        raise CostFileError(f"{where}: cannot read the {what} (permission denied)") from None
    except OSError as err:
        raise CostFileError(f"{where}: cannot read the {what} ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise CostFileError(f"{where}: not {_a(what)} (not UTF-8 text)") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as err:
        raise CostFileError(f"{where}: not a JSON {what} ({err})") from None
    if not isinstance(d, dict):
        raise CostFileError(f"{where}: not {_a(what)} (the JSON is a {type(d).__name__}, not an object)")
    return d


def _number(where: str, key: str, v, *, positive: bool, integer: bool = False) -> float:
    kind = "an integer" if integer else "a number"
    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int))
    if bad or not math.isfinite(v) or (v <= 0 if positive else v < 0):
        need = "> 0" if positive else ">= 0"
        raise CostFileError(f"{where}: {key} must be {kind} {need}, got {v!r}")
    return v


def check_calibration(d: dict, where: str) -> dict:
    """A calibration dict checked (``format``, positive finite ``bandwidth`` / ``peak_flops``, a
    positive int ``tile_tokens`` when given); returns it."""
    if not isinstance(d, dict) or d.get("format") != CALIBRATION_FORMAT:
        raise CostFileError(f"{where}: not a calibration file (needs \"format\": \"{CALIBRATION_FORMAT}\")")
    for key in ("bandwidth", "peak_flops"):
        if key not in d:
            raise CostFileError(f"{where}: '{key}' is missing (a calibration file from a dry run has no fit)")
        _number(where, f"'{key}'", d[key], positive=True)
    if "tile_tokens" in d:
        _number(where, "'tile_tokens'", d["tile_tokens"], positive=True, integer=True)
    return d


def check_overheads(d: dict, where: str) -> dict:
    """An overheads dict checked; returns ``{"hot_path": {key: {tokens: µs}}, "intra": µs,
    "inter": µs, "ranks_per_node": int, "source": str}`` with ints and floats."""
    if not isinstance(d, dict) or d.get("format") != OVERHEADS_FORMAT:
        raise CostFileError(f"{where}: not an overheads table (needs \"format\": \"{OVERHEADS_FORMAT}\")")
    hot = d.get("hot_path_us")
    if not isinstance(hot, dict) or not hot:
        raise CostFileError(f"{where}: 'hot_path_us' must be a non-empty object of mode -> {{tokens: µs}}")
    out: dict = {}
    for key, pts in hot.items():
        if not isinstance(pts, dict) or not pts:
            raise CostFileError(f"{where}: hot_path_us[{key!r}] must be a non-empty object of tokens -> µs")
        row = {}
        for t, us in pts.items():
            try:
                n = int(t)
            except (TypeError, ValueError):
                n = 0
            if str(n) != str(t).strip() or n < 1:
                raise CostFileError(f"{where}: hot_path_us[{key!r}] has a batch size {t!r}; sizes are integers >= 1")
            row[n] = float(_number(where, f"hot_path_us[{key!r}][{t!r}]", us, positive=False))
        out[key] = row
    col = d.get("collective_us")
    if not isinstance(col, dict):
        raise CostFileError(f"{where}: 'collective_us' must be an object with intra_node, inter_node, ranks_per_node")
    for key in ("intra_node", "inter_node", "ranks_per_node"):
        if key not in col:
            raise CostFileError(f"{where}: collective_us.{key} is missing")
    intra = float(_number(where, "collective_us.intra_node", col["intra_node"], positive=False))
    inter = float(_number(where, "collective_us.inter_node", col["inter_node"], positive=False))
    rpn = int(_number(where, "collective_us.ranks_per_node", col["ranks_per_node"], positive=True, integer=True))
    source = " ".join(str(d.get(k, "?")) for k in ("gpu", "kernels_version", "date"))
    return {"hot_path": out, "intra": intra, "inter": inter, "ranks_per_node": rpn, "source": source}
