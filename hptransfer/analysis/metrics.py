"""The three transfer metrics, the wider-is-better check and the clipping check (docs/science.md#transfer-metrics).

These definitions are hptransfer's own, after Kalra & Barkeshli (2026), whose exact
formulas were not available to us; DEFINITIONS states them for the report.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hptransfer.analysis.laws import Law, fit_loss_law
from hptransfer.analysis.optimum import Curve, Optimum, loss_spline, spline_minimum

# Loss differences below this are treated as seed noise (final losses of small models scatter this
# much between seeds): a wider model may be this much worse before "wider is better" breaks, and
# parameterizations this close in transfer penalty tie.
LOSS_NOISE = 0.01
# Clipping active in fractions of steps this far apart at two scales' optima changes the effective
# learning rate with scale: a tenth of the steps is where the law starts to mix the two effects.
CLIP_SPREAD = 0.1

DEFINITIONS: dict[str, str] = {
    "fit_quality": (
        "How well the transfer law log lr* = log a + b log s describes the interior optima (each weighted by "
        "its own variance plus the extra scatter, the spread beyond those variances): R^2, the RMS residual in "
        "log2(lr) units, the leave-largest-out error |log2(lr_pred / lr*)| of the law fitted without the largest "
        "scale and asked for it, and the bend test (the curvature term in log2 s over its standard error, z). "
        "R^2 is uninformative when the optimum barely moves (b ~ 0): read the RMS residual and the "
        "leave-largest-out error then."
    ),
    "robustness": (
        "What a mis-set learning rate costs: at each scale, L(lr* x 2^e) - L(lr*) for e = -1 and +1, read "
        "from the Akima spline through the valid points; the loss penalty of the leave-largest-out "
        "prediction at the largest scale; and the log-log slope of the mean penalty against scale "
        "(flat or negative = robust: errors do not cost more as models grow)."
    ),
    "asymptotic": (
        "Where each parameterization is heading: L(s) = L_inf + A (s / s_ref)^(-alpha) fitted to the local "
        "fits' minimum loss per scale (3 parameters, so it needs 4 scales: with 3 it would pass through every "
        "point and say nothing about L_inf; at an edge optimum the best loss is an upper bound), and the "
        "differences of L_inf and of the measured loss at the largest scale that all parameterizations on the "
        "axis share (the best learning rate tried, seed mean), against the best of them. A fit that pins L_inf "
        "or alpha at a bound has no identified L_inf (losses that do not level off): it is marked and left out "
        "of the L_inf comparison."
    ),
    "wider_is_better": (
        f"At every fixed learning rate, the loss does not rise (by more than {LOSS_NOISE}) and training "
        "does not start to diverge when the width doubles."
    ),
    "clipping": (
        "The fraction of steps with gradient clipping active at each scale's best learning rate (seed mean, "
        f"from the clip_fraction column). When it differs by more than {CLIP_SPREAD:g} across the scales, "
        "clipping acts as a learning-rate change that depends on scale, and the law measures both together."
    ),
}


def fit_quality(law: Law | None) -> dict[str, Any]:
    """R^2, RMS residual and leave-largest-out error of the law."""
    if law is None:
        return {"reason": "no law: fewer than 2 interior optima"}
    return {
        "r2": law.r2,
        "rms_residual_log2": law.rms_log2,
        "loo_error_log2": law.loo_error_log2,
        "extra_scatter_log2": law.extra_scatter_log2,
        "bend_z": law.bend_z,
        "bends": law.bends,
        "n_points": len(law.scales),
        "residuals_log2": [{"scale": s, "residual": float(r)} for s, r in zip(law.scales, law.residuals, strict=True)],
    }


@dataclass(frozen=True)
class _Bowl:
    """The spline through one scale point's valid losses, and the spline's own minimum."""

    curve: Curve
    x: np.ndarray  # valid log2(lr), ascending
    spline: Callable[[np.ndarray], np.ndarray]
    x_min: float

    @classmethod
    def of(cls, curve: Curve) -> "_Bowl | None":
        """None with fewer than 3 valid points: no curve to read penalties from."""
        mean, valid = curve.mean()
        if valid.sum() < 3:
            return None
        x, loss = curve.x[valid], mean[valid]
        return cls(curve, x, loss_spline(x, loss), spline_minimum(x, loss))

    def penalty(self, x: float) -> float:
        """Loss above the minimum at log2(lr) = x: inf past a diverged run, NaN beyond the grid."""
        if self.x[0] <= x <= self.x[-1]:
            return float(self.spline(x) - self.spline(self.x_min))
        if x > self.x[-1]:
            crossed = (self.curve.x > self.x[-1]) & (self.curve.x <= x)
        else:
            crossed = (self.curve.x < self.x[0]) & (self.curve.x >= x)
        return math.inf if self.curve.diverged[crossed].any() else math.nan


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def robustness(curves: list[Curve], law: Law | None) -> dict[str, Any]:
    """Penalty of a factor-2 LR error per scale, its trend with scale, and the leave-largest-out penalty."""
    per_scale, typical = [], []
    for curve in curves:
        bowl = _Bowl.of(curve)
        if bowl is None:
            continue
        down, up = bowl.penalty(bowl.x_min - 1), bowl.penalty(bowl.x_min + 1)
        per_scale.append({
            "scale": curve.scale,
            "penalty_down": _finite(down),
            "penalty_up": _finite(up),
            "diverged_down": math.isinf(down),
            "diverged_up": math.isinf(up),
        })
        finite = [p for p in (down, up) if math.isfinite(p)]
        if finite:
            typical.append((curve.scale, float(np.mean(finite))))
    out: dict[str, Any] = {
        "per_scale": per_scale,
        "mean_penalty": float(np.mean([p for _, p in typical])) if typical else None,
        "penalty_trend_log2_per_doubling": _loglog_slope(typical),
        "loo_penalty": None,
        "loo_diverged": False,
    }
    if law is not None and law.loo_pred_log2 is not None:
        bowl = _Bowl.of(next(c for c in curves if c.scale == law.scales[-1]))
        if bowl is not None:
            penalty = bowl.penalty(law.loo_pred_log2)
            out["loo_penalty"], out["loo_diverged"] = _finite(penalty), math.isinf(penalty)
    return out


def _loglog_slope(points: list[tuple[float, float]]) -> float | None:
    """Slope of log2(value) against log2(scale) over the positive values; None with fewer than 2."""
    pts = [(s, v) for s, v in points if v > 0]
    if len(pts) < 2:
        return None
    s, v = np.log2(np.array(pts)).T
    return float(np.polyfit(s, v, 1)[0])


def asymptotic(
    fitted: dict[str, list[tuple[float, float]]], observed: dict[str, list[tuple[float, float]]]
) -> dict[str, dict[str, Any]]:
    """Per group (label -> (scale, loss) pairs on one axis): the loss law through the fitted minima, and the
    gaps to the best group in L_inf and in the measured best loss at the largest common scale."""
    fits = {label: fit_loss_law([s for s, _ in pts], [v for _, v in pts]) for label, pts in fitted.items()}
    l_infs = [law.l_inf for law, _ in fits.values() if law is not None and not law.at_bound]
    common = set.intersection(*(set(s for s, _ in pts) for pts in observed.values())) if observed else set()
    largest = max(common) if common else None
    at_largest = {label: dict(pts).get(largest) for label, pts in observed.items()}
    best_at_largest = min(at_largest.values()) if largest is not None else None
    out = {}
    for label, (law, reason) in fits.items():
        entry: dict[str, Any] = {"l_inf": None, "reason": reason} if law is None else {
            "l_inf": law.l_inf, "A": law.A, "alpha": law.alpha, "scale_ref": law.scale_ref, "rms": law.rms,
            "at_bound": law.at_bound,  # then L_inf is not identified and takes no part in the comparison
            "delta_l_inf": None if law.at_bound or not l_infs else law.l_inf - min(l_infs),
        }
        entry["largest_common_scale"] = largest
        entry["loss_at_largest"] = at_largest[label]
        entry["delta_loss_at_largest"] = None if largest is None else at_largest[label] - best_at_largest
        out[label] = entry
    return out


def wider_is_better(curves: list[Curve]) -> dict[str, Any]:
    """At each learning rate tried at two consecutive widths, does the wider model do at least as well?"""
    checks, violations = 0, []
    for narrow, wide in zip(curves, curves[1:], strict=False):
        n_mean, n_valid = narrow.mean()
        w_mean, w_valid = wide.mean()
        for i, x in enumerate(narrow.x):
            j = np.flatnonzero(wide.x == x)
            if not n_valid[i] or not len(j):
                continue
            checks += 1
            j = int(j[0])
            change = w_mean[j] - n_mean[i] if w_valid[j] else math.inf
            if change > LOSS_NOISE:
                violations.append({
                    "lr": float(2.0**x), "from": narrow.scale, "to": wide.scale,
                    "loss_change": _finite(change), "diverged": math.isinf(change),
                })
    return {"holds": not violations, "n_checks": checks, "n_violations": len(violations), "violations": violations}


def clipping(curves: list[Curve], optima: list[Optimum | None]) -> dict[str, Any] | None:
    """Clipping at each scale's best learning rate and its spread; None where under 2 scales recorded it."""
    per_scale = []
    for curve, opt in zip(curves, optima, strict=True):
        if opt is None:
            continue
        values = curve.clip[np.flatnonzero(curve.x == opt.x_best)[0], curve.used]
        if np.isfinite(values).any():
            per_scale.append({"scale": curve.scale, "clip_fraction": float(np.nanmean(values))})
    if len(per_scale) < 2:
        return None
    fractions = [p["clip_fraction"] for p in per_scale]
    spread = max(fractions) - min(fractions)
    return {"per_scale": per_scale, "spread": spread, "differs": spread > CLIP_SPREAD}
