"""The optimal learning rate at one scale point, and how sure it is (docs/science.md#optimum-at-one-scale).

Work in x = log2(lr). Per scale, seeds are averaged per learning rate over the seeds that ran
every learning rate of that scale (a seed missing somewhere would mix seed subsets across the
curve); a learning rate at which any seed diverged (or ended with a non-finite loss) is dropped
from the fits, since an LR that is unstable on some seeds is no candidate for the optimum.
Two estimates:

- the minimum of a cubic in x fitted to the best point and its neighbours within 1.5 octaves
  (a quadratic when fewer than 5 points are there): real bowls rise faster on the high side, and
  a quadratic's vertex then sits about a tenth of an octave toward the flat side, a bias that
  no interval would show;
- the minimum of an Akima spline of log-loss over x (Porian et al.), on a fine grid.

They disagree when more than half a grid step apart. The best point on the first or last
learning rate tried makes the optimum a bound (an *edge* optimum): the grid must grow on that side.

Uncertainty: the noise of one run's loss is estimated from the seeds' scatter at each learning
rate and the seed means' scatter around the local fit, pooled over a group's scales
(`pool_noise`); the fit's minimum then has a standard error (delta method, the *curvature*
interval). With 3 or more seeds, resampling the seeds gives a *bootstrap* interval, used when it is
the wider: a bootstrap over a few seeds is too narrow (on the simulated sweeps of tests/test_coverage.py a
95% bootstrap over 3 seeds holds the true optimum about 72% of the time, the curvature interval 96%).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy.interpolate import Akima1DInterpolator
from scipy.special import stdtrit  # Student t quantiles; scipy.stats takes seconds to import

from hptransfer.analysis.load import LR_COLUMN, SEED_COLUMN

# The local fit sees the neighbours within 1.5 octaves of the best point (2 to 4 on each side):
# 7 points on a half-step grid, 5 on a full-step one. A cubic there follows an asymmetric bowl;
# a narrower window would cut the bias less than it adds noise.
FIT_HALF_WIDTH_LOG2 = 1.5
FIT_NEIGHBOURS = (2, 4)
# A cubic needs a spare point beyond its 4 parameters to be told from noise; a quadratic needs 3.
MIN_POINTS = {3: 5, 2: 3}
SPLINE_SAMPLES = 4001     # points on which the spline's minimum is searched
LEVEL = 0.95              # every interval of the analysis
BOOTSTRAP_MIN_SEEDS = 3   # with 2 seeds a bootstrap has 3 distinct resamples: too few for a percentile
CLIP_COLUMN = "clip_fraction"


@dataclass(frozen=True)
class Curve:
    """Loss against log2(lr) at one scale point: one row per learning rate, one column per seed."""

    scale: float
    x: np.ndarray         # log2(lr) of every learning rate tried, ascending
    loss: np.ndarray      # (n_lr, n_seeds): the metric of completed runs; NaN where there is none
    diverged: np.ndarray  # (n_lr, n_seeds): the run diverged, or completed with a non-finite metric
    present: np.ndarray   # (n_lr, n_seeds): the seed has a run (completed or diverged) at this lr
    clip: np.ndarray      # (n_lr, n_seeds): fraction of steps with gradient clipping active; NaN if unknown
    seeds: tuple          # seed labels, one per column
    n_runs: int

    @classmethod
    def from_runs(cls, runs: pd.DataFrame, scale: float, metric: str) -> "Curve":
        """Pivot one scale point's completed and diverged runs into the (lr, seed) grid."""
        column = next((c for c in (SEED_COLUMN, "cfg.train.seed") if c in runs.columns), None)  # or an old table's
        seed = runs[column].fillna(-1) if column else np.zeros(len(runs))
        value = pd.to_numeric(runs[metric], errors="coerce").to_numpy(float)
        ok = (runs["status"] == "completed").to_numpy() & np.isfinite(value)
        clip = (pd.to_numeric(runs[CLIP_COLUMN], errors="coerce").to_numpy(float) if CLIP_COLUMN in runs.columns
                else np.full(len(runs), np.nan))
        rows, x = pd.factorize(np.log2(runs[LR_COLUMN].to_numpy(float)), sort=True)
        cols, seeds = pd.factorize(seed, sort=True)

        def total(values: np.ndarray) -> np.ndarray:
            out = np.zeros((len(x), len(seeds)))
            np.add.at(out, (rows, cols), values)
            return out

        # Repeats of one (lr, seed) pair (e.g. two sweeps) average their losses; any divergence counts.
        n_ok, n_clip = total(ok), total(np.isfinite(clip))
        with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 is the NaN of a cell without a value
            loss = total(np.where(ok, value, 0.0)) / n_ok
            clip_mean = total(np.nan_to_num(clip)) / n_clip
        return cls(
            scale=float(scale),
            x=np.asarray(x, float),
            loss=np.where(n_ok > 0, loss, np.nan),
            diverged=total(~ok) > 0,
            present=total(np.ones(len(runs))) > 0,
            clip=np.where(n_clip > 0, clip_mean, np.nan),
            seeds=tuple(np.asarray(seeds).tolist()),
            n_runs=len(runs),
        )

    @property
    def n_diverged(self) -> int:
        return int(self.diverged.sum())

    @property
    def n_seeds(self) -> int:
        return self.loss.shape[1]

    @property
    def used(self) -> np.ndarray:
        """Indices of the seeds averaged: those with a run at every learning rate (all, if none has)."""
        complete = np.flatnonzero(self.present.all(axis=0))
        return complete if len(complete) else np.arange(self.n_seeds)

    @property
    def dropped(self) -> list:
        """Labels of the seeds left out of the averages for missing some learning rate."""
        return [self.seeds[i] for i in sorted(set(range(self.n_seeds)) - set(self.used.tolist()))]

    @property
    def mixed(self) -> bool:
        """No seed ran every learning rate: the averages mix different seeds at different learning rates."""
        return not self.present.all(axis=0).any()

    def mean(self, seeds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Seed-averaged loss per learning rate (over the used seeds, or `seeds`) and which learning rates
        are valid: a loss there and no divergence on any seed, used or not."""
        loss = self.loss[:, self.used if seeds is None else seeds]
        has_loss = ~np.isnan(loss).all(axis=1)
        valid = has_loss & ~self.diverged.any(axis=1)
        mean = np.full(len(self.x), np.nan)
        mean[has_loss] = np.nanmean(loss[has_loss], axis=1)
        return mean, valid

    @property
    def step(self) -> float:
        """The grid step in log2 units (median spacing; 1 with a single learning rate)."""
        return float(np.median(np.diff(self.x))) if len(self.x) > 1 else 1.0

    def window(self, x_best: float) -> np.ndarray:
        """Mask of the learning rates within the local fit's reach of `x_best`."""
        k = int(np.clip(round(FIT_HALF_WIDTH_LOG2 / self.step), *FIT_NEIGHBOURS))
        return np.abs(self.x - x_best) <= k * self.step * (1 + 1e-9)


@dataclass(frozen=True)
class LocalFit:
    """A polynomial in x through the best point's window, its minimum and what its noise does to it."""

    x_opt: float
    loss_opt: float
    kind: str          # "cubic", "quadratic", or "best point" when no polynomial has a minimum in the window
    gain: float | None  # standard error of x_opt per unit noise of a mean loss (delta method)
    rss: float         # residual sum of squares of the seed means around the fit
    dof: int           # points minus parameters


def local_fit(x: np.ndarray, loss: np.ndarray, window: np.ndarray) -> LocalFit:
    """The minimum of a cubic (5+ points) or quadratic (3+ points) through the windowed points.

    The minimum must lie within the window (beyond it the polynomial extrapolates), or the next
    simpler fit is tried, and last the best point.
    """
    best = int(np.argmin(loss))
    u, w = x[window] - x[best], loss[window]  # centred on the best point: well conditioned at any lr
    for degree in (3, 2):
        if len(u) < MIN_POINTS[degree]:
            continue
        design = np.vander(u, degree + 1, increasing=True)
        coef, *_ = np.linalg.lstsq(design, w, rcond=None)
        u_opt = _poly_minimum(coef, u[0], u[-1])
        if u_opt is None:
            continue
        powers = np.arange(degree + 1)
        curvature = float(np.sum(powers[2:] * (powers[2:] - 1) * coef[2:] * u_opt ** (powers[2:] - 2)))
        # d u_opt / d coef_j = -j u_opt^(j-1) / f''(u_opt): how a coefficient's noise moves the minimum.
        grad = -powers * u_opt ** np.maximum(powers - 1, 0) / curvature
        gain = float(np.sqrt(grad @ np.linalg.pinv(design.T @ design) @ grad))
        rss = float(np.sum((design @ coef - w) ** 2))
        return LocalFit(float(x[best]) + u_opt, float(np.polyval(coef[::-1], u_opt)), "cubic" if degree == 3
                        else "quadratic", gain, rss, len(u) - degree - 1)
    return LocalFit(float(x[best]), float(loss[best]), "best point", None, 0.0, 0)


def _poly_minimum(coef: np.ndarray, lo: float, hi: float) -> float | None:
    """The local minimum of the polynomial (ascending coefficients) within [lo, hi], or None."""
    deriv = np.polynomial.polynomial.polyder(coef)
    second = np.polynomial.polynomial.polyder(deriv)
    # A negligible leading term (a cubic through a symmetric bowl) is dropped: polyroots divides by it, and
    # a coefficient of rounding size throws the real root off (by a quarter grid step, on an exact parabola).
    while len(deriv) > 1 and abs(deriv[-1]) < 1e-9 * np.max(np.abs(deriv)):
        deriv = deriv[:-1]
    roots = np.polynomial.polynomial.polyroots(deriv) if np.any(deriv[1:]) else np.array([])
    found = [float(r.real) for r in np.atleast_1d(roots)
             if abs(r.imag) < 1e-12 and lo <= r.real <= hi
             and np.polynomial.polynomial.polyval(r.real, second) > 0]
    return min(found, key=abs) if found else None


@dataclass(frozen=True)
class Noise:
    """The noise of one run's loss, pooled over a group's scale points."""

    sd: float      # standard deviation of one run's final loss around the smooth bowl
    dof: int       # degrees of freedom of the estimate (sets the Student t quantile)
    source: str    # "seeds", "fit residuals" or "seeds and fit residuals"


@dataclass(frozen=True)
class Optimum:
    """The optimum at one scale point, in log2(lr) units."""

    x_opt: float                  # local-fit estimate; the best point at an edge or when no fit has a minimum
    x_spline: float | None        # Akima-spline estimate; None with fewer than 3 valid points
    loss_opt: float               # the local fit's minimum (the best point's loss without a fit)
    loss_best: float              # the measured seed-averaged loss at the best learning rate tried
    x_best: float                 # the best learning rate tried
    step: float                   # grid step, log2
    edge: tuple[str, ...]         # "low" / "high": the best point is the first / last learning rate tried
    to_add: tuple[float, ...]     # log2 learning rates to add to the grid to bracket an edge optimum
    stability_limited: bool       # the next larger learning rate diverged
    fit: LocalFit | None          # None at an edge
    n_seeds_used: int             # seeds averaged (those that ran every learning rate of the scale)
    pure_ss: float = 0.0          # sum of squares of the seeds around their mean, over the window
    pure_dof: int = 0
    boot: tuple[float, float] | None = None      # bootstrap interval over seeds, log2 (3+ seeds)
    se: float | None = None       # standard error of x_opt, log2 (set by `with_uncertainty`, as are the next two)
    interval: tuple[float, float] | None = None  # 95%, log2: the curvature or the (wider) bootstrap interval
    interval_method: str | None = None           # "bootstrap", "curvature", "grid" (no local fit) or None

    @property
    def fitted(self) -> bool:
        return self.fit is not None and self.fit.kind != "best point"

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


def find_optimum(curve: Curve, n_boot: int = 200, rng: np.random.Generator | None = None) -> Optimum | None:
    """Both estimates, the edge and stability flags, and the seed bootstrap (3+ seeds); None if nothing
    is valid. The standard error and the interval need the group's pooled noise: `with_uncertainty`
    adds them."""
    mean, valid = curve.mean()
    if not valid.any():
        return None
    x, loss = curve.x[valid], mean[valid]
    best = int(np.argmin(loss))
    x_best = float(x[best])
    step = curve.step
    edge = tuple(side for side, at in (("low", curve.x[0]), ("high", curve.x[-1])) if x_best == at)
    window = curve.window(x_best)[valid]
    # At an edge the grid says only that the optimum lies beyond it: report the edge, the bound.
    fit = None if edge else local_fit(x, loss, window)
    to_add = []
    if "low" in edge:
        to_add += [curve.x[0] - 2 * step, curve.x[0] - step]
    if "high" in edge:
        to_add += [curve.x[-1] + step, curve.x[-1] + 2 * step]
    above = curve.x > x_best
    pure_ss, pure_dof = _seed_scatter(curve, valid & curve.window(x_best))
    boot = None
    if fit is not None and len(curve.used) >= BOOTSTRAP_MIN_SEEDS and n_boot > 0:
        boot = _bootstrap(curve, valid, n_boot, rng or np.random.default_rng(0))
    return Optimum(
        x_opt=x_best if fit is None else fit.x_opt,
        x_spline=spline_minimum(x, loss),
        loss_opt=float(loss[best]) if fit is None else fit.loss_opt,
        loss_best=float(loss[best]),
        x_best=x_best,
        step=step,
        edge=edge,
        to_add=tuple(float(v) for v in to_add),
        stability_limited=bool(above.any() and curve.diverged[np.argmax(above)].any()),
        fit=fit,
        n_seeds_used=len(curve.used),
        pure_ss=pure_ss,
        pure_dof=pure_dof,
        boot=boot,
    )


def _seed_scatter(curve: Curve, rows: np.ndarray) -> tuple[float, int]:
    """Sum of squares of the used seeds around their mean at each of `rows`' learning rates, and its dof."""
    loss = curve.loss[np.ix_(rows, curve.used)]
    n = np.sum(~np.isnan(loss), axis=1)
    keep = n >= 2
    if not keep.any():
        return 0.0, 0
    dev = loss[keep] - np.nanmean(loss[keep], axis=1, keepdims=True)
    return float(np.nansum(dev**2)), int(np.sum(n[keep] - 1))


def _bootstrap(curve: Curve, valid: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile interval of the local-fit optimum over resamples of the used seeds (with replacement).

    The valid learning rates stay those of the full data: a resample that happens to skip the seed that
    diverged does not make its learning rate a candidate.
    """
    used, draws = curve.used, []
    for _ in range(n_boot):
        mean, _ = curve.mean(used[rng.integers(0, len(used), len(used))])
        ok = valid & np.isfinite(mean)  # seeds mixed across learning rates: a resample may miss one
        x, loss = curve.x[ok], mean[ok]
        draws.append(local_fit(x, loss, curve.window(float(x[np.argmin(loss)]))[ok]).x_opt)
    tail = 100 * (1 - LEVEL) / 2
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return float(lo), float(hi)


def pool_noise(optima: list[Optimum | None]) -> Noise | None:
    """One run's loss noise from a group's optima; None without any degree of freedom.

    Two estimates, each pooled over the scales: the seeds' scatter at each learning rate of the fit
    windows (pure error), and the seed means' scatter around the local fits (lack of fit). Where the
    means scatter more than the seeds explain, the bowl is not quite a cubic and that misfit moves the
    optimum as noise would: the lack-of-fit estimate is used alone. Otherwise both estimate the noise
    and are pooled.
    """
    pure_ss = pure_dof = fit_ss = fit_dof = 0
    for o in optima:
        if o is None:
            continue
        pure_ss, pure_dof = pure_ss + o.pure_ss, pure_dof + o.pure_dof
        if o.fitted and o.fit.dof:
            # The fit's residuals are of seed means: n seeds' mean has 1/n of one run's variance.
            fit_ss, fit_dof = fit_ss + o.n_seeds_used * o.fit.rss, fit_dof + o.fit.dof
    if fit_dof and (not pure_dof or fit_ss / fit_dof > pure_ss / pure_dof):
        return Noise(float(np.sqrt(fit_ss / fit_dof)), int(fit_dof), "fit residuals")
    if not pure_dof:
        return None
    return Noise(float(np.sqrt((pure_ss + fit_ss) / (pure_dof + fit_dof))), int(pure_dof + fit_dof),
                 "seeds and fit residuals" if fit_dof else "seeds")


def quantile(dof: float) -> float:
    """The two-sided LEVEL quantile of Student's t (the normal one for infinite dof)."""
    return float(stdtrit(dof, 0.5 + LEVEL / 2))


def with_uncertainty(opt: Optimum | None, noise: Noise | None) -> Optimum | None:
    """The optimum with its standard error and its interval: the curvature interval, or the bootstrap
    over seeds (3+ seeds) where that is wider or there is no noise estimate.

    Without a local fit the optimum is the best grid point, and counts with half a grid step of
    standard error (a "grid" interval); an edge optimum is a bound and has neither.
    """
    if opt is None or opt.edge:
        return opt
    se = None
    if not opt.fitted:
        se = opt.step / 2
    elif noise is not None:
        se = opt.fit.gain * noise.sd / np.sqrt(opt.n_seeds_used)
    if se is None:
        return replace(opt, interval=opt.boot, interval_method=None if opt.boot is None else "bootstrap")
    half = quantile(noise.dof if noise is not None else np.inf) * se
    if opt.boot is not None and opt.boot[1] - opt.boot[0] > 2 * half:
        return replace(opt, se=se, interval=opt.boot, interval_method="bootstrap")
    return replace(opt, se=se, interval=(opt.x_opt - half, opt.x_opt + half),
                   interval_method="curvature" if opt.fitted else "grid")
