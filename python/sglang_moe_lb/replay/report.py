"""The *report* stage: a ``ReplayResult`` as the stdout tables, the JSON file and the PNG plots."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ReplayResult", "format_table", "format_sweep", "write_json", "write_plots", "PLOT_FILES", "SWEEP_PLOT"]

PLOT_FILES = ("replay_balancedness.png", "replay_worst_step.png")
SWEEP_PLOT = "replay_sweep.png"


@dataclass
class ReplayResult:
    config: dict
    modes: dict
    bound: dict
    bound_local_shared: dict
    bound_routed: dict
    rebalance_steps: list
    phases: list
    sampled_steps: list
    notes: list
    skipped: dict
    wall_s: float
    sweep: list = field(default_factory=list)
    server_default: dict = field(default_factory=dict)
    series: dict = field(repr=False, default_factory=dict)
    worst: dict = field(repr=False, default_factory=dict)
    arrays: dict = field(repr=False, default_factory=dict)
    """Raw numbers (not in the JSON): ``slots[mode]`` ``[steps, L, R, S+1]`` tokens per fused slot,
    ``total[mode]`` / ``routed[mode]`` ``[steps, L, R]`` loads (NaN where not scored),
    ``bound_joint`` / ``bound_local`` / ``bound_routed`` ``[steps, L]`` LP max loads, ``tokens``
    ``[steps, R]``, ``placements`` (each ``[L, P]``) and ``state_of_step``."""

    def to_json(self, per_step: bool = True) -> dict:
        out = {
            "config": self.config,
            "server_default": self.server_default,
            "modes": self.modes,
            "bound": self.bound,
            "bound_local_shared": self.bound_local_shared,
            "bound_routed": self.bound_routed,
            "rebalance_steps": self.rebalance_steps,
            "phases": [{"start_step": s, "label": lab} for s, lab in self.phases],
            "sampled_steps": self.sampled_steps,
            "notes": self.notes,
            "skipped": self.skipped,
            "wall_s": round(self.wall_s, 3),
        }
        if self.sweep:
            out["sweep"] = self.sweep
        if per_step:
            out["per_step"] = {
                "balancedness": {k: [None if math.isnan(v) else round(float(v), 6) for v in s]
                                 for k, s in self.series.items()},
            }
        return out


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def _name_width(res: ReplayResult) -> int:
    return max([24] + [len(n) + 2 for n in res.modes])


def format_table(res: ReplayResult) -> str:
    """The per-mode table (one row per mode, then the two LP bounds), with notes."""
    cfg = res.config
    w = _name_width(res)
    head = (
        f"{'mode':<{w}}{'by':<7}{'steps':>6}{'bal mean':>9}{'bal p5':>8}{'gap->bound':>11}"
        f"{'gap->class':>11}{'MoE time':>9}{'modelled':>10}{'overhead':>9}{'CPU':>9}"
    )
    sub = (f"{'':<{w}}{'':<7}{'':>6}{'':>9}{'':>8}{'(joint LP)':>11}{'bound':>11}{'/static':>9}"
           f"{'t/static':>10}{'us/layer':>9}{'ms/batch':>9}")
    lines = [head, sub, "-" * len(head)]
    for name, m in res.modes.items():
        cls = "J" if m["class_bound"] == "joint" else "L"
        star = "*" if m["steps_scored"] < cfg["num_steps"] else " "
        cpu = f"{m['overhead_ms_per_batch']:8.2f}{'i' if 'overhead_note' in m else ' '}"
        lines.append(
            f"{name + star:<{w}}{'SGLang' if m['family'] == 'upstream' else 'ours':<7}{m['steps_scored']:>6}"
            f"{m['balancedness_mean']:>9.4f}{m['balancedness_p5']:>8.4f}{_pct(m['gap_to_bound_mean']):>11}"
            f"{_pct(m['gap_to_class_bound_mean']) + ' ' + cls:>11}{m['moe_time_ratio_vs_static']:>9.4f}"
            f"{m['time_vs_static']:>10.4f}{m['overhead_us_per_layer']:>9.1f}{cpu:>9}"
        )
    lines.append("-" * len(head))
    for label, b in (("bound (joint LP)", res.bound), ("bound (shared local)", res.bound_local_shared)):
        lines.append(
            f"{label:<{w}}{'LP':<7}{cfg['num_steps']:>6}{b['balancedness_mean']:>9.4f}{b['balancedness_p5']:>8.4f}"
            f"{'':>11}{'':>11}{b['moe_time_ratio_vs_static']:>9.4f}"
        )
    out = ["\n".join(lines)]
    legend = [
        "balancedness = mean rank load / max rank load per layer, averaged over layers; p5 over steps.",
        "Load = routed token-slots received + shared-expert tokens run on the rank (same total work in every mode).",
        "gap->bound = 1 - joint-LP max / achieved max (shared expert may go anywhere); gap->class: J = same, "
        "L = against the LP with the shared expert kept on the source rank (the best a routed-only mode can do).",
        "MoE time/static = sum over steps and layers of the max rank load, relative to static on the same steps.",
        f"modelled t/static = busiest rank's grouped-GEMM time (cost model: {cfg['cost_model']}) plus the mode's "
        "overhead per layer (measured kernels + collective; 0 for SGLang static/dynamic), relative to static.",
        "CPU = one rank's dispatch-decision time per batch (all layers) on this CPU"
        + (" (i = Triton interpreter)" if any("overhead_note" in m for m in res.modes.values()) else "") + ".",
    ]
    if any(m["steps_scored"] < cfg["num_steps"] for m in res.modes.values()):
        legend.append("* scored on a subset of steps; its ratio and gaps are against the other modes on the same steps.")
    out.append("\n".join(legend))
    for name, m in res.modes.items():
        if "on_sampled_steps" in m:
            rows = [f"On the {m['steps_scored']} steps where {name} ran ({res.sampled_steps}):"]
            for other, s in m["on_sampled_steps"].items():
                rows.append(
                    f"  {other:<{w}}bal mean {s['balancedness_mean']:.4f}   MoE time/static {s['moe_time_ratio_vs_static']:.4f}"
                )
            out.append("\n".join(rows))
    summ = _headline(res)
    if summ:
        out.append(summ)
    info = [
        f"trace: {_trace_line(cfg)}",
        f"EP {cfg['ep_size']}, {cfg['num_logical_experts']} experts + {cfg['redundant_experts']} redundant "
        f"({cfg['slots_per_rank']} slots/rank), top-{cfg['top_k']}, {cfg['num_layers']} layers, {cfg['num_steps']} steps; "
        f"EPLB {cfg['eplb_algorithm_resolved']} every {cfg['rebalance_every'] or 'never'} steps on a {cfg['window']}-step "
        f"window (rebalanced at {res.rebalance_steps}); SGLang {cfg['sglang_version']}",
        f"--moe-lb lplb runs {res.server_default['lplb']}; --moe-lb waterfill+lplb runs {res.server_default['waterfill+lplb']} "
        "(mode.SERVER_DEFAULTS)",
    ]
    info += [f"note: {n}" for n in res.notes]
    info += [f"skipped {k}: {v}" for k, v in res.skipped.items()]
    info.append(f"wall time {res.wall_s:.1f} s")
    out.append("\n".join(info))
    return "\n\n".join(out)


def format_sweep(res: ReplayResult) -> str:
    """Modelled time vs SGLang static per mode (rows) and batch size (columns), then break-even µs."""
    sizes = [row["tokens_per_rank"] for row in res.sweep]
    names = list(dict.fromkeys(n for row in res.sweep for n in row["modes"]))
    w = max([24] + [len(n) + 2 for n in names])
    head = f"{'tokens per rank ->':<{w}}" + "".join(f"{n:>9}" for n in sizes)

    def table(title: str, key: str, fmt: str) -> str:
        lines = [title, head, "-" * len(head)]
        for n in names:
            cells = []
            for row in res.sweep:
                v = row["modes"].get(n, {}).get(key)
                cells.append(f"{'-' if v is None else format(v, fmt):>9}")
            lines.append(f"{n:<{w}}" + "".join(cells))
        return "\n".join(lines)

    default = res.server_default
    foot = [
        "time/static = (busiest rank's modelled layer time + the mode's overhead) / SGLang static's, summed over "
        "steps and layers; < 1 is faster than static. Gated modes run static (ratio 1, no overhead) where the gate is closed.",
        f"cost model: {res.config['cost_model']}; overheads: {res.config['overheads_source']}.",
        f"--moe-lb lplb runs {default['lplb']}; waterfill+lplb runs {default['waterfill+lplb']}.",
        "break-even = the largest overhead per layer (us) at which the mode, where it balances, would still match static "
        "(negative: slower than static even for free).",
    ]
    return "\n\n".join([
        table("modelled MoE-layer time with overhead / SGLang static, per batch size", "time_vs_static", ".4f"),
        table("tile balancedness (grouped-GEMM tiles per rank, mean/max)", "tile_balancedness", ".4f"),
        table("break-even overhead, us per layer", "break_even_overhead_us", ".1f"),
        "\n".join(foot),
    ])


def _trace_line(cfg: dict) -> str:
    tr = cfg["trace"]
    if tr.get("kind") == "bundled":
        return (
            f"bundled {tr['model']} data ({tr['provenance']}); placement calibrated on {tr['calibration_domain']}, "
            f"serving {' -> '.join(tr['serving_domains'])}; {tr['tokens_per_batch'][0]}-{tr['tokens_per_batch'][1]} "
            f"tokens/batch, seed {tr['seed']}"
        )
    if tr.get("kind") == "synthetic":
        return (
            f"synthetic: {tr['experts']} experts, top-{tr['top_k']}, skew {tr['skew']}, drift {tr['drift']}, "
            f"shift at {tr['shift_at']}, {tr['tokens_per_batch'][0]}-{tr['tokens_per_batch'][1]} tokens/batch, seed {tr['seed']}"
        )
    return f"SGLang recorder dump ({tr.get('kind')}): {', '.join(tr.get('files', []))}"


def _headline(res: ReplayResult) -> str:
    modes = res.modes
    ups = {n: m for n, m in modes.items() if m["family"] == "upstream" and m["steps_scored"] == res.config["num_steps"]}
    ours = {n: m for n, m in modes.items() if m["family"] == "ours"}
    if not ups or not ours:
        return ""
    bu = max(ups, key=lambda n: ups[n]["balancedness_mean"])
    bo = max(ours, key=lambda n: ours[n]["balancedness_mean"])
    # Ties (within rounding) go to the server defaults, then to the mode listed first.
    defaults = set(res.server_default.values())
    fast = min((n for n in modes if modes[n]["steps_scored"] == res.config["num_steps"]),
               key=lambda n: (round(modes[n]["time_vs_static"], 6), n not in defaults))
    return (
        f"Best of ours: {bo} (balancedness {ours[bo]['balancedness_mean']:.4f}, MoE time x{ours[bo]['moe_time_ratio_vs_static']:.3f} "
        f"of static, {100 * ours[bo]['gap_to_bound_mean']:.2f}% from the joint LP bound {res.bound['balancedness_mean']:.4f}); "
        f"best SGLang mode on every step: {bu} ({ups[bu]['balancedness_mean']:.4f}, x{ups[bu]['moe_time_ratio_vs_static']:.3f}).\n"
        f"Fastest modelled (overhead included): {fast} (x{modes[fast]['time_vs_static']:.3f} of static)."
    )


def write_json(res: ReplayResult, path: str | os.PathLike) -> None:
    """The result as JSON (schema: docs/replay.md), written whole or not at all: serialised first
    (a NaN or infinite value raises ``ValueError`` before the file is touched), then a temporary
    file in the same directory renamed over ``path``."""
    text = json.dumps(res.to_json(), indent=1, allow_nan=False) + "\n"
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    # O_EXCL: never another file; mode 0o666 less the umask, as a plain open would give.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_plots(res: ReplayResult, out_dir: str | os.PathLike) -> list[Path]:
    """Balancedness over steps per mode, and per-rank loads of each mode's worst step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    N = res.config["num_steps"]
    x = np.arange(N)
    colors = plt.get_cmap("tab20").colors
    # Gated modes are static or their ungated mode per batch: the sweep shows them; here they only repeat.
    names = [n for n in res.modes if not n.endswith("/gate")]
    col = {n: colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20] for i, n in enumerate(names)}

    fig, axes = plt.subplots(2, 1, figsize=(12, 8), sharex=True, sharey=True)
    groups = (("SGLang modes", "upstream"), ("our modes", "ours"))
    for ax, (title, fam) in zip(axes, groups):
        for n in names:
            m = res.modes[n]
            if m["family"] != fam and n != "static":
                continue
            s = res.series[n]
            if m["steps_scored"] < N:
                ax.plot(x, s, "o", ms=7, color=col[n], label=f"{n} (sampled)", zorder=3)
            else:
                ax.plot(x, s, "-" if m["family"] == "ours" else "--", lw=1.3, color=col[n], label=n, zorder=3)
        # The bounds are drawn wide and pale underneath: modes that reach them stay visible on top.
        ax.plot(x, res.series["bound"], "-", color="black", lw=5, alpha=0.25, label="bound (joint LP)", zorder=1)
        ax.plot(x, res.series["bound-local-shared"], "-", color="tab:olive", lw=5, alpha=0.25,
                label="bound (shared local)", zorder=1)
        for i, t in enumerate(res.rebalance_steps):
            ax.axvline(t, color="grey", ls=":", lw=1.2, label="EPLB rebalance" if i == 0 else None)
        for start, label in res.phases:
            ax.axvline(start, color="tab:red", lw=0.8, alpha=0.5)
            ax.text(start + 0.5, 1.0, label, color="tab:red", fontsize=8, va="top", transform=ax.get_xaxis_transform())
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("balancedness (mean/max)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1].set_xlabel("step (forward pass)")
    fig.suptitle(_plot_title(res), fontsize=10)
    fig.tight_layout()
    p1 = out / PLOT_FILES[0]
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    worst = {k: v for k, v in res.worst.items() if k in names}
    n = len(worst)
    cols = 4
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.4), squeeze=False, sharey=True)
    for ax, (name, w) in zip(axes.flat, worst.items()):
        r = np.arange(len(w["routed"]))
        ax.bar(r, w["routed"], color="tab:blue", label="routed")
        ax.bar(r, w["shared"], bottom=w["routed"], color="tab:orange", label="shared expert")
        ax.axhline(w["mean"], color="black", lw=1, ls="--", label="mean")
        ax.axhline(w["bound"], color="tab:green", lw=1.2, label="joint LP max")
        ax.set_title(f"{name}\nstep {w['step']} layer {w['layer']}: bal {w['balancedness']:.3f}", fontsize=6)
        ax.set_xticks(r)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("per-rank load (token-slots) at each mode's worst step and layer", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (2.6 * rows + 0.4)))
    p2 = out / PLOT_FILES[1]
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    paths = [p1, p2]
    if res.sweep:
        paths.append(write_sweep_plot(res, out))
    return paths


def _plot_title(res: ReplayResult) -> str:
    c = res.config
    return (
        f"EP {c['ep_size']}, {c['num_logical_experts']}+{c['redundant_experts']} experts, top-{c['top_k']}, "
        f"{c['num_layers']} layers, {c['num_steps']} steps; rebalance every {c['rebalance_every'] or 'never'} steps"
        + (f"; bundled {c['trace']['model']}: calibrated on {c['trace']['calibration_domain']}, "
           f"serving {' -> '.join(c['trace']['serving_domains'])}" if c["trace"].get("kind") == "bundled" else "")
    )


def write_sweep_plot(res: ReplayResult, out: Path) -> Path:
    """Net speedup (static time / mode time, overhead included) against tokens per rank, log x."""
    import matplotlib.pyplot as plt

    sizes = [row["tokens_per_rank"] for row in res.sweep]
    names = list(dict.fromkeys(n for row in res.sweep for n in row["modes"]))
    colors = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(11, 6.5))
    for i, n in enumerate(names):
        xs = [row["tokens_per_rank"] for row in res.sweep if n in row["modes"]]
        ys = [1.0 / row["modes"][n]["time_vs_static"] for row in res.sweep if n in row["modes"]]
        ours = not (n in ("static", "dynamic") or n.startswith("upstream"))
        ax.plot(xs, ys, "-o" if ours else "--s", ms=3.5, lw=1.8 if n in res.server_default.values() else 1.1,
                color="black" if n == "static" else colors[i % 20], label=n + (" (server default)" if n in res.server_default.values() else ""))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("tokens per rank per batch")
    ax.set_ylabel("net speedup vs SGLang static (modelled, overhead included)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    title = textwrap.fill(_plot_title(res), 140) + "\n" + textwrap.fill(f"cost model: {res.config['cost_model']}", 140)
    ax.set_title(title, fontsize=7)
    fig.tight_layout()
    path = out / SWEEP_PLOT
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
