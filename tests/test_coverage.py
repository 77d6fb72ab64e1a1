"""Do the 95% intervals of `hpt predict` and `hpt analyze` mean what they say? Measured on simulated sweeps.

Each simulated sweep has a known optimum law, known seed noise and the grid a researcher would use,
and goes through the real code path: a table in the results.parquet layout, then `predict` (which
runs `analyze`) or `analyze`. The truth, at the target 2 to 3 doublings beyond the largest scale or
at each swept scale, is then inside the interval or not. `coverage_table()` prints every case's
numbers (`python -m tests.test_coverage`); docs/science.md#transfer-laws quotes them.

The simulated world (every draw independent per sweep, from a fixed RNG seed):
- scales: widths 64, 128, ... (3, 4 or 5 of them), one per doubling; 1, 2 or 3 seeds;
- the law: log2 lr*(u) = x0 + b u with u = log2(width / 64), b uniform in [-1.1, 0.2] (SP-like to
  muP-like); a curved law adds c u^2, either sign, |c| uniform in [0.1, 0.2] (strong: the slope
  changes by 0.2 to 0.4 per doubling, a straight extrapolation misses the target by 1 to 4 octaves)
  or in [0.03, 0.08] (mild: misses of a third of an octave to 2 octaves);
- the bowl: L = L*(w) + k g(x - x*), g(d) = 2 (e^(beta d) - 1 - beta d) / beta^2 (= d^2 near the
  optimum, rising faster on the high side: 1.4 to 2 times at one octave), k uniform in [0.04, 0.1]
  per octave^2, beta uniform in [0.3, 1]; runs more than 2 to 3 octaves above the optimum diverge;
- noise: each run's loss gets Gaussian noise of sd uniform in [0.005, 0.015];
- the grid: 9 to 13 learning rates at 2^(1/2) spacing (a step of 0.5 in log2) on the lattice of
  half-integer powers of 2, centred within 0.75 octave of the optimum (a researcher's guess).

What is asserted, and why:
- straight laws: the prediction interval covers the truth in 90-98% of 200 sweeps for every number of
  scales and seeds (nominal 95%; 200 sweeps have a binomial sd of 1.5 points, so 90-98 is nominal
  -3 sd to +2 sd: too narrow an interval is the failure that costs a large run);
- 3 scales: the median interval is under 1.5 octaves wide, so it says something (the old straight-line
  t interval with its one degree of freedom was about 2 octaves wide);
- each optimum's own interval (curvature-based with 1 and 2 seeds) covers its truth in 90-98%;
- curved laws: the interval assumes a straight law, and a curved one puts the truth outside it (the
  straight law's own interval, recorded beside, covers a strong bend's truth in under 1% of sweeps).
  So the bend must be flagged, or be small enough for the warning every unflagged prediction carries:
  "a bend the test misses 1 time in 5 would move the optimum here by X log2". Asserted: in >= 90%
  of curved sweeps (strong and mild, 3 to 5 scales) the bend is flagged or the truth lies within
  the interval widened by X. And strong bends must be flagged in >= 95%, >= 85% and >= 45% of
  sweeps with 5, 4 and 3 scales: with 3 scales the test has one degree of freedom and the bend's own
  noise is of its size, which is why X is about 2 octaves there (1.2 with 4 scales, 0.8 with 5).
The thresholds sit a few points below the measured values (the RNG seed is fixed, so the numbers
only move when the analysis does).
"""

import re
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from hptransfer.analysis.analyze import analyze
from hptransfer.analysis.predict import predict

BASE_WIDTH = 64


@dataclass(frozen=True)
class Case:
    n_scales: int
    n_seeds: int
    bend: tuple[float, float] = (0.0, 0.0)  # range of |c|, the curvature of the law in log2 lr* per doubling^2
    n_sims: int = 200
    doublings: float = 2.5  # target beyond the largest scale
    step: float = 0.5       # of the learning-rate grid, log2
    n_lrs: tuple[int, int] = (9, 13)  # the grid's size, drawn in this range per scale

    @property
    def name(self) -> str:
        law = "straight" if not self.bend[1] else f"curved |c| {self.bend[0]:g}-{self.bend[1]:g}"
        grid = "" if self.step == 0.5 else f", {self.n_lrs[1]} lrs a step of {self.step:g} apart"
        return f"{law}, {self.n_scales} scales, {self.n_seeds} seed(s){grid}"


def bowl(d: np.ndarray, beta: float) -> np.ndarray:
    """An asymmetric bowl with its minimum 0 at d = 0 and curvature 1 there, steeper for d > 0."""
    return 2 * (np.exp(beta * d) - 1 - beta * d) / beta**2


def simulate(case: Case, seed: int) -> tuple[pd.DataFrame, dict[int, tuple[float, float, float]]]:
    """`case.n_sims` sweeps in one results table (one `cfg.sim` value each), and each one's true law:
    (x0, b, c) of log2 lr* = x0 + b u + c u^2, u = log2(width / 64)."""
    rng = np.random.default_rng(seed)
    rows, laws = [], {}
    for sim in range(case.n_sims):
        x0, b = rng.uniform(-10, -6), rng.uniform(-1.1, 0.2)
        c = rng.choice([-1, 1]) * rng.uniform(*case.bend)
        k, beta, sd, limit = rng.uniform(0.04, 0.1), rng.uniform(0.3, 1.0), rng.uniform(0.005, 0.015), rng.uniform(2, 3)
        laws[sim] = (x0, b, c)
        for u in range(case.n_scales):
            x_opt, width = x0 + b * u + c * u**2, BASE_WIDTH * 2**u
            n = int(rng.integers(case.n_lrs[0], case.n_lrs[1] + 1))
            centre = round((x_opt + rng.uniform(-0.75, 0.75)) / case.step) * case.step
            grid = centre + case.step * (np.arange(n) - n // 2)
            best_loss = 2.0 + 1.5 * 2.0 ** (-0.3 * u)
            for x in grid:
                diverged = x > x_opt + limit
                for s in range(case.n_seeds):
                    loss = np.nan if diverged else best_loss + k * bowl(x - x_opt, beta) + sd * rng.normal()
                    rows.append((f"{sim}-{u}-{x}-{s}", "diverged" if diverged else "completed", loss, 2.0**x, width,
                                 s, sim))
    df = pd.DataFrame(rows, columns=["run_id", "status", "final_val_loss", "lr", "width", "cfg.train.seed", "cfg.sim"])
    return df.assign(parameterization="mup", **{"cfg.model.width": df["width"]}), laws


def true_x(law: tuple[float, float, float], u: float) -> float:
    x0, b, c = law
    return x0 + b * u + c * u**2


@dataclass
class Measured:
    case: Case
    coverage: float              # fraction of sweeps whose 95% interval holds the truth at the target
    median_width_log2: float
    bend_rate: float             # fraction of sweeps whose law bends
    accounted: float             # fraction: the bend flagged, or the truth within the interval +- the missable shift
    median_missable_log2: float  # how far a bend the test would miss 1 time in 5 moves the target, log2
    straight_coverage: float     # the straight law's own interval, without widening for a bend
    missing: int                 # sweeps without a prediction or an interval (no law: edge optima)
    seconds: float


def measure(case: Case, seed: int = 0) -> Measured:
    """Simulate the case's sweeps and score `predict`'s intervals against the truth at the target."""
    start = time.perf_counter()
    df, laws = simulate(case, seed)
    u = case.n_scales - 1 + case.doublings
    covered, straight, widths, bends, accounted, missable = [], [], [], [], [], []
    for p in predict(df, f"width={BASE_WIDTH * 2**u}"):
        if p.interval is None:
            continue
        truth = true_x(laws[int(re.search(r"sim=(\d+)", p.label)[1])], u)
        lo, hi = np.log2(p.interval)
        s_lo, s_hi = np.log2(p.interval_straight)
        covered.append(lo <= truth <= hi)
        straight.append(s_lo <= truth <= s_hi)
        widths.append(hi - lo)
        bends.append(p.bend["detected"])
        missable.append(p.bend["missable_shift_log2"])
        accounted.append(bends[-1] or lo - missable[-1] <= truth <= hi + missable[-1])
    return Measured(case, float(np.mean(covered)), float(np.median(widths)), float(np.mean(bends)),
                    float(np.mean(accounted)), float(np.median(missable)), float(np.mean(straight)),
                    case.n_sims - len(covered), time.perf_counter() - start)


def optimum_coverage(case: Case, n_boot: int = 0, seed: int = 0) -> tuple[float, float, dict[str, int]]:
    """Coverage and median width (log2) of each swept optimum's own interval, and the methods used."""
    df, laws = simulate(case, seed)
    covered, widths, methods = [], [], {}
    for r in analyze(df, n_boot=n_boot).results:
        law = laws[int(r.group.fixed["sim"])]
        for curve, opt in zip(r.curves, r.optima, strict=True):
            if opt is None or opt.interval is None:
                continue
            covered.append(opt.interval[0] <= true_x(law, np.log2(curve.scale / BASE_WIDTH)) <= opt.interval[1])
            widths.append(opt.interval[1] - opt.interval[0])
            methods[opt.interval_method] = methods.get(opt.interval_method, 0) + 1
    return float(np.mean(covered)), float(np.median(widths)), methods


STRAIGHT = [Case(n, s, doublings=d) for n, d in ((3, 2.0), (4, 2.5), (5, 3.0)) for s in (1, 2, 3)]
CURVED = [Case(n, 2, bend=bend) for bend in ((0.1, 0.2), (0.03, 0.08)) for n in (3, 4, 5)]
PER_OPTIMUM = [Case(3, 1, n_sims=100), Case(3, 2, n_sims=100)]
# The grid of `make demo`: 7 learning rates a full octave apart. Measured, not asserted (the assertions are for
# the half-octave grids above): the prediction still covers, but each optimum's own interval holds its truth
# only 87-90% of the time, as the cubic has to reach 2 octaves out where the bowl is far from a cubic.
DEMO_GRID = [Case(3, 2, doublings=2.0, step=1.0, n_lrs=(7, 7))]


def coverage_table(cases: list[Case] | None = None) -> str:
    """Every case's measured coverage, median width and bend rate, as a markdown table."""
    lines = ["| case | target (doublings out) | coverage | median width (log2) | bend flagged | straight interval's "
             "coverage | median missable shift (log2) | flagged or within +- missable | no interval | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in map(measure, cases or STRAIGHT + CURVED + DEMO_GRID):
        lines.append(f"| {m.case.name} | {m.case.doublings:g} | {m.coverage:.1%} | {m.median_width_log2:.2f} | "
                     f"{m.bend_rate:.1%} | {m.straight_coverage:.1%} | {m.median_missable_log2:.2f} | "
                     f"{m.accounted:.1%} | {m.missing} | {m.seconds:.1f} |")
    return "\n".join(lines)


@pytest.mark.parametrize("case", STRAIGHT, ids=lambda c: c.name)
def test_the_interval_covers_a_straight_law_at_its_level(case: Case) -> None:
    m = measure(case)
    print(f"{case.name}: coverage {m.coverage:.1%}, median width {m.median_width_log2:.2f} log2, "
          f"bend flagged {m.bend_rate:.1%}, {m.seconds:.1f} s")
    assert m.missing <= case.n_sims // 50, m
    assert 0.90 <= m.coverage <= 0.98, m
    if case.n_scales == 3:
        assert m.median_width_log2 < 1.5, m


@pytest.mark.parametrize("case", CURVED, ids=lambda c: c.name)
def test_a_curved_law_is_caught_or_within_what_the_prediction_says_it_could_miss(case: Case) -> None:
    m = measure(case)
    print(f"{case.name}: bend flagged {m.bend_rate:.1%}, flagged or within +-{m.median_missable_log2:.2f} "
          f"{m.accounted:.1%}, straight interval covers {m.straight_coverage:.1%}, {m.seconds:.1f} s")
    assert m.accounted >= 0.90, m
    if case.bend[0] >= 0.1:
        assert m.bend_rate >= {3: 0.45, 4: 0.85, 5: 0.95}[case.n_scales], m


@pytest.mark.parametrize("case", PER_OPTIMUM, ids=lambda c: c.name)
def test_each_optimum_interval_covers_its_truth(case: Case) -> None:
    coverage, width, methods = optimum_coverage(case)
    print(f"{case.name}: each optimum's interval covers {coverage:.1%}, median width {width:.2f} log2, {methods}")
    assert set(methods) == {"curvature"}
    assert 0.90 <= coverage <= 0.98


if __name__ == "__main__":
    print(coverage_table())
    for c in PER_OPTIMUM + [Case(3, 2, n_sims=100, step=1.0, n_lrs=(7, 7))]:
        print(c.name, "each optimum:", optimum_coverage(c))
