"""The ``sglang-moe-lb`` command line (also ``python -m sglang_moe_lb``).

Subcommands:
    replay   what-if: feed recorded (or bundled, or synthetic) expert routing through SGLang's
             dispatch modes and ours, and report balancedness, the gap to the LP bound and
             the modelled MoE-layer time, optionally over batch sizes (replay/command.py
             holds its flags). See docs/replay.md.
    export-patch  write the feature as a numbered patch series of an SGLang source tree (the fork
             form; fork/command.py). See docs/upstream-pr.md.
    doctor   check that the installed SGLang has every touch point the --moe-lb plugin uses
             (plugin/manifest.py); exit status 0 when all are present. See docs/usage.md.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sglang-moe-lb",
        description="Dispatch-time MoE load balancing for SGLang expert parallelism (LPLB split, Waterfill).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from .replay.command import add_parser as add_replay  # the replay flags live with replay

    add_replay(sub)
    _add_doctor(sub)
    from .fork.command import add_parser as add_export_patch  # the fork form (docs/upstream-pr.md)

    add_export_patch(sub)
    return parser


def _add_doctor(sub) -> None:
    sub.add_parser(
        "doctor",
        help="check that the installed SGLang has every touch point the plugin hooks",
        description=(
            "Print every SGLang touch point of the --moe-lb plugin (hooked targets, attributes it writes and reads; "
            "plugin/manifest.py) and whether the installed SGLang has it, whether SGLang will load the plugin "
            "(entry point, SGLANG_PLUGINS), and which per-batch path a CUDA device runs. Exit status 0 when "
            "everything is present, 1 otherwise. See docs/usage.md."
        ),
    )


def _doctor(args) -> int:
    from .plugin.doctor import run

    return run()


def _replay(args) -> int:
    from .replay.command import run

    return run(args)


def _command_name(argv: list[str]) -> str:
    """``sglang-moe-lb replay`` etc. for messages printed before the arguments are parsed."""
    name = next((a for a in argv if not a.startswith("-")), None)
    return f"sglang-moe-lb {name}" if name in ("replay", "doctor", "export-patch") else "sglang-moe-lb"


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "replay":
        return _replay(args)
    if args.command == "export-patch":
        from .fork.command import run as export_patch

        return export_patch(args)
    if args.command == "doctor":
        return _doctor(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    A Ctrl-C at any moment in here, the imports of the subcommand (torch, SGLang) included, is
    one line and exit status 130, as during the run. Called without ``argv`` (the console
    script, ``python -m sglang_moe_lb``), the process ends right after its output is flushed:
    with SGLang, Triton and torch loaded, the interpreter's teardown otherwise spends seconds in
    native finalizers that do nothing useful here.
    """
    try:
        rc = _run(argv)
    except KeyboardInterrupt:
        print(f"{_command_name(sys.argv[1:] if argv is None else argv)}: interrupted", file=sys.stderr)
        rc = 130
    if argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
