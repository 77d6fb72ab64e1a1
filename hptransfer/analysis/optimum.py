"""The optimal learning rate at one scale point (docs/science.md#optimum-at-one-scale).

Work in x = log2(lr). Seeds are averaged per learning rate; a learning rate at which
any seed diverged (or ended with a non-finite loss) is dropped from the fits, since an
LR that is unstable on some seeds is no candidate for the optimum. Two estimates:

- a quadratic in x fitted to the best point and its neighbours within about an octave
  (one on each side on a full-step grid, two on a half-step grid);
- the minimum of an Akima spline of log-loss over x (Porian et al.), on a fine grid.

They disagree when more than half a grid step apart. The best point on the first or
last learning rate tried makes the optimum a bound (an *edge* optimum): the grid must
grow on that side. With several seeds, resampling the seeds gives a bootstrap interval.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.interpolate import Akima1DInterpolator

from hptransfer.analysis.load import LR_COLUMN, SEED_COLUMN

# The quadratic sees the neighbours within about an octave of the best point, where a loss bowl is
# close to a parabola: one on each side on a full-step grid, two on a half-step grid (3 to 5 points).
QUAD_HALF_WIDTH_LOG2 = 1.0
QUAD_MAX_NEIGHBOURS = 2
SPLINE_SAMPLES = 4001     # points on which the spline's minimum is searched
BOOTSTRAP_LEVEL = 0.95


@dataclass(frozen=True)
class Curve:
    """Loss against log2(lr) at one scale point: one row per learning rate, one column per seed."""

    scale: float
    x: np.ndarray         # log2(lr) of every learning rate tried, ascending
    loss: np.ndarray      # (n_lr, n_seeds): the metric of completed runs; NaN where there is none
    diverged: np.ndarray  # (n_lr, n_seeds): the run diverged, or completed with a non-finite metric
    n_runs: int

    @classmethod
    def from_runs(cls, runs: pd.DataFrame, scale: float, metric: str) -> "Curve":
        """Pivot one scale point's completed and diverged runs into the (lr, seed) grid."""
        seed = runs[SEED_COLUMN] if SEED_COLUMN in runs.columns else pd.Series(0, index=runs.index)
        value = pd.to_numeric(runs[metric], errors="coerce")
        ok = (runs["status"] == "completed") & np.isfinite(value)
        frame = pd.DataFrame({
            "x": np.log2(runs[LR_COLUMN].astype(float)),
            "seed": seed.fillna(-1),
            "loss": value.where(ok),
            "diverged": ~ok,
        })
        # Repeats of one (lr, seed) pair (e.g. two sweeps) average their losses; any divergence counts.
        loss = frame.pivot_table(index="x", columns="seed", values="loss", aggfunc="mean", dropna=False)
        div = frame.pivot_table(index="x", columns="seed", values="diverged", aggfunc="max", dropna=False)
        loss = loss.reindex(index=div.index, columns=div.columns)
        return cls(
            scale=float(scale),
            x=div.index.to_numpy(float),
            loss=loss.to_numpy(float),
            diverged=div.fillna(False).to_numpy(bool),
            n_runs=len(runs),
        )

    @property
    def n_diverged(self) -> int:
        return int(self.diverged.sum())

    @property
    def n_seeds(self) -> int:
        return self.loss.shape[1]

    def mean(self, seeds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Seed-averaged loss per learning rate and which learning rates are valid (no divergence)."""
        loss = self.loss if seeds is None else self.loss[:, seeds]
        div = self.diverged if seeds is None else self.diverged[:, seeds]
        has_loss = ~np.isnan(loss).all(axis=1)
        valid = has_loss & ~div.any(axis=1)
        mean = np.full(len(self.x), np.nan)
        mean[has_loss] = np.nanmean(loss[has_loss], axis=1)
        return mean, valid

    @property
    def step(self) -> float:
        """The grid step in log2 units (median spacing; 1 with a single learning rate)."""
        return float(np.median(np.diff(self.x))) if len(self.x) > 1 else 1.0


@dataclass(frozen=True)
class Optimum:
    """The optimum at one scale point, in log2(lr) units."""

    x_opt: float                  # quadratic estimate; the best point at an edge or when no quadratic fits
    x_spline: float | None        # Akima-spline estimate; None with fewer than 3 valid points
    loss_opt: float               # the quadratic's minimum (the best point's loss when no quadratic fits)
    x_best: float                 # the best learning rate tried
    step: float                   # grid step, log2
    edge: tuple[str, ...]         # "low" / "high": the best point is the first / last learning rate tried
    to_add: tuple[float, ...]     # log2 learning rates to add to the grid to bracket an edge optimum
    stability_limited: bool       # the next larger learning rate diverged
    quadratic: bool               # False: an edge, too few points or no convex fit, so x_opt is the best point
    interval: tuple[float, float] | None  # bootstrap interval over seeds, log2; None with one seed or at an edge

    @property
    def disagree(self) -> bool:
        """The two estimates are more than half a grid step apart."""
        return self.x_spline is not None and abs(self.x_opt - self.x_spline) > self.step / 2


def loss_spline(x: np.ndarray, loss: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Akima interpolation of the loss over log2(lr) (through log-loss when every loss is positive)."""
    if np.all(loss > 0):
        spline = Akima1DInterpolator(x, np.log(loss))
        return lambda xs: np.exp(spline(xs))
    return Akima1DInterpolator(x, loss)


def spline_minimum(x: np.ndarray, loss: np.ndarray) -> float | None:
    """x of the Akima spline's minimum over the span of the points; None with fewer than 3 points."""
    if len(x) < 3:
        return None
    grid = np.linspace(x[0], x[-1], SPLINE_SAMPLES)
    return float(grid[np.argmin(loss_spline(x, loss)(grid))])


def _quadratic(x: np.ndarray, loss: np.ndarray, step: float) -> tuple[float, float, bool]:
    """Vertex and minimum of a least-squares quadratic through the best valid point and its neighbours.

    The vertex is kept within the fitted points: beyond them the quadratic extrapolates.
    Falls back to the best point (flag False) with fewer than 3 points or a concave fit.
    """
    best = int(np.argmin(loss))
    k = int(np.clip(round(QUAD_HALF_WIDTH_LOG2 / step), 1, QUAD_MAX_NEIGHBOURS))
    lo, hi = max(0, best - k), min(len(x), best + k + 1)
    wx, wl = x[lo:hi], loss[lo:hi]
    if len(wx) < 3:
        return float(x[best]), float(loss[best]), False
    # Centred on the best point so the 3x3 least squares is well conditioned at any lr.
    coef, *_ = np.linalg.lstsq(np.vander(wx - x[best], 3), wl, rcond=None)
    if coef[0] <= 0:
        return float(x[best]), float(loss[best]), False
    shift = float(np.clip(-coef[1] / (2 * coef[0]), wx[0] - x[best], wx[-1] - x[best]))
    return float(x[best]) + shift, float(np.polyval(coef, shift)), True


def find_optimum(curve: Curve, n_boot: int = 200, rng: np.random.Generator | None = None) -> Optimum | None:
    """Both estimates, the edge and stability flags, and the seed bootstrap; None if nothing is valid."""
    mean, valid = curve.mean()
    if not valid.any():
        return None
    x, loss = curve.x[valid], mean[valid]
    x_best = float(x[np.argmin(loss)])
    step = curve.step
    edge = tuple(side for side, at in (("low", curve.x[0]), ("high", curve.x[-1])) if x_best == at)
    # At an edge the grid says only that the optimum lies beyond it: report the edge, the bound.
    x_opt, loss_opt, quadratic = (x_best, float(loss.min()), False) if edge else _quadratic(x, loss, step)
    to_add = []
    if "low" in edge:
        to_add += [curve.x[0] - 2 * step, curve.x[0] - step]
    if "high" in edge:
        to_add += [curve.x[-1] + step, curve.x[-1] + 2 * step]
    above = curve.x > x_best
    stability_limited = bool(above.any() and curve.diverged[np.argmax(above)].any())
    return Optimum(
        x_opt=x_opt,
        x_spline=spline_minimum(x, loss),
        loss_opt=loss_opt,
        x_best=x_best,
        step=step,
        edge=edge,
        to_add=tuple(float(v) for v in to_add),
        stability_limited=stability_limited,
        quadratic=quadratic,
        interval=None if edge else _bootstrap(curve, n_boot, rng or np.random.default_rng(0)),
    )


def _bootstrap(curve: Curve, n_boot: int, rng: np.random.Generator) -> tuple[float, float] | None:
    """Percentile interval of the quadratic optimum over resamples of the seeds (with replacement)."""
    if curve.n_seeds < 2 or n_boot < 1:
        return None
    draws = []
    for _ in range(n_boot):
        mean, valid = curve.mean(rng.integers(0, curve.n_seeds, curve.n_seeds))
        if valid.any():
            draws.append(_quadratic(curve.x[valid], mean[valid], curve.step)[0])
    if not draws:
        return None
    tail = 100 * (1 - BOOTSTRAP_LEVEL) / 2
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return float(lo), float(hi)
