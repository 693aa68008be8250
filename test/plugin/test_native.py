"""plugin/native.py: the decorator a patched SGLang calls runs our handlers exactly as SGLang's
HookRegistry would (the reference: HookRegistry itself on a twin function), and only once a
mode switches them on."""

from __future__ import annotations

import pytest

from sglang_moe_lb.plugin import manifest, native


def _spec(kind: str, stage: str = "forward") -> manifest.Hook:
    return manifest.Hook(f"fake.module.{kind.lower()}_target", kind, f"x.{kind}", stage, "always", "test")


def _handlers(calls: list):
    def before(*args, **kwargs):
        calls.append(("before", args, kwargs))
        return (args[0] + 1,) + args[1:], kwargs

    def after(result, *args, **kwargs):
        calls.append(("after", result, args))
        return result * 10

    def around(original, *args, **kwargs):
        calls.append(("around", args))
        return original(*args, **kwargs) + 100

    return {"BEFORE": before, "AFTER": after, "AROUND": around}


@pytest.fixture
def fake_specs(monkeypatch):
    specs = {kind: _spec(kind) for kind in ("BEFORE", "AFTER", "AROUND")}
    for s in specs.values():
        monkeypatch.setitem(native._BY_TARGET, s.target, s)
    monkeypatch.setattr(native, "_DECORATED", dict(native._DECORATED))
    monkeypatch.setattr(native, "_ON", dict(native._ON))
    return specs


@pytest.mark.parametrize("kind", ["BEFORE", "AFTER", "AROUND"])
def test_native_hook_matches_hook_registry(fake_specs, monkeypatch, kind):
    from sglang.srt.plugins.hook_registry import HookType, _wrap_fn

    calls: list = []
    handler = _handlers(calls)[kind]
    monkeypatch.setattr(manifest, "handler", lambda h: handler)

    def add(a, b=1):
        return a + b

    wrapped = native.hook(fake_specs[kind].target)(add)
    assert wrapped(2, b=3) == 5 and calls == []  # off: the original, no handler call
    assert native.enable([fake_specs[kind]]) == []
    reference = _wrap_fn(add, handler, getattr(HookType, kind))  # what the plugin form installs
    got, want_calls = wrapped(2, b=3), list(calls)
    calls.clear()
    want = reference(2, b=3)
    assert got == want and want_calls == calls and calls, (got, want, want_calls, calls)
    assert wrapped.__wrapped__ is add and wrapped.__name__ == "add"


def test_light_hooks_are_on_from_the_start(monkeypatch):
    spec = _spec("AFTER", stage="light")
    monkeypatch.setitem(native._BY_TARGET, spec.target, spec)
    monkeypatch.setattr(native, "_DECORATED", {})
    monkeypatch.setattr(native, "_ON", {})
    monkeypatch.setattr(manifest, "handler", lambda h: (lambda result, *a, **k: result + 1))
    assert not native.patched()
    fn = native.hook(spec.target)(lambda: 1)
    assert native.patched() and fn() == 2


def test_a_target_this_package_does_not_hook_is_left_alone_and_blocks_a_mode(monkeypatch):
    monkeypatch.setattr(native, "_UNKNOWN", [])
    monkeypatch.setattr(native, "_DECORATED", {})
    monkeypatch.setattr(native, "_ON", {})

    def f():
        return 7

    assert native.hook("sglang.srt.somewhere.new_target")(f) is f
    assert native.enable([]) == ["sglang.srt.somewhere.new_target"]


def test_an_activation_switches_on_exactly_its_hooks(fake_specs, monkeypatch):
    """A later activation (or uninstall) leaves no forward handler of an earlier mode on."""
    calls: list = []
    handlers = _handlers(calls)
    monkeypatch.setattr(manifest, "handler", lambda h: handlers[h.kind])
    after = native.hook(fake_specs["AFTER"].target)(lambda: 1)
    around = native.hook(fake_specs["AROUND"].target)(lambda: 1)
    native.enable([fake_specs["AFTER"], fake_specs["AROUND"]])
    assert (after(), around()) == (10, 101)
    native.enable([fake_specs["AROUND"]])
    assert (after(), around()) == (1, 101)
    native.reset()
    assert (after(), around()) == (1, 1)
