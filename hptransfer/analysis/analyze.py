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
from hptransfer.analysis.metrics import (
    CLIP_SPREAD,
    LOSS_NOISE,
    asymptotic,
    clipping,
    fit_quality,
    robustness,
    wider_is_better,
)
from hptransfer.analysis.optimum import Curve, Noise, Optimum, find_optimum, pool_noise, with_uncertainty
from hptransfer.analysis.summary import fmt_scale
from hptransfer.analysis.targets import TargetResult, analyze_targets, split_targets
from hptransfer.config.derived import FLOPS_FORMULA
from hptransfer.errors import HptError
from hptransfer.formats import fmt_lr


@dataclass
class GroupResult:
    """One group's curves and optima (one per scale point), transfer law and metrics."""

    group: Group
    curves: list[Curve]
    optima: list[Optimum | None]  # None where every run at that scale diverged
    law: Law | None
    metrics: dict[str, Any]
    noise: Noise | None  # one run's loss noise, pooled over the scales; None when nothing estimates it
    warnings: list[str] = field(default_factory=list)

    @property
    def loss_noise(self) -> float | None:
        """Standard deviation of a seed-averaged loss at the scale with the fewest seeds."""
        used = [o.n_seeds_used for o in self.optima if o is not None]
        return None if self.noise is None or not used else self.noise.sd / math.sqrt(min(used))


@dataclass
class Analysis:
    metric: str
    results: list[GroupResult]
    verdicts: dict[str, list[str]]  # axis -> sentences: which parameterization transfers best, and why
    warnings: list[str]             # table-wide; each group's own are in its GroupResult
    ignored: dict[str, int]         # runs left out, by status
    compute: dict[str, Any] | None  # FLOPs the sweep spent (None without a flops column)
    targets: list[TargetResult] = field(default_factory=list)  # runs of `hpt predict --launch`, beside the law


def analyze(
    df: pd.DataFrame,
    metric: str = "final_val_loss",
    params: list[str] | None = None,
    axes: list[str] | None = None,
    n_boot: int = 200,
) -> Analysis:
    """Find the groups, then their optima, laws and metrics, then compare parameterizations per axis; target
    runs (of `hpt predict --launch`) are set beside their group's law, never fitted into it."""
    df, target_runs = split_targets(df)
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
        pairs = {r.group.label: [(c.scale, o) for c, o in zip(r.curves, r.optima, strict=True) if o] for r in on_axis}
        fitted = {label: [(s, o.loss_opt) for s, o in pts] for label, pts in pairs.items()}
        observed = {label: [(s, o.loss_best) for s, o in pts] for label, pts in pairs.items()}
        for r, entry in zip(on_axis, asymptotic(fitted, observed).values(), strict=True):
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
                    _compute(df), analyze_targets(target_runs, results, metric))


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
    raw = [find_optimum(c, n_boot, rng) for c in curves]
    noise = pool_noise(raw)
    optima = [with_uncertainty(o, noise) for o in raw]
    interior = [(c.scale, o) for c, o in zip(curves, optima, strict=True) if o and not o.edge]
    se = [o.se for _, o in interior]
    # The law is weighted only when every optimum has a standard error; else it falls back to its scatter.
    law = fit_law([s for s, _ in interior], [o.x_opt for _, o in interior],
                  se if all(e is not None for e in se) else None, noise.dof if noise else math.inf)
    metrics = {"fit_quality": fit_quality(law), "robustness": robustness(curves, law),
               "clipping": clipping(curves, optima)}
    if group.axis == "width":
        metrics["wider_is_better"] = wider_is_better(curves)
    result = GroupResult(group, curves, optima, law, metrics, noise)
    result.warnings = _group_warnings(result, len(interior))
    return result


def _group_warnings(r: GroupResult, n_interior: int) -> list[str]:
    axis, out = r.group.axis, []
    for curve, opt in zip(r.curves, r.optima, strict=True):
        at = f"{axis}={fmt_scale(curve.scale)}"
        if curve.mixed:
            out.append(f"{at}: no seed ran every learning rate; the averages mix different seeds")
        elif curve.dropped:
            out.append(f"{at}: seed(s) {', '.join(map(str, curve.dropped))} miss some learning rate(s) and are left "
                       f"out of the averages ({len(curve.used)} of {curve.n_seeds} seeds used)")
        if opt is None:
            out.append(f"{at}: every run diverged; no optimum")
            continue
        for side in opt.edge:
            out.append(
                f"{at}: optimum at the {side} edge of the grid (lr {fmt_lr(2**opt.x_best)}), a bound, not an "
                f"estimate; add lr {', '.join(fmt_lr(2**x) for x in _side(opt.to_add, opt.x_best, side))}"
            )
        if opt.disagree:
            out.append(f"{at}: local-fit and spline optima disagree by {abs(opt.x_opt - opt.x_spline):.2f} "
                       f"log2 (more than half the grid step {opt.step:g})")
        if not opt.fitted and not opt.edge:
            out.append(f"{at}: no local fit has a minimum near the best point; using the best point "
                       f"(standard error: half a grid step)")
    if r.law is None:
        out.append(f"no transfer law: {n_interior} interior optimum(s), 2 needed")
    elif r.law.se is None:
        out.append("no noise estimate (one seed and too few points per local fit): the law is unweighted and its "
                   "interval rests on its own scatter" + (" (none with 2 points)" if len(r.law.scales) == 2 else ""))
    elif len(r.law.scales) == 2:
        out.append("the law has 2 points: its interval comes from the optima's own uncertainties only, and it cannot "
                   "be tested for a bend")
    if r.law is not None and r.law.bends:
        out.append(f"the law bends: curvature z = {r.law.bend_z:+.1f} (its slope changes by "
                   f"{2 * r.law.curved.coef[2]:+.2f} log2 per doubling); `hpt predict` widens its interval to cover "
                   "the curved law")
    clip = r.metrics["clipping"]
    if clip and clip["differs"]:
        parts = ", ".join(f"{100 * p['clip_fraction']:.0f}% at {axis}={fmt_scale(p['scale'])}"
                          for p in clip["per_scale"])
        out.append(f"gradient clipping differs across scales at the optimum ({parts}; spread > {CLIP_SPREAD:g}): "
                   "clipping then acts as a scale-dependent learning-rate change, and the law mixes the two")
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
# (the loss resolution, None below; a tenth of an octave) tie, and a tie goes to the optimum that moves
# least with scale. Each sentence says what is measured and what is fitted.
_CRITERIA = (
    ("loo_penalty", None, "setting the LR at the largest {axis} by the law fitted to the smaller ones costs "
     "{v} in loss (read off the spline through the measured losses)"),
    ("loo_error_log2", 0.1, "the law fitted without the largest {axis} misses its (fitted) optimum by {v} log2"),
    ("abs_slope", 0.0, "its fitted law moves the optimum {v} log2(lr) per doubling of {axis}"),
)


def _loss_resolution(results: list[GroupResult]) -> float:
    """Loss differences below this tie: two standard deviations of the difference of two seed-averaged
    losses of the noisiest group, and never less than LOSS_NOISE."""
    noise = [r.loss_noise for r in results if r.loss_noise is not None]
    return max([LOSS_NOISE] + [2 * math.sqrt(2) * n for n in noise])


def _ranking(results: list[GroupResult]) -> tuple[str, float, dict[str, float]]:
    """The first criterion every group has: its sentence, resolution, and each group's value."""
    for key, resolution, sentence in _CRITERIA[:-1]:
        values = {r.group.label: _transfer_value(r, key) for r in results}
        if all(v is not None for v in values.values()):
            return sentence, _loss_resolution(results) if resolution is None else resolution, values
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
                   + (f"; within {resolution:.3g} of each other that is a tie, won by the optimum that moves least "
                      f"with {axis}." if tie else "."))
        slopes = ", ".join(f"{r.group.label} {r.law.b:+.2f}" for r in ranked)
        out.append(f"The optimum moves, in log2(lr) per doubling of {axis} (0: it transfers as is; fitted): {slopes}.")
        bent = [f"{r.group.label} (z = {r.law.bend_z:+.1f})" for r in ranked if r.law.bends]
        if bent:
            out.append(f"The law bends for {', '.join(bent)}: its slope holds over the swept range only, and "
                       "extrapolations are less certain.")
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
        resolution = _loss_resolution(results)
        close = min(b["delta_loss_at_largest"] for lb, b in scored if lb != label) <= resolution
        out.append(f"Lowest measured loss at {axis}={fmt_scale(a['largest_common_scale'])} (best learning rate tried, "
                   f"seed mean): {label} ({a['loss_at_largest']:.4f}; {gaps})"
                   + (f"; a gap within {resolution:.3g} is a tie within noise." if close else "."))
    fitted = [(label, a) for label, a in asym if a["l_inf"] is not None and not a["at_bound"]]
    if len(fitted) > 1:
        label, a = min(fitted, key=lambda la: la[1]["l_inf"])
        gaps = "; ".join(f"{lb}: +{b['delta_l_inf']:.4f}" for lb, b in fitted if lb != label)
        out.append(f"Lowest fitted L_inf (an extrapolation of the loss law): {label} ({a['l_inf']:.4f}; {gaps}).")
    unknown = [label for label, a in asym if a["l_inf"] is None and a["reason"].startswith("not identified")]
    if unknown:
        out.append(f"L_inf is not identified for {', '.join(unknown)}: the loss law has 3 parameters and needs 4 "
                   "scales; compare the loss at the largest scale instead.")
    pinned = [f"{label} ({a['at_bound']})" for label, a in asym if a["l_inf"] is not None and a["at_bound"]]
    if pinned:
        out.append(f"L_inf not identified for {', '.join(pinned)}: the loss-law fit sits at a bound (losses that "
                   "do not level off, or too few scales to tell); compare the loss at the largest scale instead.")
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
