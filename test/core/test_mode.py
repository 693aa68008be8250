"""BalanceMode: one vocabulary, names that read back, normalisation, errors."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sglang_moe_lb import BalanceMode, ModeError
from sglang_moe_lb.mode import CANDIDATES, OBJECTIVES, SERVER_DEFAULTS, SYNCS

modes = st.builds(
    BalanceMode,
    lplb=st.sampled_from(["off", "plan", "per-batch"]),
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
    splits = mode.lplb == "per-batch" or (mode.lplb == "plan" and mode.gate)
    assert mode.splits == splits
    if not splits:
        assert mode.lplb_sync is None and mode.objective is None
    if mode.waterfill is None or splits:
        assert mode.waterfill_sync is None
    assert mode.joint == (mode.waterfill is not None and splits)
    assert mode.collective == (mode.sync == "global")


@given(modes)
def test_opened_and_closed_forms(mode):
    """The gate chooses between two ungated forms: the per-batch split (opened) and what costs
    nothing per batch (closed: the plan for a plan schedule, SGLang static otherwise)."""
    assert not mode.opened.gate
    if not mode.gate:
        assert mode.opened == mode and mode.closed is None
        return
    if mode.lplb == "plan":
        assert mode.opened.lplb == "per-batch"
        assert (mode.opened.lplb_sync, mode.opened.objective, mode.opened.waterfill) == \
            (mode.lplb_sync, mode.objective, mode.waterfill)
        assert mode.closed == BalanceMode(lplb="plan")  # no Waterfill: the shared expert stays home
    else:
        assert mode.opened == mode.with_(gate=False) and mode.closed is None


def test_examples():
    m = BalanceMode.parse("waterfill+lplb/per-batch/local/tiles/all_rank/gate")
    assert (m.lplb, m.lplb_sync, m.objective, m.waterfill, m.gate) == ("per-batch", "local", "tiles", "all_rank", True)
    assert m.flag == "waterfill+lplb" and m.joint and not m.collective
    t = BalanceMode.parse("waterfill+lplb/plan/conservative/global")
    assert t.collective and not t.joint and t.waterfill_sync == "global"
    h = BalanceMode.parse("lplb/plan/local/tokens/gate")
    assert h.splits and not h.per_batch and h.plan and not h.collective
    assert BalanceMode().name == "off" and not BalanceMode().active
    # sub-options that do not apply are dropped, so equal behaviour means equal modes
    assert BalanceMode(lplb="plan", lplb_sync="local", objective="tiles") == BalanceMode(lplb="plan")


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
        ("lplb/plan/local", "sync choice applies"),
        ("lplb/plan/tiles", "objective applies to a per-batch split"),
        ("lplb/plan/gate", "needs its sync"),
        ("waterfill/local", "needs its candidates"),
        ("waterfill/all_rank", "Waterfill needs its sync"),
        ("lplb/all_rank/plan", "candidates given without Waterfill"),
        ("lplb/table", "unknown part 'table'"),
        ("lplb/per-batch/local/global/tokens", "one sync choice"),
        ("lplb/per-batch/local/tokens/tiles", "two values for objective"),
        ("waterfill/conservative/local/fast", "unknown part 'fast'"),
        ("lpbl/plan", "first part must be one of"),
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
        BalanceMode(lplb="plan", gate="yes")
    with pytest.raises(ModeError, match="--moe-lb must be one of"):
        BalanceMode.from_flag("lplb+waterfill")
