"""The SGLang source tree ``export-patch`` reads, and the folder it writes to.

Two layouts are accepted for ``--sglang-src``:

* a git checkout of SGLang: ``DIR/python/sglang/srt`` exists; patch paths start with
  ``python/sglang/`` and tests go to ``test/registered/eplb/`` (where SGLang keeps its EPLB tests);
* an installed package's own directory (``.../site-packages/sglang``): ``DIR/srt`` exists;
  patch paths start with ``srt/``, tests go to ``test/registered/eplb/`` under it.

The version comes from the tree itself (``_version.py``, ``version.py``, ``python/pyproject.toml``,
then the checkout's git tag), never from the Python that runs us.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SourceTree", "TreeError", "open_tree", "check_out_dir"]


class TreeError(ValueError):
    """An unusable ``--sglang-src`` or ``--out``; the message is one line naming the flag."""


@dataclass(frozen=True)
class SourceTree:
    """root: the folder patches apply in. package: ``root``-relative folder of the ``sglang``
    package (``python/sglang`` or ``.``). version: the tree's SGLang version."""

    root: Path
    package: str
    version: str

    def module_path(self, module: str) -> str:
        """``sglang.srt.x.y`` -> root-relative path of its file (``python/sglang/srt/x/y.py``)."""
        parts = module.split(".")
        if parts[0] != "sglang":
            raise TreeError(f"{module} is not an sglang module")
        base = "/".join(parts[1:])
        if self.package != ".":
            base = f"{self.package}/{base}"
        return f"{base}/__init__.py" if (self.root / base).is_dir() else f"{base}.py"

    def read(self, rel: str) -> str:
        """A tree file's text; ``TreeError`` naming it when it cannot be read as UTF-8."""
        try:
            return (self.root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise TreeError(f"--sglang-src {self.root}: cannot read {rel} ({detail})") from None


def _assigned_string(path: Path, names: tuple[str, ...]) -> str | None:
    """The string literal assigned to one of ``names`` at the top of a Python file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        value = getattr(node, "value", None)
        for t in targets:
            if isinstance(t, ast.Name) and t.id in names and isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
    return None


def _tree_version(root: Path, package: str) -> str | None:
    pkg = root / package
    for name in ("_version.py", "version.py"):
        v = _assigned_string(pkg / name, ("__version__", "version"))
        if v:
            return v
    pyproject = root / "python" / "pyproject.toml"
    if pyproject.is_file():
        try:
            text = pyproject.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""
        m = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
        if m:
            return m.group(1)
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(root), "describe", "--tags", "--abbrev=0"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        tag = out.stdout.strip()
        if out.returncode == 0 and tag:
            return tag[1:] if tag.startswith("v") else tag
    return None


def open_tree(src: str | os.PathLike, want_version: str) -> SourceTree:
    """Check ``--sglang-src`` and return its layout; ``TreeError`` (one line) when it is unusable."""
    root = Path(src).expanduser()
    if not root.exists():
        raise TreeError(f"--sglang-src {src}: no such directory")
    if not root.is_dir():
        raise TreeError(f"--sglang-src {src}: not a directory")
    if (root / "python" / "sglang" / "srt").is_dir():
        package = "python/sglang"
    elif (root / "srt").is_dir() and (root / "__init__.py").is_file():
        package = "."
    else:
        raise TreeError(f"--sglang-src {src}: not an SGLang source tree (neither python/sglang/srt/ of a checkout nor "
                        "srt/ of an installed sglang package is there)")
    version = _tree_version(root, package)
    if version is None:
        raise TreeError(f"--sglang-src {src}: cannot tell its SGLang version (no _version.py, version.py, "
                        "python/pyproject.toml version or git tag)")
    if version != want_version:
        raise TreeError(f"--sglang-src {src}: SGLang {version}, but this sglang-moe-lb is written for SGLang "
                        f"{want_version}; check out v{want_version} or install sglang=={want_version}")
    return SourceTree(root.resolve(), package, version)


def check_out_dir(out: str | os.PathLike, names: set[str]) -> Path:
    """``--out``: created if missing; must be writable and hold nothing but files named in
    ``names`` (an earlier export of this series, replaced), so nothing else is overwritten."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise TreeError(f"--out {out}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TreeError(f"--out {out}: cannot create it ({err.strerror or err})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise TreeError(f"--out {out}: not writable")
    try:  # access() says yes to root on a read-only mount: try it
        with tempfile.NamedTemporaryFile(dir=path, prefix=".moe-lb-probe-"):
            pass
    except OSError as err:
        raise TreeError(f"--out {out}: not writable ({err.strerror or err})") from None
    try:
        others = sorted(p.name for p in path.iterdir() if p.name not in names)
    except OSError as err:
        raise TreeError(f"--out {out}: cannot list it ({err.strerror or err})") from None
    if others:
        raise TreeError(f"--out {out}: holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                        "give an empty or new directory")
    return path
