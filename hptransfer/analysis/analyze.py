"""From a results table to the answer: optima, law and metrics per group, a verdict per axis.

`analyze` does the work and keeps the curves (the figures need them); `summary.summary`
turns the result into summary.json (docs/design.md#summaryjson), which the terminal tables
and report.md are rendered from, so all three always show the same numbers.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hptransfer.analysis.laws import Law, fit_law
from hptransfer.analysis.load import AXES, USED_STATUSES, Group, find_groups, used_runs
from hptransfer.analysis.metrics import LOSS_NOISE, asymptotic, fit_quality, robustness, wider_is_better
from hptransfer.analysis.optimum import Curve, Optimum, find_optimum
from hptransfer.analysis.summary import fmt_lr, fmt_scale
from hptransfer.config.derived import FLOPS_FORMULA
from hptransfer.errors import HptError


@dataclass
class GroupResult:
    """One group's curves and optima (one per scale point), transfer law and metrics."""

    group: Group
    curves: list[Curve]
    optima: list[Optimum | None]  # None where every run at that scale diverged
    law: Law | None
    metrics: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Analysis:
    metric: str
    results: list[GroupResult]
    verdicts: dict[str, list[str]]  # axis -> sentences: which parameterization transfers best, and why
    warnings: list[str]             # table-wide; each group's own are in its GroupResult
    ignored: dict[str, int]         # runs left out, by status
    compute: dict[str, Any] | None  # FLOPs the sweep spent (None without a flops column)


def analyze(
    df: pd.DataFrame,
    metric: str = "final_val_loss",
    params: list[str] | None = None,
    axes: list[str] | None = None,
    n_boot: int = 200,
) -> Analysis:
    """Find the groups, then their optima, laws and metrics, then compare parameterizations per axis."""
    groups = [
        g for g in find_groups(df)
        if (not params or g.parameterization in params) and (not axes or g.axis in axes)
    ]
    if not groups:
        raise HptError(_why_no_groups(df, params, axes))
    results = [_analyze_group(g, metric, n_boot) for g in groups]
    verdicts = {}
    for axis in dict.fromkeys(r.group.axis for r in results):
        on_axis = [r for r in results if r.group.axis == axis]
        best = {r.group.label: [(c.scale, o.loss_opt) for c, o in zip(r.curves, r.optima, strict=True) if o]
                for r in on_axis}
        for r, entry in zip(on_axis, asymptotic(best).values(), strict=True):
            r.metrics["asymptotic"] = entry
        verdicts[axis] = _verdict(axis, on_axis)
    ignored = df.loc[~df["status"].isin(USED_STATUSES), "status"].value_counts().to_dict()
    warnings = []
    if ignored:
        states = ", ".join(f"{n} {s}" for s, n in ignored.items())
        warnings.append(f"{sum(ignored.values())} run(s) ignored ({states}): only completed and diverged runs count")
    grouped = set().union(*(set(g.runs["run_id"]) for g in groups)) if "run_id" in df.columns else None
    if grouped is not None:
        orphans = set(used_runs(df)["run_id"]) - grouped
        if orphans:
            warnings.append(f"{len(orphans)} run(s) belong to no group (a scale point with no neighbour)")
    return Analysis(metric, results, verdicts, warnings, {str(k): int(v) for k, v in ignored.items()},
                    _compute(df))


def _why_no_groups(df: pd.DataFrame, params: list[str] | None, axes: list[str] | None) -> str:
    runs = used_runs(df)
    if runs.empty:
        return "no completed or diverged runs with a learning rate in the table"
    if params or axes:
        wanted = [f"--param {p}" for p in params or []] + [f"--axis {a}" for a in axes or []]
        return f"no group matches {' '.join(wanted)}"
    points = [f"{a}={sorted(runs[a].dropna().unique().tolist())}" for a in AXES if a in runs.columns]
    return f"one scale point only: no scaling axis varies with the other hyperparameters fixed ({', '.join(points)})"


def _analyze_group(group: Group, metric: str, n_boot: int) -> GroupResult:
    curves = [Curve.from_runs(rows, scale, metric) for scale, rows in group.runs.groupby(group.axis)]
    rng = np.random.default_rng(0)  # a fixed seed: the same table always gives the same intervals
    optima = [find_optimum(c, n_boot, rng) for c in curves]
    interior = [(c.scale, o.x_opt) for c, o in zip(curves, optima, strict=True) if o and not o.edge]
    law = fit_law([s for s, _ in interior], [x for _, x in interior])
    metrics = {"fit_quality": fit_quality(law), "robustness": robustness(curves, law)}
    if group.axis == "width":
        metrics["wider_is_better"] = wider_is_better(curves)
    result = GroupResult(group, curves, optima, law, metrics)
    result.warnings = _group_warnings(result, len(interior))
    return result


def _group_warnings(r: GroupResult, n_interior: int) -> list[str]:
    axis, out = r.group.axis, []
    for curve, opt in zip(r.curves, r.optima, strict=True):
        at = f"{axis}={fmt_scale(curve.scale)}"
        if opt is None:
            out.append(f"{at}: every run diverged; no optimum")
            continue
        for side in opt.edge:
            out.append(
                f"{at}: optimum at the {side} edge of the grid (lr {fmt_lr(2**opt.x_best)}), a bound, not an "
                f"estimate; add lr {', '.join(fmt_lr(2**x) for x in _side(opt.to_add, opt.x_best, side))}"
            )
        if opt.disagree:
            out.append(f"{at}: quadratic and spline optima disagree by {abs(opt.x_opt - opt.x_spline):.2f} "
                       f"log2 (more than half the grid step {opt.step:g})")
        if not opt.quadratic and not opt.edge:
            out.append(f"{at}: no convex quadratic through the best point and its neighbours; using the best point")
    if r.law is None:
        out.append(f"no transfer law: {n_interior} interior optimum(s), 2 needed")
    wider = r.metrics.get("wider_is_better")
    if wider and not wider["holds"]:
        v = wider["violations"][0]
        what = "diverges" if v["diverged"] else f"loses {v['loss_change']:+.4f}"
        out.append(f"wider is not better at {wider['n_violations']} of {wider['n_checks']} (lr, width) pairs, "
                   f"e.g. lr {fmt_lr(v['lr'])}: width {fmt_scale(v['from'])} -> {fmt_scale(v['to'])} {what}")
    return out


def _side(to_add: tuple[float, ...], x_best: float, side: str) -> list[float]:
    return [x for x in to_add if (x < x_best) == (side == "low")]


# How parameterizations are ranked for transfer, first criterion that every group with a law has:
# the loss lost by trusting the law at the largest scale; else how far the law misses there;
# else how far the optimum moves per doubling (always there). Values closer than the resolution
# (seed noise; a tenth of an octave) tie, and a tie goes to the optimum that moves least with scale.
_CRITERIA = (
    ("loo_penalty", LOSS_NOISE, "setting the LR at the largest {axis} from the smaller ones costs {v} in loss"),
    ("loo_error_log2", 0.1, "the law fitted without the largest {axis} misses its optimum by {v} log2"),
    ("abs_slope", 0.0, "its optimum moves {v} log2(lr) per doubling of {axis}"),
)


def _ranking(results: list[GroupResult]) -> tuple[str, float, dict[str, float]]:
    """The first criterion every group has: its sentence, resolution, and each group's value."""
    for key, resolution, sentence in _CRITERIA[:-1]:
        values = {r.group.label: _transfer_value(r, key) for r in results}
        if all(v is not None for v in values.values()):
            return sentence, resolution, values
    _, resolution, sentence = _CRITERIA[-1]
    return sentence, resolution, {r.group.label: abs(r.law.b) for r in results}


def _cost(r: GroupResult) -> str:
    rob = r.metrics["robustness"]
    trend = rob["penalty_trend_log2_per_doubling"]
    return f"{r.group.label} {rob['mean_penalty']:.4f}" + ("" if trend is None else f" (trend {trend:+.2f})")


def _transfer_value(r: GroupResult, key: str) -> float | None:
    if key == "loo_penalty":
        rob = r.metrics["robustness"]
        return math.inf if rob["loo_diverged"] else rob["loo_penalty"]
    return r.metrics["fit_quality"][key]


def _fmt_value(v: float) -> str:
    return "a divergence" if math.isinf(v) else f"{v:.4g}"


def _verdict(axis: str, results: list[GroupResult]) -> list[str]:
    """Which parameterization transfers best along this axis, and why, in a few sentences."""
    with_law = [r for r in results if r.law is not None]
    out = []
    if with_law:
        sentence, resolution, values = _ranking(with_law)
        lowest = min(values.values())
        tied = [r for r in with_law if values[r.group.label] == lowest or values[r.group.label] - lowest <= resolution]
        best = min(tied, key=lambda r: abs(r.law.b))
        ranked = [best] + sorted((r for r in with_law if r is not best), key=lambda r: values[r.group.label])
        others = "; ".join(f"{r.group.label}: {_fmt_value(values[r.group.label])}" for r in ranked[1:])
        if len(with_law) > 1:
            lead = f"{best.group.label} transfers best"
        else:
            lead = f"{best.group.label} is the only group with a law"
        tie = len(tied) > 1
        out.append(f"{lead} along {axis}: " + sentence.format(axis=axis, v=_fmt_value(values[best.group.label]))
                   + (f" ({others})" if others else "")
                   + (f"; within {resolution:g} of each other that is a tie, won by the optimum that moves least "
                      f"with {axis}." if tie else "."))
        slopes = ", ".join(f"{r.group.label} {r.law.b:+.2f}" for r in ranked)
        out.append(f"The optimum moves, in log2(lr) per doubling of {axis} (0: it transfers as is): {slopes}.")
    costs = [_cost(r) for r in results if r.metrics["robustness"]["mean_penalty"] is not None]
    if costs:
        out.append("Loss cost of a 2x learning-rate error, mean over scales (trend: log2 per doubling; > 0 means "
                   f"errors cost more at scale): {', '.join(costs)}.")
    missing = [r.group.label for r in results if r.law is None]
    if missing:
        out.append(f"No law for {', '.join(missing)}: too few interior optima (extend the grid).")
    asym = [(r.group.label, r.metrics["asymptotic"]) for r in results]
    scored = [(label, a) for label, a in asym if a["loss_at_largest"] is not None]
    if len(scored) > 1:
        label, a = min(scored, key=lambda la: la[1]["loss_at_largest"])
        gaps = "; ".join(f"{lb}: +{b['delta_loss_at_largest']:.4f}" for lb, b in scored if lb != label)
        out.append(f"Lowest loss at {axis}={fmt_scale(a['largest_common_scale'])}: {label} "
                   f"({a['loss_at_largest']:.4f}; {gaps}).")
    fitted = [(label, a) for label, a in asym if a["l_inf"] is not None and not a["at_bound"]]
    if len(fitted) > 1:
        label, a = min(fitted, key=lambda la: la[1]["l_inf"])
        gaps = "; ".join(f"{lb}: +{b['delta_l_inf']:.4f}" for lb, b in fitted if lb != label)
        out.append(f"Lowest fitted L_inf: {label} ({a['l_inf']:.4f}; {gaps}).")
    pinned = [f"{label} ({a['at_bound']})" for label, a in asym if a["l_inf"] is not None and a["at_bound"]]
    if pinned:
        out.append(f"L_inf not identified for {', '.join(pinned)}: the loss-law fit sits at a bound (too few "
                   "scales, or losses that do not level off); compare the loss at the largest scale instead.")
    return out


def _compute(df: pd.DataFrame) -> dict[str, Any] | None:
    """Total FLOPs of the runs that trained, against the costliest single run among them."""
    if "flops" not in df.columns:
        return None
    flops = pd.to_numeric(used_runs(df)["flops"], errors="coerce").dropna()
    if flops.empty:
        return None
    return {"formula": f"{FLOPS_FORMULA}: the `flops` column each run recorded", "sweep_flops": float(flops.sum()),
            "largest_run_flops": float(flops.max()),
            "n_runs": int(len(flops))}
