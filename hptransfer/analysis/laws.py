"""Laws fitted across scale points: how the optimum moves, and how the best loss falls.

- Transfer law: `log lr* = log a + b log s`, least squares in log2 units on interior
  optima. `b` is then the optimum's move in log2(lr) per doubling of scale; `b ~ 0`
  means the parameterization makes the optimum scale-invariant.
- Loss law: `L(s) = L_inf + A (s / s_ref)^(-alpha)` with `s_ref` the smallest scale.
"""

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import stdtrit  # Student t quantiles; scipy.stats takes seconds to import

LEVEL = 0.95  # confidence level of the law's prediction interval


@dataclass(frozen=True)
class Law:
    """`log2 lr* = log2_a + b log2 s`, with what is needed to judge and extrapolate it."""

    log2_a: float
    b: float
    scales: tuple[float, ...]
    log2_lr: tuple[float, ...]   # the interior optima the law was fitted to
    cov: np.ndarray | None       # covariance of (log2_a, b); None with two points (no residual freedom)
    loo_pred_log2: float | None  # the largest scale's optimum predicted from the others (>= 3 points)

    @property
    def a(self) -> float:
        return float(2.0**self.log2_a)

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

    def predict(self, scale: float | np.ndarray) -> np.ndarray | float:
        """log2(lr*) at `scale`."""
        return self.log2_a + self.b * np.log2(scale)

    def interval(self, scale: float) -> tuple[float, float] | None:
        """Confidence interval (LEVEL) of the law's log2(lr*) at `scale`; None with two points."""
        if self.cov is None:
            return None
        g = np.array([1.0, np.log2(scale)])
        half = stdtrit(len(self.scales) - 2, 0.5 + LEVEL / 2) * float(np.sqrt(g @ self.cov @ g))
        centre = float(self.predict(scale))
        return centre - half, centre + half


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Least-squares (intercept, slope) of y on x and their covariance (None with no residual freedom)."""
    design = np.column_stack([np.ones_like(x), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(x) - 2
    if dof < 1:
        return coef, None
    sigma2 = float(np.sum((y - design @ coef) ** 2)) / dof
    return coef, sigma2 * np.linalg.inv(design.T @ design)


def fit_law(scales: list[float], log2_lr: list[float]) -> Law | None:
    """The transfer law through (scale, log2 lr*) pairs; None with fewer than two scales."""
    order = np.argsort(scales)
    s, y = np.asarray(scales, float)[order], np.asarray(log2_lr, float)[order]
    if len(s) < 2:
        return None
    coef, cov = _ols(np.log2(s), y)
    loo = None
    if len(s) >= 3:
        loo_coef, _ = _ols(np.log2(s[:-1]), y[:-1])
        loo = float(loo_coef[0] + loo_coef[1] * np.log2(s[-1]))
    return Law(float(coef[0]), float(coef[1]), tuple(s.tolist()), tuple(y.tolist()), cov, loo)


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
    if len(s) < 3:
        return None, f"needs 3 scales, has {len(s)}"
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
    # A parameter pinned at a bound means the data do not determine it: with 3 scales a power law
    # through the points often needs L_inf = 0 or alpha at its limit, and L_inf then says nothing.
    tol = 1e-6 * max(1.0, abs(lo_loss))
    bounds = (("L_inf", l_inf, floor), ("L_inf", l_inf, lo_loss), ("alpha", alpha, 1e-3), ("alpha", alpha, 4.0))
    at_bound = ", ".join(f"{name} = {bound:g}" for name, value, bound in bounds if abs(value - bound) < tol)
    return LossLaw(float(l_inf), float(amp), float(alpha), ref, rms, at_bound), ""
