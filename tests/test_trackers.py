"""Live logging to trackers: TensorBoard's own reader gets back what metrics.jsonl holds; a missing package is
one line; a tracker that fails never breaks a run; trackers never change a run's id."""

import json
import sys
from pathlib import Path

import pytest

from hptransfer.config.compose import compose_run
from hptransfer.config.frozen import run_id, to_yaml
from hptransfer.errors import HptError
from hptransfer.train import loop, trackers
from hptransfer.train.rules import apply_rules
from tests.conftest import TINY, assert_one_line_error, cli

RUN = [*TINY, "train.eval_every=4"]


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """One tag's (step, value) points as TensorBoard shows them, read with TensorBoard's own reader."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def train(run_dir: Path, *overrides: str) -> dict:
    proc = cli("train", *RUN, *overrides, "--run-dir", str(run_dir), "-q")
    assert proc.returncode == 0, proc.stderr
    return json.loads((run_dir / "result.json").read_text())


def test_tensorboard_gets_the_curves_of_metrics_jsonl_the_lr_and_the_throughput(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    plain = train(tmp_path / "plain")
    monkeypatch.setenv("HPT_LOG_TO", "tensorboard")
    result = train(tmp_path / "r")
    # Logging is no part of the run: the same id, config.yaml and results as the run without it.
    assert result["run_id"] == plain["run_id"] == run_id(compose_run(RUN))
    assert (tmp_path / "r" / "config.yaml").read_text() == (tmp_path / "plain" / "config.yaml").read_text()
    assert result["final_val_loss"] == plain["final_val_loss"] and lines(tmp_path / "r") == lines(tmp_path / "plain")
    rows = lines(tmp_path / "r")
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert [s for s, _ in val] == [4, 8, 12, 16, 20]  # every train.eval_every steps, then the final one
    for tag, want in (("train/loss", loss), ("val/loss", val)):
        got = scalars(tmp_path / "r", tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag  # stored as float32
    cfg = compose_run(RUN)
    eff, _ = apply_rules(cfg)
    lr = scalars(tmp_path / "r", "train/lr")
    assert [s for s, _ in lr] == [4, 9, 14, 19]  # the log steps
    assert [v for _, v in lr] == pytest.approx([eff.optim.lr * loop.lr_factor(s, 20, eff) for s, _ in lr], rel=1e-6)
    tps = scalars(tmp_path / "r", "train/tokens_per_s")
    assert [s for s, _ in tps] == [4, 9, 14, 19] and all(v > 0 for _, v in tps)


class Preempted(BaseException):
    """Like SIGTERM/SIGKILL: not an Exception, so nothing records a result."""


def test_a_resumed_run_shows_in_tensorboard_as_the_uninterrupted_one(tmp_path, monkeypatch):
    """The killed attempt's events from the checkpoint's step on are purged (SummaryWriter's purge_step)."""
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("HPT_LOG_TO", "tensorboard")
    train(tmp_path / "whole", "train.checkpoint_every=10")
    real = loop.lr_factor

    def preempt_at_17(step: int, total: int, cfg):  # noqa: ANN001
        if step == 17:
            raise Preempted
        return real(step, total, cfg)

    monkeypatch.setattr(loop, "lr_factor", preempt_at_17)
    with pytest.raises(Preempted):
        cli("train", *RUN, "train.checkpoint_every=10", "--run-dir", str(tmp_path / "cut"), "-q")
    # The cut attempt logged steps 0-14 and the evaluations at 4, 8, 12, past its step-10 checkpoint.
    assert [s for s, _ in scalars(tmp_path / "cut", "val/loss")] == [4, 8, 12]
    assert [s for s, _ in scalars(tmp_path / "cut", "train/loss")] == list(range(15))
    monkeypatch.setattr(loop, "lr_factor", real)
    train(tmp_path / "cut", "train.checkpoint_every=10")  # resumes from step 10: steps 10-14 and 12 again
    assert len(list((tmp_path / "cut" / "tb").glob("events.out.tfevents.*"))) == 2
    for tag in ("train/loss", "val/loss"):
        assert scalars(tmp_path / "cut", tag) == scalars(tmp_path / "whole", tag), tag
    assert lines(tmp_path / "cut") == lines(tmp_path / "whole")


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_one_line_for_hpt_train_and_a_warning_for_a_job(tmp_path, monkeypatch, capsys,
                                                                                      name):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed: find_spec gives None, import fails
    monkeypatch.setenv("HPT_LOG_TO", name)
    proc = cli("train", *TINY, "--run-dir", str(tmp_path / "x"))
    assert_one_line_error(proc, f"HPT_LOG_TO names {name}, but the '{name}' package is not installed: pip install")
    assert not (tmp_path / "x").exists()  # nothing written for bad input
    # A job never fails for a tracker: one warning line in its log, and the run trains.
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "config.yaml").write_text(to_yaml(compose_run(TINY)))
    capsys.readouterr()
    assert loop.train_folder(tmp_path / "job")["status"] == "completed"
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(said) == 1 and said[0].startswith("hpt: warning: ") and f"'{name}' package is not installed" in said[0]


class Failing:
    """A tracker that starts, then fails at its first log call."""

    closed: list = []

    def __init__(self, *args):  # noqa: ANN002
        pass

    def log(self, step: int, values: dict) -> None:
        raise OSError("No space left on device\nsecond line")

    def close(self, status: str | None) -> None:
        Failing.closed.append(status)


def test_a_tracker_that_fails_is_reported_once_and_the_run_goes_on(tmp_path, monkeypatch):
    Failing.closed = []
    monkeypatch.setitem(trackers.OPENERS, "tensorboard", Failing)
    monkeypatch.setattr(trackers, "missing_package", lambda name: None)
    monkeypatch.setenv("HPT_LOG_TO", "tensorboard")
    proc = cli("train", *RUN, "--run-dir", str(tmp_path / "a"), "-q")
    assert proc.returncode == 0 and json.loads((tmp_path / "a" / "result.json").read_text())["status"] == "completed"
    warnings = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert warnings == ["hpt: warning: tracker tensorboard failed (OSError: No space left on device); "
                        "the run goes on without it"]
    assert Failing.closed == [None]  # closed once, when dropped

    def broken(*args):  # noqa: ANN002, ANN202
        raise RuntimeError("cannot reach the server")

    monkeypatch.setitem(trackers.OPENERS, "tensorboard", broken)
    proc = cli("train", *RUN, "--run-dir", str(tmp_path / "b"), "-q")
    assert proc.returncode == 0 and "tracker tensorboard did not start (RuntimeError: cannot reach" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_tracker_names_and_where_they_come_from(monkeypatch):
    assert trackers.requested("") == [] and trackers.requested("none") == []
    assert trackers.requested(" TensorBoard, wandb,tensorboard ") == ["tensorboard", "wandb"]
    with pytest.raises(HptError, match="'tensorbord' is not a tracker"):
        trackers.requested("tensorbord")
    monkeypatch.setenv("HPT_LOG_TO", "tensorbord")
    with pytest.raises(HptError, match="HPT_LOG_TO"):
        trackers.Trackers.from_env(strict=True)
    said = []
    assert trackers.Trackers.from_env(strict=False, warn=said.append).names == [] and len(said) == 1
    monkeypatch.setenv("HPT_LOG_TO", "tensorboard")
    monkeypatch.setenv("RANK", "1")  # another rank of a run that spans processes: rank 0 logs
    assert trackers.Trackers.from_env(strict=True).names == []
