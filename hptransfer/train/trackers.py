"""Live logging of a run to the trackers researchers watch: TensorBoard, Weights & Biases, MLflow.

Optional, off by default, and never part of a run. Which trackers a run logs to is read from the
environment variable `HPT_LOG_TO` (`tensorboard`, `wandb`, `mlflow`, comma-separated; unset, empty or
`none`: none), not from the run config: a run logged or not is the same run (its id, config.yaml and
results do not change), and a sweep planned without trackers is watched by launching it again with
them. A job inherits the variable from `hpt sweep` (the local scheduler's environment; sbatch exports
it to SLURM jobs, or `launcher.setup` can). W&B and MLflow read their own settings from their own
variables (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE; MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME).

Each tracker's package is imported only when named. A tracker that fails (a missing package, a network
error, a full disk) is reported once, as a warning line on stderr (the run's log), and dropped: the run
goes on without it. What is logged, at the steps metrics.jsonl gives:

  train/loss           every step's training loss (read back at log steps)
  train/lr             optim.lr after the batch/duration rules x the schedule's factor, at log steps
  train/tokens_per_s   training throughput of this attempt so far, at log steps
  val/loss             each evaluation: every train.eval_every steps, and the final one

TensorBoard writes `<run_dir>/tb/` through PyTorch's SummaryWriter, so `tensorboard --logdir runs/<sweep>`
shows a whole sweep; a resumed attempt purges the killed attempt's events from its checkpoint's step on.
W&B and MLflow name each attempt's run after the run id, grouped (W&B) or filed (MLflow experiment) by
sweep. Only the process that writes the run folder logs (rank 0, should a run ever span processes).
"""

import importlib.util
import math
import os
import sys
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from hptransfer.config.derived import flatten
from hptransfer.config.frozen import run_config
from hptransfer.errors import HptError

ENV = "HPT_LOG_TO"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # tracker -> the package it needs


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, status: str | None) -> None: ...


def requested(value: str | None = None) -> list[str]:
    """The trackers named by HPT_LOG_TO (or `value`), in order; an HptError for a name that is no tracker."""
    raw = os.environ.get(ENV, "") if value is None else value
    names = list(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    if names in ([], ["none"]):
        return []
    for name in names:
        if name not in PACKAGES:
            raise HptError(f"{ENV}: '{name}' is not a tracker: name any of {', '.join(PACKAGES)} "
                           "(comma-separated), or none")
    return names


def missing_package(name: str) -> str | None:
    """The one-line error for a tracker whose package is not installed, else None (nothing is imported)."""
    package = PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        return f"{ENV} names {name}, but the '{package}' package is not installed: pip install {package}"
    return None


def _warn(message: str) -> None:
    print(f"hpt: warning: {message}", file=sys.stderr, flush=True)


class Trackers:
    """The trackers of one run: `start` opens them, `log` sends scalars, `close` ends them.

    Never raises once built: a tracker that fails is reported once through `warn` and dropped.
    False when no tracker is active, so the loop builds nothing to log.
    """

    def __init__(self, names: list[str], warn: Callable[[str], None] = _warn):
        self.names = names
        self.warn = warn
        self.active: dict[str, Tracker] = {}

    @classmethod
    def from_env(cls, *, strict: bool, warn: Callable[[str], None] = _warn) -> "Trackers":
        """HPT_LOG_TO's trackers. `strict` (`hpt train`): an unknown name or a missing package is an HptError,
        raised before anything is written; otherwise (a job) a warning, and the run goes on without it."""
        if os.environ.get("RANK", "0") != "0":  # torchrun's other ranks: the run folder is rank 0's
            return cls([], warn)
        try:
            names = requested()
        except HptError as err:
            if strict:
                raise
            warn(f"{err}: no tracker")
            return cls([], warn)
        ok = []
        for name in names:
            if (problem := missing_package(name)) is None:
                ok.append(name)
            elif strict:
                raise HptError(problem)
            else:
                warn(f"{problem}; the run goes on without {name}")
        return cls(ok, warn)

    def __bool__(self) -> bool:
        return bool(self.active)

    def start(self, run_dir: Path, cfg: DictConfig, run_id: str, sweep: str | None, step0: int) -> None:
        """Open each tracker for this attempt, which trains from `step0` (a resumed one: its checkpoint's step)."""
        if not self.names:
            return
        config = run_config(cfg)  # the run's identity as plain data, launcher settings excluded
        for name in self.names:
            try:
                self.active[name] = OPENERS[name](Path(run_dir), config, run_id, sweep, step0)
            except Exception as err:  # a tracker never breaks a run
                self.warn(f"tracker {name} did not start ({_one_line(err)}); the run goes on without it")

    def log(self, items: Iterable[tuple[int, dict[str, float | None]]]) -> None:
        """Send (step, {name: value}) items, merged per step and in step order (W&B drops a step below its last)."""
        if not self.active:
            return
        by_step: dict[int, dict[str, float]] = {}
        for step, values in items:
            by_step.setdefault(step, {}).update({k: math.nan if v is None else float(v) for k, v in values.items()})
        for name, tracker in list(self.active.items()):
            try:
                for step in sorted(by_step):
                    tracker.log(step, by_step[step])
            except Exception as err:  # reported once, then the tracker is dropped
                self.warn(f"tracker {name} failed ({_one_line(err)}); the run goes on without it")
                self.active.pop(name)
                _close_quietly(tracker, None)

    def close(self, status: str | None) -> None:
        """End every tracker: `status` is the run's (completed, diverged, failed), None when the attempt was cut."""
        for name, tracker in list(self.active.items()):
            try:
                tracker.close(status)
            except Exception as err:
                self.warn(f"tracker {name} did not close cleanly ({_one_line(err)})")
        self.active.clear()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _close_quietly(tracker: Tracker, status: str | None) -> None:
    with suppress(Exception):  # already reported as failed
        tracker.close(status)


class TensorBoard:
    """PyTorch's own SummaryWriter into `<run_dir>/tb/`."""

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str, sweep: str | None, step0: int):
        # here: only a run that logs to TensorBoard imports it (seconds of start-up)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the events a killed attempt logged from this attempt's first step on.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=step0, flush_secs=10)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self, status: str | None) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run named after the run id, grouped by sweep; its local files in `<run_dir>/wandb/`."""

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str, sweep: str | None, step0: int):
        import wandb  # here: only when named, and never a dependency

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "hptransfer", group=sweep, name=run_id,
                              config=config, dir=str(run_dir), tags=[f"resumed-at-{step0}"] if step0 else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, status: str | None) -> None:
        self.run.finish(exit_code=0 if status in ("completed", "diverged") else 1)


class MLflow:
    """An MLflow run named after the run id, in the experiment MLFLOW_EXPERIMENT_NAME or else the sweep's name."""

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str, sweep: str | None, step0: int):
        import mlflow  # here: only when named, and never a dependency

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_EXPERIMENT_NAME") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
            mlflow.set_experiment(sweep or "hptransfer")
        mlflow.start_run(run_name=run_id, tags={"hpt.run_id": run_id, "hpt.sweep": sweep or "",
                                                "hpt.run_dir": str(run_dir), "hpt.first_step": str(step0)})
        mlflow.log_params(flatten(config))  # dotted keys, as MLflow's parameters want them

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self, status: str | None) -> None:
        self.mlflow.end_run({"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))


OPENERS: dict[str, Callable[[Path, dict[str, Any], str, str | None, int], Tracker]] = {
    "tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow,
}
