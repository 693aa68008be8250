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

from sglang_moe_lb.plugin.options import ERRORS, WARNINGS

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
    assert "--moe-lb {off,waterfill,lplb,waterfill+lplb}" in out
    for flag in ("--moe-lb-waterfill-candidates", "--moe-lb-waterfill-sync", "--moe-lb-lplb-schedule"):
        assert flag in out


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
    assert "[--moe-lb {off,waterfill,lplb,waterfill+lplb}]" in proc.stderr


def test_parse_lplb_and_carry_to_children(plugin):
    sa = parse("--moe-lb", "lplb", *EP4, *REDUNDANT)
    opts = sa._moe_lb
    assert (opts.mode, opts.lplb_schedule) == ("lplb", "rebalance-only")
    assert sa.ep_dispatch_algorithm == "dynamic" and not sa.enable_waterfill
    child = pickle.loads(pickle.dumps(sa))  # how SGLang hands ServerArgs to spawned schedulers
    assert child._moe_lb == opts


def test_parse_waterfill_turns_on_the_fused_layout(plugin):
    sa = parse("--moe-lb", "waterfill+lplb", "--moe-lb-lplb-schedule", "per-batch",
               "--moe-lb-waterfill-candidates", "all_rank", *DEEPEP4, *REDUNDANT)
    assert sa._moe_lb.joint and sa._moe_lb.waterfill_candidates == "all_rank"
    assert sa.enable_waterfill


def test_default_is_off_and_changes_nothing(plugin):
    sa = parse(*EP4)
    assert sa._moe_lb.mode == "off" and sa.ep_dispatch_algorithm is None and not sa.enable_waterfill


@pytest.mark.parametrize("flags, needle", [
    (["--moe-lb", "lpbl"], "argument --moe-lb: invalid choice: 'lpbl'"),
    (["--moe-lb", "waterfill", "--moe-lb-waterfill-sync", "sometimes"],
     "argument --moe-lb-waterfill-sync: invalid choice: 'sometimes'"),
    (["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "always"],
     "argument --moe-lb-lplb-schedule: invalid choice: 'always'"),
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
    assert sa._moe_lb.mode == "off" and sa._moe_lb.requested == "lplb"
    assert sa2._moe_lb.mode == "waterfill"
    assert WARNINGS["no_redundant"].format(mode="lplb", rest="") in log
    assert WARNINGS["no_redundant"].format(mode="waterfill+lplb", rest="; Waterfill stays on") in log


def test_ignored_sub_option_warns(plugin, capsys):
    parse("--moe-lb", "lplb", "--moe-lb-waterfill-sync", "dynamic", *EP4, *REDUNDANT)
    parse("--moe-lb", "waterfill+lplb", "--moe-lb-lplb-schedule", "per-batch", "--moe-lb-waterfill-sync", "static",
          *DEEPEP4, *REDUNDANT)
    log = capsys.readouterr().err
    assert "--moe-lb-waterfill-sync is ignored with --moe-lb lplb: it only applies to Waterfill" in log
    assert "--moe-lb-waterfill-sync is ignored with --moe-lb waterfill+lplb: per-batch LPLB" in log


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


@pytest.mark.parametrize("mode, flags", [("lplb", [*EP4, *REDUNDANT]), ("waterfill", DEEPEP4)])
def test_cuda_graphs_need_kernels_or_disabled_graphs(plugin, capsys, mode, flags):
    flags = ["--moe-lb", mode, "--device", "cuda", *flags]
    err = expect_exit(capsys, *flags, resolve=True)
    assert ERRORS["cuda_graph"].format(mode=mode) in err
    for off in (["--disable-cuda-graph"], ["--cuda-graph-backend-decode", "disabled"],
                ["--cuda-graph-config", '{"decode": {"backend": "disabled"}}']):
        sa = parse(*flags, *off)
        sa.resolve_once()
        assert sa._moe_lb.mode == mode
    prefill_graph = ["--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "breakable"]
    assert ERRORS["cuda_graph"].format(mode=mode) in expect_exit(capsys, *flags, *prefill_graph, resolve=True)


def test_ep_size_one_turns_the_plugin_off(plugin, capsys):
    sa = parse("--moe-lb", "lplb", "--ep-num-redundant-experts", "4")  # (SGLang's EPLB itself needs EP > 1)
    sa.resolve_once()
    assert sa._moe_lb.mode == "off"
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
