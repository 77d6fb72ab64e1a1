"""Render an analysis: rich tables in the terminal, and a report folder (report.md, summary.json, figures).

Both renderings are built from the same table specs, which read the summary dict
that is written as summary.json: the terminal, report.md and the JSON cannot disagree.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from hptransfer.analysis.analyze import Analysis
from hptransfer.analysis.metrics import DEFINITIONS
from hptransfer.analysis.summary import fmt_loss, fmt_scale, summary
from hptransfer.files import write_atomic, write_json_atomic
from hptransfer.formats import fmt_lr

OPTIMUM_METHOD = (
    "Per scale point, runs are averaged per learning rate over the seeds that ran every learning rate of "
    "that scale; a learning rate where any seed diverged (or ended with a non-finite loss) is dropped from the "
    "fits and drawn as a cross. The optimum lr* is the minimum of a cubic in log2(lr) through the best point "
    "and its neighbours within 1.5 octaves (a quadratic with fewer than 5 points); the spline estimate is the "
    "minimum of an Akima spline of log-loss over log2(lr). Edge: the best point is the first or last learning "
    "rate tried, so lr* is a bound. The 95% interval (curvature) comes from the fit's curvature and the loss "
    "noise (the seeds' scatter and the scatter around the fits, pooled over the group's scales); with 3 or more "
    "seeds a bootstrap over seeds replaces it where the bootstrap is wider (a bootstrap over a few seeds alone "
    "is too narrow). The law is fitted on interior optima only, each weighted by its own variance. "
    "Fitted and measured losses are kept apart: loss* (fitted) is the vertex of the local fit, which can lie "
    "below every loss observed; the measured column is the seed-mean loss at the best learning rate tried. "
    "The verdict ranks on measured losses (the spline through them) and says where it uses a fit."
)
LAW_METHOD = (
    "b is the move of the optimum in log2(lr) per doubling of scale: 0 means the optimum transfers as is. "
    "Extra scatter: how far the optima stray from the law beyond their own uncertainties (0: not at all). "
    "Bend: the curvature term of a quadratic in log2(scale) over its standard error; past the 95% threshold "
    "the law bends and `hpt predict` widens its interval to also hold the curved law's."
)
ATTRIBUTION = (
    "The three transfer metrics follow Kalra & Barkeshli (2026, arXiv 2605.21486) in spirit; their exact "
    "formulas were not available, so these definitions are hptransfer's own."
)


@dataclass(frozen=True)
class TableSpec:
    """A table to render: title, column names, rows of strings."""

    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]


def _pm(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _flags(o: dict[str, Any]) -> str:
    if o["lr_opt"] is None:
        return "all diverged"
    flags = []
    if o["edge"]:
        flags.append(f"edge ({', '.join(o['edge_side'])}): add {', '.join(fmt_lr(v) for v in o['lrs_to_add'])}")
    if o["disagree"]:
        flags.append("estimates disagree")
    if o["stability_limited"]:
        flags.append("next LR diverges")
    if o["fit"] == "best point":
        flags.append("best point (no local fit)")
    return "; ".join(flags)


def tables(s: dict[str, Any]) -> list[TableSpec]:
    """The tables of the summary, in reading order: groups, optima, laws, metrics."""
    groups = s["groups"]
    return [
        TableSpec("Groups found", ("group", "axis", "scales", "runs", "varies with scale", "loss noise per run"),
            [_group_row(g) for g in groups]),
        TableSpec("Optimum per scale", ("group", "scale", "lr* (local fit)", "lr* (spline)", "95% interval",
                                        "loss* (fitted)", "runs (diverged)", "seeds used", "interval from",
                                        "loss at best lr tried (measured)", "flags"),
            [_optimum_row(g["label"], o) for g in groups for o in g["optima"]]),
        TableSpec("Transfer law: log lr* = log a + b log s", ("group", "a", "b (log2 per doubling)", "R^2",
                                                      "RMS residual (log2)", "leave-largest-out (log2)", "points",
                                                      "extra scatter (log2)", "bend (z)"),
            [_law_row(g) for g in groups]),
        TableSpec("Transfer metrics", ("group", "mean penalty of lr* x2^+-1 (measured, via spline)",
                                 "penalty trend (per doubling)",
                                 "penalty of leave-largest-out lr (measured, via spline)", "L_inf (fitted)",
                                 "delta L_inf (fitted)", "delta loss at largest (measured)", "wider is better"),
            [_metrics_row(g) for g in groups]),
        *([TableSpec("Target runs (hpt predict --launch) beside the law", (
            "group", "scale", "lr predicted (95% interval)", "lrs run", "lr* realized (bracket)", "inside interval",
            "loss at predicted lr", "loss law of the small scales at this scale"),
            [_target_row(t) for t in s["targets"]])] if s.get("targets") else []),
    ]


def _target_row(t: dict[str, Any]) -> tuple[str, ...]:
    interval = "" if t["lr_interval"] is None else f" ({fmt_lr(t['lr_interval'][0])} - {fmt_lr(t['lr_interval'][1])})"
    if t["lr_realized"] is not None:
        realized = fmt_lr(t["lr_realized"])
    else:
        realized = "at the bracket's edge" if t["realized_at_edge"] else "- (bracket: 3+ lrs)"
    inside = {True: "yes", False: "NO", None: "-"}[t["inside_interval"]]
    return (t["group"], fmt_scale(t["scale"]), fmt_lr(t["lr_predicted"]) + interval,
            ", ".join(fmt_lr(x) for x in t["lrs"]), realized, inside, _num(t["loss_at_predicted"], 4),
            _num(t["loss_law_at_scale"], 4))


def _group_row(g: dict[str, Any]) -> tuple[str, ...]:
    scales = ", ".join(fmt_scale(x) for x in g["scales"])
    noise = g["noise"]
    sd = "-" if noise is None else f"{noise['loss_sd_per_run']:.2g} (from {noise['source']})"
    return g["label"], g["axis"], scales, str(g["n_runs"]), ", ".join(g["varies_with_scale"]) or "-", sd


def _optimum_row(label: str, o: dict[str, Any]) -> tuple[str, ...]:
    interval = o.get("lr_interval")
    return (
        label, fmt_scale(o["scale"]), _bound(o) + fmt_lr(o["lr_opt"]), fmt_lr(o["lr_opt_spline"]),
        "-" if interval is None else f"{fmt_lr(interval[0])} - {fmt_lr(interval[1])}",
        fmt_loss(o["loss_opt"]), f"{o['n_runs']} ({o['n_diverged']})", _seeds(o), o["interval_method"] or "-",
        fmt_loss(o.get("loss_best_grid")), _flags(o),
    )


def _seeds(o: dict[str, Any]) -> str:
    if o["seeds_mixed"]:
        return f"{o['n_seeds']} (mixed)"
    if o["seeds_dropped"]:
        return f"{o['n_seeds_used']} of {o['n_seeds']}"
    return str(o["n_seeds"])


def _bound(o: dict[str, Any]) -> str:
    """An edge optimum is a bound: <= at the low edge, >= at the high edge."""
    return {("low",): "<= ", ("high",): ">= "}.get(tuple(o.get("edge_side") or ()), "")


def _law_row(g: dict[str, Any]) -> tuple[str, ...]:
    law = g["law"]
    if law is None:
        return g["label"], "-", "-", "-", "-", "-", "no law", "-", "-"
    bend = law["bend"]
    return (
        g["label"], fmt_lr(law["a"]), _pm(law["slope_log2_per_doubling"]), _num(law["r2"]),
        _num(law["rms_residual_log2"]), _num(law["loo_error_log2"]), str(len(law["scales"])),
        _num(law["extra_scatter_log2"]),
        "- (2 points)" if bend is None else f"{bend['z']:+.1f}" + (" bends" if bend["detected"] else ""),
    )


def _metrics_row(g: dict[str, Any]) -> tuple[str, ...]:
    rob, asy = g["metrics"]["robustness"], g["metrics"]["asymptotic"]
    return (
        g["label"], _num(rob["mean_penalty"], 4), _pm(rob["penalty_trend_log2_per_doubling"]),
        "diverges" if rob["loo_diverged"] else _num(rob["loo_penalty"], 4),
        _l_inf(asy),
        _num(asy.get("delta_l_inf")), _num(asy["delta_loss_at_largest"], 4), _wider(g["metrics"]),
    )


def _l_inf(asy: dict[str, Any]) -> str:
    if asy["l_inf"] is None:
        return asy["reason"].split(":")[0]  # "not identified" or "fit failed"; summary.json has the rest
    return _num(asy["l_inf"]) + (" (at bound)" if asy["at_bound"] else "")


def _wider(metrics: dict[str, Any]) -> str:
    w = metrics.get("wider_is_better")
    if w is None:
        return "n/a"
    return "yes" if w["holds"] else f"no ({w['n_violations']}/{w['n_checks']})"


def _warnings(s: dict[str, Any]) -> list[str]:
    return s["warnings"] + [f"{g['label']}: {w}" for g in s["groups"] for w in g["warnings"]]


def _compute_line(s: dict[str, Any]) -> str | None:
    c = s["compute"]
    if c is None:
        return None
    return (f"The sweep spent {c['sweep_flops']:.3g} FLOPs over {c['n_runs']} runs, "
            f"{c['sweep_flops'] / c['largest_run_flops']:.1f}x its costliest run ({c['formula']}).")


def print_terminal(s: dict[str, Any], console: Console, out: Path | None) -> None:
    """The summary as rich tables, then the verdict and the warnings."""
    for tab in tables(s):
        table = Table(title=tab.title, title_justify="left", title_style="bold")
        for col in tab.columns:
            table.add_column(col, overflow="fold")
        for row in tab.rows:
            table.add_row(*map(Text, row))  # Text: a label like "sp [wd=0.1]" is not markup
        console.print(table)
    console.print("[bold]Verdict[/bold]")
    for axis, sentences in s["verdicts"].items():
        for sentence in sentences:
            console.print(f"  [{axis}] {sentence}", highlight=False, markup=False)
    warnings = _warnings(s)
    if warnings:
        console.print(f"[bold yellow]Warnings ({len(warnings)})[/bold yellow]")
        for w in warnings:
            console.print(f"  - {w}", highlight=False, markup=False)
    line = _compute_line(s)
    if line:
        console.print(line, highlight=False, markup=False)
    if out is not None:
        console.print(f"Report: {out / 'report.md'} (figures and summary.json beside it)", highlight=False,
                      markup=False)


def _md_table(tab: TableSpec) -> str:
    head = f"| {' | '.join(tab.columns)} |\n|{'---|' * len(tab.columns)}\n"
    return head + "".join(f"| {' | '.join(cell.replace('|', '/') for cell in row)} |\n" for row in tab.rows)


TARGET_METHOD = (
    "Target runs are the runs of `hpt predict --launch` at the target scale; they are not fitted into the "
    "law that predicted them. With a bracket (3+ learning rates) the realized optimum is found as at any scale "
    "point, and *inside interval* says whether the prediction's 95% interval holds it. The last column is the "
    "loss law fitted to the small scales' minima, at the target scale (blank when that law is not identified)."
)


def markdown(s: dict[str, Any], inputs: list[Path], figures: list[Path]) -> str:
    """report.md: verdict, tables, figures, definitions, compute and warnings."""
    found, optima, laws, metrics, *targets = tables(s)
    figs = {f.name: f for f in figures}
    axes = list(s["verdicts"])

    def images(prefix: str, caption: str) -> str:
        return "".join(f"![{caption} ({a})]({prefix}_{a}.png)\n\n" for a in axes if f"{prefix}_{a}.png" in figs)

    parts = [
        "# Learning-rate transfer report\n\n",
        f"Input: {', '.join(f'`{p}`' for p in inputs)}. Metric: `{s['metric']}`.\n",
        "\n## Verdict\n\n",
        "".join(f"- **{axis}**: {sentence}\n" for axis, sentences in s["verdicts"].items() for sentence in sentences),
        f"\n## {found.title}\n\n", _md_table(found),
        "\nEach group holds every hyperparameter fixed except the learning rate, the seed, the scaling axis and "
        "the config values that change only because the axis does.\n",
        f"\n## {optima.title}\n\n", _md_table(optima), "\n", OPTIMUM_METHOD, "\n\n",
        images("loss_vs_lr", "Loss against learning rate, one curve per scale"),
        f"## {laws.title}\n\n", _md_table(laws), "\n", LAW_METHOD, "\n\n",
        images("optimum_vs_scale", "Optimum against scale with the fitted law"),
        f"## {metrics.title}\n\n", _md_table(metrics), "\n",
        images("best_loss_vs_scale", "Best loss against scale"),
        "### What the metrics mean\n\n", ATTRIBUTION, "\n\n",
        "".join(f"- **{name}**: {text}\n" for name, text in DEFINITIONS.items()),
    ]
    for tab in targets:
        parts += [f"\n## {tab.title}\n\n", _md_table(tab), "\n", TARGET_METHOD, "\n"]
    line = _compute_line(s)
    if line:
        parts += ["\n## Compute\n\n", line, "\n"]
    warnings = _warnings(s)
    if warnings:
        parts += ["\n## Warnings\n\n", "".join(f"- {w}\n" for w in warnings)]
    return "".join(parts)


def write_report(analysis: Analysis, out: Path, inputs: list[Path]) -> dict[str, Any]:
    """Write figures, summary.json and report.md into `out`; returns the summary."""
    from hptransfer.analysis.plots import plot_all  # matplotlib is slow to import: only when writing

    out.mkdir(parents=True, exist_ok=True)
    s = summary(analysis)
    figures = plot_all(analysis.results, analysis.metric, out)
    write_json_atomic(out / "summary.json", s)
    write_atomic(out / "report.md", markdown(s, inputs, figures))
    return s
