"""The flag: discovery, parsing, the trip to schedulers, and every start-up check."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from plugin_helpers import TINY, base_argv

from sglang_moe_lb import BalanceMode
from sglang_moe_lb.plugin.options import ERRORS, OPTIONS, WARNINGS

EP4 = ["--tp", "4", "--ep-size", "4"]
DEEPEP4 = ["--tp", "4", "--moe-a2a-backend", "deepep"]
REDUNDANT = ["--ep-num-redundant-experts", "4", "--enable-eplb"]


def parse(*flags):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(base_argv(*flags))


def expect_exit(capsys, *flags, resolve=False) -> str:
    with pytest.raises(SystemExit) as info:
        sa = parse(*flags)
        if resolve:
            sa.resolve_once()
    assert info.value.code == 2
    return capsys.readouterr().err


def test_entry_point_is_discovered():
    from sglang_moe_lb.plugin import register

    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "moe_lb"]
    assert len(eps) == 1 and eps[0].value == "sglang_moe_lb.plugin:register"
    assert eps[0].load() is register


def test_launch_server_help_lists_the_flag():
    """``python -m sglang.launch_server --help``: SGLang's own load_plugins() finds us."""
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True,
                         timeout=180).stdout
    assert "--moe-lb {off,lplb,waterfill,waterfill+lplb}" in out
    for o in OPTIONS:
        assert o.flag in out
    assert "--moe-lb-lplb-schedule {plan,per-batch}" in out and "--moe-lb-lplb-sync {local,global}" in out
    assert "--moe-lb-placement {auto,eplb,decode}" in out and "--moe-lb-plan-refresh PASSES" in out


def test_sglang_serve_parses_the_flag():
    """``sglang serve`` loads plugins before parsing, so it validates ``--moe-lb`` too.

    (Its ``--help`` is printed before SGLang 0.5.23 loads any plugin, so the flag is missing
    from ``sglang serve --help``; docs/usage.md says so.)
    """
    sglang = os.path.join(os.path.dirname(sys.executable), "sglang")
    proc = subprocess.run([sglang, "serve", "--model-path", str(TINY), "--device", "cpu", "--moe-lb", "lpbl"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    assert "sglang serve: error: argument --moe-lb: invalid choice: 'lpbl'" in proc.stderr
    assert "[--moe-lb {off,lplb,waterfill,waterfill+lplb}]" in proc.stderr


def test_parse_lplb_and_carry_to_children(plugin):
    sa = parse("--moe-lb", "lplb", *EP4, *REDUNDANT)
    opts = sa._moe_lb
    assert opts.mode == BalanceMode.from_flag("lplb") and opts.mode.flag == "lplb"
    assert sa.ep_dispatch_algorithm == "dynamic" and not sa.enable_waterfill
    child = pickle.loads(pickle.dumps(sa))  # how SGLang hands ServerArgs to spawned schedulers
    assert child._moe_lb == opts


def test_parse_waterfill_turns_on_the_fused_layout(plugin):
    sa = parse("--moe-lb", "waterfill+lplb", "--moe-lb-lplb-schedule", "per-batch",
               "--moe-lb-waterfill-candidates", "all_rank", *DEEPEP4, *REDUNDANT)
    assert sa._moe_lb.mode.joint and sa._moe_lb.mode.waterfill == "all_rank"
    assert sa.enable_waterfill


@pytest.mark.parametrize("name", [
    "lplb/plan", "lplb/plan/global/tiles/gate", "lplb/per-batch/local/tiles/gate", "lplb/per-batch/global/tokens",
    "waterfill/all_rank/global", "waterfill+lplb/per-batch/local/tokens/conservative",
    "waterfill+lplb/plan/all_rank/local", "waterfill+lplb/plan/local/tokens/conservative/gate",
])
def test_every_flag_reaches_the_mode(plugin, name):
    """The flags of a mode (``mode_flags``) parse back to that mode: one vocabulary."""
    from sglang_moe_lb.plugin.options import mode_flags

    want = BalanceMode.parse(name)
    flags = [*mode_flags(want), *(DEEPEP4 if want.waterfill else EP4), *REDUNDANT]
    assert parse(*flags)._moe_lb.mode == want


def test_default_is_off_and_changes_nothing(plugin):
    sa = parse(*EP4)
    assert not sa._moe_lb.active and sa.ep_dispatch_algorithm is None and not sa.enable_waterfill


@pytest.mark.parametrize("flags, needle", [
    (["--moe-lb", "lpbl"], "argument --moe-lb: invalid choice: 'lpbl'"),
    (["--moe-lb", "waterfill", "--moe-lb-waterfill-sync", "sometimes"],
     "argument --moe-lb-waterfill-sync: invalid choice: 'sometimes'"),
    (["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "always"],
     "argument --moe-lb-lplb-schedule: invalid choice: 'always'"),
    (["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "table"],  # the schedule plans replaced
     "argument --moe-lb-lplb-schedule: invalid choice: 'table' (choose from 'plan', 'per-batch')"),
    (["--moe-lb", "lplb", "--moe-lb-placement", "everywhere"],
     "argument --moe-lb-placement: invalid choice: 'everywhere' (choose from 'auto', 'eplb', 'decode')"),
    (["--moe-lb", "lplb", "--moe-lb-plan-refresh", "-1"], "--moe-lb-plan-refresh: expected a number of passes >= 0"),
    (["--moe-lb", "lplb", "--moe-lb-plan-window", "0"], "--moe-lb-plan-window: expected a number of passes >= 1"),
    (["--moe-lb", "lplb", "--moe-lb-plan-timeout", "nan"], "--moe-lb-plan-timeout: expected a number of seconds > 0"),
    (["--moe-lb", "lplb", "--moe-lb-tile-tokens", "96"], "argument --moe-lb-tile-tokens: invalid choice: 96"),
    (["--moe-lb", "lplb", "--moe-lb-expected-gain", "2"],
     "argument --moe-lb-expected-gain: expected a number in (0, 1], got '2'"),
    (["--moe-lb", "lplb", "--moe-lb-gpu", "Z80"], "argument --moe-lb-gpu: invalid choice: 'Z80'"),
])
def test_bad_values_exit(plugin, capsys, flags, needle):
    assert needle in expect_exit(capsys, *flags)


@pytest.mark.parametrize("flags, key, fmt", [
    (["--moe-lb", "lplb", "--enable-waterfill", *DEEPEP4, *REDUNDANT], "upstream_waterfill",
     dict(mode="lplb", hint="for both, use --moe-lb waterfill+lplb")),
    (["--moe-lb", "waterfill", "--enable-waterfill", *DEEPEP4], "upstream_waterfill",
     dict(mode="waterfill", hint="--moe-lb waterfill already includes Waterfill")),
    (["--moe-lb", "lplb", "--ep-dispatch-algorithm", "lp", *EP4, *REDUNDANT], "lp_dispatch", dict(mode="lplb")),
    (["--moe-lb", "waterfill", *EP4], "waterfill_a2a", dict(mode="waterfill", backend="none")),
    (["--moe-lb", "waterfill+lplb", "--moe-a2a-backend", "mooncake", "--tp", "4", *REDUNDANT], "waterfill_a2a",
     dict(mode="waterfill+lplb", backend="mooncake")),
    (["--moe-lb", "waterfill", "--disable-shared-experts-fusion", *DEEPEP4], "waterfill_fusion_disabled",
     dict(mode="waterfill")),
])
def test_bad_combinations_exit_with_documented_message(plugin, capsys, flags, key, fmt):
    err = expect_exit(capsys, *flags)
    assert ERRORS[key].format(**fmt) in err


def test_lplb_without_redundant_experts_is_a_noop_with_warning(plugin, capsys):
    # SGLang's prepare_server_args() re-installs root logging on stderr (basicConfig(force=True)).
    sa = parse("--moe-lb", "lplb", *EP4)
    sa2 = parse("--moe-lb", "waterfill+lplb", *DEEPEP4)
    log = capsys.readouterr().err
    assert sa._moe_lb.mode.flag == "off" and sa._moe_lb.requested.flag == "lplb"
    assert sa2._moe_lb.mode.flag == "waterfill"
    assert WARNINGS["no_redundant"].format(mode="lplb", rest="") in log
    assert WARNINGS["no_redundant"].format(mode="waterfill+lplb", rest="; Waterfill stays on") in log


def test_ignored_sub_option_warns(plugin, capsys):
    parse("--moe-lb", "lplb", "--moe-lb-waterfill-sync", "global", *EP4, *REDUNDANT)
    parse("--moe-lb", "waterfill+lplb", "--moe-lb-lplb-schedule", "per-batch", "--moe-lb-waterfill-sync", "local",
          *DEEPEP4, *REDUNDANT)
    parse("--moe-lb", "lplb", "--moe-lb-lplb-schedule", "plan", "--moe-lb-gate", "off", "--moe-lb-objective", "tiles",
          *EP4, *REDUNDANT)
    parse("--moe-lb", "lplb", "--moe-lb-lplb-schedule", "per-batch", "--moe-lb-gate", "off", "--moe-lb-gpu", "H100",
          "--moe-lb-placement", "decode", *EP4, *REDUNDANT)
    parse("--moe-lb-lplb-sync", "local", *EP4)
    log = capsys.readouterr().err
    assert "--moe-lb-waterfill-sync is ignored with --moe-lb lplb: it only applies to Waterfill" in log
    assert ("--moe-lb-waterfill-sync is ignored with --moe-lb waterfill+lplb: with a per-batch split, Waterfill is "
            "decided in the same split and shares --moe-lb-lplb-sync") in log
    assert ("--moe-lb-objective is ignored with --moe-lb lplb: it only applies to the per-batch split "
            "(--moe-lb-lplb-schedule per-batch, or plan with --moe-lb-gate on)") in log
    assert "--moe-lb-gpu is ignored with --moe-lb lplb: the cost model is only used by plans" in log
    assert "--moe-lb-placement is ignored with --moe-lb lplb: it only applies to --moe-lb-lplb-schedule plan" in log
    assert "--moe-lb-lplb-sync is ignored with --moe-lb off: the plugin is off" in log


def _model_dir(tmp_path, **changes):
    cfg = json.loads((TINY / "config.json").read_text())
    cfg.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_usage_doc_lists_every_message():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "usage.md").read_text()
    for key, text in {**ERRORS, **WARNINGS}.items():
        assert text in doc, f"docs/usage.md does not list the {key!r} message"
    for o in OPTIONS:  # every sub-option and each of its values
        assert f"| `{o.flag}" in doc, o.flag
        for c in o.choices or ():
            assert f"`{c}`" in doc, (o.flag, c)
    from sglang_moe_lb.mode import SERVER_DEFAULTS as d

    today = [d["schedule"], d["lplb_sync"], d["objective"], d["candidates"], d["waterfill_sync"], "on" if d["gate"] else "off"]
    from sglang_moe_lb.plugin.options import PLAN_DEFAULTS

    want = "today " + ", ".join(f"`{v}`" for v in today) + f", and `{PLAN_DEFAULTS['placement']}` placement)"
    assert want in doc, "docs/usage.md: the server defaults changed"


def test_waterfill_on_a_model_without_shared_expert_exits(plugin, capsys, tmp_path):
    model = _model_dir(tmp_path, n_shared_experts=0)
    err = expect_exit(capsys, "--model-path", model, "--moe-lb", "waterfill", *DEEPEP4, resolve=True)
    assert ERRORS["no_shared_expert"].format(mode="waterfill", arch="DeepseekV3ForCausalLM",
                                             detail="n_shared_experts=0") in err


def test_waterfill_on_a_family_without_fusion_exits(plugin, capsys, tmp_path):
    cfg = {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 64,
        "intermediate_size": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 16,
        "num_experts_per_tok": 4, "vocab_size": 512, "max_position_embeddings": 512, "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    err = expect_exit(capsys, "--model-path", str(tmp_path), "--moe-lb", "waterfill", *DEEPEP4, resolve=True)
    assert ERRORS["no_fusion_support"].format(mode="waterfill", arch="Qwen2MoeForCausalLM") in err


def _fake_seam(monkeypatch, **attrs):
    """Point the plugin's kernel seam at a stand-in module (None: a seam that is not installed)."""
    import types

    from sglang_moe_lb.plugin import hot_path

    name = "moe_lb_fake_seam_for_tests"
    if attrs is None or attrs.get("absent"):
        monkeypatch.setattr(hot_path, "KERNEL_MODULE", name + "_absent")
        return
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(hot_path, "KERNEL_MODULE", name)


class _FakePath:
    """A layer-path class that meets the contract and must not be built at start-up."""

    def __init__(self, pl, mode, *, max_tokens, topk, source_rank, device, cost=None):
        raise AssertionError("not built at start-up")

    def stats(self, topk_ids, phys_ids=None): ...

    def __call__(self, topk_ids, *, gathered=None, phys_ids=None): ...

    def update_placement(self, pl): ...

    def counters(self): ...


CUDA_LPLB = ["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "per-batch", "--moe-lb-lplb-sync", "local",
             "--moe-lb-gate", "off", "--device", "cuda", *EP4, *REDUNDANT]


@pytest.mark.parametrize("seam, needle", [
    (dict(absent=True), "moe_lb_fake_seam_for_tests_absent is not importable"),
    (dict(KERNELS_VERSION="v9", CUDA_GRAPH_SAFE=False, KernelLayerPath=_FakePath),
     "(kernels v9) does not promise CUDA-graph safety (CUDA_GRAPH_SAFE is not True)"),
    (dict(KERNELS_VERSION="v9", CUDA_GRAPH_SAFE=True, KernelLayerPath=_FakePath,
          supports=lambda m: (False, "no such mode in this set")),
     "(kernels v9) does not run lplb/per-batch/local/tokens: no such mode in this set"),
])
def test_cuda_graphs_refused_with_the_reason(plugin, capsys, monkeypatch, seam, needle):
    """Issue 10 (d): the start-up check names why graphs cannot run and which flags turn them off."""
    _fake_seam(monkeypatch, **seam)
    err = expect_exit(capsys, *CUDA_LPLB, resolve=True)
    assert "--moe-lb lplb with CUDA graphs in the decode phase: " in err and needle in err
    assert "Turn those graphs off (--cuda-graph-backend-decode disabled)" in err
    # Prefill graphs alone (decode off): the message names the prefill flag, not the decode one.
    prefill = ["--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "breakable"]
    err = expect_exit(capsys, *CUDA_LPLB, *prefill, resolve=True)
    assert "in the prefill phase" in err and "(--cuda-graph-backend-prefill disabled)" in err
    assert "--cuda-graph-backend-decode disabled)" not in err
    both = ["--cuda-graph-backend-prefill", "breakable"]
    err = expect_exit(capsys, *CUDA_LPLB, *both, resolve=True)
    assert ("in the decode and prefill phase" in err and "--cuda-graph-backend-decode disabled and "
            "--cuda-graph-backend-prefill disabled, or --disable-cuda-graph" in err)
    for off in (["--disable-cuda-graph"], ["--cuda-graph-backend-decode", "disabled"],
                ["--cuda-graph-config", '{"decode": {"backend": "disabled"}}']):
        sa = parse(*CUDA_LPLB, *off)
        sa.resolve_once()
        assert sa._moe_lb.mode.flag == "lplb"


def test_kernels_that_break_the_contract_are_not_picked(plugin, capsys, monkeypatch):
    """A seam whose class does not meet the core's layer-path contract is never picked: graphs
    are refused naming what it lacks, and the core path serves."""
    from sglang_moe_lb.layer_path import CoreLayerPath
    from sglang_moe_lb.plugin import hot_path

    class NoCounters(_FakePath):
        counters = None

    _fake_seam(monkeypatch, KERNELS_VERSION="v9", CUDA_GRAPH_SAFE=True, KernelLayerPath=NoCounters,
               supports=lambda m: (True, ""))
    err = expect_exit(capsys, *CUDA_LPLB, resolve=True)
    assert "moe_lb_fake_seam_for_tests.KernelLayerPath does not meet the layer-path contract: no method counters" in err
    assert hot_path.pick("cuda", BalanceMode.parse("lplb/per-batch/local/tokens")) is CoreLayerPath
    _fake_seam(monkeypatch, KERNELS_VERSION="v9", CUDA_GRAPH_SAFE=True, KernelLayerPath=_FakePath,
               supports=lambda m: (True, ""))
    assert hot_path.pick("cuda", BalanceMode.parse("lplb/per-batch/local/tokens")) is _FakePath
    assert hot_path.pick("cpu", BalanceMode.parse("lplb/per-batch/local/tokens")) is CoreLayerPath


def test_cuda_graphs_refused_for_tiles_name_the_token_objective(plugin, capsys, monkeypatch):
    """Kernels that run the token objective only: the error names the flag that keeps graphs on."""
    _fake_seam(monkeypatch, KERNELS_VERSION="v9", CUDA_GRAPH_SAFE=True, KernelLayerPath=_FakePath,
               supports=lambda m: (m.objective != "tiles", "token objective only"))
    tiles = ["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "per-batch", "--moe-lb-objective", "tiles",
             "--moe-lb-gate", "off", "--device", "cuda", *EP4, *REDUNDANT]
    err = expect_exit(capsys, *tiles, resolve=True)
    assert "(kernels v9) does not run lplb/per-batch/local/tiles: token objective only" in err
    assert "or use the token objective, which these kernels run under graphs (--moe-lb-objective tokens)" in err
    sa = parse(*[("tokens" if f == "tiles" else f) for f in tiles])
    sa.resolve_once()
    assert sa._moe_lb.mode == BalanceMode.parse("lplb/per-batch/local/tokens")
    # A seam that cannot run tokens either: no such hint.
    _fake_seam(monkeypatch, KERNELS_VERSION="v9", CUDA_GRAPH_SAFE=True, KernelLayerPath=_FakePath,
               supports=lambda m: (False, "nothing"))
    err = expect_exit(capsys, *tiles, resolve=True)
    assert "does not run lplb/per-batch/local/tiles: nothing" in err and "--moe-lb-objective tokens" not in err


def test_cuda_graphs_accepted_when_the_kernels_promise_safety(plugin, monkeypatch):
    """Issue 10 (d): graphs on (decode and prefill) start when the seam promises graph safety."""
    _fake_seam(monkeypatch, KERNELS_VERSION="v9", CUDA_GRAPH_SAFE=True, KernelLayerPath=_FakePath,
               supports=lambda m: (True, ""))
    sa = parse(*CUDA_LPLB, "--cuda-graph-backend-prefill", "breakable")
    sa.resolve_once()
    assert sa._moe_lb.mode == BalanceMode.parse("lplb/per-batch/local/tokens")


def test_plans_alone_run_under_cuda_graphs_without_kernels(plugin, capsys, monkeypatch):
    """A plan is one gather into fixed maps: graphs need no kernel. The gated plan (the default)
    opens the per-batch split, which does: refused without kernels, naming that form."""
    _fake_seam(monkeypatch, absent=True)
    plan = ["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "plan", "--moe-lb-gate", "off", "--device", "cuda",
            *EP4, *REDUNDANT]
    sa = parse(*plan)
    sa.resolve_once()
    assert sa._moe_lb.mode == BalanceMode(lplb="plan")
    err = expect_exit(capsys, "--moe-lb", "lplb", "--device", "cuda", *EP4, *REDUNDANT, resolve=True)
    assert "--moe-lb lplb with CUDA graphs in the decode phase" in err and "is not importable" in err


def test_redundant_expert_counts_are_checked(plugin, capsys):
    err = expect_exit(capsys, "--moe-lb", "lplb", *EP4, "--ep-num-redundant-experts", "-4")
    assert ERRORS["redundant_negative"].format(mode="lplb", n=-4) in err
    err = expect_exit(capsys, "--moe-lb", "lplb", *EP4, "--ep-num-redundant-experts", "3", "--enable-eplb", resolve=True)
    assert ERRORS["redundant_indivisible"].format(mode="lplb", experts=16, n=3, total=19, ranks=4, suggest=4) in err


def test_cost_files_are_checked_at_start_up(plugin, capsys, tmp_path):
    tiles = ["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "per-batch", "--moe-lb-objective", "tiles", *EP4, *REDUNDANT]
    err = expect_exit(capsys, *tiles, "--moe-lb-calibration", str(tmp_path / "nope.json"))
    assert f"--moe-lb-calibration: {tmp_path / 'nope.json'}: no such calibration file" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    err = expect_exit(capsys, *tiles, "--moe-lb-calibration", str(bad))
    assert f"--moe-lb-calibration: {bad}: not a calibration file" in err
    err = expect_exit(capsys, *tiles, "--moe-lb-gate", "on", "--moe-lb-overheads", str(bad))
    assert f"--moe-lb-overheads: {bad}: not an overheads table" in err
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"format": "sglang-moe-lb-calibration/1", "gpu": "test", "bandwidth": 1e12,
                               "peak_flops": 1e14, "tile_tokens": 64}))
    ov = tmp_path / "ov.json"
    ov.write_text(json.dumps({"format": "sglang-moe-lb-overheads/1", "gpu": "t", "kernels_version": "t", "date": "d",
                              "hot_path_us": {"waterfill/all_rank": {"1": 1.0}},
                              "collective_us": {"intra_node": 1, "inter_node": 2, "ranks_per_node": 8}}))
    err = expect_exit(capsys, *tiles, "--moe-lb-gate", "on", "--moe-lb-overheads", str(ov))
    assert ERRORS["overheads_key"].format(path=ov, key="lplb/per-batch", known="waterfill/all_rank") in err
    sa = parse(*tiles, "--moe-lb-calibration", str(cal), "--moe-lb-expected-gain", "0.1")
    assert sa._moe_lb.cost.calibration["bandwidth"] == 1e12 and sa._moe_lb.cost.expected_gain == 0.1


def test_cost_model_needs_the_expert_shape(plugin, capsys, tmp_path):
    model = _model_dir(tmp_path, moe_intermediate_size=0, intermediate_size=0)
    err = expect_exit(capsys, "--model-path", model, "--moe-lb", "lplb", "--moe-lb-gate", "on", *EP4, *REDUNDANT,
                      resolve=True)
    assert ERRORS["cost_model"].format(mode="lplb", detail="model config needs positive integer hidden_size and "
                                       "moe_intermediate_size (or intermediate_size); got hidden_size=64, "
                                       "moe_intermediate_size/intermediate_size=0") in err


def test_ep_size_one_turns_the_plugin_off(plugin, capsys):
    sa = parse("--moe-lb", "lplb", "--ep-num-redundant-experts", "4")  # (SGLang's EPLB itself needs EP > 1)
    sa.resolve_once()
    assert not sa._moe_lb.active
    assert WARNINGS["ep1"].format(mode="lplb") in capsys.readouterr().err


def test_model_built_without_fused_slot_fails_before_forward(rank0):
    """Load-time backstop: SGLang may still turn fusion off (e.g. for a quantisation)."""
    from plugin_helpers import make_topk
    from sglang.srt.model_executor.model_runner_components import moe_ep_setup

    from sglang_moe_lb.plugin.options import MoeLbConfigError

    _, _, mc = rank0("--moe-lb", "waterfill", *DEEPEP4, *REDUNDANT)  # hooks the forward path
    with pytest.raises(MoeLbConfigError) as info:
        moe_ep_setup.prepare_moe_topk(model=torch.nn.ModuleList([make_topk(1, waterfill=False)]), model_config=mc)
    assert str(info.value) == ERRORS["fusion_off_at_load"].format(mode="waterfill")
