"""``sglang-moe-lb replay``: table, JSON, plots, and clear errors."""

import json
import subprocess
import sys

import pytest
import torch

from sglang_moe_lb.cli import main

REQUIRED = ("balancedness_mean", "balancedness_p5", "gap_to_bound_mean", "moe_time_ratio_vs_static")


def test_replay_table_json_and_plots(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    rc = main(["replay", "--steps", "4", "--tokens", "512:1024", "--upstream-waterfill-steps", "1", "--workers", "1",
               "--json", str(out_json), "--plot", str(tmp_path / "img")])
    assert rc == 0
    text = capsys.readouterr().out
    for mode in ("static", "dynamic", "upstream-waterfill*", "waterfill-cons", "waterfill-all", "lplb-rebalance",
                 "lplb ", "waterfill+lplb-all", "bound (joint LP)"):
        assert mode in text, mode
    js = json.loads(out_json.read_text())
    assert js["config"]["ep_size"] == 8 and js["config"]["num_steps"] == 4
    assert "OLMoE" in js["config"]["trace"]["provenance"]
    for name, m in js["modes"].items():
        for key in REQUIRED:
            assert isinstance(m[key], float), (name, key)
    assert isinstance(js["bound"]["balancedness_mean"], float)
    for name in ("replay_balancedness.png", "replay_worst_step.png"):
        assert (tmp_path / "img" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_on_a_recorder_dump(recorder_dumps, capsys):
    rc = main(["replay", *map(str, recorder_dumps["per_token"]), "--ep-size", "2", "--redundant-experts", "1",
               "--workers", "1", "--modes", "static,lplb,waterfill+lplb-all"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "per_token" in text and "initial placement: the recorded physical_to_logical_map" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modes", "static,nope"], "unknown mode(s) ['nope']"),
        (["--modes", "lplb"], "--modes must include 'static'"),
        (["--ep-size", "7"], "not divisible by --ep-size 7"),
        (["--serving-domains", "github,mars"], "no domain 'mars'"),
        (["--synthetic", "x.pt"], "either DUMP files or --synthetic"),
    ],
)
def test_cli_errors_name_the_flag(argv, message, capsys):
    rc = main(["replay", "--steps", "2", "--workers", "1", *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("sglang-moe-lb replay: error:") and message in err


def test_cli_error_names_the_file_and_key(tmp_path, capsys):
    p = tmp_path / "bad.pt"
    torch.save({"logical_count_typo": torch.zeros(1)}, p)
    assert main(["replay", str(p)]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "missing key 'logical_count'" in err


def test_argparse_rejects_bad_values(capsys):
    with pytest.raises(SystemExit) as e:
        main(["replay", "--tokens", "9:3"])
    assert e.value.code == 2 and "MIN:MAX" in capsys.readouterr().err


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "sglang_moe_lb", "replay", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for word in ("--ep-size", "--json", "--plot", "upstream-waterfill", "waterfill+lplb-all", "docs/replay.md"):
        assert word in r.stdout
