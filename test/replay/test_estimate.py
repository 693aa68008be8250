"""The up-front run estimate: grows with every unit of work, and warns only above the threshold."""

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_moe_lb.mode import BalanceMode
from sglang_moe_lb.replay.estimate import WARN_ABOVE_S, Estimate, estimate_run, long_run_line
from sglang_moe_lb.replay.mode_names import parse_mode
from sglang_moe_lb.replay.setup import ReplayConfig

MODES = (parse_mode("static"), parse_mode("dynamic"), parse_mode("upstream-waterfill"),
         parse_mode("lplb/per-batch/global/tokens"), parse_mode(BalanceMode(lplb="plan").name))


def _setup(N=10, L=2, R=8, E=64, k=8, modes=3, sampled=0, sweep=()):
    cfg = ReplayConfig(ep_size=R, rebalance_every=5, batch_sweep=tuple(sweep))  # fixed: N alone grows
    return SimpleNamespace(cfg=cfg, N=N, L=L, R=R, E=E, k=k, P=E + 16, eval_modes=MODES[:modes],
                           sampled_steps=list(range(min(sampled, N))))


SIZES = dict(N=st.integers(1, 200), L=st.integers(1, 8), R=st.sampled_from([1, 2, 8, 16, 64, 512]),
             modes=st.integers(1, len(MODES)), sampled=st.integers(0, 4))


@settings(max_examples=60, deadline=None)
@given(base=st.fixed_dictionaries(SIZES), grow=st.sampled_from(["N", "L", "R", "modes", "sampled"]),
       tokens=st.integers(1, 1 << 16), workers=st.integers(1, 16))
def test_more_work_is_never_estimated_shorter(base, grow, tokens, workers):
    bigger = dict(base)
    bigger[grow] = {"R": base["R"] * 2, "modes": min(len(MODES), base["modes"] + 1)}.get(grow, base[grow] + 1)
    a = estimate_run(_setup(**base), tokens, workers).total_s
    b = estimate_run(_setup(**bigger), tokens, workers).total_s
    assert 0 < a <= b * (1 + 1e-12)  # equal work may differ in the last bit (summed in another order)
    assert estimate_run(_setup(**base), tokens, workers + 1).total_s <= a * (1 + 1e-12)  # more workers: never longer


def test_a_sweep_adds_work():
    plain = estimate_run(_setup(), 512, 2)
    swept = estimate_run(_setup(sweep=(1, 4096)), 512, 2)
    assert plain.sweep_s == 0 and swept.sweep_s > 0 and swept.evaluate_s == plain.evaluate_s


def test_the_line_appears_only_above_the_threshold():
    setup = _setup()
    assert long_run_line(setup, Estimate(0, 0, WARN_ABOVE_S, 0, 2)) is None
    line = long_run_line(setup, Estimate(0, 0, 600, 0, 2))
    assert line == ("sglang-moe-lb replay: this run is estimated to take ~10 min (10 steps x 2 layers x 8 ranks x "
                    "3 evaluated modes, 2 workers); fewer --steps, --modes, --ep-size or --batch-sweep sizes make it "
                    "shorter, Ctrl-C stops it")
    assert "~3 h" in long_run_line(setup, Estimate(0, 0, 3 * 3600, 0, 2))
