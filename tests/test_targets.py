"""`hpt predict --launch`: the target run (and its bracket) trained for real, its prediction recorded, and
`hpt analyze` setting it beside the small-scale law without fitting it in."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from hptransfer.analysis.analyze import analyze
from tests.conftest import TINY, assert_one_line_error, cli, hpt
from tests.test_analysis import X0, Truth, table, write

# The synthetic sweep's law (mup: the optimum stays at 2^-7.3 at every width) predicts width 32's learning rate.
TARGET = [a for o in TINY if not o.startswith("model.width") for a in ("--set", o)]


def synthetic(tmp_path: Path) -> Path:
    return write(table({"mup": Truth(), "sp": Truth(slope=-1.0)}, widths=(64, 128, 256)), tmp_path / "small.parquet")


def test_predict_launch_runs_the_bracket_and_analyze_sets_it_beside_the_law(tmp_path):
    small, root = synthetic(tmp_path), tmp_path / "runs"
    proc = hpt("predict", str(small), "--at", "width=32", "--param", "mup", "--launch", "--bracket", "3",
               "--root", str(root), *TARGET)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "learning rate" in proc.stdout and "3 runs ended (3 completed)" in proc.stdout
    definition = (root / "target-mup-width32" / "sweep.yaml").read_text()
    assert "prediction:" in definition and "group: mup × width" in definition
    out = tmp_path / "targets.parquet"
    assert hpt("collect", "--root", str(root), "--out", str(out)).returncode == 0
    rows = pq.read_table(out).to_pylist()
    predicted = rows[0]["prediction.lr"]
    assert abs(predicted / 2**-7.3 - 1) < 0.05  # the law's value: every target row records it
    assert sorted(r["lr"] / predicted for r in rows) == [0.5, 1.0, 2.0] and {r["width"] for r in rows} == {32}
    assert all(r["prediction.group"] == "mup × width" and r["prediction.at"] == 32 for r in rows)
    report = tmp_path / "report"
    proc = hpt("analyze", str(small), str(out), "--out", str(report))
    assert proc.returncode == 0, proc.stderr
    assert "Target runs" in proc.stdout
    s = json.loads((report / "summary.json").read_text())
    (mup,) = [g for g in s["groups"] if g["parameterization"] == "mup"]
    assert mup["scales"] == [64, 128, 256]  # the target runs are beside the law, not in it
    (t,) = s["targets"]
    assert t["group"] == "mup × width" and t["scale"] == 32 and t["runs"] == 3 and len(t["lrs"]) == 3
    assert t["loss_at_predicted"] > 0 and t["lr_predicted"] == predicted
    assert t["lr_realized"] is not None or t["realized_at_edge"]
    assert "Target runs" in (report / "report.md").read_text()


def test_predict_launch_needs_one_prediction_and_an_odd_bracket(tmp_path):
    small = synthetic(tmp_path)
    assert_one_line_error(cli("predict", str(small), "--at", "width=32", "--launch", "--root", str(tmp_path)),
                          "--launch runs one prediction, and there are 2")
    assert_one_line_error(cli("predict", str(small), "--at", "width=32", "--param", "mup", "--launch", "--bracket",
                              "2", "--root", str(tmp_path)), "use an odd number")
    assert_one_line_error(cli("predict", str(small), "--at", "width=32", "--bracket", "3"), "go with --launch")
    assert not (tmp_path / "target-mup-width32").exists()


def test_predict_launch_dry_run_shows_the_target_sweep(tmp_path):
    proc = cli("predict", str(synthetic(tmp_path)), "--at", "width=32", "--param", "mup", "--launch", "--dry-run",
               "--bracket", "5", "--root", str(tmp_path / "runs"), *TARGET)
    assert proc.returncode == 0, proc.stderr
    assert "5 runs" in proc.stdout and "launcher: local" in proc.stdout
    assert not (tmp_path / "runs" / "target-mup-width32").exists()


def _targets(truth: Truth, predicted_x: float, width: int = 1024) -> "object":
    """Target rows at `width`: a bracket of 5 learning rates around 2^predicted_x, losses from `truth`."""
    grid = predicted_x + np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    rows = table({"mup": truth}, widths=(width,), grid=grid).assign(**{
        "sweep": "target", "prediction.lr": 2.0**predicted_x, "prediction.lr_low": 2.0 ** (predicted_x - 0.5),
        "prediction.lr_high": 2.0 ** (predicted_x + 0.5), "prediction.group": "mup × width",
        "prediction.axis": "width", "prediction.at": float(width), "prediction.from": "synthetic"})
    rows["run_id"] = rows["run_id"] + "-target"
    return rows


@pytest.mark.parametrize("shift,inside", [(0.0, True), (1.5, False)])
def test_a_bracket_confirms_a_right_prediction_and_catches_a_wrong_one(shift, inside):
    """The small widths follow the truth; at the target the optimum is where the truth says (a right law) or
    1.5 octaves away (a law that stops holding): the bracket's realized optimum says which."""
    small = table({"mup": Truth()}, widths=(64, 128, 256))
    target = _targets(Truth(x0=X0 + shift), predicted_x=X0)
    result = analyze(pd.concat([small, target], ignore_index=True), n_boot=0)
    (t,) = result.targets
    assert t.scale == 1024 and t.runs == 5 and t.inside is inside
    assert abs(np.log2(t.lr_realized) - (X0 + shift)) < 0.1
    assert [g.scales for g in (r.group for r in result.results)] == [[64, 128, 256]]
    assert t.loss_at_predicted == pytest.approx(Truth(x0=X0 + shift).loss(1024, X0))
