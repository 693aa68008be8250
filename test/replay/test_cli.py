"""``sglang-moe-lb replay``: table, JSON (sweep schema), plots, and bad input by class."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_moe_lb.cli import main
from sglang_moe_lb.mode import BalanceMode

REQUIRED = ("balancedness_mean", "balancedness_p5", "gap_to_bound_mean", "moe_time_ratio_vs_static",
            "time_vs_static", "overhead_us_per_layer", "tile_balancedness")
SWEEP_MODES = ("static,dynamic,upstream-waterfill,lplb/plan,lplb/per-batch/global/tiles,lplb/per-batch/local/tokens/gate,"
               "lplb")


def test_replay_table_json_sweep_and_plots(tmp_path, capsys):
    out_json = tmp_path / "sub" / "r.json"  # a directory that does not exist yet is created
    rc = main(["replay", "--steps", "4", "--tokens", "512:1024", "--upstream-waterfill-steps", "1", "--workers", "1",
               "--modes", SWEEP_MODES, "--batch-sweep", "1,64", "--sweep-steps", "1",
               "--json", str(out_json), "--plot", str(tmp_path / "img")])
    assert rc == 0
    text = capsys.readouterr().out
    for mode in ("static", "dynamic", "upstream-waterfill*", "lplb/plan", "lplb/per-batch/global/tiles",
                 BalanceMode.from_flag("lplb").name,
                 "bound (joint LP)", "modelled MoE-layer time with overhead / SGLang static", "preset olmoe"):
        assert mode in text, mode
    js = json.loads(out_json.read_text())
    assert js["config"]["ep_size"] == 8 and js["config"]["num_steps"] == 4
    assert "OLMoE" in js["config"]["trace"]["provenance"]
    for name, m in js["modes"].items():
        for key in REQUIRED:
            assert isinstance(m[key], float), (name, key)
    assert isinstance(js["bound"]["balancedness_mean"], float)
    # The sweep schema an outside check reads.
    assert [row["tokens_per_rank"] for row in js["sweep"]] == [1, 64]
    for row in js["sweep"]:
        assert isinstance(row["tokens_per_rank"], int)
        assert row["server_default"] == BalanceMode.from_flag("lplb").name
        assert {"static", "dynamic", "upstream-waterfill"} <= set(row["modes"])
        for name, m in row["modes"].items():
            for key in ("time_vs_static", "overhead_us_per_layer", "tile_balancedness"):
                assert isinstance(m[key], float), (row["tokens_per_rank"], name, key)
        assert row["modes"]["static"]["time_vs_static"] == 1.0
        assert row["modes"]["static"]["overhead_us_per_layer"] == 0.0
        gated = row["modes"]["lplb/per-batch/local/tokens/gate"]  # OLMoE's tiny experts: never worth 36 µs
        assert gated["time_vs_static"] == 1.0 and gated["overhead_us_per_layer"] == 0.0 and not gated["gate_open"]
        # the server default: closed, it is the plan (no kernels, no overhead until measured)
        default = row["modes"][BalanceMode.from_flag("lplb").name]
        assert not default["gate_open"] and default["overhead_us_per_layer"] == 0.0
        assert default["time_vs_static"] == row["modes"]["lplb/plan"]["time_vs_static"]
    for name in ("replay_balancedness.png", "replay_worst_step.png", "replay_sweep.png"):
        assert (tmp_path / "img" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_on_a_recorder_dump(recorder_dumps, capsys):
    rc = main(["replay", *map(str, recorder_dumps["per_token"]), "--ep-size", "2", "--redundant-experts", "1",
               "--workers", "1", "--modes", "static,lplb/per-batch/global/tokens,waterfill+lplb/per-batch/local/tokens/all_rank"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "per_token" in text and "initial placement: the recorded physical_to_logical_map" in text
    assert "preset deepseek-v3" in text  # dumps default to the DeepSeek-V3 expert shape


def _error(argv, capsys) -> str:
    """Run replay with bad input; it must fail with exit 2 and one line, before any work."""
    import sglang_moe_lb.replay.simulate as sim

    def no_work(*a, **k):
        raise AssertionError("work started before the input was checked")

    orig = sim.run_replay
    sim.run_replay = no_work
    try:
        try:
            rc = main(["replay", "--workers", "1", *argv])
        except SystemExit as e:  # argparse: usage line + one error line
            rc = e.code
    finally:
        sim.run_replay = orig
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(("sglang-moe-lb replay: error:", "sglang-moe-lb replay: error", "usage:")) or ": error:" in last
    return last


@pytest.mark.parametrize("argv, message", [
    # flag values
    (["--modes", "static,nope"], "first part must be one of"),
    (["--modes", "lplb-rebalance"], "renamed: use 'lplb/plan'"),
    (["--modes", "static,lplb/table"], "the table schedule is gone"),
    (["--modes", "lplb"], "--modes must include 'static'"),
    (["--placement", "best"], "invalid choice: 'best'"),
    (["--plan-refresh", "-1"], "expected an integer >= 0"),
    (["--plan-window", "0"], "expected an integer >= 1"),
    (["--modes", "static,static"], "given twice"),
    (["--ep-size", "7"], "not divisible by --ep-size 7"),
    (["--eplb-algorithm", "best"], "--eplb-algorithm must be one of SGLang's auto, deepseek"),
    (["--num-groups", "5"], "--num-groups 5 must divide the 64 experts"),
    (["--nnodes", "3"], "--nnodes 3 must divide --ep-size 8"),
    (["--serving-domains", "github,mars"], "no domain 'mars'"),
    (["--tokens", "1000000000"], "--tokens: one batch of 1000000000 tokens"),
    (["--batch-sweep", "1,100000000"], "--batch-sweep 100000000: one batch"),
    (["--batch-sweep", "0"], "tokens per rank must be >= 1"),
    (["--batch-sweep", "4,4"], "a size is given twice"),
    (["--batch-sweep", "a,b"], "expected comma-separated tokens per rank"),
    (["--synthetic", "--experts", "100000", "--layers", "20", "--steps", "100000", "--tokens", "16"],
     "the popularity walk needs"),
    (["--synthetic", "--top-k", "9", "--experts", "4"], "--top-k 9 must be at most --experts 4"),
    (["--synthetic", "--shift-at", "99"], "--shift-at 99 is beyond the last step"),
    (["--upstream-waterfill-steps", "-2"], "expected an integer >= -1"),
    (["--gpu", "T4"], "--gpu must be one of H200"),
    (["--dtype", "fp7"], "--dtype must be one of"),
    (["--cost-model-config", "deepseekv3"], "neither a preset (olmoe, deepseek-v3, qwen1.5-moe, mixtral)"),
    (["--tile-tokens", "0"], "expected an integer >= 1"),
    (["--expected-gain", "2"], "expected a number in [0, 1]"),
    (["--collective-us", "-1"], "expected a number >= 0"),
    # flags of another source would be ignored
    (["--experts", "32"], "--experts applies to --synthetic only"),
    (["--top-k", "4"], "--top-k: the bundled data has the top-k of its model"),
    (["--synthetic", "--model", "mixtral"], "--model applies to the bundled data only"),
    (["--synthetic", "x.pt"], "either DUMP files or --synthetic"),
    # non-finite generator knobs, empty names, seeds out of range: never silently a default
    (["--synthetic", "--skew", "inf"], "argument --skew: expected a finite number, got inf"),
    (["--synthetic", "--drift", "nan"], "argument --drift: expected a finite number, got nan"),
    (["--collective-us", "inf"], "argument --collective-us: expected a finite number, got inf"),
    (["--model", ""], "argument --model: expected a non-empty value"),
    (["--calibration-domain", " "], "argument --calibration-domain: expected a non-empty value"),
    (["--cost-model-config", ""], "argument --cost-model-config: expected a non-empty value"),
    (["--overheads", ""], "argument --overheads: expected a non-empty value"),
    (["--json", ""], "argument --json: expected a non-empty value"),
    ([""], "argument DUMP: expected a non-empty value"),
    (["--seed", str(2**70)], f"argument --seed: expected an integer in [0, {2**63 - 1}], got {2**70}"),
    (["--seed", "-1"], f"argument --seed: expected an integer in [0, {2**63 - 1}], got -1"),
])
def test_bad_flags_fail_before_any_work(argv, message, capsys):
    assert message in _error(argv, capsys)


def test_bad_files_fail_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text("{not json")
    assert "--cost-model-config" in _error(["--cost-model-config", str(cfg)], capsys)
    assert "no such calibration file" in _error(["--calibration", str(tmp_path / "none.json")], capsys)
    ov = tmp_path / "ov.json"
    ov.write_text(json.dumps({"format": "other"}))
    assert "--overheads" in _error(["--overheads", str(ov)], capsys)
    ov.write_text(json.dumps({"format": "sglang-moe-lb-overheads/1", "gpu": "x", "kernels_version": "x", "date": "x",
                              "hot_path_us": {"lplb/plan": {"1": 1.0}},
                              "collective_us": {"intra_node": 1, "inter_node": 1, "ranks_per_node": 8}}))
    assert "no measured hot-path time for" in _error(["--overheads", str(ov)], capsys)


def test_output_paths_are_checked_first(tmp_path, capsys):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    assert "is a directory" in _error(["--json", str(tmp_path)], capsys)
    assert "is not a directory" in _error(["--json", str(a_file / "r.json")], capsys)
    assert "exists and is not a directory" in _error(["--plot", str(a_file)], capsys)
    assert "is not a directory" in _error(["--plot", str(a_file / "img")], capsys)
    assert "is also a --plot output" in _error(["--plot", str(tmp_path), "--json", str(tmp_path / "replay_sweep.png")], capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_is_rejected(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert "not writable" in _error(["--json", str(ro / "r.json")], capsys)


def test_bad_dumps_name_the_file(tmp_path, recorder_dumps, capsys):
    p = tmp_path / "bad.pt"
    torch.save({"logical_count_typo": torch.zeros(1)}, p)
    err = _error([str(p)], capsys)
    assert str(p) in err and "missing key 'logical_count'" in err
    f = recorder_dumps["stat"][0]
    assert "given twice" in _error([str(f), str(f)], capsys)
    assert "--tokens applies to the bundled data" in _error([str(f), "--tokens", "64"], capsys)
    tok = [str(x) for x in recorder_dumps["per_token"]]
    assert "--top-k 1 would drop routed experts" in _error([*tok, "--top-k", "1", "--ep-size", "2",
                                                            "--redundant-experts", "1"], capsys)


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "sglang_moe_lb", "replay", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for word in ("--ep-size", "--json", "--plot", "upstream-waterfill", "waterfill+lplb/per-batch/global/tokens/all_rank",
                 "--batch-sweep", "--cost-model-config", BalanceMode.from_flag("lplb").name, "docs/replay.md"):
        assert word in r.stdout, word


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signals_exit_quietly_without_leftover_workers(sig, code, word):
    """Ctrl-C reaches the whole process group, SIGTERM only the parent: both end in one line."""
    env = dict(os.environ, TRITON_INTERPRET="1")

    def interactive_signals():
        # As from an interactive shell: an ignored SIGINT (e.g. inherited by a background job,
        # or from whatever ran earlier in this test process) would stay ignored across exec.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    p = subprocess.Popen([sys.executable, "-m", "sglang_moe_lb", "replay", "--no-progress", "--workers", "2",
                          "--upstream-waterfill-steps", "-1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, start_new_session=True, preexec_fn=interactive_signals)
    try:
        workers = _wait_for_workers(p, 2)
        time.sleep(0.5)
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)
        else:
            os.kill(p.pid, sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == code, err
    assert _last_line_only(err) == f"sglang-moe-lb replay: {word}", err
    time.sleep(0.5)
    assert not [w for w in workers if _alive(w)], "worker processes left behind"


ESTIMATE_LINE = "sglang-moe-lb replay: this run is estimated to take ~"


def _last_line_only(err: str) -> str:
    """stderr's last line; every other line may only be the up-front estimate of a long run."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert all(line.startswith(ESTIMATE_LINE) for line in lines[:-1]), err
    return lines[-1] if lines else ""


def _interactive_signals():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start_replay(*argv: str) -> subprocess.Popen:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.Popen([sys.executable, "-m", "sglang_moe_lb", "replay", "--no-progress", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=_interactive_signals)


def test_a_killed_worker_ends_replay_in_one_line():
    """The OOM killer's SIGKILL on a worker: one line naming it, exit 1, no hang, no worker left."""
    p = _start_replay("--workers", "2", "--upstream-waterfill-steps", "-1")
    try:
        workers = _wait_for_workers(p, 2)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        out, err = p.communicate(timeout=60)  # the old multiprocessing.Pool waited here forever
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 1, err
    last = _last_line_only(err)
    assert last.startswith("sglang-moe-lb replay: error: a worker process died (killed by signal 9 (SIGKILL); "
                           "out of memory?); rerun with fewer --workers"), err
    time.sleep(0.5)
    assert not [w for w in workers if _alive(w)], "worker processes left behind"


def _wait_for_workers(p: subprocess.Popen, n: int, timeout: float = 90) -> set[int]:
    """The replay's worker pids, once it has started ``n`` of them (fails if it never does)."""
    workers: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(workers) < n and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
        workers = _children(p.pid)
    assert len(workers) >= n, "the replay never started its workers"
    return workers


def _wait_for_library(pid: int, name: str, timeout: float = 120) -> bool:
    """Poll until the process has mapped a shared library ``name`` (it is importing that package)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if name in Path(f"/proc/{pid}/maps").read_text():
                return True
        except OSError:
            return False
        time.sleep(0.01)
    return False


def _cli_import_loads_torch() -> bool:
    code = "import sys, sglang_moe_lb.cli; print('torch' in sys.modules)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip() == "True"


@pytest.mark.parametrize("library", ["libtorch_cpu.so", "libtriton.so"])
def test_ctrl_c_while_modules_import_is_quiet(library):
    """A Ctrl-C in the first seconds, while torch (then SGLang and Triton) import, is the same one
    line and exit 130 as later. ``cli.py`` catches it from its first line: importing the package
    ``sglang_moe_lb`` loads no torch (its names are lazy), so nothing heavy runs before that."""
    assert not _cli_import_loads_torch(), "import sglang_moe_lb.cli loads torch before cli.py can catch Ctrl-C"
    p = _start_replay("--workers", "1")
    try:
        assert _wait_for_library(p.pid, library), f"{library} never loaded"
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert "Traceback" not in err, err
    assert p.returncode == 130, err
    assert err.strip() == "sglang-moe-lb replay: interrupted", err


class _Accepted(BaseException):
    """The input passed every check and the work would start."""


@settings(max_examples=15, deadline=None)
@given(
    source=st.sampled_from([[], ["--synthetic"]]),
    ep=st.sampled_from(["1", "2", "3", "4", "8"]),
    red=st.sampled_from(["0", "1", "4", "16", "60"]),
    groups=st.sampled_from([[], ["--num-groups", "1"], ["--num-groups", "4"], ["--num-groups", "3"]]),
    nnodes=st.sampled_from([[], ["--nnodes", "2"]]),
    algo=st.sampled_from(["auto", "deepseek", "deepseek_hierarchical", "deepseek_vec", "elasticity_aware", "x"]),
    extra=st.sampled_from([[], ["--experts", "4", "--top-k", "4", "--layers", "1"], ["--window", "1000"],
                           ["--rebalance-every", "0"], ["--init-placement", "recorded"], ["--steps", "1"],
                           ["--modes", "all"], ["--tokens", "1"]]),
)
def test_no_flag_combination_ends_in_a_traceback(source, ep, red, groups, nnodes, algo, extra):
    """Either the work starts, or one error line and exit 2: never a traceback (SGLang's asserts included)."""
    import sglang_moe_lb.replay.simulate as sim

    def accepted(*a, **k):
        raise _Accepted()

    orig = sim.run_replay
    sim.run_replay = accepted
    argv = ["replay", "--workers", "1", *source, "--ep-size", ep, "--redundant-experts", red, *groups, *nnodes,
            "--eplb-algorithm", algo, *extra]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            rc = main(argv)
    except _Accepted:
        return
    except SystemExit as e:
        rc = e.code
    finally:
        sim.run_replay = orig
    err = buf.getvalue()
    assert rc == 2 and "Traceback" not in err, (argv, err)
    assert len(err.strip().splitlines()) <= 2, err  # argparse: usage + error; ours: one line


@pytest.mark.parametrize("kind, flag", [("calibration", "--calibration"), ("overheads", "--overheads")])
def test_damaged_cost_files_are_one_line_naming_flag_and_file(tmp_path, capsys, kind, flag):
    """The validator the plugin and ``Engine`` use too (cost_files.py; test/core/test_cost_files.py)."""
    from sglang_moe_lb.testing.bad_cost_files import bad_files

    for name, path, message in bad_files(tmp_path, kind):
        last = _error([flag, str(path)], capsys)
        assert last.startswith(f"sglang-moe-lb replay: error: {flag}: {path}: ") and message in last, (name, last)


def _accepted_stderr(argv, capsys) -> str:
    """Run replay until the work would start; returns what it printed on stderr up front."""
    import sglang_moe_lb.replay.simulate as sim

    def accepted(*a, **k):
        raise _Accepted()

    orig = sim.run_replay
    sim.run_replay = accepted
    try:
        with pytest.raises(_Accepted):
            main(["replay", "--workers", "1", *argv])
    finally:
        sim.run_replay = orig
    return capsys.readouterr().err


def test_a_long_run_says_so_up_front(capsys):
    err = _accepted_stderr(["--synthetic", "--steps", "4", "--ep-size", "256", "--redundant-experts", "0",
                            "--upstream-waterfill-steps", "0", "--tokens", "256"], capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ESTIMATE_LINE), err
    assert "4 steps x 2 layers x 256 ranks" in lines[0] and " min (" in lines[0], err


def test_a_short_run_says_nothing_up_front(capsys):
    err = _accepted_stderr(["--synthetic", "--steps", "2", "--experts", "8", "--top-k", "2", "--layers", "1",
                            "--ep-size", "2", "--redundant-experts", "0", "--modes", "static,lplb",
                            "--upstream-waterfill-steps", "0", "--tokens", "16"], capsys)
    assert err.strip() == ""


def test_json_is_written_whole_or_not_at_all(tmp_path):
    """A value JSON cannot hold (NaN) leaves the previous file as it was and no temporary file."""
    from sglang_moe_lb.replay.report import ReplayResult, write_json

    res = ReplayResult(config={}, modes={"static": {"balancedness_mean": float("nan")}}, bound={},
                       bound_local_shared={}, bound_routed={}, rebalance_steps=[], phases=[], sampled_steps=[],
                       notes=[], skipped={}, wall_s=1.0)
    out = tmp_path / "r.json"
    out.write_text("previous")
    with pytest.raises(ValueError):
        write_json(res, out)
    assert out.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    res.modes["static"]["balancedness_mean"] = 0.5
    write_json(res, out)
    assert json.loads(out.read_text())["modes"]["static"]["balancedness_mean"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would have made it
