"""The ``sglang-moe-lb replay`` subcommand: flags, up-front checks, and the run.

The flags are walked once, into a ``ReplayArgs`` (``from_args``: the trace's source and knobs
with their defaults, the simulation's ``setup.ReplayConfig``, the output paths); nothing after
that reads them. Every flag value and output path is checked before any work starts; a user
error is one line (``sglang-moe-lb replay: error: ...``, exit 2) naming the flag or file. A run
estimated above a minute says so in one line first (``estimate.py``). Ctrl-C and SIGTERM end
the run quietly: one line, exit 130 or 143, worker processes terminated; a worker process that
dies (the OOM killer) ends it in one line, exit 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["add_parser", "run", "from_args", "ReplayArgs", "TraceSpec", "ReplayCliError", "ReplayRunError",
           "BUNDLED_STEPS", "SYNTHETIC_STEPS", "MAX_SEED"]

# Defaults of the no-argument run (the bundled OLMoE data); docs/replay.md documents them.
BUNDLED_STEPS = 60
BUNDLED_TOKENS = (512, 4096)
SYNTHETIC_STEPS = 60
SYNTHETIC_TOKENS = (4096, 4096)
SYNTHETIC_DEFAULTS = {"experts": 256, "top_k": 8, "layers": 2, "skew": 1.0, "drift": 0.05}
BUNDLED_DEFAULTS = {"model": "olmoe", "calibration_domain": "c4", "serving_domains": ["github", "arxiv"]}
SWEEP_EXAMPLE = "1,16,64,256,1024,4096,16384"
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's non-negative range


class ReplayCliError(Exception):
    """A user error: bad flag value or input file. Printed without a traceback, exit 2."""


class ReplayRunError(Exception):
    """The run could not finish (a worker process died, the JSON could not be written). One line, exit 1."""


# ---------------------------------------------------------------------------------------------
# argparse types
# ---------------------------------------------------------------------------------------------
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


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated tokens per rank, e.g. {SWEEP_EXAMPLE}; got {text!r}") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"tokens per rank must be >= 1, got {text!r}")
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"a size is given twice in {text!r}")
    return sizes


def _bounded(kind: type, minimum: float, noun: str, maximum: float | None = None):
    """argparse type: a ``kind`` (int or float) in ``[minimum, maximum]``, with a clear message.
    A float must be finite: ``inf`` and ``nan`` parse as floats but mean nothing here."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if not v >= minimum or (maximum is not None and not v <= maximum):
            rng = f">= {minimum:g}" if maximum is None else f"in [{minimum:g}, {maximum:g}]"
            if kind is int:  # exact bounds: 2**63 - 1 is not 9.22337e+18
                rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"expected {noun} {rng}, got {text}")
        return v

    return parse


def _name(text: str) -> str:
    """argparse type: a non-empty name or path (an empty one would silently mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value, got ''")
    return text


_positive = _bounded(int, 1, "an integer")
_nonneg = _bounded(int, 0, "an integer")
_nonneg_float = _bounded(float, 0, "a number")
_share = _bounded(float, 0, "a number", 1)
_seed = _bounded(int, 0, "an integer", MAX_SEED)


_steps_k = _bounded(int, -1, "an integer")


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------
def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``replay`` subparser to ``sub`` (an argparse subparsers object)."""
    from .mode_names import SGLANG_MODES, default_mode_names, describe, parse_mode, server_default

    ours = [parse_mode(n) for n in default_mode_names() if n not in SGLANG_MODES]
    mode_lines = "\n".join(f"  {n:<24}{d}" for n, d in SGLANG_MODES.items())
    mode_lines += "\n" + "\n".join(f"  {m.name}\n  {'':<24}{describe(m.balance)}" for m in ours)
    rp = sub.add_parser(
        "replay",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="what-if: replay expert routing through SGLang's balancing modes and ours",
        description=(
            "Replay expert routing through every balancing mode over identical batches, using SGLang's own\n"
            "EPLB placement, dispatch and Waterfill and this package's server code path (chain.balance_layer).\n"
            "Prints per mode: balancedness (mean/max rank load), the gap to the per-batch LP bound, the MoE-layer\n"
            "time relative to SGLang's static dispatch (token-based, and modelled: cost model + overhead), and the\n"
            "per-batch decision time on this CPU. --batch-sweep repeats the time model at fixed batch sizes.\n\n"
            "With no DUMP it replays the bundled OLMoE per-domain expert popularity (placement calibrated on one\n"
            "domain, traffic from others, a domain shift half-way).\n\n"
            "Modes: SGLang's, and any --moe-lb mode by its name (flag/schedule/sync/objective/candidates[/gate]).\n"
            f"--moe-lb lplb with default sub-options runs {server_default('lplb')}; waterfill+lplb runs "
            f"{server_default('waterfill+lplb')}.\nSGLang modes, then our default set:\n" + mode_lines
        ),
        epilog=(
            "examples:\n"
            "  sglang-moe-lb replay                                   # bundled OLMoE data, default modes\n"
            "  sglang-moe-lb replay dump_dir/ --ep-size 16 --redundant-experts 32 --json out.json --plot img/\n"
            f"  sglang-moe-lb replay --batch-sweep {SWEEP_EXAMPLE} --json sweep.json --plot img/\n"
            "  sglang-moe-lb replay --synthetic --experts 256 --top-k 8 --ep-size 64 --redundant-experts 64 \\\n"
            "      --upstream-waterfill-steps 0 --steps 20\n"
            "Schema of --json and every option: docs/replay.md."
        ),
    )
    src = rp.add_argument_group("input")
    src.add_argument(
        "inputs", nargs="*", metavar="DUMP", type=_name,
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
        help=f"bundled/synthetic: tokens per batch (over all ranks), drawn uniformly per step; default "
        f"{BUNDLED_TOKENS[0]}:{BUNDLED_TOKENS[1]} bundled, {SYNTHETIC_TOKENS[0]} synthetic",
    )
    src.add_argument("--seed", type=_seed, default=0,
                     help=f"seed of the token sampling and of SGLang's dynamic dispatch, 0 to {MAX_SEED} (default 0)")
    src.add_argument("--model", type=_name, default=None, help="bundled data: olmoe (64 experts, top-8; default) or mixtral, olmoe-sft, olmoe-dpo")
    src.add_argument("--calibration-domain", type=_name, default=None, help="bundled data: domain the initial placement is calibrated on (default c4)")
    src.add_argument(
        "--serving-domains", type=_csv, default=None, metavar="D1,D2,...",
        help="bundled data: served domains in order, switching every steps/len (default github,arxiv)",
    )
    src.add_argument("--experts", type=_bounded(int, 2, "an integer"), default=None, help="synthetic: logical experts (default 256)")
    src.add_argument("--top-k", type=_positive, default=None,
                     help="synthetic: experts per token (default 8); counts-only dumps: top-k of the model (default 8); "
                     "per_token dumps: only to widen rows (narrower than the dump's rows is rejected)")
    src.add_argument("--layers", type=_positive, default=None, help="synthetic: MoE layers (default 2)")
    src.add_argument("--skew", type=_nonneg_float, default=None, help="synthetic: Zipf exponent of expert popularity, 0 = uniform (default 1.0)")
    src.add_argument("--drift", type=_nonneg_float, default=None, help="synthetic: per-step random-walk step of log-popularity (default 0.05)")
    src.add_argument("--shift-at", type=_nonneg, default=None, help="synthetic: step at which the popularity ranking is redrawn (default: half-way)")

    sim = rp.add_argument_group("simulation")
    sim.add_argument("--ep-size", type=_positive, default=8, help="EP ranks, each also a DP-attention rank owning a share of every batch (default 8)")
    sim.add_argument("--redundant-experts", type=_nonneg, default=16, help="--ep-num-redundant-experts (default 16)")
    sim.add_argument("--rebalance-every", type=_nonneg, default=None, help="--eplb-rebalance-num-iterations: steps between EPLB rebalances, 0 = never (default: steps/3)")
    sim.add_argument("--window", type=_positive, default=None, help="steps of recorded counts a rebalance uses (the recorder buffer; default = --rebalance-every)")
    sim.add_argument("--eplb-algorithm", type=_name, default="auto", help="--eplb-algorithm for SGLang's rebalance_experts (default auto; SGLang's names)")
    sim.add_argument("--num-groups", type=_positive, default=None, help="expert groups of the model, for hierarchical EPLB; must divide the experts (default none)")
    sim.add_argument("--nnodes", type=_positive, default=1, help="nodes of the EP group; must divide --ep-size (default 1)")
    sim.add_argument(
        "--init-placement", default="auto", choices=["auto", "calibration", "recorded", "trivial", "first-window"],
        help="initial placement: calibration counts (bundled/synthetic), the dump's recorded map, trivial, or EPLB on the "
        "first window; auto picks the first available in that order",
    )
    sim.add_argument(
        "--placement", default="auto", choices=["auto", "eplb", "decode"],
        help="our modes' placement: SGLang's EPLB, or EPLB followed by the decode-aware post-step (same replica "
        "counts, copies moved so plans can switch them off evenly); auto (default, as the server's "
        "--moe-lb-placement): decode from 16 EP ranks on, else eplb. SGLang's modes always run on EPLB's",
    )
    sim.add_argument("--plan-refresh", type=_nonneg, default=None, metavar="STEPS",
                     help="steps between plan refreshes from recent counts (no weights move); 0 = only at each "
                     "rebalance (default: --rebalance-every / 4)")
    sim.add_argument("--plan-window", type=_positive, default=None, metavar="STEPS",
                     help="recorded steps a plan is solved from (default: --plan-refresh, at least 1)")
    sim.add_argument(
        "--modes", type=_csv, default=None, metavar="M1,M2,...|all|default",
        help="modes to run: names (see above), the --moe-lb values lplb, waterfill, waterfill+lplb (their server "
        "defaults), 'default' (the set above) or 'all' (every SGLang mode and every --moe-lb mode, gated or not); "
        "must include static",
    )
    sim.add_argument(
        "--upstream-waterfill-steps", type=_steps_k, default=None, metavar="K",
        help="score SGLang's Waterfill (Triton interpreter on CPU, ~0.1 s per rank and layer) on K evenly spaced steps; "
        "0 = skip, -1 = every step (default: 4 up to EP 16, skipped above; 1 per size in a --batch-sweep)",
    )
    sim.add_argument(
        "--lp-method", default="fast", choices=["fast", "highs"],
        help="split solver of our per-batch modes: fast (default: the core's FLOAT_STEPS, what the server's CPU path "
        "runs) or highs (HiGHS LP; the same integral optimum, but another optimal split, so Waterfill after it may differ)",
    )
    sim.add_argument("--workers", type=_positive, default=None, help="worker processes for the per-step evaluation (default: CPU count)")
    sim.add_argument("--threads", type=_positive, default=1, help="torch threads per process (default 1: the tensors are tiny)")

    cm = rp.add_argument_group("time model (--cost-model options)")
    cm.add_argument("--batch-sweep", type=_sizes, default=None, metavar="N1,N2,...",
                    help=f"also replay the routing at these tokens per rank per batch (e.g. {SWEEP_EXAMPLE}) and report "
                    "modelled time vs SGLang static per mode and size")
    cm.add_argument("--sweep-steps", type=_positive, default=8, help="steps per --batch-sweep size, evenly spaced (default 8)")
    cm.add_argument("--cost-model-config", type=_name, default=None, metavar="PRESET|config.json",
                    help="model expert shape: a preset (olmoe, deepseek-v3, qwen1.5-moe, mixtral) or an HF config.json "
                    "(default: olmoe for the bundled data, mixtral for --model mixtral, deepseek-v3 otherwise)")
    cm.add_argument("--gpu", type=_name, default="H200", help="GPU of the datasheet table (cost.GPUS: H200, H100, A100, B200, MI300X; default H200)")
    cm.add_argument("--dtype", type=_name, default=None, help="expert weight dtype: fp8, bf16, fp16, fp32, int4 (default: the preset's; bf16 for a config file)")
    cm.add_argument("--calibration", type=_name, default=None, metavar="FILE", help="measured calibration file (docs/cost-model.md) overriding the datasheet")
    cm.add_argument("--tile-tokens", type=_positive, default=None, help="grouped-GEMM M-tile in tokens (default: the calibration's, else 128)")
    cm.add_argument("--overheads", type=_name, default=None, metavar="FILE", help="per-mode overhead table (default: the shipped H200 measurements)")
    cm.add_argument("--collective-us", type=_nonneg_float, default=None, help="override the all-gather µs per layer of global-sync modes")
    cm.add_argument("--expected-gain", type=_share, default=None,
                    help="gated modes: share of the layer time the per-batch work is expected to save over what runs "
                    "when the gate is closed (default: 0.05 over static; 0.02 over a plan)")

    out = rp.add_argument_group("output")
    out.add_argument("--json", type=_name, metavar="FILE", default=None, help="write the results as JSON (schema in docs/replay.md)")
    out.add_argument("--plot", type=_name, metavar="DIR", default=None,
                     help="write replay_balancedness.png, replay_worst_step.png (and replay_sweep.png) into DIR")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return rp


# ---------------------------------------------------------------------------------------------
# The one walk of the flags
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceSpec:
    """Where the traffic comes from (``source``: dump, synthetic or bundled), defaults resolved.

    ``steps`` is None for a dump without ``--steps`` (all of them); ``top_k`` is None where the
    input decides it (a dump, or the bundled model)."""

    source: str
    ep_size: int
    seed: int
    inputs: tuple[str, ...] = ()
    steps: int | None = None
    tokens: tuple[int, int] = BUNDLED_TOKENS
    top_k: int | None = None
    model: str = BUNDLED_DEFAULTS["model"]
    calibration_domain: str = BUNDLED_DEFAULTS["calibration_domain"]
    serving_domains: tuple[str, ...] = tuple(BUNDLED_DEFAULTS["serving_domains"])
    experts: int = SYNTHETIC_DEFAULTS["experts"]
    layers: int = SYNTHETIC_DEFAULTS["layers"]
    skew: float = SYNTHETIC_DEFAULTS["skew"]
    drift: float = SYNTHETIC_DEFAULTS["drift"]
    shift_at: int | None = None


@dataclass(frozen=True)
class ReplayArgs:
    """Every flag, walked once: the trace, the simulation's config, the outputs."""

    trace: TraceSpec
    config: object  # setup.ReplayConfig (imported lazily: it pulls in torch)
    json: str | None = None
    plot: str | None = None


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _source(args) -> str:
    if args.inputs and args.synthetic:
        raise ReplayCliError("give either DUMP files or --synthetic, not both")
    return "dump" if args.inputs else "synthetic" if args.synthetic else "bundled"


def _check_source_flags(args, source: str) -> None:
    """Flags of another source would be silently ignored: reject them."""
    synthetic_only = [f for f in ("experts", "layers", "skew", "drift", "shift_at") if getattr(args, f) is not None]
    bundled_only = [f for f in ("model", "calibration_domain", "serving_domains") if getattr(args, f) is not None]
    if source != "synthetic" and synthetic_only:
        raise ReplayCliError(f"{_flag(synthetic_only[0])} applies to --synthetic only")
    if source != "bundled" and bundled_only:
        raise ReplayCliError(f"{_flag(bundled_only[0])} applies to the bundled data only (no DUMP, no --synthetic)")
    if source == "dump" and args.tokens is not None:
        raise ReplayCliError("--tokens applies to the bundled data and --synthetic; a dump has its own batches "
                             "(use --batch-sweep to replay it at other sizes)")
    if source == "bundled" and args.top_k is not None:
        raise ReplayCliError("--top-k: the bundled data has the top-k of its model (use --synthetic to choose it)")


def _trace_spec(args, source: str) -> TraceSpec:
    given = {k: v for k, v in vars(args).items() if v is not None}
    common = {"source": source, "ep_size": args.ep_size, "seed": args.seed, "top_k": args.top_k}
    if source == "dump":
        return TraceSpec(inputs=tuple(args.inputs), steps=args.steps, **common)
    if source == "synthetic":
        steps = args.steps or SYNTHETIC_STEPS
        knobs = {k: given[k] for k in ("experts", "layers", "skew", "drift") if k in given}
        return TraceSpec(steps=steps, tokens=args.tokens or SYNTHETIC_TOKENS,
                         shift_at=steps // 2 if args.shift_at is None else args.shift_at, **knobs, **common)
    knobs = {k: given[k] for k in ("model", "calibration_domain") if k in given}
    if args.serving_domains is not None:
        knobs["serving_domains"] = tuple(args.serving_domains)
    return TraceSpec(steps=args.steps or BUNDLED_STEPS, tokens=args.tokens or BUNDLED_TOKENS, **knobs, **common)


def from_args(args) -> ReplayArgs:
    """The flags (an ``argparse.Namespace`` of ``add_parser``'s) walked once; raises ``ReplayCliError``
    for a source conflict or a flag of another source."""
    from .cost_setup import CostOptions
    from .setup import DEFAULT_MODES, ReplayConfig

    source = _source(args)
    _check_source_flags(args, source)
    cost = CostOptions(config=args.cost_model_config, gpu=args.gpu, dtype=args.dtype, calibration=args.calibration,
                       tile_tokens=args.tile_tokens, overheads=args.overheads, collective_us=args.collective_us,
                       expected_gain=args.expected_gain)
    config = ReplayConfig(
        ep_size=args.ep_size, redundant_experts=args.redundant_experts, rebalance_every=args.rebalance_every,
        window=args.window, eplb_algorithm=args.eplb_algorithm, num_groups=args.num_groups, nnodes=args.nnodes,
        init_placement=args.init_placement, modes=tuple(args.modes or DEFAULT_MODES),
        upstream_waterfill_steps=args.upstream_waterfill_steps, lp_method=args.lp_method, seed=args.seed,
        threads=args.threads, workers=args.workers, progress=not args.no_progress and sys.stderr.isatty(),
        cost=cost, batch_sweep=tuple(args.batch_sweep or ()), sweep_steps=args.sweep_steps,
        placement=args.placement, plan_refresh=args.plan_refresh, plan_window=args.plan_window,
    )
    return ReplayArgs(_trace_spec(args, source), config, args.json, args.plot)


# ---------------------------------------------------------------------------------------------
# Up-front checks
# ---------------------------------------------------------------------------------------------
def _first_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def check_output_file(path: str, flag: str) -> None:
    """A file we will write: not a directory, writable, or creatable in a writable directory."""
    p = Path(path)
    if p.exists():
        if p.is_dir():
            raise ReplayCliError(f"{flag} {path}: is a directory; give a file name")
        if not os.access(p, os.W_OK):
            raise ReplayCliError(f"{flag} {path}: not writable")
        return
    _check_creatable(_first_existing(p.parent), path, flag)


def _check_creatable(base: Path, path: str, flag: str) -> None:
    """``path`` does not exist yet: its first existing ancestor ``base`` must let us create it."""
    if not base.is_dir():
        raise ReplayCliError(f"{flag} {path}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ReplayCliError(f"{flag} {path}: cannot create it ({base} is not writable)")


def check_output_dir(path: str, flag: str) -> None:
    """A directory we will write into: an existing writable one, or creatable."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ReplayCliError(f"{flag} {path}: exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ReplayCliError(f"{flag} {path}: not writable")
        return
    _check_creatable(_first_existing(p), path, flag)


def check_outputs(spec: ReplayArgs) -> None:
    if spec.json:
        check_output_file(spec.json, "--json")
    if spec.plot:
        check_output_dir(spec.plot, "--plot")
        from .report import PLOT_FILES, SWEEP_PLOT

        plots = {(Path(spec.plot) / f).absolute() for f in PLOT_FILES + (SWEEP_PLOT,)}
        if spec.json and Path(spec.json).absolute() in plots:
            raise ReplayCliError(f"--json {spec.json} is also a --plot output file; give another name")


def _generator_checks(ts: TraceSpec) -> None:
    """Memory of the generators' batches and popularity walk, before any is drawn."""
    from .sampling import MAX_BATCH_BYTES
    from .setup import check_batch_memory

    if ts.source == "bundled":
        check_batch_memory(3, ts.tokens[1], 64, "--tokens")  # every bundled model: 3 layers, 64 experts
    elif ts.source == "synthetic":
        k = ts.top_k or SYNTHETIC_DEFAULTS["top_k"]
        if k > ts.experts:
            raise ReplayCliError(f"--top-k {k} must be at most --experts {ts.experts}")
        check_batch_memory(ts.layers, ts.tokens[1], ts.experts, "--tokens")
        walk = ts.steps * ts.layers * ts.experts * 8 * 3
        if walk > MAX_BATCH_BYTES:
            raise ReplayCliError(f"--steps x --layers x --experts: the popularity walk needs ~{walk / 2**30:.1f} GiB "
                                 f"(limit {MAX_BATCH_BYTES / 2**30:.0f} GiB)")
        if ts.shift_at is not None and ts.shift_at >= ts.steps:
            raise ReplayCliError(f"--shift-at {ts.shift_at} is beyond the last step ({ts.steps - 1})")


# ---------------------------------------------------------------------------------------------
# Trace, run
# ---------------------------------------------------------------------------------------------
def make_trace(ts: TraceSpec):
    """(the ``Trace``, notes for the report)."""
    from .dumps import load_recorder
    from .sources import bundled_trace, synthetic_trace

    notes = []
    if ts.source == "dump":
        trace = load_recorder(ts.inputs, num_ranks=ts.ep_size, top_k=ts.top_k, seed=ts.seed)
        if ts.steps is not None and ts.steps < trace.num_steps:
            trace = replace(trace, num_steps=ts.steps)
        elif ts.steps is not None and ts.steps > trace.num_steps:
            notes.append(f"--steps {ts.steps}: the dump has {trace.num_steps} steps with tokens; replaying those")
        return trace, notes
    if ts.source == "synthetic":
        return synthetic_trace(
            steps=ts.steps, tokens=ts.tokens, num_ranks=ts.ep_size, experts=ts.experts,
            top_k=ts.top_k or SYNTHETIC_DEFAULTS["top_k"], layers=ts.layers, skew=ts.skew, drift=ts.drift,
            shift_at=ts.shift_at, seed=ts.seed,
        ), notes
    return bundled_trace(steps=ts.steps, tokens=ts.tokens, num_ranks=ts.ep_size, model=ts.model,
                         calibration=ts.calibration_domain, serving=ts.serving_domains, seed=ts.seed), notes


def _warn_if_long(setup, trace) -> None:
    """One line on stderr when the run is estimated above a minute (``estimate.py``)."""
    from .estimate import estimate_run, long_run_line, mean_tokens
    from .evaluate import worker_count

    line = long_run_line(setup, estimate_run(setup, mean_tokens(trace), worker_count(setup.cfg, setup.N)))
    if line:
        print(line, file=sys.stderr, flush=True)


def _write_outputs(res, spec: ReplayArgs) -> None:
    from .report import write_json, write_plots

    if spec.json:
        try:
            write_json(res, spec.json)
        except (ValueError, OSError) as err:  # nothing was written: write_json is all or nothing
            raise ReplayRunError(f"--json {spec.json}: not written: {err}") from None
        print(f"wrote {spec.json}")
    if spec.plot:
        for p in write_plots(res, spec.plot):
            print(f"wrote {p}")


def _checked_run(spec: ReplayArgs) -> int:
    from ..placement import PlacementError
    from . import simulate
    from .report import format_sweep, format_table
    from .setup import check_batch_memory, make_setup
    from .sources import TraceFormatError

    t0 = time.perf_counter()
    try:
        check_outputs(spec)
        _generator_checks(spec.trace)
        cfg = spec.config
        cfg.validate()  # flag values alone, before reading anything
        trace, notes = make_trace(spec.trace)
        for n in cfg.batch_sweep:
            check_batch_memory(trace.num_layers, n * cfg.ep_size, trace.num_logical, f"--batch-sweep {n}")
        setup = make_setup(trace, cfg)
        setup.notes[:0] = notes
        _warn_if_long(setup, trace)
        res = simulate.run_replay(trace, setup.cfg, setup)
    except (TraceFormatError, PlacementError, ReplayCliError, ValueError) as err:
        raise ReplayCliError(str(err)) from None
    res.wall_s = time.perf_counter() - t0
    print(format_table(res))
    if res.sweep:
        print()
        print(format_sweep(res))
    _write_outputs(res, spec)
    return 0


def run(args) -> int:
    """The subcommand; returns the exit status (2: user error, 1: the run failed, 130: Ctrl-C,
    143: SIGTERM)."""
    from .pool import Terminated, WorkerDied, signals_as_exceptions

    try:
        with signals_as_exceptions():
            return _checked_run(from_args(args))
    except ReplayCliError as err:
        print(f"sglang-moe-lb replay: error: {err}", file=sys.stderr)
        return 2
    except WorkerDied as err:
        print(f"sglang-moe-lb replay: error: {err}; rerun with fewer --workers (e.g. --workers 1) or a smaller run "
              "(--steps, --tokens, --ep-size)", file=sys.stderr)
        return 1
    except ReplayRunError as err:
        print(f"sglang-moe-lb replay: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sglang-moe-lb replay: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("sglang-moe-lb replay: terminated", file=sys.stderr)
        return 143
