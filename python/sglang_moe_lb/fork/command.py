"""``sglang-moe-lb export-patch --sglang-src DIR --out DIR``: write the fork form's patch series."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run"]

PROG = "sglang-moe-lb export-patch"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-patch",
        help="write the feature as a numbered patch series of an SGLang source tree (the fork form)",
        description=(
            "Write a git-format-patch style series (one concern per patch) that makes --moe-lb native to the "
            "SGLang tree given: the flags in server_args.py, the plan dispatch in expert_location_dispatch.py, "
            "the plan solve in the EPLB cycle, the collective at the DeepEP dispatcher, and CPU unit tests under "
            "test/registered/eplb/. The patches call into this package (an optional dependency) from the same "
            "touch points the plugin hooks (plugin/manifest.py); diff context is read from DIR now. Apply with "
            "`git -C DIR apply OUT/*.patch` (or `git am`). See docs/upstream-pr.md."
        ),
    )
    p.add_argument("--sglang-src", required=True, metavar="DIR",
                   help="an SGLang source tree at the pinned version: a git checkout (with python/sglang/) or an "
                        "installed package's own directory (.../site-packages/sglang)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the patches (created if missing; must be empty or hold only this series' files, "
                        "which are replaced)")


def run(args: argparse.Namespace) -> int:
    from ..plugin.manifest import WRITTEN_FOR
    from .series import PATCHES, SeriesError, build_series
    from .tree import TreeError, check_out_dir, open_tree

    try:
        tree = open_tree(args.sglang_src, WRITTEN_FOR)
        names = {f"{n:04d}-{p.slug}.patch" for n, p in enumerate(PATCHES, 1)}
        out = check_out_dir(args.out, names)
        from .. import __version__

        series = build_series(tree, f"Exported by sglang-moe-lb {__version__} for SGLang {tree.version}.")
    except (TreeError, SeriesError, OSError) as err:  # OSError: a tree file that cannot be read
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    for p in series:
        path = out / p.name
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(p.text, encoding="utf-8")
            tmp.replace(path)
        except OSError as err:
            print(f"{PROG}: error: --out {args.out}: cannot write {p.name} ({err.strerror or err})", file=sys.stderr)
            return 2
        print(f"{path}  ({', '.join(p.files)})")
    print(f"{len(series)} patches for SGLang {tree.version} ({tree.root}); apply them in order with "
          f"`git -C {tree.root} apply {out}/*.patch`")
    return 0
