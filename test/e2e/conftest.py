"""End-to-end tests against a real SGLang 0.5.23 server on CPU (the TEST AND DEMO harness).

Tests marked ``e2e`` start real servers (about 20-60 s each on 2 cores, one per mode, reused
by every test of that mode) or spawn SGLang ranks, and are skipped unless selected:
``pytest test/e2e -m e2e`` (or SGLANG_MOE_LB_E2E=1, which scripts/run_tests.sh sets).
Server logs go to SGLANG_MOE_LB_E2E_LOG_DIR if set, else to pytest's temporary dir.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

# Wall times of this session (server start, each test), printed at the end.
TIMINGS: dict[str, float] = {}
# mode -> rank-load statistics from the harness's slot log, printed at the end.
SLOT_STATS: dict[str, dict] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: starts a real SGLang server on CPU (slow; select with -m e2e)")


def _e2e_selected(config) -> bool:
    return "e2e" in (config.getoption("markexpr") or "") or os.environ.get("SGLANG_MOE_LB_E2E") == "1"


def pytest_collection_modifyitems(config, items):
    if _e2e_selected(config):
        return
    skip = pytest.mark.skip(reason="end-to-end server test: select with -m e2e or SGLANG_MOE_LB_E2E=1")
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    t0 = time.monotonic()
    yield
    if item.get_closest_marker("e2e") is not None:
        TIMINGS[f"test {item.name}"] = time.monotonic() - t0


def pytest_terminal_summary(terminalreporter):
    if SLOT_STATS:
        terminalreporter.section("e2e MoE calls at the optimal max rank load (slot log)")
        for mode, st in SLOT_STATS.items():
            terminalreporter.write_line(
                f"{mode:16s} {st['optimal']}/{st['calls']} calls; with a replicated expert in play: "
                f"{st['contested_optimal']}/{st['contested']}"
            )
    if not TIMINGS:
        return
    terminalreporter.section("e2e wall times (s)")
    for name, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{seconds:7.1f}  {name}")
    out = os.environ.get("SGLANG_MOE_LB_E2E_LOG_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "timings.json").write_text(json.dumps(TIMINGS, indent=1))


@pytest.fixture(scope="session")
def e2e_log_dir(tmp_path_factory) -> Path:
    env = os.environ.get("SGLANG_MOE_LB_E2E_LOG_DIR")
    path = Path(env) if env else tmp_path_factory.mktemp("e2e_logs")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def e2e_timings() -> dict:
    return TIMINGS


@pytest.fixture(scope="session")
def live_dumps() -> dict:
    """mode -> recorder dump written by that mode's live server (fed to replay)."""
    return {}


@pytest.fixture(scope="session")
def slot_stats() -> dict:
    return SLOT_STATS


@pytest.fixture(scope="session")
def served_logs() -> dict:
    """mode -> the server log text, kept for comparisons across modes (plugin vs fork form)."""
    return {}


@pytest.fixture(scope="session")
def greedy_results() -> dict:
    """mode -> greedy outputs, filled by the per-mode tests and compared against "off"."""
    return {}
