"""``sglang-moe-lb doctor``: does the installed SGLang have every touch point this plugin uses?

Prints each entry of ``manifest`` (hooks, attributes written, attributes read) with ``ok`` or
``MISSING`` and why, whether SGLang will load the plugin at all (entry point, ``SGLANG_PLUGINS``),
and which per-batch implementation a CUDA device would run. Exit status 0 when everything is
present, 1 otherwise (the last line names what is missing).
"""

from __future__ import annotations

import sys
from typing import TextIO

from . import manifest

__all__ = ["run"]


def _section(out: TextIO, title: str, entries, problems: dict) -> None:
    print(f"{title}:", file=out)
    for e in entries:
        kind = getattr(e, "kind", "")
        p = problems.get(e.target)
        status = "ok     " if p is None else "MISSING"
        print(f"  {status} {kind.lower():11s} {e.target}" + ("" if p is None else f"  ({p.detail})"), file=out)


def _kernels_line() -> str:
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device here: the core's torch path runs (CUDA graphs are a GPU question)"
    except Exception as err:  # noqa: BLE001
        return f"torch unavailable ({err})"
    from .hot_path import graph_safety, impl_name

    safe, why = graph_safety()
    return f"{impl_name('cuda')}; CUDA graphs {'allowed' if safe else 'refused: ' + why}"


def run(out: TextIO | None = None, entries: list | None = None) -> int:
    """Print the report; return the exit status. ``entries``: check these instead of the manifest."""
    out = out or sys.stdout
    installed = manifest.sglang_version()
    print(f"sglang-moe-lb doctor: sglang {installed} installed; touch points written for sglang=={manifest.WRITTEN_FOR}",
          file=out)
    failures: list[str] = []
    registered = manifest.entry_point_registered()
    print(f"entry point {manifest.ENTRY_POINT!r} (group sglang.srt.plugins): {'registered' if registered else 'NOT FOUND'}",
          file=out)
    if not registered:
        failures.append(f"entry point {manifest.ENTRY_POINT} (reinstall sglang-moe-lb)")
    note = manifest.plugin_filter_note()
    print(f"SGLANG_PLUGINS: {note or 'the plugin loads'}", file=out)
    if note:
        failures.append(f"SGLANG_PLUGINS excludes {manifest.ENTRY_POINT}")
    hooks_ = [e for e in (entries or manifest.HOOKS) if isinstance(e, manifest.Hook)]
    attrs = [e for e in (entries or []) if isinstance(e, manifest.Attr)]
    writes = list(manifest.WRITES) if entries is None else [a for a in attrs if a in manifest.WRITES]
    reads = list(manifest.READS) if entries is None else [a for a in attrs if a not in manifest.WRITES]
    problems = {p.target: p for p in manifest.check(hooks_ + writes + reads)}
    _section(out, "hooks (HookRegistry)", hooks_, problems)
    _section(out, "attributes we write", writes, problems)
    _section(out, "attributes we read", reads, problems)
    print(f"per-batch path on CUDA: {_kernels_line()}", file=out)
    failures += [str(p) for p in problems.values()]
    total = len(hooks_) + len(writes) + len(reads)
    if failures:
        print(f"missing: {'; '.join(failures)}", file=out)
        return 1
    print(f"all {total} touch points present", file=out)
    return 0
