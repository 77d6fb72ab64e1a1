"""The report's figures, one set per scaling axis.

- `loss_vs_lr_<axis>.png`: loss against log2(lr), one curve per scale (a colour each),
  one panel per group, optima starred, diverged runs as crosses on the top edge, points
  above the (clipped) loss range as up-triangles on the top edge, counted in the legend
  (the style of Figure 1 of the muP paper);
- `optimum_vs_scale_<axis>.png`: the optimum against scale, its 95% intervals as error
  bars, edge optima as open triangles pointing where the optimum lies, the fitted laws,
  on a learning-rate axis at least MIN_SPAN_LOG2 octaves tall (a drift of a tenth of an
  octave must look like one) with one tick per octave;
- `best_loss_vs_scale_<axis>.png`: the best loss against scale with the fitted L(s).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, MultipleLocator  # noqa: E402

from hptransfer.analysis.analyze import GroupResult  # noqa: E402
from hptransfer.analysis.laws import LossLaw  # noqa: E402
from hptransfer.analysis.summary import fmt_scale  # noqa: E402
from hptransfer.files import write_figure  # noqa: E402

PANEL = (4.6, 3.6)  # inches per panel
MIN_SPAN_LOG2 = 2.0  # the optimum's axis spans at least this many octaves around the data


def plot_all(results: list[GroupResult], metric: str, out: Path) -> list[Path]:
    """Write every figure into `out`; returns their paths."""
    paths = []
    for axis in dict.fromkeys(r.group.axis for r in results):
        on_axis = [r for r in results if r.group.axis == axis]
        paths.append(_save(_loss_vs_lr(on_axis, metric), out / f"loss_vs_lr_{axis}.png"))
        paths.append(_save(_optimum_vs_scale(on_axis, axis), out / f"optimum_vs_scale_{axis}.png"))
        paths.append(_save(_best_loss_vs_scale(on_axis, axis, metric), out / f"best_loss_vs_scale_{axis}.png"))
    return paths


def _save(fig: Figure, path: Path) -> Path:
    """Rendered in memory, then written atomically: a reader never sees half a PNG, the file gets the
    umask's mode, and a full disk is one line (files.DiskFull) with no temp file left behind."""
    write_figure(fig, path)
    return path


def _log2_ticks(ax: Axes, which: str) -> None:
    """log2 positions labelled 2^k: one tick per octave up to 8 octaves, whole octaves beyond (never a
    label twice: a non-integer position would be written with its own exponent)."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    axis.set_major_locator(MultipleLocator(1) if abs(hi - lo) <= 8 else MaxNLocator(integer=True))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"$2^{{{v:g}}}$"))


def _scale_ticks(ax: Axes) -> None:
    """Scale on a log2 axis, labelled with the plain values."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_scale(v)))


def _loss_vs_lr(results: list[GroupResult], metric: str) -> Figure:
    n = len(results)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL[0] * cols, PANEL[1] * rows), squeeze=False)
    for ax, r in zip(axes.flat, results, strict=False):
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(r.curves)))
        means = [c.mean() for c in r.curves]
        lo, top = _loss_range(np.concatenate([mean[valid] for mean, valid in means]))
        n_above = 0
        for curve, opt, (mean, valid), colour in zip(r.curves, r.optima, means, colours, strict=True):
            ax.plot(curve.x[valid], mean[valid], "o-", ms=3.5, lw=1.3, color=colour,
                    label=f"{r.group.axis} {fmt_scale(curve.scale)}")
            div = curve.diverged.any(axis=1)
            if div.any():  # an empty unclipped line would still stretch the tight bounding box to (0, 0)
                ax.plot(curve.x[div], np.full(div.sum(), top), "x", ms=6, mew=1.5, color=colour, clip_on=False)
            above = valid & (mean > top)
            if above.any():  # off the clipped range: a mark on the top edge, so no point vanishes
                ax.plot(curve.x[above], np.full(above.sum(), top), "^", ms=6, color=colour, clip_on=False,
                        gid="above")
                n_above += int(above.sum())
            if opt is not None:
                ax.plot(opt.x_opt, opt.loss_opt, "*", ms=12, mec="black", mew=0.8,
                        color="white" if opt.edge else colour, zorder=5)
        ax.set_ylim(lo, top)
        _log2_ticks(ax, "x")
        ax.set_title(r.group.label, fontsize=10)
        ax.set_xlabel("learning rate")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        key = "x on top: diverged\n" + (f"^ on top: {n_above} point(s) above the range\n" if n_above else "")
        ax.legend(fontsize=7, title=key + "* optimum (open: edge)", title_fontsize=7, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _loss_range(losses: np.ndarray) -> tuple[float, float]:
    """y limits that show the bowls: from the best loss to a few times its distance to the median."""
    if losses.size == 0:
        return 0.0, 1.0
    lo, med, hi = float(losses.min()), float(np.median(losses)), float(losses.max())
    top = min(hi, lo + 3 * (med - lo)) if med > lo else hi
    pad = 0.05 * (top - lo) or 0.05 * abs(lo) or 0.05
    return lo - pad, top + pad


def _optimum_vs_scale(results: list[GroupResult], axis: str) -> Figure:
    fig, ax = plt.subplots(figsize=PANEL)
    ys: list[float] = []  # everything drawn on the learning-rate axis
    for r, colour in zip(results, plt.cm.tab10.colors, strict=False):
        for curve, opt in zip(r.curves, r.optima, strict=True):
            if opt is None:
                continue
            ys.append(opt.x_opt)
            if opt.edge:  # a bound: the triangle points to where the optimum lies
                marker = "v" if opt.edge == ("low",) else "^"
                ax.plot(curve.scale, opt.x_opt, marker, ms=8, mfc="none", color=colour)
                continue
            # A bootstrap interval need not hold the full data's estimate: clip, since matplotlib refuses negatives.
            err = None if opt.interval is None else [[max(0.0, opt.x_opt - opt.interval[0])],
                                                     [max(0.0, opt.interval[1] - opt.x_opt)]]
            ys += [] if opt.interval is None else list(opt.interval)
            ax.errorbar(curve.scale, opt.x_opt, yerr=err, fmt="o", ms=5, color=colour, capsize=3)
        if r.law is not None:
            s = np.geomspace(min(r.group.scales), max(r.group.scales), 50)
            fitted = r.law.predict(s)
            ys += [float(np.min(fitted)), float(np.max(fitted))]
            ax.plot(s, fitted, "--", color=colour, lw=1.2,
                    label=f"{r.group.label}: {r.law.b:+.2f} per doubling")
        else:
            ax.plot([], [], "o", color=colour, label=f"{r.group.label}: no law")
    ax.set_ylim(*_octave_range(ys))
    _scale_ticks(ax)
    _log2_ticks(ax, "y")
    ax.set_xlabel(axis)
    ax.set_ylabel("optimal learning rate")
    ax.set_title(f"Optimum against {axis} (open triangles: edge bounds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _octave_range(ys: list[float], min_span: float = MIN_SPAN_LOG2, pad: float = 0.25) -> tuple[float, float]:
    """y limits in log2(lr) around the values, at least `min_span` octaves tall (centred on them): an optimum
    that moves a tenth of an octave draws as the flat line it is, not as a steep one."""
    finite = [y for y in ys if np.isfinite(y)]
    if not finite:
        return -1.0, 1.0
    lo, hi = min(finite) - pad, max(finite) + pad
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    return lo, hi


def _best_loss_vs_scale(results: list[GroupResult], axis: str, metric: str) -> Figure:
    fig, ax = plt.subplots(figsize=PANEL)
    for r, colour in zip(results, plt.cm.tab10.colors, strict=False):
        pts = [(c.scale, o.loss_opt) for c, o in zip(r.curves, r.optima, strict=True) if o is not None]
        if not pts:
            continue
        s, loss = np.array(pts).T
        ax.plot(s, loss, "o", color=colour, label=r.group.label)
        fit = r.metrics["asymptotic"]
        if fit["l_inf"] is not None:
            law = LossLaw(fit["l_inf"], fit["A"], fit["alpha"], fit["scale_ref"], fit["rms"])
            grid = np.geomspace(s.min(), s.max(), 50)
            ax.plot(grid, law(grid), "--", color=colour, lw=1.2, label=f"L_inf {law.l_inf:.3f}, alpha {law.alpha:.2f}")
    _scale_ticks(ax)
    ax.set_xlabel(axis)
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"Best loss against {axis}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
