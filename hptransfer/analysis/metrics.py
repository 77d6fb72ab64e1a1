"""The three transfer metrics and the wider-is-better check (docs/science.md#transfer-metrics).

These definitions are hptransfer's own, after Kalra & Barkeshli (2026), whose exact
formulas were not available to us; DEFINITIONS states them for the report.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hptransfer.analysis.laws import Law, fit_loss_law
from hptransfer.analysis.optimum import Curve, loss_spline, spline_minimum

# Loss differences below this are treated as seed noise (final losses of small models scatter this
# much between seeds): a wider model may be this much worse before "wider is better" breaks, and
# parameterizations this close in transfer penalty tie.
LOSS_NOISE = 0.01

DEFINITIONS: dict[str, str] = {
    "fit_quality": (
        "How well the transfer law log lr* = log a + b log s describes the interior optima: R^2, the RMS "
        "residual in log2(lr) units, and the leave-largest-out error |log2(lr_pred / lr*)| of the law fitted "
        "without the largest scale and asked for it. R^2 is uninformative when the optimum barely moves "
        "(b ~ 0): read the RMS residual and the leave-largest-out error then."
    ),
    "robustness": (
        "What a mis-set learning rate costs: at each scale, L(lr* x 2^e) - L(lr*) for e = -1 and +1, read "
        "from the Akima spline through the valid points; the loss penalty of the leave-largest-out "
        "prediction at the largest scale; and the log-log slope of the mean penalty against scale "
        "(flat or negative = robust: errors do not cost more as models grow)."
    ),
    "asymptotic": (
        "Where each parameterization is heading: L(s) = L_inf + A (s / s_ref)^(-alpha) fitted to the best "
        "loss per scale (needs 3 scales; at an edge optimum the best loss is an upper bound), and the "
        "differences of L_inf and of the loss at the largest scale that all parameterizations on the axis "
        "share, against the best of them. A fit that pins L_inf or alpha at a bound of the fit has no "
        "identified L_inf (too few scales, or losses that do not level off): it is marked and left out "
        "of the L_inf comparison."
    ),
    "wider_is_better": (
        f"At every fixed learning rate, the loss does not rise (by more than {LOSS_NOISE}) and training "
        "does not start to diverge when the width doubles."
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


def asymptotic(best_losses: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, Any]]:
    """Per group (label -> (scale, best loss) pairs on one axis): loss law fit, and gaps to the best group."""
    fits = {label: fit_loss_law([s for s, _ in pts], [v for _, v in pts]) for label, pts in best_losses.items()}
    l_infs = [law.l_inf for law, _ in fits.values() if law is not None and not law.at_bound]
    common = set.intersection(*(set(s for s, _ in pts) for pts in best_losses.values())) if best_losses else set()
    largest = max(common) if common else None
    at_largest = {label: dict(pts).get(largest) for label, pts in best_losses.items()}
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
