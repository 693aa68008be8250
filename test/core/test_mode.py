"""BalanceMode: one vocabulary, names that read back, normalisation, errors."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_moe_lb import BalanceMode, ModeError
from sglang_moe_lb.mode import CANDIDATES, OBJECTIVES, SERVER_DEFAULTS, SYNCS

modes = st.builds(
    BalanceMode,
    lplb=st.sampled_from(["off", "table", "per-batch"]),
    lplb_sync=st.none() | st.sampled_from(SYNCS),
    objective=st.none() | st.sampled_from(OBJECTIVES),
    waterfill=st.none() | st.sampled_from(CANDIDATES),
    waterfill_sync=st.none() | st.sampled_from(SYNCS),
    gate=st.booleans(),
)


@given(modes)
def test_names_read_back(mode):
    assert BalanceMode.parse(mode.name) == mode
    # parts after the flag may come in any order
    head, *rest = mode.name.split("/")
    assert BalanceMode.parse("/".join([head] + rest[::-1])) == mode


@given(modes)
def test_irrelevant_fields_are_normalised(mode):
    if not mode.per_batch:
        assert mode.lplb_sync is None and mode.objective is None
    if mode.waterfill is None or mode.per_batch:
        assert mode.waterfill_sync is None
    assert mode.joint == (mode.waterfill is not None and mode.per_batch)
    assert mode.collective == (mode.sync == "global")


def test_examples():
    m = BalanceMode.parse("waterfill+lplb/per-batch/local/tiles/all_rank/gate")
    assert (m.lplb, m.lplb_sync, m.objective, m.waterfill, m.gate) == ("per-batch", "local", "tiles", "all_rank", True)
    assert m.flag == "waterfill+lplb" and m.joint and not m.collective
    t = BalanceMode.parse("waterfill+lplb/table/conservative/global")
    assert t.collective and not t.joint and t.waterfill_sync == "global"
    assert BalanceMode().name == "off" and not BalanceMode().active
    # sub-options that do not apply are dropped, so equal behaviour means equal modes
    assert BalanceMode(lplb="table", lplb_sync="local", objective="tiles") == BalanceMode(lplb="table")


def test_from_flag_uses_the_server_defaults():
    m = BalanceMode.from_flag("lplb")
    assert m.lplb == SERVER_DEFAULTS["schedule"]
    w = BalanceMode.from_flag("waterfill")
    assert w.waterfill == SERVER_DEFAULTS["candidates"] and w.waterfill_sync == SERVER_DEFAULTS["waterfill_sync"]
    assert BalanceMode.from_flag("off") == BalanceMode()


@pytest.mark.parametrize(
    "name, msg",
    [
        ("", "non-empty"),
        ("lplb", "name the LPLB schedule"),
        ("lplb/per-batch", "needs its sync"),
        ("lplb/table/local", "sync choice applies"),
        ("lplb/table/tiles", "objective applies to per-batch"),
        ("waterfill/local", "needs its candidates"),
        ("waterfill/all_rank", "Waterfill needs its sync"),
        ("lplb/all_rank/table", "candidates given without Waterfill"),
        ("lplb/per-batch/local/global/tokens", "one sync choice"),
        ("lplb/per-batch/local/tokens/tiles", "two values for objective"),
        ("waterfill/conservative/local/fast", "unknown part 'fast'"),
        ("lpbl/table", "first part must be one of"),
    ],
)
def test_parse_errors_name_the_bad_part(name, msg):
    with pytest.raises(ModeError, match=msg):
        BalanceMode.parse(name)


def test_constructor_errors():
    with pytest.raises(ModeError, match="lplb must be one of"):
        BalanceMode(lplb="rebalance-only")
    with pytest.raises(ModeError, match="waterfill must be one of"):
        BalanceMode(waterfill="everywhere")
    with pytest.raises(ModeError, match="gate must be a bool"):
        BalanceMode(lplb="table", gate="yes")
    with pytest.raises(ModeError, match="--moe-lb must be one of"):
        BalanceMode.from_flag("lplb+waterfill")
