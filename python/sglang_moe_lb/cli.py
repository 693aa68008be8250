"""The ``sglang-moe-lb`` command line (also ``python -m sglang_moe_lb``).

Subcommands:
    replay   what-if: feed recorded (or bundled, or synthetic) expert routing through SGLang's
             dispatch modes and ours, and report balancedness, the gap to the LP bound and
             the modelled MoE-layer time. See docs/replay.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

__all__ = ["main", "build_parser"]

# Defaults of the no-argument run (the bundled OLMoE data); docs/replay.md documents them.
BUNDLED_STEPS = 60
BUNDLED_TOKENS = "512:4096"
SYNTHETIC_STEPS = 60
SYNTHETIC_TOKENS = "4096"


class CliError(Exception):
    """A user error: bad flag value or input file. Printed without a traceback."""


def _tokens(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX token counts, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


def _modes(text: str) -> list[str]:
    from .replay.simulate import MODES

    return list(MODES) if text.strip() == "all" else _csv(text)


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _bounded(kind: type, minimum: float, noun: str):
    """argparse type: a ``kind`` (int or float) of at least ``minimum``, with a clear message."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not v >= minimum:
            raise argparse.ArgumentTypeError(f"expected {noun} >= {minimum:g}, got {text if kind is float else v}")
        return v

    return parse


_positive = _bounded(int, 1, "an integer")
_nonneg = _bounded(int, 0, "an integer")
_nonneg_float = _bounded(float, 0, "a number")


def build_parser() -> argparse.ArgumentParser:
    from .replay.report import mode_descriptions
    from .replay.simulate import DEFAULT_MODES

    parser = argparse.ArgumentParser(
        prog="sglang-moe-lb",
        description="Dispatch-time MoE load balancing for SGLang expert parallelism (LPLB split, Waterfill).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    rp = sub.add_parser(
        "replay",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="what-if: replay expert routing through SGLang's balancing modes and ours",
        description=(
            "Replay expert routing through every balancing mode over identical batches, using SGLang's own\n"
            "EPLB placement, dispatch and Waterfill and this package's server code path (joint.balance_layer).\n"
            "Prints per mode: balancedness (mean/max rank load), the gap to the per-batch LP bound, the modelled\n"
            "MoE-layer time relative to SGLang's static dispatch, and the per-batch decision overhead on this CPU.\n\n"
            "With no DUMP it replays the bundled OLMoE per-domain expert popularity (placement calibrated on one\n"
            "domain, traffic from others, a domain shift half-way).\n\nModes:\n" + mode_descriptions()
        ),
        epilog=(
            "examples:\n"
            "  sglang-moe-lb replay                                   # bundled OLMoE data, all modes\n"
            "  sglang-moe-lb replay dump_dir/ --ep-size 16 --redundant-experts 32 --json out.json --plot img/\n"
            "  sglang-moe-lb replay --synthetic --experts 256 --top-k 8 --ep-size 64 --redundant-experts 64 \\\n"
            "      --upstream-waterfill-steps 0 --steps 20\n"
            "Schema of --json and every option: docs/replay.md."
        ),
    )
    src = rp.add_argument_group("input")
    src.add_argument(
        "inputs", nargs="*", metavar="DUMP",
        help="SGLang expert-distribution recorder dump(s): a stat .pt (logical_count [steps, layers, experts]), "
        "or the per-rank .pt files of a per_pass or per_token dump, or a directory of them. "
        "Default: the bundled OLMoE data.",
    )
    src.add_argument("--synthetic", action="store_true", help="use the synthetic generator instead of the bundled data")
    src.add_argument(
        "--steps", type=_positive, default=None,
        help=f"steps (forward passes) to replay; default {BUNDLED_STEPS} bundled, {SYNTHETIC_STEPS} synthetic, "
        "all for dumps (first N)",
    )
    src.add_argument(
        "--tokens", type=_tokens, default=None, metavar="N|MIN:MAX",
        help=f"tokens per batch (over all ranks), drawn uniformly per step; default {BUNDLED_TOKENS} bundled, "
        f"{SYNTHETIC_TOKENS} synthetic",
    )
    src.add_argument("--seed", type=int, default=0, help="seed of the token sampling and of SGLang's dynamic dispatch (default 0)")
    src.add_argument("--model", default="olmoe", help="bundled data: olmoe (64 experts, top-8; default) or mixtral, olmoe-sft, olmoe-dpo")
    src.add_argument("--calibration-domain", default="c4", help="bundled data: domain the initial placement is calibrated on (default c4)")
    src.add_argument(
        "--serving-domains", type=_csv, default=["github", "arxiv"], metavar="D1,D2,...",
        help="bundled data: served domains in order, switching every steps/len (default github,arxiv)",
    )
    src.add_argument("--experts", type=_positive, default=256, help="synthetic: logical experts (default 256)")
    src.add_argument("--top-k", type=_positive, default=None, help="synthetic: experts per token (default 8); counts-only dumps: top-k of the model (default 8)")
    src.add_argument("--layers", type=_positive, default=2, help="synthetic: MoE layers (default 2)")
    src.add_argument("--skew", type=_nonneg_float, default=1.0, help="synthetic: Zipf exponent of expert popularity, 0 = uniform (default 1.0)")
    src.add_argument("--drift", type=_nonneg_float, default=0.05, help="synthetic: per-step random-walk step of log-popularity (default 0.05)")
    src.add_argument("--shift-at", type=_nonneg, default=None, help="synthetic: step at which the popularity ranking is redrawn (default: half-way)")

    sim = rp.add_argument_group("simulation")
    sim.add_argument("--ep-size", type=_positive, default=8, help="EP ranks, each also a DP-attention rank owning a share of every batch (default 8)")
    sim.add_argument("--redundant-experts", type=_nonneg, default=16, help="--ep-num-redundant-experts (default 16)")
    sim.add_argument("--rebalance-every", type=_nonneg, default=None, help="--eplb-rebalance-num-iterations: steps between EPLB rebalances, 0 = never (default: steps/3)")
    sim.add_argument("--window", type=_positive, default=None, help="steps of recorded counts a rebalance uses (the recorder buffer; default = --rebalance-every)")
    sim.add_argument("--eplb-algorithm", default="auto", help="--eplb-algorithm for SGLang's rebalance_experts (default auto)")
    sim.add_argument("--num-groups", type=_positive, default=None, help="expert groups of the model, for hierarchical EPLB (default none)")
    sim.add_argument("--nnodes", type=_positive, default=1, help="nodes of the EP group (default 1)")
    sim.add_argument(
        "--init-placement", default="auto", choices=["auto", "calibration", "recorded", "trivial", "first-window"],
        help="initial placement: calibration counts (bundled/synthetic), the dump's recorded map, trivial, or EPLB on the "
        "first window; auto picks the first available in that order",
    )
    sim.add_argument(
        "--modes", type=_modes, default=list(DEFAULT_MODES), metavar="M1,M2,...|all",
        help="modes to run, or 'all' (default: all but upstream-waterfill-dyn, waterfill-cons-static, "
        "waterfill-all-static); must include static",
    )
    sim.add_argument(
        "--upstream-waterfill-steps", type=int, default=None, metavar="K",
        help="score SGLang's Waterfill (Triton interpreter on CPU, ~0.1 s per rank and layer) on K evenly spaced steps; "
        "0 = skip, -1 = every step (default: 4 up to EP 16, skipped above)",
    )
    sim.add_argument(
        "--lp-method", default="fast", choices=["fast", "highs"],
        help="per-batch split solver of our modes: fast (default; the server's exact solver) or highs (same optimum, faster on CPU)",
    )
    sim.add_argument("--workers", type=_positive, default=None, help="worker processes for the per-step evaluation (default: CPU count)")
    sim.add_argument("--threads", type=_positive, default=1, help="torch threads per process (default 1: the tensors are tiny)")

    out = rp.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON (schema in docs/replay.md)")
    out.add_argument("--plot", metavar="DIR", default=None, help="write replay_balancedness.png and replay_worst_step.png into DIR")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _make_trace(args):
    from .replay.sources import bundled_trace, load_recorder, synthetic_trace

    if args.inputs and args.synthetic:
        raise CliError("give either DUMP files or --synthetic, not both")
    if args.inputs:
        trace = load_recorder(args.inputs, num_ranks=args.ep_size, top_k=args.top_k, seed=args.seed)
        if args.steps is not None and args.steps < trace.num_steps:
            trace = replace(trace, num_steps=args.steps)
        return trace
    if args.synthetic:
        steps = args.steps or SYNTHETIC_STEPS
        return synthetic_trace(
            steps=steps, tokens=args.tokens or _tokens(SYNTHETIC_TOKENS), num_ranks=args.ep_size,
            experts=args.experts, top_k=args.top_k or 8, layers=args.layers, skew=args.skew, drift=args.drift,
            shift_at=steps // 2 if args.shift_at is None else args.shift_at, seed=args.seed,
        )
    return bundled_trace(
        steps=args.steps or BUNDLED_STEPS, tokens=args.tokens or _tokens(BUNDLED_TOKENS), num_ranks=args.ep_size,
        model=args.model, calibration=args.calibration_domain, serving=args.serving_domains, seed=args.seed,
    )


def _replay(args) -> int:
    from .placement import PlacementError
    from .replay.report import format_table, write_json, write_plots
    from .replay.simulate import ReplayConfig, run_replay
    from .replay.sources import TraceFormatError

    t0 = time.perf_counter()
    try:
        trace = _make_trace(args)
        every = args.rebalance_every if args.rebalance_every is not None else max(1, trace.num_steps // 3)
        cfg = ReplayConfig(
            ep_size=args.ep_size, redundant_experts=args.redundant_experts, rebalance_every=every,
            window=args.window, eplb_algorithm=args.eplb_algorithm, num_groups=args.num_groups, nnodes=args.nnodes,
            init_placement=args.init_placement, modes=tuple(args.modes),
            upstream_waterfill_steps=args.upstream_waterfill_steps, lp_method=args.lp_method, seed=args.seed,
            threads=args.threads, workers=args.workers, progress=not args.no_progress and sys.stderr.isatty(),
        )
        cfg.validate()
        res = run_replay(trace, cfg)
    except (TraceFormatError, PlacementError, CliError) as err:
        raise CliError(str(err)) from None
    except ValueError as err:
        raise CliError(str(err)) from None
    res.wall_s = time.perf_counter() - t0
    print(format_table(res))
    if args.json:
        write_json(res, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        for p in write_plots(res, args.plot):
            print(f"wrote {p}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Called without ``argv`` (the console script, ``python -m sglang_moe_lb``), the process ends
    right after its output is flushed: with SGLang, Triton and torch loaded, the interpreter's
    teardown otherwise spends seconds in native finalizers that do nothing useful here.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "replay":
            rc = _replay(args)
        else:
            parser.error(f"unknown command {args.command!r}")
    except CliError as err:
        print(f"sglang-moe-lb {args.command}: error: {err}", file=sys.stderr)
        rc = 2
    if argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
