"""Registering, checking and removing the plugin's hooks (the list itself is ``manifest``).

Two stages. ``register_light_hooks()`` (from ``register()``, the entry point) checks and adds
the argument hooks, whose targets (``sglang.srt.server_args``, ``sglang.srt.runtime_context``)
every SGLang process imports anyway, and, where the Engine module is loaded, SGLang's
``Engine.server_args_class`` override point (``sglang.Engine(moe_lb=...)``). The forward-path
hooks are checked, registered and applied when a scheduler process publishes a configuration
with ``--moe-lb`` on (``install_runtime_hooks``), and only those the mode needs: with the flag
off nothing on the forward path is touched. ``HookRegistry.apply_hooks()`` is idempotent, and
we check afterwards that each of our hooks really sits on its target (the registry skips a
target another plugin already patched).

Handlers are looked up by name from the manifest; the import graph is one-way
(``activation`` -> ``hooks`` -> ``cli_hooks`` -> ``options``/``manifest``).
"""

from __future__ import annotations

import logging
import pkgutil
import sys
import types

from ..mode import BalanceMode
from . import cli_hooks, manifest
from .options import ERRORS, MoeLbConfigError

__all__ = ["register_light_hooks", "install_runtime_hooks", "uninstall"]

logger = logging.getLogger("sglang_moe_lb.plugin")

ENGINE_MODULE = "sglang.srt.entrypoints.engine"

# target -> (owner, attribute, raw attribute before we patched it, our hook)
_ORIGINALS: dict[str, tuple] = {}
# Plain attributes we set outside HookRegistry: target -> (owner, attribute, previous value)
_SET: dict[str, tuple] = {}


def _hook_type(name: str):
    from sglang.srt.plugins.hook_registry import HookType

    return getattr(HookType, name)


def _resolve(target: str):
    owner_path, attr = target.rsplit(".", 1)
    owner = pkgutil.resolve_name(owner_path)
    raw = owner.__dict__[attr] if isinstance(owner, type) and attr in owner.__dict__ else getattr(owner, attr)
    return owner, attr, raw


def _source():
    from sglang.srt.plugins.hook_registry import HookSource

    return HookSource(plugin_name=manifest.ENTRY_POINT, dist_name="sglang-moe-lb")


def _register(specs: list[manifest.Hook]) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry

    for h in specs:
        if h.target in _ORIGINALS:
            continue
        owner, attr, raw = _resolve(h.target)
        fn = manifest.handler(h)
        _ORIGINALS[h.target] = (owner, attr, raw, fn)
        HookRegistry.register(h.target, fn, _hook_type(h.kind), source=_source())


def _install_engine_entry() -> None:
    """``sglang.Engine(moe_lb=...)``: our ``ServerArgs`` factory on SGLang's override point.

    ``Engine.__init__`` loads plugins first and only then reads ``self.server_args_class``,
    so setting it here reaches the very call that loaded us."""
    if ENGINE_MODULE not in sys.modules or "engine.server_args_class" in _SET:
        return
    engine = sys.modules[ENGINE_MODULE].Engine
    prev = engine.__dict__.get("server_args_class")
    if prev is None:
        return
    _SET["engine.server_args_class"] = (engine, "server_args_class", prev)
    engine.server_args_class = staticmethod(cli_hooks.engine_server_args_factory(prev))


def register_light_hooks() -> None:
    """Check the argument-handling touch points, then register them.

    A missing or changed target stops the process with one line naming it and the installed
    SGLang version (``SystemExit`` passes through SGLang's plugin loader, which would
    otherwise only log the error and leave ``--moe-lb`` an unrecognized argument)."""
    from . import native

    if native.patched():  # the fork form: SGLang calls our handlers itself (native.py)
        logger.info("[moe-lb] this SGLang carries the sglang-moe-lb patch series; the plugin entry point stays idle")
        return
    light = manifest.hooks_for("light")
    engine_loaded = ENGINE_MODULE in sys.modules
    entries = list(light) + [a for a in manifest.WRITES + manifest.READS if a.when == "always"
                             and (engine_loaded or not a.owner.startswith(ENGINE_MODULE))]
    problems = manifest.check(entries)
    if problems:
        msg = manifest.missing_message(problems)
        print(msg, file=sys.stderr, flush=True)
        raise SystemExit(msg)
    _register(light)
    _install_engine_entry()


def _fn_of(obj):
    return obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj


def _installed(target: str, fn) -> bool:
    """Whether ``fn`` is in the wrapper chain now sitting on ``target``."""
    cur = _fn_of(_resolve(target)[2])
    seen = 0
    while cur is not None and seen < 64:
        for cell in getattr(cur, "__closure__", None) or ():
            try:
                if cell.cell_contents is fn:
                    return True
            except ValueError:
                pass
        cur = getattr(cur, "__wrapped__", None)
        seen += 1
    return False


def install_runtime_hooks(mode: BalanceMode, *, rank_invariant: bool) -> None:
    """Check, register and apply the forward-path hooks ``mode`` needs; fail loudly if one did not land."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from . import native

    cli_hooks.check_forward_targets(mode, rank_invariant=rank_invariant)
    specs = manifest.hooks_for("forward", mode, rank_invariant)
    if native.patched():  # the fork form: the decorated targets only need switching on
        missing = native.enable(specs)
        if missing:
            raise MoeLbConfigError(f"--moe-lb {mode.flag}: the patched SGLang and this sglang-moe-lb disagree on "
                                   f"{', '.join(missing)}; apply the series `sglang-moe-lb export-patch` writes for "
                                   "this sglang-moe-lb")
        return
    _register(specs)
    HookRegistry.apply_hooks()
    missing = [h.target for h in specs if not _installed(h.target, _ORIGINALS[h.target][3])]
    if missing:
        raise MoeLbConfigError(ERRORS["hook_conflict"].format(mode=mode.flag, targets=", ".join(missing)))


def uninstall() -> None:
    """Put every SGLang attribute we patched back, forget our hooks, drop the runtime.

    ``HookRegistry.reset()`` alone does not undo patches; tests and engine restarts use this.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry

    from . import native
    from .runtime import deactivate

    native.reset()

    for target, (owner, attr, raw, fn) in list(_ORIGINALS.items()):
        current = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        if current is not raw:
            setattr(owner, attr, raw)
            cur_fn, raw_fn = _fn_of(current), _fn_of(raw)
            if isinstance(cur_fn, types.FunctionType) and not isinstance(owner, type):
                for mod in list(sys.modules.values()):
                    if isinstance(mod, types.ModuleType) and mod is not owner:
                        try:
                            for name, val in list(vars(mod).items()):
                                if val is cur_fn:
                                    setattr(mod, name, raw_fn)
                        except TypeError:
                            pass
        HookRegistry._patched.discard(target)
        kept = [h for h in HookRegistry._hooks.get(target, []) if h[1] is not fn]
        if kept:
            HookRegistry._hooks[target] = kept
        else:
            HookRegistry._hooks.pop(target, None)
    _ORIGINALS.clear()
    for owner, attr, prev in _SET.values():
        setattr(owner, attr, prev)
    _SET.clear()
    deactivate()
