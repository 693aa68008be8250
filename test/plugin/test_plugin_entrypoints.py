"""Every way in: ``sglang.Engine(moe_lb=...)``, the touch-point manifest, ``doctor``, and ``register()``
failing clearly on an SGLang without what we hook.

The Engine runs for real up to the point where it would spawn processes (its
``_launch_subprocesses`` is replaced in the test by one that resolves the ``ServerArgs``, as
the real one does first, and stops).
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_helpers import TINY

from sglang_moe_lb import BalanceMode
from sglang_moe_lb.plugin import manifest
from sglang_moe_lb.plugin.options import ERRORS, OPTIONS, MoeLbConfigError

ROOT = Path(__file__).resolve().parents[2]
EP4 = dict(tp_size=4, ep_size=4, ep_num_redundant_experts=4, enable_eplb=True)


class _Launched(Exception):
    def __init__(self, server_args):
        self.server_args = server_args


@pytest.fixture
def engine(plugin, monkeypatch):
    """``engine(**kwargs)`` -> the resolved ``ServerArgs`` an ``sglang.Engine(**kwargs)`` would launch."""
    import atexit

    import sglang.srt.entrypoints.engine as engine_mod
    from sglang.srt.runtime_context import restore_context, snapshot_context

    from sglang_moe_lb.plugin import register

    register()  # the Engine module is loaded now: what load_plugins() inside Engine.__init__ does

    def fake_launch(cls, server_args, **kwargs):
        server_args.resolve_once()
        raise _Launched(server_args)

    monkeypatch.setattr(engine_mod, "load_plugins", lambda: None)
    monkeypatch.setattr(engine_mod.Engine, "_launch_subprocesses", classmethod(fake_launch))
    monkeypatch.setattr(atexit, "register", lambda *a, **k: None)
    before = snapshot_context()

    def run(**kwargs):
        with pytest.raises(_Launched) as info:
            engine_mod.Engine(**{"model_path": str(TINY), "device": "cpu", "load_format": "dummy", **kwargs})
        return info.value.server_args

    yield run
    restore_context(before)


def test_engine_keywords_work_like_the_flags(engine):
    from plugin_helpers import base_argv
    from sglang.srt.server_args import prepare_server_args

    sa = engine(**EP4, moe_lb="lplb", moe_lb_lplb_schedule="per-batch", moe_lb_lplb_sync="local",
                moe_lb_objective="tiles", moe_lb_gate="on", moe_lb_tile_tokens=64)
    cli = prepare_server_args(base_argv("--tp", "4", "--ep-size", "4", "--ep-num-redundant-experts", "4",
                                        "--enable-eplb", "--moe-lb", "lplb", "--moe-lb-lplb-schedule", "per-batch",
                                        "--moe-lb-lplb-sync", "local", "--moe-lb-objective", "tiles",
                                        "--moe-lb-gate", "on", "--moe-lb-tile-tokens", "64"))
    got, want = sa._moe_lb, cli._moe_lb
    assert got.mode == want.mode == BalanceMode.parse("lplb/per-batch/local/tiles/gate")
    assert got.cost == want.cost and got.explicit == want.explicit
    assert got.entry == "engine" and want.entry == "cli"
    assert sa.ep_dispatch_algorithm == "dynamic" and sa._moe_lb_checked  # the resolve-time checks ran


def test_engine_without_our_keywords_is_untouched(engine):
    sa = engine(**EP4)
    assert getattr(sa, "_moe_lb", None) is None and sa.ep_dispatch_algorithm is None


@pytest.mark.parametrize("kwargs, needle", [
    (dict(moe_lb="lpbl"), "sglang.Engine(..., moe_lb=...) (--moe-lb): expected one of off, lplb, waterfill, "
                          "waterfill+lplb, got 'lpbl'"),
    (dict(moe_lb="lplb", moe_lb_lplb_shedule="plan"), "sglang.Engine(..., moe_lb_lplb_shedule=...): not an "
                                                       "sglang-moe-lb option. Known: moe_lb, moe_lb_lplb_schedule"),
    (dict(moe_lb="lplb", moe_lb_lplb_schedule="always"), "sglang.Engine(..., moe_lb_lplb_schedule=...) "
                                                         "(--moe-lb-lplb-schedule): expected one of plan, per-batch, got 'always'"),
    (dict(moe_lb="lplb", moe_lb_expected_gain=3), "(--moe-lb-expected-gain): expected a number in (0, 1], got 3"),
    (dict(moe_lb="lplb", moe_lb_expected_gain=True), "sglang.Engine(..., moe_lb_expected_gain=...) "
                                                     "(--moe-lb-expected-gain): expected a number in (0, 1], got True"),
    (dict(moe_lb="lplb", moe_lb_tile_tokens=64.9), "sglang.Engine(..., moe_lb_tile_tokens=...) "
                                                   "(--moe-lb-tile-tokens): expected one of 64, 128, got 64.9"),
    (dict(moe_lb="waterfill"), ERRORS["waterfill_a2a"].format(mode="waterfill", backend="none")),
])
def test_engine_bad_keywords_raise_one_clear_error(engine, kwargs, needle):
    with pytest.raises(MoeLbConfigError) as info:
        engine(**EP4, **kwargs)
    assert needle in str(info.value)


# Values of the wrong type for some option: bools, floats (integral or not), ints, other objects;
# and strings, which every option must read exactly as its flag does.
ODD_VALUES = (True, False, 64.9, 64.0, 0.5, 1, 64, 0, -3, [64], b"on", "64", "0.5", "1", "on", "True", "64.0", " 2 ")


def _cli_verdict(option, text: str):
    """The command line's own verdict on ``option text``: the options, or None when it refuses."""
    import argparse

    from sglang_moe_lb.plugin.options import add_cli_flags, options_from_namespace

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ValueError(message)

    parser = Parser()
    add_cli_flags(parser)
    try:
        return options_from_namespace(parser.parse_args(["--moe-lb", "lplb", f"{option.flag}={text}"]))
    except (ValueError, MoeLbConfigError):
        return None


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.flag)
def test_engine_keywords_are_as_strict_as_their_flags(option):
    """Every option, every odd value: the Engine keyword accepts exactly what the flag accepts
    written as a string, with the same result; a refusal is one line naming keyword, flag and value.
    Documented exceptions: ``moe_lb_gate`` takes True/False (= on/off), and a file option only a
    path (``str`` or ``os.PathLike``)."""
    from sglang_moe_lb.plugin.options import engine_options

    for value in ODD_VALUES:
        text = str(value)
        if option.dest == "moe_lb_gate" and isinstance(value, bool):
            text = "on" if value else "off"  # documented: the gate keyword takes a bool
        want = _cli_verdict(option, text)
        try:
            got, err = engine_options({"moe_lb": "lplb", option.dest: value}), None
        except MoeLbConfigError as e:
            got, err = None, str(e)
        if option.metavar == "FILE" and not isinstance(value, (str, os.PathLike)):
            want = None  # a path must be a path: the Engine refuses 5 where the flag reads the text '5'
        if want is None:
            assert got is None, f"{option.dest}={value!r} accepted as {got}; {option.flag} {str(value)!r} is refused"
            assert err.startswith(f"sglang.Engine(..., {option.dest}=...) ({option.flag}): expected "), err
            assert err.endswith(f"got {value!r}") and "\n" not in err, err
        else:
            assert got is not None, f"{option.dest}={value!r} refused ({err}); {option.flag} {str(value)!r} is accepted"
            assert (got.mode, got.cost, got.plan, got.explicit) == (want.mode, want.cost, want.plan, want.explicit)


def test_engine_resolve_time_errors_raise_instead_of_exiting(engine, tmp_path):
    import json

    cfg = json.loads((TINY / "config.json").read_text())
    cfg["n_shared_experts"] = 0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoeLbConfigError) as info:
        engine(model_path=str(tmp_path), tp_size=4, moe_a2a_backend="deepep", moe_lb="waterfill")
    assert str(info.value) == ERRORS["no_shared_expert"].format(mode="waterfill", arch="DeepseekV3ForCausalLM",
                                                                 detail="n_shared_experts=0")


@pytest.mark.parametrize("kind, key, flag", [("calibration", "moe_lb_calibration", "--moe-lb-calibration"),
                                               ("overheads", "moe_lb_overheads", "--moe-lb-overheads")])
def test_damaged_cost_files_fail_the_same_way_as_flag_and_engine_keyword(engine, plugin, capsys, tmp_path, kind, key,
                                                                          flag):
    """One validator (cost_files.py) behind replay, the flags and the Engine keywords: each
    damaged file is one line naming the flag and the file, from the launcher, before any process."""
    from plugin_helpers import base_argv
    from sglang.srt.server_args import prepare_server_args

    from sglang_moe_lb.testing.bad_cost_files import bad_files

    mode = dict(moe_lb="lplb", moe_lb_lplb_schedule="per-batch", moe_lb_objective="tiles", moe_lb_gate="on")
    flags = ["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "per-batch", "--moe-lb-objective", "tiles",
             "--moe-lb-gate", "on", "--ep-num-redundant-experts", "4", "--enable-eplb", "--tp", "4", "--ep-size", "4"]
    for name, path, message in bad_files(tmp_path, kind):
        with pytest.raises(MoeLbConfigError) as info:
            engine(**EP4, **mode, **{key: str(path)})
        text = str(info.value)
        assert "\n" not in text and f"{flag}: {path}: " in text and message in text, (name, text)
        with pytest.raises(SystemExit) as exit_info:
            prepare_server_args(base_argv(*flags, flag, str(path)))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"{flag}: {path}: " in err and message in err, (name, err)


# ---------------------------------------------------------------------------------------------
# The manifest and doctor
# ---------------------------------------------------------------------------------------------
def test_installed_sglang_has_every_touch_point():
    assert manifest.sglang_version() == manifest.WRITTEN_FOR
    assert manifest.check() == []


def test_usage_doc_table_is_the_manifest():
    doc = (ROOT / "docs" / "usage.md").read_text()
    assert manifest.markdown() in doc, "docs/usage.md's touch-point tables differ from plugin/manifest.py (markdown())"


def test_a_changed_target_is_named():
    gone = manifest.Hook("sglang.srt.server_args.ServerArgs.no_such_method", "AFTER", "cli_hooks.fail", "light",
                         "always", "test")
    moved = manifest.Hook("sglang.srt.no_such_module.fn", "AFTER", "cli_hooks.fail", "light", "always", "test")
    renamed = manifest.Hook("sglang.srt.runtime_context.publish", "AFTER", "cli_hooks.fail", "light", "always",
                            "test", params=("server_args", "no_such_param"))
    slots = manifest.Attr("sglang.srt.runtime_context.SpawnRanks", "_moe_lb_x", "new", "always", "test")
    got = {p.target: p.detail for p in manifest.check([gone, moved, renamed, slots])}
    assert got[gone.target] == "sglang.srt.server_args.ServerArgs has no attribute 'no_such_method'"
    assert got[moved.target].startswith("cannot import sglang.srt.no_such_module: ")
    assert got[renamed.target] == "signature changed: no parameter no_such_param"
    assert "take no new attributes" in got[slots.target]


def test_register_stops_with_one_line_naming_the_target(monkeypatch, capsys):
    from sglang_moe_lb.plugin import hooks, register

    fake = manifest.Hook("sglang.srt.server_args.ServerArgs.no_such_hook", "AFTER", "cli_hooks.after_add_cli_args",
                         "light", "always", "test")
    monkeypatch.setattr(manifest, "HOOKS", manifest.HOOKS + (fake,))
    with pytest.raises(SystemExit) as info:
        register()
    msg = str(info.value.code)
    assert "sglang.srt.server_args.ServerArgs.no_such_hook (sglang.srt.server_args.ServerArgs has no attribute" in msg
    assert f"the installed sglang {manifest.sglang_version()}" in msg and "sglang==0.5.23" in msg
    assert "\n" not in msg and capsys.readouterr().err.strip() == msg
    assert not hooks._ORIGINALS, "registered hooks although a target is missing"


def _doctor(env: dict) -> subprocess.CompletedProcess:
    """``sglang-moe-lb doctor`` as a user runs it: the venv's console script, a fresh process."""
    script = Path(sys.executable).with_name("sglang-moe-lb")
    return subprocess.run([str(script), "doctor"], capture_output=True, text=True, timeout=300, env=env)


def test_doctor_reports_each_touch_point_present_and_nothing_else():
    """Against the installed SGLang: every touch point ``ok``, the imported sglang named, and
    none of SGLang's import-time warnings (AWQ, GGUF, Triton platform, deprecations) in the
    output: stderr stays empty and every stdout line is one of the report's."""
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_PLUGINS", "PYTHONWARNINGS")}
    proc = _doctor(env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    import sglang

    assert lines[0] == (f"sglang-moe-lb doctor: sglang {manifest.WRITTEN_FOR} imported from {sglang.__file__}; "
                        f"distribution sglang {manifest.WRITTEN_FOR}; touch points written for "
                        f"sglang=={manifest.WRITTEN_FOR}")
    for e in manifest.HOOKS + manifest.WRITES + manifest.READS:
        assert any(ln.startswith("  ok ") and ln.endswith(e.target) for ln in lines), e.target
    ours = ("sglang-moe-lb doctor: ", "entry point ", "SGLANG_PLUGINS: ", "hooks (HookRegistry):",
            "attributes we write:", "attributes we read:", "  ok ", "per-batch path on CUDA: ", "all ")
    assert [ln for ln in lines if not ln.startswith(ours)] == []
    assert "warn" not in proc.stdout.lower()
    assert lines[-1] == f"all {len(manifest.HOOKS + manifest.WRITES + manifest.READS)} touch points present"


def test_doctor_fails_when_another_sglang_is_imported(tmp_path):
    """A different ``sglang`` on PYTHONPATH shadows the installed one: doctor names both
    versions and paths on one line and exits 1."""
    fake = tmp_path / "sglang"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "0.0.1"\n')
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_PLUGINS"}
    env["PYTHONPATH"] = str(tmp_path)
    proc = _doctor(env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("problems: the imported sglang 0.0.1 (") and str(fake / "__init__.py") in last, last
    assert f"installed distribution sglang {manifest.WRITTEN_FOR} (" in last and "site-packages" in last, last


def test_doctor_fails_on_another_release():
    """The imported sglang is the installed one, but not the release the touch points were written for."""
    from sglang_moe_lb.plugin import doctor

    found = doctor.SglangFound("0.6.0", "/x/sglang/__init__.py", "0.6.0", "/x/sglang/__init__.py")
    assert found.problem() is None  # imported == installed: not shadowed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(doctor, "find_sglang", lambda: found)
        out = io.StringIO()
        assert doctor.run(out, entries=list(manifest.HOOKS[:1])) == 1
    last = out.getvalue().splitlines()[-1]
    assert last == f"problems: sglang 0.6.0 is installed, this plugin is written for sglang=={manifest.WRITTEN_FOR}"


def test_doctor_names_what_is_missing():
    from sglang_moe_lb.plugin import doctor

    fake = manifest.Hook("sglang.srt.eplb.eplb_manager.EPLBManager.no_such_step", "AFTER", "cli_hooks.fail",
                         "forward", "plan", "test")
    out = io.StringIO()
    assert doctor.run(out, entries=[*manifest.HOOKS, fake]) == 1
    text = out.getvalue()
    assert "  MISSING after       sglang.srt.eplb.eplb_manager.EPLBManager.no_such_step  (sglang.srt.eplb." in text
    assert text.splitlines()[-1].startswith("problems: missing sglang.srt.eplb.eplb_manager.EPLBManager.no_such_step (")


def test_plugin_filtered_out_by_sglang_plugins_gets_a_hint(monkeypatch):
    """SGLang never runs our code when SGLANG_PLUGINS leaves us out; doctor (and the docs) say why."""
    from sglang_moe_lb.plugin import doctor

    assert manifest.plugin_filter_note({}) is None
    assert manifest.plugin_filter_note({"SGLANG_PLUGINS": "moe_lb,other"}) is None
    note = manifest.plugin_filter_note({"SGLANG_PLUGINS": "other"})
    assert "leaves this plugin ('moe_lb') out" in note and "--moe-lb is an unrecognized argument" in note
    monkeypatch.setenv("SGLANG_PLUGINS", "other")
    out = io.StringIO()
    assert doctor.run(out, entries=[]) == 1
    assert out.getvalue().splitlines()[-1] == "problems: SGLANG_PLUGINS excludes moe_lb"


def test_plugin_modules_import_without_cycles():
    """The plugin's module graph (every ``from . import`` / ``from .x import``, nested ones too) is acyclic."""
    pkg = ROOT / "python" / "sglang_moe_lb" / "plugin"
    names = {p.stem for p in pkg.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for p in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps |= {a.name for a in node.names}
        graph[p.stem] = (deps & names) - {p.stem}
    state: dict[str, int] = {}

    def visit(n, path):
        if state.get(n) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [n])}")
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            visit(d, path + [n])
        state[n] = 2

    for n in sorted(graph):
        visit(n, [])
