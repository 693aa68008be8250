"""Replay's mode names: SGLang's four, every BalanceMode by its name, and clear errors."""

import pytest

from sglang_moe_lb.mode import SERVER_DEFAULTS, BalanceMode, ModeError
from sglang_moe_lb.replay.mode_names import (
    RENAMED,
    SGLANG_MODES,
    all_mode_names,
    default_mode_names,
    parse_mode,
    parse_modes,
    server_default,
)


def test_sglang_names_and_balance_mode_names_round_trip():
    for name in SGLANG_MODES:
        m = parse_mode(name)
        assert m.sglang == name and m.balance is None and m.family == "upstream"
    for name in ("lplb/plan", "lplb/plan/local/tokens/gate", "lplb/per-batch/global/tokens", "lplb/per-batch/local/tiles/gate",
                 "waterfill/conservative/global", "waterfill+lplb/per-batch/global/tokens/all_rank"):
        m = parse_mode(name)
        assert m.balance == BalanceMode.parse(name) and m.name == name and m.family == "ours"


def test_gated_mode_runs_its_opened_and_closed_forms():
    m = parse_mode("lplb/per-batch/local/tiles/gate")
    assert m.gated and m.ungated.name == "lplb/per-batch/local/tiles" and not m.ungated.gated
    assert m.closed.name == "static" and m.closed.sglang == "static"
    h = parse_mode("waterfill+lplb/plan/local/tokens/all_rank/gate")
    assert h.ungated.name == "waterfill+lplb/per-batch/local/tokens/all_rank"
    assert h.closed.name == "lplb/plan" and h.closed.balance == BalanceMode(lplb="plan")


def test_the_server_flag_values_mean_what_moe_lb_means():
    for flag in ("lplb", "waterfill", "waterfill+lplb"):
        m = parse_mode(flag)
        assert m.balance == BalanceMode.from_flag(flag) and m.name == server_default(flag)
    assert parse_mode("off").name == "static"
    assert [m.name for m in parse_modes("static,lplb")] == ["static", server_default("lplb")]


def test_server_default_comes_from_mode_server_defaults(monkeypatch):
    assert server_default("lplb") == BalanceMode.from_flag("lplb").name
    monkeypatch.setitem(SERVER_DEFAULTS, "schedule", "per-batch")
    monkeypatch.setitem(SERVER_DEFAULTS, "lplb_sync", "local")
    monkeypatch.setitem(SERVER_DEFAULTS, "objective", "tiles")
    monkeypatch.setitem(SERVER_DEFAULTS, "gate", False)
    assert server_default("lplb") == "lplb/per-batch/local/tiles"
    assert server_default("waterfill+lplb").startswith("waterfill+lplb/per-batch/local/tiles/")
    assert server_default("lplb") in default_mode_names()  # the default set follows the defaults


def test_default_set_covers_the_brief():
    names = default_mode_names()
    for want in ("static", "dynamic", "upstream-waterfill", "lplb/plan",
                 "lplb/per-batch/global/tokens", "lplb/per-batch/global/tiles",
                 "lplb/per-batch/local/tokens", "lplb/per-batch/local/tiles",
                 "waterfill/conservative/global", "waterfill/all_rank/local",
                 "waterfill+lplb/per-batch/global/tokens/conservative", "waterfill+lplb/per-batch/local/tokens/all_rank",
                 server_default("lplb"), server_default("waterfill+lplb")):
        assert want in names, want
    assert len(set(names)) == len(names)


def test_all_is_every_mode_once():
    names = all_mode_names()
    assert len(names) == len(set(names)) == 4 + 21 + 28  # SGLang's 4; 21 ungated BalanceModes, 28 gated
    assert {parse_mode(n).name for n in names} == set(names)


@pytest.mark.parametrize("items, message", [
    (["static", "lplb-rebalance"], "renamed: use 'lplb/plan'"),
    (["static", "lplb/table"], "the table schedule is gone; plans replace it"),
    (["static", "off"], "given twice"),
    (["static", "nope"], "first part must be one of"),
    (["static", "lplb/per-batch"], "needs its sync"),
    (["static", "lplb/per-batch/global/tokens/global"], "one sync choice"),
    (["static", "lplb/global/per-batch/tokens"], "write it as 'lplb/per-batch/global/tokens'"),
    (["static", "static"], "given twice"),
    (["all", "static"], "given twice"),
    (["lplb/plan"], "must include 'static'"),
    ([], "at least one mode"),
])
def test_mode_name_errors(items, message):
    with pytest.raises(ModeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_modes(items)


def test_every_old_name_has_a_parseable_new_name():
    for old, new in RENAMED.items():
        assert parse_mode(new).name == new
        with pytest.raises(ModeError, match="renamed"):
            parse_mode(old)
