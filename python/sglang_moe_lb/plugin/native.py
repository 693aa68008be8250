"""The fork form's seam: SGLang source patched by ``sglang-moe-lb export-patch`` calls in here.

The patch series (``fork/series.py``) puts one decorator line above each function the
plugin hooks (``manifest.HOOKS``), ``@moe_lb_hook("<target>")``, imported from a small module
the series adds to SGLang (``sglang/srt/moe_lb.py``), which falls back to a no-op when this
package is not installed. The decorator is ``hook`` below: it wraps the function once, at its
definition, with the same calling convention SGLang's ``HookRegistry`` gives a plugin's
handler (``BEFORE``: may replace the arguments; ``AFTER``: may replace the result;
``AROUND``: gets the original first), so the plugin's handlers serve both forms unchanged.

What differs is only who switches a handler on:

* argument hooks (``light`` stage) are on from the start, as ``register()`` turns them on;
* forward-path hooks are off (the wrapper is one dict lookup, then the original) until a
  scheduler activates a mode: ``hooks.install_runtime_hooks`` then calls ``enable`` with the
  hooks that mode needs, exactly the set the plugin would register.

With SGLang patched, the plugin's entry point stays idle (``hooks.register_light_hooks``
sees ``patched()``), so loading both forms never runs a handler twice.
"""

from __future__ import annotations

import functools
from typing import Callable

from . import manifest

__all__ = ["hook", "patched", "enable", "reset", "enabled", "decorated"]

# target -> the manifest entry of every function the patched SGLang decorated (at its import).
_DECORATED: dict[str, manifest.Hook] = {}
# target -> our handler, for the hooks switched on in this process.
_ON: dict[str, Callable] = {}
_BY_TARGET = {h.target: h for h in manifest.HOOKS}


# Targets the patched SGLang decorates that this version of the package does not hook: left
# as they are (SGLang must still import with --moe-lb off); enable() refuses to run a mode.
_UNKNOWN: list[str] = []


def hook(target: str) -> Callable[[Callable], Callable]:
    """Decorator for the SGLang function ``target`` (a ``manifest.HOOKS`` target)."""
    spec = _BY_TARGET.get(target)
    if spec is None:
        _UNKNOWN.append(target)
        return lambda fn: fn
    _DECORATED[target] = spec
    if spec.stage == "light":
        _ON[target] = None  # resolved on first call: handler modules import SGLang

    def wrap(fn: Callable) -> Callable:
        kind = spec.kind

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if target not in _ON:
                return fn(*args, **kwargs)
            handler = _ON[target] or _resolve(target)
            if kind == "BEFORE":
                new = handler(*args, **kwargs)
                if new is not None:
                    args, kwargs = new
                return fn(*args, **kwargs)
            if kind == "AFTER":
                result = fn(*args, **kwargs)
                new = handler(result, *args, **kwargs)
                return result if new is None else new
            return handler(fn, *args, **kwargs)  # AROUND

        wrapper.__wrapped__ = fn
        return wrapper

    return wrap


def _resolve(target: str) -> Callable:
    fn = manifest.handler(_BY_TARGET[target])
    _ON[target] = fn
    return fn


def patched() -> bool:
    """Whether the SGLang in this process carries the patch series (its decorators have run)."""
    return any(h.stage == "light" for h in _DECORATED.values())


def enable(specs: list[manifest.Hook]) -> list[str]:
    """Switch on the handlers of ``specs``; returns the targets the patched SGLang lacks, and
    those it decorates that this package does not hook (a tree patched by another version of
    the series): non-empty means the mode must not run."""
    missing = [h.target for h in specs if h.target not in _DECORATED] + list(_UNKNOWN)
    reset()  # exactly this mode's forward hooks: none left on from an earlier activation
    for h in specs:
        if h.target in _DECORATED:
            _ON[h.target] = manifest.handler(h)
    return missing


def reset() -> None:
    """Switch every forward-path handler off (argument hooks stay on); ``hooks.uninstall`` and
    each activation call it, as the plugin form removes its forward hooks."""
    for target in [t for t in _ON if _DECORATED.get(t) is None or _DECORATED[t].stage != "light"]:
        del _ON[target]


def enabled() -> list[str]:
    """The targets whose handlers are on in this process."""
    return sorted(_ON)


def decorated() -> list[str]:
    """The targets the patched SGLang has decorated so far (its modules imported in this process)."""
    return sorted(_DECORATED)
