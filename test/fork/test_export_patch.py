"""``sglang-moe-lb export-patch``: the series covers every hooked target, applies to the
installed SGLang, and refuses a bad ``--sglang-src``/``--out`` with one line.

The full proof (the patched copy serves the CPU demo with the plugin left out, outputs equal
to the plugin's) is the ``lplb-native`` server of test/e2e/test_cpu_server.py.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sglang

from sglang_moe_lb.cli import main
from sglang_moe_lb.fork.series import PATCHES, SEAM_MODULE, TEST_PATH, patch_of
from sglang_moe_lb.plugin import manifest

INSTALLED = Path(sglang.__file__).resolve().parent
DECORATOR_RE = re.compile(r'^\+(?P<indent>\s*)@moe_lb_hook\("(?P<target>[^"]+)"\)$', re.M)


def export(src, out) -> subprocess.CompletedProcess:
    """As a user runs it (a subprocess)."""
    return subprocess.run([sys.executable, "-m", "sglang_moe_lb", "export-patch", "--sglang-src", str(src),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)


def export_here(src, out, capsys) -> tuple[int, str]:
    """The same command in this process (quicker): (exit status, stderr)."""
    capsys.readouterr()
    rc = main(["export-patch", "--sglang-src", str(src), "--out", str(out)])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("series")
    res = export(INSTALLED, out)
    assert res.returncode == 0, res.stderr
    return sorted(out.glob("*.patch"))


def _touched(patches: list[Path]) -> list[str]:
    files = []
    for p in patches:
        for m in re.finditer(r"^diff --git a/(\S+) b/", p.read_text(), re.M):
            files.append(m.group(1))
    return files


def small_copy(dest: Path, patches: list[Path], version: str | None = None) -> Path:
    """The files the series touches (and the markers a tree needs), copied from the installed SGLang."""
    root = dest / "sglang"
    for rel in {*_touched(patches), "__init__.py", "_version.py"}:
        src = INSTALLED / rel
        if src.exists():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    (root / "srt").mkdir(exist_ok=True)
    if version is not None:
        (root / "_version.py").write_text(f'__version__ = version = "{version}"\n')
    return root


def test_every_hooked_target_has_its_hunk(series):
    """One decorator line per manifest hook, in the patch that owns it, and nothing else decorated."""
    owner = patch_of()
    found: dict[str, list[str]] = {}
    for p in series:
        for m in DECORATOR_RE.finditer(p.read_text()):
            found.setdefault(m["target"], []).append(p.name)
    assert sorted(found) == sorted(h.target for h in manifest.HOOKS)
    for target, names in found.items():
        assert len(names) == 1, (target, names)
        assert names[0].split("-", 1)[1] == f"{owner[target]}.patch", (target, names)


def test_series_is_numbered_one_concern_each(series):
    assert [p.name for p in series] == [f"{i:04d}-{pt.slug}.patch" for i, pt in enumerate(PATCHES, 1)]
    for i, p in enumerate(series, 1):
        text = p.read_text()
        assert re.search(rf"^Subject: \[PATCH {i}/{len(series)}\] \S", text, re.M), p.name
        assert "for SGLang 0.5.23" in text
    assert TEST_PATH in _touched(series[-1:]) and TEST_PATH not in _touched(series[:-1])
    seam = "srt/" + SEAM_MODULE.split(".")[-1] + ".py"
    assert seam in _touched(series[:1])


def test_series_applies_and_decorates_each_def(series, tmp_path):
    """git apply --check, then apply, patch by patch, on a copy; then each decorator sits right
    above the def of its target (below the other decorators), and the patched files parse."""
    root = small_copy(tmp_path, series)
    for p in series:
        for args in (["--check"], []):
            res = subprocess.run(["git", "apply", *args, str(p)], cwd=root, capture_output=True, text=True)
            assert res.returncode == 0, (p.name, args, res.stderr)
    for h in manifest.HOOKS:
        parts = h.target.split(".")
        rel = next(f for f in _touched(series) if f.endswith(".py") and _module_file_matches(f, parts))
        text = (root / rel).read_text()
        ast.parse(text)
        lines = text.splitlines()
        at = lines.index(next(ln for ln in lines if ln.strip() == f'@moe_lb_hook("{h.target}")'))
        assert re.match(rf"\s*(async )?def {parts[-1]}\(", lines[at + 1]), (h.target, lines[at:at + 2])
    # Applying twice is refused by git (nothing is silently doubled).
    res = subprocess.run(["git", "apply", "--check", str(series[1])], cwd=root, capture_output=True, text=True)
    assert res.returncode != 0


def _run(src, out) -> tuple[int, str]:
    res = export(src, out)  # one case as a subprocess: the console path end to end
    return res.returncode, res.stderr


def _module_file_matches(rel: str, parts: list[str]) -> bool:
    mod = rel[:-3].replace("/__init__", "").split("/")
    return parts[1:1 + len(mod)] == mod


def test_export_again_over_its_own_series(series, tmp_path, capsys):
    out = tmp_path / "again"
    assert export_here(INSTALLED, out, capsys)[0] == 0
    assert export_here(INSTALLED, out, capsys)[0] == 0  # an earlier series is replaced, nothing else is there
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in series]


@pytest.mark.parametrize("case", ["missing", "file", "not-sglang", "other-version", "applied"])
def test_bad_sglang_src_is_one_line(series, tmp_path, case, capsys):
    if case == "missing":
        src, want = tmp_path / "nowhere", "no such directory"
    elif case == "file":
        src, want = tmp_path / "f.txt", "not a directory"
        src.write_text("x")
    elif case == "not-sglang":
        src, want = tmp_path, "not an SGLang source tree"
    elif case == "other-version":
        src, want = small_copy(tmp_path, series, version="0.5.22"), "SGLang 0.5.22, but this sglang-moe-lb is written for SGLang 0.5.23"
    else:
        src = small_copy(tmp_path, series)
        subprocess.run(["git", "apply", str(series[0])], cwd=src, check=True)
        want = "already exists in --sglang-src"
    rc, err = export_here(src, tmp_path / "out", capsys) if case != "other-version" else _run(src, tmp_path / "out")
    err = err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith("sglang-moe-lb export-patch: error: ") and want in err, err
    assert not any((tmp_path / "out").glob("*.patch"))


@pytest.mark.parametrize("case", ["is-a-file", "under-a-file", "other-files", "other-patch", "read-only"])
def test_bad_out_is_one_line(tmp_path, case, capsys):
    out = tmp_path / "out"
    if case == "is-a-file":
        out.write_text("x")
        want = "exists and is not a directory"
    elif case == "under-a-file":
        (tmp_path / "f").write_text("x")
        out, want = tmp_path / "f" / "out", "cannot create it"
    elif case in ("other-files", "other-patch"):
        out.mkdir()
        mine = "notes.md" if case == "other-files" else "fix.patch"  # a patch of the user's own
        (out / mine).write_text("mine")
        want = f"holds other files ({mine})"
    else:
        out, want = Path("/proc/sys"), "not writable"  # read-only even for root
    rc, err = export_here(INSTALLED, out, capsys)
    err = err.strip()
    assert rc == 2 and "\n" not in err and err.startswith(f"sglang-moe-lb export-patch: error: --out {out}: "), err
    assert want in err, err
    if case in ("other-files", "other-patch"):
        assert [p.name for p in out.iterdir()] == [mine] and (out / mine).read_text() == "mine"
