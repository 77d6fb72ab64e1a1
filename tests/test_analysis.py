"""`hpt analyze` and `hpt predict` on synthetic results tables with a known answer.

Every table follows the Parquet contract of docs/design.md#resultsparquet. The loss at width w and log2(lr) x is
`l_inf + 2 (w/64)^-0.5 + 0.05 (d^2 + 0.05 d^4)`, d = x - x*(w), with x*(w) = x0 + b log2(w/128):
a symmetric, not quite quadratic bowl whose minimum is exactly x*, so the true optimum and
the true law are known. Runs far above the optimum diverge, as real ones do.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hptransfer.analysis.analyze import analyze
from hptransfer.analysis.load import find_groups, load_results
from hptransfer.analysis.optimum import Curve, find_optimum, local_fit, quantile
from hptransfer.analysis.predict import predict
from hptransfer.analysis.summary import fmt_loss, fmt_scale, summary
from hptransfer.formats import fmt_lr
from tests.conftest import assert_one_line_error, cli, hpt

X0 = -7.3          # log2 of the optimum at the base width 128: not on any grid point
WIDTHS = (64, 128, 256, 512, 1024)
GRID = np.arange(-13.0, -2.0, 1.0)


@dataclass(frozen=True)
class Truth:
    """A synthetic parameterization: optimum x0 + slope u + bend u^2 with u = log2(w/128), best loss
    l_inf + 2 (w/64)^-0.5."""

    slope: float = 0.0
    l_inf: float = 2.0
    x0: float = X0
    diverge_above: float = 2.5  # runs this many log2 steps above the optimum diverge
    bend: float = 0.0

    def x_opt(self, width: float) -> float:
        return self.x0 + self.slope * np.log2(width / 128) + self.bend * np.log2(width / 128) ** 2

    def loss(self, width: float, x: float) -> float:
        d = x - self.x_opt(width)
        return self.l_inf + 2.0 * (width / 64) ** -0.5 + 0.05 * (d**2 + 0.05 * d**4)


def table(
    truths: dict[str, Truth],
    widths: tuple[int, ...] = WIDTHS,
    grid: np.ndarray = GRID,
    seeds: tuple[int, ...] = (0,),
    noise: float = 0.0,
    weight_decay: float = 0.0,
    rng: int = 0,
) -> pd.DataFrame:
    """A width sweep in the results.parquet layout: one row per (parameterization, width, lr, seed)."""
    gen = np.random.default_rng(rng)
    rows = []
    for name, truth in truths.items():
        for w in widths:
            for x in grid:
                for seed in seeds:
                    diverged = x > truth.x_opt(w) + truth.diverge_above
                    loss = np.nan if diverged else truth.loss(w, x) + noise * gen.normal()
                    rows.append(_row(name, w, 2, float(x), seed, loss, diverged, weight_decay))
    return pd.DataFrame(rows)


def _row(name: str, width: int, depth: int, x: float, seed: int, loss: float, diverged: bool, wd: float) -> dict:
    tokens = (50 if diverged else 200) * 16 * 128  # as in result.json: a diverged run stops early
    return {
        "run_id": f"{name}-{width}-{depth}-{x}-{seed}-{wd}", "sweep": "synthetic",
        "status": "diverged" if diverged else "completed",
        "final_val_loss": loss, "final_train_loss": loss, "steps": 200, "tokens": tokens, "batch_size": 16,
        "seq_len": 128, "n_params": 12 * depth * width**2, "flops": 6.0 * 12 * depth * width**2 * tokens,
        "diverged_at_step": 50 if diverged else None,
        "width": width, "depth": depth, "parameterization": name, "lr": 2.0**x,
        "cfg.model.width": width, "cfg.model.n_layers": depth, "cfg.model.n_heads": width // 32,
        "cfg.optim.lr": 2.0**x, "cfg.optim.weight_decay": wd, "cfg.train.seed": seed, "cfg.param.name": name,
        "cfg.param.base_width": 128, "cfg.param.base_depth": 2, "cfg.train.batch_size": 16,
        "cfg.train.steps": 200, "cfg.train.tokens": None, "cfg.train.seq_len": 128, "cfg.train.log_every": 10,
    }


def write(df: pd.DataFrame, path: Path) -> Path:
    df.to_parquet(path, engine="pyarrow")
    return path


def by_scale(result) -> dict[float, object]:
    return {c.scale: o for c, o in zip(result.curves, result.optima, strict=True)}


# -- optimum and law ---------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1.0, 0.5])
def test_optimum_and_law_are_recovered(tmp_path: Path, step: float) -> None:
    truths = {"mup": Truth(slope=0.0), "sp": Truth(slope=-1.0, l_inf=2.05), "half": Truth(slope=-0.5)}
    grid = np.arange(-14.0, -1.0, step)
    df = load_results([write(table(truths, grid=grid), tmp_path / "r.parquet")], "final_val_loss")
    results = {r.group.parameterization: r for r in analyze(df, n_boot=0).results}
    assert set(results) == set(truths)
    for name, truth in truths.items():
        r = results[name]
        for scale, opt in by_scale(r).items():
            assert not opt.edge
            assert abs(opt.x_opt - truth.x_opt(scale)) < step / 10, (name, scale)
            assert abs(opt.x_spline - truth.x_opt(scale)) < step / 10, (name, scale)
        assert abs(r.law.b - truth.slope) < 0.02
        assert abs(r.law.log2_a + 7 * truth.slope - truth.x0) < 0.1  # log2 a = x0 - slope log2(128)
        assert r.law.loo_error_log2 < 0.1
        assert r.metrics["fit_quality"]["rms_residual_log2"] < 0.05


def test_diverged_and_nan_runs_never_become_the_optimum(tmp_path: Path) -> None:
    df = table({"mup": Truth()})
    at = (df["width"] == 256) & (df["lr"] == 2.0**-7)  # the best grid point at width 256
    # A diverged run that still logged a tiny loss, a NaN and an infinite loss of "completed" runs.
    df.loc[at, ["status", "final_val_loss"]] = ["diverged", 0.01]
    df.loc[(df["width"] == 512) & (df["lr"] == 2.0**-7), "final_val_loss"] = np.nan
    df.loc[(df["width"] == 1024) & (df["lr"] == 2.0**-7), "final_val_loss"] = np.inf
    # A failed run with a tiny loss is not even shown.
    failed = df[at].assign(status="failed", final_val_loss=0.0, run_id="failed-run")
    df = pd.concat([df, failed], ignore_index=True)
    result = analyze(load_results([write(df, tmp_path / "r.parquet")], "final_val_loss"), n_boot=0).results[0]
    optima = by_scale(result)
    for width in (256, 512, 1024):
        opt = optima[width]
        assert opt.x_best != -7.0
        assert opt.loss_opt > 2.0, "a diverged or non-finite run's loss was used"
        assert abs(opt.x_opt - X0) < 1.0
    curve = next(c for c in result.curves if c.scale == 256)
    assert curve.n_diverged == 1 + 2  # the marked run and the two (2^-4, 2^-3) past the stability limit


def test_a_learning_rate_that_diverges_on_one_seed_is_not_a_candidate() -> None:
    runs = table({"mup": Truth()}, widths=(128,), seeds=(0, 1, 2))
    best = runs["lr"] == 2.0**-7
    runs.loc[best & (runs["cfg.train.seed"] == 1), ["status", "final_val_loss"]] = ["diverged", np.nan]
    opt = find_optimum(Curve.from_runs(runs, 128, "final_val_loss"), n_boot=0)
    assert opt.x_best != -7.0


def test_edge_optimum_is_flagged_with_the_points_to_add(tmp_path: Path) -> None:
    # With slope -1, the optimum at width 1024 (log2 -10.3) lies below this grid's lowest lr, 2^-10.
    df = table({"sp": Truth(slope=-1.0)}, grid=np.arange(-10.0, -2.0, 1.0))
    path = write(df, tmp_path / "r.parquet")
    result = analyze(load_results([path], "final_val_loss"), n_boot=0).results[0]
    edge = by_scale(result)[1024]
    assert edge.edge == ("low",)
    assert [2**x for x in edge.to_add] == [2.0**-12, 2.0**-11]
    assert all(not o.edge for s, o in by_scale(result).items() if s != 1024)
    assert 1024 not in result.law.scales  # an edge optimum is a bound: the law does not use it
    assert abs(result.law.b + 1.0) < 0.02
    assert any("low edge" in w and "add lr 0.000244 (2^-12), 0.000488 (2^-11)" in w for w in result.warnings)


def test_law_is_null_with_fewer_than_two_interior_optima(tmp_path: Path) -> None:
    # Only width 64 has its optimum inside the grid: the law is null with a warning, not a crash.
    df = table({"sp": Truth(slope=-1.0)}, widths=(64, 256, 1024), grid=np.arange(-8.0, -2.0, 1.0))
    path = write(df, tmp_path / "r.parquet")
    result = analyze(load_results([path], "final_val_loss"), n_boot=0).results[0]
    assert result.law is None
    assert any("no transfer law" in w for w in result.warnings)
    proc = cli("predict", str(path), "--at", "width=4096")
    assert proc.returncode == 2 and "no transfer law" in proc.stderr


# -- seeds ---------------------------------------------------------------------------------------------


def test_seed_bootstrap_interval_covers_the_true_optimum() -> None:
    truth, covered, widths = Truth(), 0, []
    for rep in range(20):
        runs = table({"mup": truth}, widths=(256,), grid=np.arange(-11.0, -3.0, 0.5), seeds=tuple(range(6)),
                     noise=0.02, rng=rep)
        opt = find_optimum(Curve.from_runs(runs, 256, "final_val_loss"), n_boot=200,
                           rng=np.random.default_rng(rep))
        lo, hi = opt.boot
        covered += lo <= truth.x_opt(256) <= hi
        widths.append(hi - lo)
    assert covered >= 15, f"the 95% interval covered the truth {covered}/20 times"
    assert 0.02 < np.median(widths) < 0.5, "the interval should reflect the noise, not be empty or the whole grid"


@pytest.mark.parametrize("seeds", [1, 2, 3])
def test_the_interval_is_a_bootstrap_only_with_three_seeds_and_when_wider(seeds: int) -> None:
    # With 2 seeds a bootstrap has 3 distinct resamples: none is computed. The interval comes from the fit's
    # curvature and the loss noise (for one seed: the scatter around the local fits, pooled over the scales);
    # a bootstrap over 3 seeds is used only where it is the wider of the two.
    df = table({"mup": Truth()}, widths=(128, 256, 512), grid=np.arange(-11.0, -3.0, 0.5), seeds=tuple(range(seeds)),
               noise=0.01)
    analysis = analyze(df, n_boot=100)
    result = analysis.results[0]
    # With seeds, the seeds' scatter is pooled with the scatter around the fits, or the latter used alone
    # when it is the larger one (the bowl is then not quite a cubic).
    assert result.noise.source in (("fit residuals",) if seeds == 1 else ("seeds and fit residuals", "fit residuals"))
    assert 0.005 < result.noise.sd < 0.02
    for opt in result.optima:
        assert (opt.boot is not None) is (seeds == 3) and opt.fit.kind == "cubic"
        lo, hi = opt.interval
        assert lo < opt.x_opt < hi and 0.02 < hi - lo < 1.0 and opt.se > 0
        curvature = 2 * quantile(result.noise.dof) * opt.se
        wider = opt.boot is not None and opt.boot[1] - opt.boot[0] > curvature
        assert opt.interval_method == ("bootstrap" if wider else "curvature")
        assert hi - lo == pytest.approx(max(curvature, opt.boot[1] - opt.boot[0] if opt.boot else 0))
    entries = summary(analysis)["groups"][0]["optima"]
    assert [e["interval_method"] for e in entries] == [o.interval_method for o in result.optima]
    assert all(e["lr_opt_se_log2"] > 0 and (e["lr_interval_bootstrap"] is None) is (seeds < 3) for e in entries)


def test_an_edge_optimum_has_no_interval() -> None:
    df = table({"sp": Truth(slope=-1.0)}, grid=np.arange(-10.0, -2.0, 1.0))
    edge = by_scale(analyze(df, n_boot=0).results[0])[1024]
    assert edge.edge and edge.interval is None and edge.interval_method is None and edge.se is None


def test_seeds_missing_a_learning_rate_are_left_out_of_the_average() -> None:
    df = table({"mup": Truth()}, widths=(128, 256), grid=np.arange(-11.0, -3.0, 0.5), seeds=(0, 1, 2), noise=0.01)
    # Seed 2's run at one learning rate of width 256 failed: it is not in the table's used runs.
    gone = (df["width"] == 256) & (df["cfg.train.seed"] == 2) & (df["lr"] == 2.0**-9)
    df.loc[gone, "status"] = "failed"
    result = analyze(df, n_boot=0).results[0]
    curve = next(c for c in result.curves if c.scale == 256)
    assert curve.dropped == [2] and list(curve.used) == [0, 1] and not curve.mixed
    mean, valid = curve.mean()
    assert mean[valid] == pytest.approx(curve.loss[valid, :2].mean(axis=1))  # never seed 2, not even where it ran
    assert any("width=256: seed(s) 2 miss some learning rate(s)" in w and "2 of 3 seeds used" in w
               for w in result.warnings)
    entry = summary(analyze(df, n_boot=0))["groups"][0]["optima"]
    assert [o["seeds_dropped"] for o in entry] == [[], [2]] and [o["n_seeds_used"] for o in entry] == [3, 2]
    # When no seed ran every learning rate, the averages mix seeds, and the report says so.
    df.loc[(df["width"] == 256) & (df["cfg.train.seed"] != 2) & (df["lr"] == 2.0**-10), "status"] = "failed"
    df.loc[(df["width"] == 256) & (df["cfg.train.seed"] == 0) & (df["lr"] == 2.0**-4), "status"] = "failed"
    mixed = analyze(df, n_boot=0).results[0]
    assert any("no seed ran every learning rate" in w for w in mixed.warnings)


# -- groups and metrics --------------------------------------------------------------------------------


def test_groups_hold_everything_but_the_axis_fixed() -> None:
    width = table({"mup": Truth()}, widths=(64, 128, 256))
    decayed = table({"mup": Truth()}, widths=(64, 128, 256), weight_decay=0.1)
    depth = pd.DataFrame([
        _row("mup", 128, d, float(x), 0, Truth().loss(128, x) + 0.01 * d, False, 0.0) for d in (4, 8) for x in GRID
    ])
    pending = width.head(3).assign(status="pending", final_val_loss=np.nan, run_id=["p1", "p2", "p3"])
    groups = {g.label: g for g in find_groups(pd.concat([width, decayed, depth, pending], ignore_index=True))}
    assert set(groups) == {
        "mup × width [optim.weight_decay=0.0]", "mup × width [optim.weight_decay=0.1]", "mup × depth",
    }
    wide = groups["mup × width [optim.weight_decay=0.0]"]
    assert wide.scales == [64, 128, 256] and wide.varies_with_scale == ["model.n_heads"]
    assert wide.fixed["optim.weight_decay"] == 0.0 and "optim.lr" not in wide.fixed
    # The depth group shares its depth-2 point with the width sweep (same run ids).
    assert groups["mup × depth"].scales == [2, 4, 8]
    assert groups["mup × depth"].fixed["model.width"] == 128
    assert len(groups["mup × depth"].runs) == 3 * len(GRID)


def test_metrics_tell_the_parameterizations_apart(tmp_path: Path) -> None:
    truths = {"mup": Truth(slope=0.0), "sp": Truth(slope=-1.0, l_inf=2.05)}
    df = load_results([write(table(truths), tmp_path / "r.parquet")], "final_val_loss")
    analysis = analyze(df, n_boot=0)
    m = {r.group.parameterization: r.metrics for r in analysis.results}
    assert m["mup"]["wider_is_better"]["holds"]
    # SP's optimum moves down with width, so its large-lr runs diverge at the wider model.
    assert not m["sp"]["wider_is_better"]["holds"]
    assert any(v["diverged"] for v in m["sp"]["wider_is_better"]["violations"])
    assert m["sp"]["asymptotic"]["delta_l_inf"] == pytest.approx(0.05, abs=0.01)
    assert m["mup"]["asymptotic"]["delta_l_inf"] == 0
    assert m["sp"]["asymptotic"]["delta_loss_at_largest"] == pytest.approx(0.05, abs=0.005)
    # A factor-2 error costs 0.05 (d^2 + 0.05 d^4) at d = 1, at every width: no trend.
    for name in truths:
        rob = m[name]["robustness"]
        assert rob["mean_penalty"] == pytest.approx(0.0525, abs=0.003)
        assert abs(rob["penalty_trend_log2_per_doubling"]) < 0.05
    assert analysis.verdicts["width"][0].startswith("mup × width transfers best")


def test_the_loss_law_is_reported_only_where_identified(tmp_path: Path) -> None:
    # L_inf + A s^-alpha has 3 parameters: through 3 scales it interpolates and says nothing about L_inf.
    three = analyze(table({"mup": Truth(), "sp": Truth(l_inf=2.05)}, widths=(64, 128, 256)), n_boot=0)
    asym = three.results[0].metrics["asymptotic"]
    assert asym["l_inf"] is None and asym["reason"] == "not identified: needs 4 scales, has 3"
    assert any("L_inf is not identified for mup × width, sp × width" in v for v in three.verdicts["width"])
    assert not any("Lowest fitted L_inf" in v for v in three.verdicts["width"])
    four = analyze(table({"mup": Truth()}, widths=(64, 128, 256, 512)), n_boot=0)
    assert four.results[0].metrics["asymptotic"]["l_inf"] == pytest.approx(2.0, abs=0.01)


# -- the CLI -------------------------------------------------------------------------------------------


def test_report_folder_and_terminal_agree_with_summary_json(tmp_path: Path) -> None:
    truths = {"mup": Truth(slope=0.0), "sp": Truth(slope=-1.0, l_inf=2.05)}
    path = write(table(truths, seeds=(0, 1, 2), noise=0.003), tmp_path / "results.parquet")
    out = tmp_path / "report"
    proc = cli("analyze", str(path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("report.md", "summary.json", "loss_vs_lr_width.png", "optimum_vs_scale_width.png",
                 "best_loss_vs_scale_width.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "final_val_loss" and len(summary["groups"]) == 2

    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in proc.stdout.splitlines() if "│" in line]
    for g in summary["groups"]:
        assert {"parameterization", "axis", "fixed", "optima", "law", "metrics"} <= set(g)
        assert {"fit_quality", "robustness", "asymptotic"} <= set(g["metrics"])
        for o in g["optima"]:
            row = next(r for r in rows if r[:2] == [g["label"], fmt_scale(o["scale"])])
            assert row[2:4] == [fmt_lr(o["lr_opt"]), fmt_lr(o["lr_opt_spline"])]
            assert row[5] == fmt_loss(o["loss_opt"])
            assert row[6] == f"{o['n_runs']} ({o['n_diverged']})"
            lo, hi = o["lr_interval"]
            assert row[4] == f"{fmt_lr(lo)} - {fmt_lr(hi)}"
            assert row[7:9] == [str(o["n_seeds"]), o["interval_method"]]
            assert o["interval_method"] in ("bootstrap", "curvature")
        law_row = next(r for r in rows if r[0] == g["label"] and len(r) == 9)
        assert law_row[1:4] == [fmt_lr(g["law"]["a"]), f"{g['law']['b']:+.2f}", f"{g['law']['r2']:.3f}"]
    report = (out / "report.md").read_text()
    assert "![" in report and "loss_vs_lr_width.png" in report and "Kalra & Barkeshli" in report
    assert "mup × width transfers best" in proc.stdout

    as_json = cli("analyze", str(path), "--out", str(tmp_path / "again"), "--json")
    assert json.loads(as_json.stdout) == summary


def test_predict_gives_the_lr_per_class_and_the_launch_line(tmp_path: Path) -> None:
    truths = {"mup": Truth(slope=0.0), "sp": Truth(slope=-1.0)}
    path = write(table(truths, noise=0.003, weight_decay=0.1), tmp_path / "r.parquet")
    proc = cli("predict", str(path), "--at", "width=4096", "--param", "mup", "--json")
    assert proc.returncode == 0, proc.stderr
    [p] = json.loads(proc.stdout)
    # On this full-step grid the local cubic reaches 2 octaves out, where the bowl's quartic term moves it
    # by up to 0.09 log2 (the same at every width here, as the optimum does not move); the interval holds that.
    assert abs(np.log2(p["lr"]) - X0) < 0.1
    lo, hi = np.log2(p["lr_interval"])
    assert lo < X0 < hi and 0 < hi - lo < 0.5
    assert p["bend"] == {"detected": False, "z": pytest.approx(0, abs=1),
                         "missable_shift_log2": pytest.approx(0.5, abs=0.4)}
    assert any("no bend found" in n and "the interval assumes the law stays straight" in n for n in p["notes"])
    assert p["interval_basis"] == "the optima's own uncertainties and the law's extra scatter"
    # mup: hidden matrices' lr / m with m = 4096 / 128; embedding and readout unchanged.
    assert p["per_class_lr"]["H"] == pytest.approx(p["lr"] / 32)
    assert p["per_class_lr"]["E"] == pytest.approx(p["lr"]) == pytest.approx(p["per_class_lr"]["R"])
    assert p["command"].startswith(f"hpt train param=mup model.width=4096 optim.lr={p['lr']:.4g}")
    assert "optim.weight_decay=0.1" in p["command"] and "n_heads" not in p["command"]
    assert p["doublings_beyond"] == 2

    text = cli("predict", str(path), "--at", "width=4096")
    assert text.returncode == 0 and "sp × width at width=4096" in text.stdout and "launch" in text.stdout


@pytest.mark.parametrize("case", ["missing", "not_parquet", "no_lr", "one_scale", "bad_at"])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    path = tmp_path / "r.parquet"
    df = table({"mup": Truth()}, widths=(128,) if case == "one_scale" else WIDTHS)
    if case == "not_parquet":
        path.write_text("run_id,lr\n")
    elif case == "no_lr":
        write(df.drop(columns=["lr"]), path)
    elif case != "missing":
        write(df, path)
    args = ["predict", str(path), "--at", "widht=4096"] if case == "bad_at" else ["analyze", str(path)]
    expected = {"missing": "no such file", "not_parquet": "cannot read", "no_lr": "'lr'",
                "one_scale": "one scale point only", "bad_at": "--at"}[case]
    assert_one_line_error(cli(*args), expected)


def test_the_installed_command_reports_errors_in_one_line(tmp_path: Path) -> None:
    assert_one_line_error(hpt("analyze", str(tmp_path / "nope.parquet")), f"no such file: {tmp_path / 'nope.parquet'}")


def test_a_loss_law_pinned_at_a_bound_is_marked_and_left_out_of_the_comparison() -> None:
    from hptransfer.analysis.laws import fit_loss_law
    from hptransfer.analysis.metrics import asymptotic

    scales = [32, 64, 128, 256]
    exact = [2.0 + 0.8 * (s / 32) ** -0.5 for s in scales]
    law, _ = fit_loss_law(scales, exact)
    assert law.at_bound == "" and law.l_inf == pytest.approx(2.0, abs=1e-3)
    # Losses that fall faster at the larger scales (the demo's muP) fit no decaying power law above 0.
    accelerating = [2.3050, 2.300, 2.2875, 2.2524]
    pinned, _ = fit_loss_law(scales, accelerating)
    assert "L_inf = 0" in pinned.at_bound
    losses = {"a": list(zip(scales, exact, strict=True)), "b": list(zip(scales, accelerating, strict=True))}
    asym = asymptotic(losses, losses)
    assert asym["b"]["at_bound"] and asym["b"]["delta_l_inf"] is None and asym["a"]["delta_l_inf"] == 0


# -- detectors: each fires on the bad case and stays quiet on the good one -------------------------------


@pytest.mark.parametrize("bend", [0.0, 0.25])
def test_a_bending_law_is_flagged_and_widens_the_prediction(tmp_path: Path, bend: float) -> None:
    truth = Truth(slope=-0.5, bend=bend)
    path = write(table({"sp": truth}, grid=np.arange(-16.0, -1.0, 0.5), seeds=(0, 1), noise=0.005),
                 tmp_path / "r.parquet")
    result = analyze(load_results([path], "final_val_loss"), n_boot=0).results[0]
    warned = any("the law bends" in w for w in result.warnings)
    assert result.law.bends is (bend > 0) and warned is (bend > 0)
    law = summary(analyze(load_results([path], "final_val_loss"), n_boot=0))["groups"][0]["law"]
    assert law["bend"]["detected"] is (bend > 0)
    proc = cli("predict", str(path), "--at", "width=4096", "--json")
    [p] = json.loads(proc.stdout)
    assert p["bend"]["detected"] is (bend > 0)
    lo, hi = np.log2(p["lr_interval"])
    assert lo <= truth.x_opt(4096) <= hi
    if bend:  # widened: the straight law's own interval misses the truth, the widened one holds it
        s_lo, s_hi = np.log2(p["lr_interval_straight"])
        assert not s_lo <= truth.x_opt(4096) <= s_hi and lo <= s_lo and hi >= s_hi and hi - lo > s_hi - s_lo
        assert any("the law bends" in n for n in p["notes"])
        assert "warning" in cli("predict", str(path), "--at", "width=4096").stdout
    else:
        assert p["lr_interval"] == p["lr_interval_straight"]


def test_three_scales_bend_test_is_the_leave_largest_out_check() -> None:
    # With 3 points the quadratic law has no scatter left to estimate: its curvature's z comes from the
    # optima's own errors (the same test as predicting the largest point from the other two), and a bend
    # of this size is caught; the straight law's 1 degree of freedom shows it as extra scatter.
    df = table({"sp": Truth(slope=-0.5, bend=0.3)}, widths=(128, 256, 512), grid=np.arange(-14.0, -1.0, 0.5),
               seeds=(0, 1), noise=0.005)
    law = analyze(df, n_boot=0).results[0].law
    assert len(law.scales) == 3 and law.curved.tau2 == 0 and law.bends and law.extra_scatter_log2 > 0.1
    straight = analyze(table({"sp": Truth(slope=-0.5)}, widths=(128, 256, 512), grid=np.arange(-14.0, -1.0, 0.5),
                             seeds=(0, 1), noise=0.005), n_boot=0).results[0].law
    assert not straight.bends


def test_a_two_point_law_gets_an_interval_from_the_optima_alone() -> None:
    df = table({"mup": Truth()}, widths=(128, 256), grid=np.arange(-11.0, -3.0, 0.5), noise=0.005)
    [p] = predict(df, "width=1024")
    assert p.interval is not None and p.interval[0] < 2**X0 < p.interval[1]
    assert p.interval_basis.startswith("the optima's own uncertainties only") and p.bend is None
    assert any("no bend test with 2 points" in n for n in p.notes)
    result = analyze(df, n_boot=0).results[0]
    assert any("the law has 2 points" in w for w in result.warnings)


@pytest.mark.parametrize("clip", ["differs", "same", "absent", "null"])
def test_clipping_that_differs_across_scales_is_warned_about(clip: str) -> None:
    df = table({"mup": Truth()}, widths=(64, 128, 256), grid=np.arange(-11.0, -3.0, 0.5))
    if clip == "differs":  # clipping active in more steps as the width grows: an LR change that depends on width
        df["clip_fraction"] = df["width"].map({64: 0.02, 128: 0.05, 256: 0.4})
    elif clip == "same":
        df["clip_fraction"] = df["width"].map({64: 0.30, 128: 0.32, 256: 0.35})
    elif clip == "null":  # runs from before the column existed
        df["clip_fraction"] = np.nan
    result = analyze(df, n_boot=0).results[0]
    warned = [w for w in result.warnings if "gradient clipping differs across scales" in w]
    check = result.metrics["clipping"]
    if clip == "differs":
        assert check["differs"] and check["spread"] == pytest.approx(0.38)
        assert warned == ["gradient clipping differs across scales at the optimum (2% at width=64, 5% at width=128, "
                          "40% at width=256; spread > 0.1): clipping then acts as a scale-dependent learning-rate "
                          "change, and the law mixes the two"]
    elif clip == "same":
        assert not check["differs"] and not warned
    else:
        assert check is None and not warned


def test_the_verdict_compares_measured_losses_and_says_what_is_fitted() -> None:
    truths = {"mup": Truth(slope=0.0), "sp": Truth(slope=-1.0, l_inf=2.05)}
    analysis = analyze(table(truths, grid=np.arange(-14.0, -1.0, 0.5), seeds=(0, 1), noise=0.003), n_boot=0)
    verdict = " ".join(analysis.verdicts["width"])
    assert "read off the spline through the measured losses" in verdict and "(fitted)" not in verdict.split(":")[0]
    assert "Lowest measured loss at width=1024 (best learning rate tried, seed mean): mup × width" in verdict
    for r in analysis.results:
        asym = r.metrics["asymptotic"]
        largest = next(o for c, o in zip(r.curves, r.optima, strict=True) if c.scale == 1024)
        assert asym["loss_at_largest"] == largest.loss_best  # measured, not the fit's minimum
        curve = next(c for c in r.curves if c.scale == 1024)
        mean, _ = curve.mean()
        assert largest.loss_best == np.nanmin(mean[~curve.diverged.any(axis=1)])


@pytest.mark.parametrize("offset", [1.5, 1.6, 2.0, 3.7])
def test_the_local_fit_finds_an_exact_parabolas_minimum(offset):
    """A symmetric bowl makes the cubic's leading term rounding noise; the minimum must not move with it
    (it moved by a quarter grid step at offset 1.6 before that term was dropped)."""
    x = np.arange(-5.0, 0.0)
    fit = local_fit(x, (x + 3) ** 2 / 10 + offset, np.arange(5))
    assert fit.kind == "cubic" and fit.x_opt == pytest.approx(-3.0, abs=1e-9)


def test_fixed_tokens_per_param_sweeps_group_by_the_ratio() -> None:
    """At a fixed train.tokens_per_param each width trains its own tokens (and steps): those vary with the
    scale, the ratio holds the group together, and two ratios are two groups."""

    def at_ratio(ratio: float) -> pd.DataFrame:
        df = table({"mup": Truth()}, widths=(64, 128, 256))
        tokens = (ratio * df["n_params"]).round().astype(int)
        return df.assign(**{"cfg.train.tokens_per_param": ratio, "tokens": tokens, "cfg.train.tokens": tokens,
                            "steps": tokens // (16 * 128), "cfg.train.steps": tokens // (16 * 128),
                            "run_id": df["run_id"] + f"-tpp{ratio}"})

    assert [g.label for g in find_groups(at_ratio(8.0))] == ["mup × width"]  # its tokens follow the width
    groups = {g.label: g for g in find_groups(pd.concat([at_ratio(8.0), at_ratio(20.0)], ignore_index=True))}
    widths = {"mup × width [train.tokens_per_param=8.0]", "mup × width [train.tokens_per_param=20.0]"}
    # Two ratios at one width are two durations of that width: a tokens group each, the width held fixed.
    durations = {f"mup × tokens [model.n_heads={w // 32}, model.width={w}]" for w in (64, 128, 256)}
    assert set(groups) == widths | durations
    g = groups["mup × width [train.tokens_per_param=8.0]"]
    assert g.scales == [64, 128, 256] and {"train.tokens", "train.steps"} <= set(g.varies_with_scale)
    assert all(len(groups[d].scales) == 2 and groups[d].runs["width"].nunique() == 1 for d in durations)
