"""summary.json (docs/design.md#summaryjson): an analysis as plain JSON values, and the number formats
the terminal, report.md and the tests share."""

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from hptransfer.analysis.optimum import quantile
from hptransfer.analysis.targets import target_entry

if TYPE_CHECKING:  # analyze formats its warnings with the functions below: it imports this module
    from hptransfer.analysis.analyze import Analysis, GroupResult
    from hptransfer.analysis.laws import Law
    from hptransfer.analysis.optimum import Curve, Optimum


def summary(analysis: "Analysis") -> dict[str, Any]:
    """The summary.json of docs/design.md#summaryjson (plus fields): plain JSON values, no NaN."""
    return jsonable({
        "metric": analysis.metric,
        "groups": [_group_entry(r) for r in analysis.results],
        "verdicts": analysis.verdicts,
        "warnings": analysis.warnings,
        "ignored": analysis.ignored,
        "compute": analysis.compute,
        "targets": [target_entry(t) for t in analysis.targets],
    })


def _group_entry(r: "GroupResult") -> dict[str, Any]:
    g = r.group
    return {
        "parameterization": g.parameterization,
        "axis": g.axis,
        "label": g.label,
        "fixed": g.fixed,
        "varies_with_scale": g.varies_with_scale,
        "scales": [c.scale for c in r.curves],
        "n_runs": int(sum(c.n_runs for c in r.curves)),
        "noise": None if r.noise is None else {"loss_sd_per_run": r.noise.sd, "dof": r.noise.dof,
                                               "source": r.noise.source},
        "optima": [_optimum_entry(c, o) for c, o in zip(r.curves, r.optima, strict=True)],
        "law": _law_entry(r.law),
        "metrics": r.metrics,
        "warnings": r.warnings,
    }


def _optimum_entry(curve: "Curve", opt: "Optimum | None") -> dict[str, Any]:
    entry: dict[str, Any] = {"scale": curve.scale, "n_runs": curve.n_runs, "n_diverged": curve.n_diverged,
                             "n_seeds": curve.n_seeds, "n_seeds_used": len(curve.used), "seeds_dropped": curve.dropped,
                             "seeds_mixed": curve.mixed}
    if opt is None:
        return {**entry, "lr_opt": None, "lr_opt_spline": None, "loss_opt": None, "edge": False,
                "interval_method": None}
    return {
        **entry,
        "lr_opt": 2**opt.x_opt,
        "lr_opt_spline": None if opt.x_spline is None else 2**opt.x_spline,
        "loss_opt": opt.loss_opt,
        "edge": bool(opt.edge),
        "edge_side": list(opt.edge),
        "lrs_to_add": [2**x for x in opt.to_add],
        "disagree": opt.disagree,
        "stability_limited": opt.stability_limited,
        "fit": None if opt.fit is None else opt.fit.kind,
        "lr_best_grid": 2**opt.x_best,
        "loss_best_grid": opt.loss_best,
        "grid_step_log2": opt.step,
        "lr_opt_se_log2": opt.se,
        "lr_interval": None if opt.interval is None else [2**opt.interval[0], 2**opt.interval[1]],
        "interval_method": opt.interval_method,
        "lr_interval_bootstrap": None if opt.boot is None else [2**opt.boot[0], 2**opt.boot[1]],
    }


def _law_entry(law: "Law | None") -> dict[str, Any] | None:
    if law is None:
        return None
    return {
        "a": law.a,
        "b": law.b,
        "slope_log2_per_doubling": law.b,
        "r2": law.r2,
        "rms_residual_log2": law.rms_log2,
        "loo_error_log2": law.loo_error_log2,
        "scales": list(law.scales),
        "lr_opt": [2**y for y in law.log2_lr],
        "se_log2": None if law.se is None else list(law.se),
        "extra_scatter_log2": law.extra_scatter_log2,
        "interval_basis": law.interval_basis,
        "interval_t": quantile(law.fit.dof) if law.fit.cov is not None else None,  # half width / standard error
        "bend": None if law.bend_z is None else {
            "detected": law.bends, "z": law.bend_z,
            "slope_change_per_doubling": 2 * float(law.curved.coef[2]),
        },
    }


def jsonable(obj: Any) -> Any:
    """numpy values to Python, tuples to lists, NaN and infinities to None (JSON has neither),
    integral floats to ints (a width reads 64, not 64.0)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return int(obj) if obj.is_integer() and abs(obj) < 2**53 else obj
    return obj


# -- number formats shared by the terminal, report.md and the tests -------------------------------------


def fmt_scale(scale: float | None) -> str:
    """Widths and depths as they are; token counts with a k / M / G suffix."""
    if scale is None:
        return "-"
    for above, size, unit in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e5, 1e3, "k")):
        if scale >= above:
            return f"{scale / size:.4g}{unit}"
    return f"{scale:g}"


def fmt_loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"
