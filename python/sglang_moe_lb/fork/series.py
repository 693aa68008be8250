"""The fork form: a numbered patch series that makes ``--moe-lb`` native to an SGLang tree.

Generated from ``plugin/manifest.HOOKS``, the list the plugin registers from, so the two
forms cannot drift: every hooked function gets one line above its ``def``,
``@moe_lb_hook("<target>")``, which calls the same handler with the same convention as the
plugin's ``HookRegistry`` hook (``plugin/native.py``). The series also adds
``sglang/srt/moe_lb.py`` (the optional import of this package: without it every decorated
function stays as it is) and CPU unit tests in SGLang's test layout.

Diff context comes only from the tree given at export time; nothing of SGLang is stored
here. One concern per patch (``PATCHES``); a hooked module belongs to the patch that names
it, and a file touched by two patches is diffed against the first one's result.
"""

from __future__ import annotations

import ast
import difflib
import email.utils
from dataclasses import dataclass, field
from importlib import resources

from ..plugin import manifest
from .tree import SourceTree

__all__ = ["Patch", "PATCHES", "SEAM_MODULE", "TEST_PATH", "build_series", "patch_of", "SeriesError"]

SEAM_MODULE = "sglang.srt.moe_lb"
SEAM_IMPORT = f"from {SEAM_MODULE} import moe_lb_hook"
TEST_PATH = "test/registered/eplb/test_moe_lb_native.py"
AUTHOR = "sglang-moe-lb export-patch <sglang-moe-lb@users.noreply.github.com>"


class SeriesError(ValueError):
    """The tree does not have a function the manifest hooks (one line naming it)."""


@dataclass(frozen=True)
class Patch:
    """One concern. slug: file name part. subject/body: the commit message. targets: the
    ``manifest.HOOKS`` targets it decorates (owned here, checked complete by ``patch_of``).
    seam/tests: it adds ``sglang/srt/moe_lb.py`` / the unit tests."""

    slug: str
    subject: str
    body: str
    targets: tuple[str, ...] = ()
    seam: bool = False
    tests: bool = False


_SA = "sglang.srt.server_args.ServerArgs"
_ELD = "sglang.srt.eplb.expert_location_dispatch"
_EL = "sglang.srt.eplb.expert_location"
_EPLB = "sglang.srt.eplb.eplb_manager.EPLBManager"

PATCHES: tuple[Patch, ...] = (
    Patch("server-args-moe-lb", "server_args: add --moe-lb and its sub-options, checked at start-up",
          "Adds sglang/srt/moe_lb.py, the optional import of the sglang-moe-lb package, and hooks argument\n"
          "parsing: --moe-lb off|lplb|waterfill|waterfill+lplb and its --moe-lb-* sub-options are added to\n"
          "the parser, checked when the arguments are read and again once the model config is resolved\n"
          "(one error line and exit status 2 for an incompatible combination, no silent fallback). A\n"
          "scheduler that starts with --moe-lb on activates the forward path of that mode only.\n"
          "Without sglang-moe-lb installed, nothing changes.",
          (f"{_SA}.add_cli_args", f"{_SA}.from_cli_args", f"{_SA}.resolve_once",
           "sglang.srt.runtime_context.publish"), seam=True),
    Patch("expert-location-plan-dispatch", "eplb: dispatch plans as an expert-location dispatch algorithm",
          "--moe-lb lplb maps logical to physical experts through a per-layer plan map at the batch's\n"
          "size level: one gather, like the static dispatch, with no added launch, collective or host\n"
          "sync. Each dispatch info carries its layer; plan maps and layer paths are built after the\n"
          "model loads and before CUDA graphs are captured, and follow every placement change in place.",
          (f"{_ELD}.ExpertLocationDispatchInfo.init_new", f"{_ELD}.topk_ids_logical_to_physical",
           "sglang.srt.model_executor.model_runner_components.moe_ep_setup.prepare_moe_topk",
           f"{_EL}.ExpertLocationMetadata.update", f"{_EL}.set_global_expert_location_metadata")),
    Patch("eplb-plan-solve", "eplb: solve dispatch plans in the rebalance cycle",
          "At each EPLB rebalance the plans for the new placement are solved from the recorded window\n"
          "(HiGHS, off the forward thread) and installed at a pass boundary; between rebalances they are\n"
          "refreshed from the recorder's recent counts (no weights move). A failed or timed-out solve\n"
          "keeps the previous plans and logs one line. Optional decode-aware post-step on EPLB's\n"
          "placement (--moe-lb-placement).",
          (f"{_EL}.ExpertLocationMetadata.init_by_eplb", "sglang.srt.eplb.eplb_algorithms.rebalance_experts",
           f"{_EPLB}.rebalance", f"{_EPLB}.on_forward_pass_end")),
    Patch("deepep-collective", "moe: join the layer's all-gather from idle ranks (global-sync modes)",
          "Global-sync modes (per-batch LPLB and Waterfill with --moe-lb-*-sync global) all-gather one\n"
          "int32 row per rank and layer; a rank with no tokens still joins it, from TopK's empty output\n"
          "or, where a model skips TopK, at the DeepEP dispatcher.",
          ("sglang.srt.layers.moe.topk.TopK.empty_topk_output",
           "sglang.srt.layers.moe.token_dispatcher.deepep.DeepEPDispatcher.dispatch_a")),
    Patch("tests-moe-lb-native", "test: CPU unit tests for the native --moe-lb",
          "Runs on CPU without a model: every function the series decorates carries its hook and still\n"
          "computes what it did with --moe-lb off; the parser accepts --moe-lb and refuses a bad value.",
          tests=True),
)


def patch_of() -> dict[str, str]:
    """target -> slug of the patch that decorates it; raises if a manifest hook has none or two."""
    owner: dict[str, str] = {}
    for p in PATCHES:
        for t in p.targets:
            if t in owner:
                raise SeriesError(f"{t} is in two patches ({owner[t]}, {p.slug})")
            owner[t] = p.slug
    missing = [h.target for h in manifest.HOOKS if h.target not in owner]
    extra = [t for t in owner if t not in {h.target for h in manifest.HOOKS}]
    if missing or extra:
        raise SeriesError(f"patches out of step with the manifest: no patch for {missing}, not hooked {extra}")
    return owner


# ---------------------------------------------------------------------------------------------
# Editing one file
# ---------------------------------------------------------------------------------------------
def _def_line(tree: ast.Module, qualname: str) -> tuple[int, int] | None:
    """(1-based line of the ``def``, its column) of ``Class.method`` or ``function`` at top level."""
    scope: list[ast.stmt] = tree.body
    parts = qualname.split(".")
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef) if last else (ast.ClassDef,)
        node = next((n for n in scope if isinstance(n, kinds) and n.name == name), None)
        if node is None:
            return None
        if last:
            return node.lineno, node.col_offset
        scope = node.body
    return None


def _import_line(tree: ast.Module) -> int:
    """0-based index of the line after the module's top import block (after the docstring)."""
    end = 0
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            end = node.end_lineno or node.lineno
        elif isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) and end == 0:
            end = node.end_lineno or node.lineno
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            break
    return end


def decorate(text: str, rel: str, module: str, targets: list[str]) -> str:
    """``text`` of ``module`` with ``@moe_lb_hook(target)`` right above each target's ``def``
    (below its other decorators, so a classmethod's function is what gets wrapped) and the
    seam's import after the module's imports."""
    lines = text.splitlines(keepends=True)
    try:
        tree = ast.parse(text)
    except SyntaxError as err:
        raise SeriesError(f"{rel}: not valid Python in --sglang-src (line {err.lineno}: {err.msg})") from None
    inserts: list[tuple[int, str]] = []
    for target in targets:
        qual = target[len(module) + 1:]
        found = _def_line(tree, qual)
        if found is None:
            raise SeriesError(f"{rel}: no {qual} to hook ({target}); is this SGLang {manifest.WRITTEN_FOR}?")
        line, col = found
        inserts.append((line - 1, " " * col + f'@moe_lb_hook("{target}")\n'))
    if not any(ln.rstrip("\n") == SEAM_IMPORT for ln in lines):
        inserts.append((_import_line(tree), SEAM_IMPORT + "\n"))
    for at, new in sorted(inserts, key=lambda x: x[0], reverse=True):
        lines.insert(at, new)
    return "".join(lines)


# ---------------------------------------------------------------------------------------------
# The series
# ---------------------------------------------------------------------------------------------
@dataclass
class _File:
    rel: str
    before: str | None  # None: a new file
    after: str


@dataclass
class BuiltPatch:
    """One written patch: its number, file name and text, and the targets it decorates."""

    number: int
    name: str
    text: str
    files: list[str] = field(default_factory=list)


def _module_of(target: str) -> str:
    """The importable module of a hook target (the longest prefix that is a file in the tree
    is decided by the caller; here: strip class/function parts by SGLang's naming: classes
    start upper-case)."""
    parts = target.split(".")
    mod = []
    for p in parts[:-1]:
        if p[:1].isupper():
            break
        mod.append(p)
    return ".".join(mod)


def _asset(name: str) -> str:
    return resources.files("sglang_moe_lb.fork").joinpath(f"assets/{name}").read_text(encoding="utf-8")


def _diff(f: _File) -> str:
    after = f.after.splitlines(keepends=True)
    if f.before is None:
        head = f"diff --git a/{f.rel} b/{f.rel}\nnew file mode 100644\n"
        body = difflib.unified_diff([], after, "/dev/null", f"b/{f.rel}", n=3)
    else:
        head = f"diff --git a/{f.rel} b/{f.rel}\n"
        body = difflib.unified_diff(f.before.splitlines(keepends=True), after, f"a/{f.rel}", f"b/{f.rel}", n=3)
    text = "".join(_line(ln) for ln in body)
    return head + text


def _line(ln: str) -> str:
    return ln if ln.endswith("\n") else ln + "\n\\ No newline at end of file\n"


def _stat(diffs: list[tuple[str, str]]) -> str:
    """format-patch's summary from ``(path, unified diff)`` pairs (the series only inserts)."""
    added = [(rel, sum(1 for ln in d.splitlines() if ln.startswith("+") and not ln.startswith("+++")))
             for rel, d in diffs]
    rows = "".join(f" {rel} | {n} +\n" for rel, n in added)
    n_files = len(added)
    return rows + f" {n_files} file{'s' if n_files != 1 else ''} changed, {sum(n for _, n in added)} insertions(+)\n"


def build_series(tree: SourceTree, version_note: str) -> list[BuiltPatch]:
    """Every patch of ``PATCHES``, diffed against ``tree`` as the earlier patches leave it."""
    patch_of()  # the manifest and the patches agree
    current: dict[str, str] = {}
    out: list[BuiltPatch] = []
    date = email.utils.formatdate(usegmt=True)
    total = len(PATCHES)
    for n, p in enumerate(PATCHES, 1):
        files: list[_File] = []
        if p.seam:
            rel = tree.module_path(SEAM_MODULE)
            if (tree.root / rel).exists():
                raise SeriesError(f"{rel} already exists in --sglang-src: is the series applied there already?")
            files.append(_File(rel, None, _asset("seam.py")))
        by_module: dict[str, list[str]] = {}
        for t in p.targets:
            by_module.setdefault(_module_of(t), []).append(t)
        for module, targets in by_module.items():
            rel = tree.module_path(module)
            if rel not in current:
                current[rel] = tree.read(rel)
            new = decorate(current[rel], rel, module, targets)
            files.append(_File(rel, current[rel], new))
            current[rel] = new
        if p.tests:
            files.append(_File(TEST_PATH, None, _asset("test_moe_lb_native.py")))
        name = f"{n:04d}-{p.slug}.patch"
        header = (f"From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\nFrom: {AUTHOR}\n"
                  f"Date: {date}\nSubject: [PATCH {n}/{total}] {p.subject}\n\n{p.body}\n\n{version_note}\n---\n")
        diffs = [(f.rel, _diff(f)) for f in files]
        text = header + _stat(diffs) + "\n" + "".join(d for _, d in diffs) + "-- \nsglang-moe-lb export-patch\n"
        out.append(BuiltPatch(n, name, text, [f.rel for f in files]))
    return out
