"""``sglang-moe-lb doctor``: does the installed SGLang have every touch point this plugin uses?

Prints which ``sglang`` Python imports (version and path) beside the installed distribution
and the release the touch points were written for, then each entry of ``manifest`` (hooks,
attributes written, attributes read) with ``ok`` or ``MISSING`` and why, whether SGLang will
load the plugin at all (entry point, ``SGLANG_PLUGINS``), and which per-batch implementation a
CUDA device would run. Exit status 0 when everything is present and the imported ``sglang`` is
the installed ``sglang==WRITTEN_FOR``, 1 otherwise (the last line names each problem).

Only the report is printed: what SGLang, Triton and torch print or warn while doctor imports
them (AWQ/GGUF/platform notes, deprecations) is held back here, and only here (``_quiet``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Iterator, TextIO

from . import manifest

__all__ = ["run", "SglangFound", "find_sglang"]


@dataclass(frozen=True)
class SglangFound:
    """The ``sglang`` Python imports and the installed distribution, as doctor reports them.

    imported_version / imported_path: ``sglang.__version__`` and ``sglang.__file__`` (None
    when ``import sglang`` fails: ``import_error`` says why). dist_version / dist_path: the
    ``sglang`` distribution's metadata and its ``sglang/__init__.py`` (None when absent).
    """

    imported_version: str | None
    imported_path: str | None
    dist_version: str | None
    dist_path: str | None
    import_error: str | None = None

    def problem(self) -> str | None:
        """One line when the imported ``sglang`` is not the installed distribution, else None."""
        if self.import_error is not None:
            return f"import sglang failed ({self.import_error})"
        if self.dist_version is None:
            return (f"sglang {self.imported_version} is imported from {self.imported_path}, but no sglang "
                    f"distribution is installed (pip install sglang=={manifest.WRITTEN_FOR})")
        same_path = self.dist_path is None or _same_file(self.imported_path, self.dist_path)
        if self.imported_version != self.dist_version or not same_path:
            return (f"the imported sglang {self.imported_version} ({self.imported_path}) is not the installed "
                    f"distribution sglang {self.dist_version} ({self.dist_path or 'path unknown'}): another sglang "
                    f"shadows it (PYTHONPATH, the working directory); remove it or run from elsewhere")
        return None


def _same_file(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:  # the same file under two spellings (bind mounts, case-insensitive file systems)
        return os.path.samefile(a, b)
    except OSError:
        return False


def find_sglang() -> SglangFound:
    """Import ``sglang`` (its import-time output goes wherever the caller sends it) and read the
    distribution's metadata."""
    try:
        dist = metadata.distribution("sglang")
        dist_version = dist.version
        files = {str(f) for f in (dist.files or ())}
        dist_path = str(dist.locate_file("sglang/__init__.py")) if "sglang/__init__.py" in files else None
    except metadata.PackageNotFoundError:
        dist_version = dist_path = None
    try:
        import sglang
    except Exception as err:  # noqa: BLE001 - a broken install is what doctor reports
        return SglangFound(None, None, dist_version, dist_path, f"{type(err).__name__}: {err}")
    return SglangFound(str(getattr(sglang, "__version__", "unknown")), getattr(sglang, "__file__", None),
                       dist_version, dist_path)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back everything warned or printed inside: Python warnings are recorded and dropped,
    and file descriptors 1 and 2 (where ``print``, loggers and native code end up) point at a
    scratch file. The ``sys.stdout``/``sys.stderr`` objects stay: a log handler SGLang creates
    during the import keeps working afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True):
        warnings.simplefilter("always")  # recorded, never shown
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


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
    hooks_ = [e for e in (entries or manifest.HOOKS) if isinstance(e, manifest.Hook)]
    attrs = [e for e in (entries or []) if isinstance(e, manifest.Attr)]
    writes = list(manifest.WRITES) if entries is None else [a for a in attrs if a in manifest.WRITES]
    reads = list(manifest.READS) if entries is None else [a for a in attrs if a not in manifest.WRITES]
    with _quiet():  # every import of SGLang (and torch, Triton, the kernels) happens in here
        found = find_sglang()
        shadowed = found.problem()
        problems = {} if shadowed else {p.target: p for p in manifest.check(hooks_ + writes + reads)}
        kernels = None if shadowed else _kernels_line()
    print(f"sglang-moe-lb doctor: sglang {found.imported_version or '(not importable)'} imported from "
          f"{found.imported_path or '-'}; distribution sglang {found.dist_version or '(not installed)'}; "
          f"touch points written for sglang=={manifest.WRITTEN_FOR}", file=out)
    if shadowed:  # the touch points below would describe another sglang than the installed one
        print(f"problems: {shadowed}", file=out)
        return 1
    failures: list[str] = []
    if found.imported_version != manifest.WRITTEN_FOR:
        failures.append(f"sglang {found.imported_version} is installed, this plugin is written for "
                        f"sglang=={manifest.WRITTEN_FOR}")
    registered = manifest.entry_point_registered()
    print(f"entry point {manifest.ENTRY_POINT!r} (group sglang.srt.plugins): {'registered' if registered else 'NOT FOUND'}",
          file=out)
    if not registered:
        failures.append(f"entry point {manifest.ENTRY_POINT} missing (reinstall sglang-moe-lb)")
    note = manifest.plugin_filter_note()
    print(f"SGLANG_PLUGINS: {note or 'the plugin loads'}", file=out)
    if note:
        failures.append(f"SGLANG_PLUGINS excludes {manifest.ENTRY_POINT}")
    _section(out, "hooks (HookRegistry)", hooks_, problems)
    _section(out, "attributes we write", writes, problems)
    _section(out, "attributes we read", reads, problems)
    print(f"per-batch path on CUDA: {kernels}", file=out)
    failures += [f"missing {p}" for p in problems.values()]
    total = len(hooks_) + len(writes) + len(reads)
    if failures:
        print(f"problems: {'; '.join(failures)}", file=out)
        return 1
    print(f"all {total} touch points present", file=out)
    return 0
