"""Laws fitted across scale points: how the optimum moves, and how the best loss falls.

- Transfer law: `log lr* = log a + b log s` in log2 units on interior optima, each weighted by
  its own variance plus an extra scatter estimated when the optima scatter more than their own
  errors explain (Paule-Mandel). `b` is the optimum's move in log2(lr) per doubling of scale;
  `b ~ 0` means the parameterization makes the optimum scale-invariant. A curvature term in
  log2 s tests whether the law bends; when it does, predictions widen to cover the curved law.
- Loss law: `L(s) = L_inf + A (s / s_ref)^(-alpha)` with `s_ref` the smallest scale; 3 parameters,
  so it is identified only with 4 or more scales.

docs/science.md#transfer-laws says what the intervals mean.
"""

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, brentq, curve_fit
from scipy.special import ndtri

from hptransfer.analysis.optimum import quantile

# An optimum's standard error below this (log2) is taken as this: noiseless synthetic bowls would
# otherwise get infinite weights. A thousandth of an octave is far below any grid's resolution.
MIN_SE_LOG2 = 1e-3
LOSS_LAW_PARAMETERS = 3
# A bend the test catches 4 times in 5: its curvature sits this many standard errors past the threshold.
MISSED_BEND_POWER = 0.8


@dataclass(frozen=True)
class PolyFit:
    """log2 lr* as a polynomial in u = log2 s - centre, by weighted least squares."""

    centre: float
    coef: np.ndarray        # ascending powers of u
    cov: np.ndarray | None  # covariance of coef, the extra scatter included; None without any error estimate
    tau2: float             # variance of the extra scatter, log2^2 (0: the optima's own errors explain them)
    dof: float              # degrees of freedom of the interval's t quantile
    weights: np.ndarray     # of each point in the fit (uniform without standard errors)

    def value(self, log2_scale: float | np.ndarray) -> float | np.ndarray:
        return np.polynomial.polynomial.polyval(np.asarray(log2_scale) - self.centre, self.coef)

    def interval(self, log2_scale: float) -> tuple[float, float] | None:
        """The LEVEL confidence interval of the fitted value at `log2_scale`."""
        if self.cov is None:
            return None
        g = (log2_scale - self.centre) ** np.arange(len(self.coef))
        half = quantile(self.dof) * float(np.sqrt(g @ self.cov @ g))
        centre = float(self.value(log2_scale))
        return centre - half, centre + half


def fit_poly(u: np.ndarray, y: np.ndarray, se: np.ndarray | None, degree: int, noise_dof: float) -> PolyFit | None:
    """Polynomial of `degree` through (u, y); None with fewer points than parameters.

    With standard errors `se`: weights 1 / (se^2 + tau2), tau2 the extra scatter that makes the
    weighted residuals' chi^2 equal their degrees of freedom (0 if they already fit); the interval
    then uses the noise estimate's degrees of freedom. Without: ordinary least squares, its scatter
    estimated from the residuals (none when the points are as many as the parameters).
    """
    n, p = len(u), degree + 1
    if n < p:
        return None
    centre = float(np.mean(u))
    design = np.vander(u - centre, p, increasing=True)
    if se is None:
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        if n == p:
            return PolyFit(centre, coef, None, 0.0, 0.0, np.ones(n))
        tau2 = float(np.sum((design @ coef - y) ** 2)) / (n - p)
        return PolyFit(centre, coef, tau2 * np.linalg.inv(design.T @ design), tau2, float(n - p), np.ones(n))
    var = np.maximum(np.asarray(se, float), MIN_SE_LOG2) ** 2
    tau2 = _extra_scatter(design, y, var)
    w = 1.0 / (var + tau2)
    cov = np.linalg.inv(design.T @ (design * w[:, None]))
    return PolyFit(centre, cov @ design.T @ (w * y), cov, tau2, noise_dof, w)


def _extra_scatter(design: np.ndarray, y: np.ndarray, var: np.ndarray) -> float:
    """Paule-Mandel: the tau2 >= 0 at which sum w (y - fit)^2 = n - p with w = 1 / (var + tau2)."""
    n, p = design.shape
    if n <= p:
        return 0.0

    def excess(tau2: float) -> float:
        w = 1.0 / (var + tau2)
        coef, *_ = np.linalg.lstsq(design * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)
        return float(np.sum(w * (y - design @ coef) ** 2)) - (n - p)

    if excess(0.0) <= 0:
        return 0.0
    # At the unweighted fit's residual variance the weighted chi^2 is at most n - p: a bracket.
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    top = float(np.sum((design @ coef - y) ** 2)) / (n - p)
    return float(brentq(excess, 0.0, top, xtol=1e-12)) if excess(top) < 0 else top


@dataclass(frozen=True)
class Law:
    """`log2 lr* = log2_a + b log2 s`, with what is needed to judge and extrapolate it."""

    scales: tuple[float, ...]
    log2_lr: tuple[float, ...]       # the interior optima the law was fitted to
    se: tuple[float, ...] | None     # their standard errors, log2; None without a noise estimate
    fit: PolyFit                     # the straight law
    curved: PolyFit | None           # a quadratic in log2 s (3+ points with errors, 4+ without): the bend test
    loo_pred_log2: float | None      # the largest scale's optimum predicted from the others (>= 3 points)

    @property
    def b(self) -> float:
        return float(self.fit.coef[1])

    @property
    def log2_a(self) -> float:
        return float(self.fit.coef[0] - self.fit.coef[1] * self.fit.centre)

    @property
    def a(self) -> float:
        return float(2.0**self.log2_a)

    @property
    def extra_scatter_log2(self) -> float | None:
        """Standard deviation of the scatter beyond the optima's own errors; None when not estimable."""
        if self.se is None or len(self.scales) <= 2:
            return None
        return math.sqrt(self.fit.tau2)

    @property
    def residuals(self) -> np.ndarray:
        """Measured minus fitted log2(lr*), per scale."""
        return np.asarray(self.log2_lr) - self.predict(np.asarray(self.scales))

    @property
    def r2(self) -> float:
        """Fraction of the optima's variance the law explains; 1 when the optima do not move at all."""
        y = np.asarray(self.log2_lr)
        ss_tot = float(np.sum((y - y.mean()) ** 2))
        return 1.0 - float(np.sum(self.residuals**2)) / ss_tot if ss_tot > 1e-12 else 1.0

    @property
    def rms_log2(self) -> float:
        return float(np.sqrt(np.mean(self.residuals**2)))

    @property
    def loo_error_log2(self) -> float | None:
        """|log2(lr_pred / lr*)| at the largest scale, the law fitted without it."""
        return None if self.loo_pred_log2 is None else abs(self.loo_pred_log2 - self.log2_lr[-1])

    @property
    def bend_z(self) -> float | None:
        """The curvature term over its standard error; None without a bend test."""
        if self.curved is None or self.curved.cov is None:
            return None
        return float(self.curved.coef[2] / np.sqrt(self.curved.cov[2, 2]))

    @property
    def bends(self) -> bool | None:
        """The curvature term is significant at LEVEL; None without a bend test."""
        z = self.bend_z
        return None if z is None else abs(z) > quantile(self.curved.dof)

    @property
    def interval_basis(self) -> str:
        """Where the interval's width comes from, in words."""
        if self.se is None:
            return "the scatter of the optima around the law" if self.fit.cov is not None else "none (2 points)"
        if len(self.scales) == 2:
            return "the optima's own uncertainties only (2 points: no scatter to estimate)"
        return "the optima's own uncertainties and the law's extra scatter"

    def missable_shift(self, scale: float) -> float | None:
        """How far from the straight law, at `scale`, a bend the test would miss 1 time in 5 puts the optimum
        (log2); None without a bend test. What a straight law's interval cannot promise."""
        if self.curved is None or self.curved.cov is None:
            return None
        c = (quantile(self.curved.dof) + ndtri(MISSED_BEND_POWER)) * math.sqrt(self.curved.cov[2, 2])
        # The straight fit takes up the part of c u^2 that a line through the swept points can explain.
        u, w = np.log2(np.asarray(self.scales)), self.fit.weights
        line = np.polynomial.polynomial.polyfit(u, u**2, 1, w=np.sqrt(w))
        target = math.log2(scale)
        return abs(c * (target**2 - np.polynomial.polynomial.polyval(target, line)))

    def predict(self, scale: float | np.ndarray) -> np.ndarray | float:
        """log2(lr*) at `scale`."""
        return self.fit.value(np.log2(scale))

    def interval(self, scale: float) -> tuple[float, float] | None:
        """Confidence interval (LEVEL) of the straight law's log2(lr*) at `scale`."""
        return self.fit.interval(float(np.log2(scale)))

    def prediction_interval(self, scale: float) -> tuple[float, float] | None:
        """The straight law's interval, widened to also hold the curved law's when the law bends."""
        straight = self.interval(scale)
        if not self.bends or straight is None:
            return straight
        curved = self.curved.interval(float(np.log2(scale)))
        return min(straight[0], curved[0]), max(straight[1], curved[1])


def fit_law(scales: list[float], log2_lr: list[float], se: list[float] | None = None,
            noise_dof: float = math.inf) -> Law | None:
    """The transfer law through (scale, log2 lr*) pairs, weighted by the optima's standard errors `se`
    (their noise estimate has `noise_dof` degrees of freedom); None with fewer than two scales."""
    order = np.argsort(scales)
    s, y = np.asarray(scales, float)[order], np.asarray(log2_lr, float)[order]
    err = None if se is None else np.asarray(se, float)[order]
    if len(s) < 2:
        return None
    u = np.log2(s)
    loo = None
    if len(s) >= 3:
        loo = float(fit_poly(u[:-1], y[:-1], None if err is None else err[:-1], 1, noise_dof).value(u[-1]))
    return Law(
        scales=tuple(s.tolist()),
        log2_lr=tuple(y.tolist()),
        se=None if err is None else tuple(err.tolist()),
        fit=fit_poly(u, y, err, 1, noise_dof),
        curved=fit_poly(u, y, err, 2, noise_dof) if len(s) >= 3 else None,
        loo_pred_log2=loo,
    )


@dataclass(frozen=True)
class LossLaw:
    """`L(s) = L_inf + A (s / scale_ref)^(-alpha)`."""

    l_inf: float
    A: float
    alpha: float
    scale_ref: float
    rms: float
    at_bound: str = ""  # which parameter the fit pinned at a bound ("" if none): then L_inf is not identified

    def __call__(self, scale: float | np.ndarray) -> np.ndarray | float:
        return _power(np.asarray(scale, float), self.l_inf, self.A, self.alpha, self.scale_ref)


def _power(s: np.ndarray, l_inf: float, amp: float, alpha: float, ref: float) -> np.ndarray:
    return l_inf + amp * (s / ref) ** (-alpha)


def fit_loss_law(scales: list[float], losses: list[float]) -> tuple[LossLaw | None, str]:
    """Fit the loss law (bounded: A >= 0, 0 < alpha <= 4, L_inf <= the smallest loss, >= 0 for
    positive losses); returns (law, "") or (None, the reason)."""
    s, loss = np.asarray(scales, float), np.asarray(losses, float)
    if len(s) <= LOSS_LAW_PARAMETERS:  # as many points as parameters: an exact fit, L_inf not identified
        return None, f"not identified: needs {LOSS_LAW_PARAMETERS + 1} scales, has {len(s)}"
    ref, lo_loss, span = float(s.min()), float(loss.min()), float(np.ptp(loss)) or 1.0
    floor = 0.0 if lo_loss > 0 else -np.inf
    p0 = (max(floor, lo_loss - span), span, 0.5)
    with warnings.catch_warnings():
        # "Covariance could not be estimated" (e.g. A = 0 for flat losses): the fit stands, and we
        # do not use the covariance.
        warnings.simplefilter("ignore", OptimizeWarning)
        try:
            (l_inf, amp, alpha), _ = curve_fit(
                lambda x, c, a, k: _power(x, c, a, k, ref), s, loss, p0=p0,
                bounds=([floor, 0.0, 1e-3], [lo_loss, np.inf, 4.0]), maxfev=20000,
            )
        except (RuntimeError, ValueError) as err:
            return None, f"fit failed: {err}"
    rms = float(np.sqrt(np.mean((_power(s, l_inf, amp, alpha, ref) - loss) ** 2)))
    # A parameter pinned at a bound means the data do not determine it: with few scales a power law
    # through the points often needs L_inf = 0 or alpha at its limit, and L_inf then says nothing.
    tol = 1e-6 * max(1.0, abs(lo_loss))
    bounds = (("L_inf", l_inf, floor), ("L_inf", l_inf, lo_loss), ("alpha", alpha, 1e-3), ("alpha", alpha, 4.0))
    at_bound = ", ".join(f"{name} = {bound:g}" for name, value, bound in bounds if abs(value - bound) < tol)
    return LossLaw(float(l_inf), float(amp), float(alpha), ref, rms, at_bound), ""
