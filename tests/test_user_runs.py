"""Sweeps of the user's own code: a command and a callable, with hpt's whole engine around them.

The projects here are written to tmp_path as a user would write them (plain Python, no hpt inside), so
a run costs a process start, not training; the examples/ projects train for real in their own tests.
"""

import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hptransfer.sweeps import plan
from tests.conftest import REPO, assert_one_line_error, cli, hpt

CALLABLES = '''
import json, os
from dataclasses import dataclass, field


@dataclass
class Model:
    width: int = 8


@dataclass
class Config:
    model: Model = field(default_factory=Model)
    lr: float = 0.1
    seed: int = 0
    mode: str = "ok"


def main(cfg, run_dir):
    """A 'training' whose loss is a bowl in log2(lr) around 2^-3, a little lower for wider models."""
    import math
    if cfg.mode == "raises":
        return 1 / 0
    if cfg.mode == "none":
        return None
    if cfg.mode == "no_loss":
        return {"steps": 3}
    if cfg.mode == "not_a_dict":
        return [1.0]
    if cfg.mode == "writes":
        with open(os.path.join(run_dir, "result.json"), "w") as f:
            json.dump({"final_train_loss": 1.5}, f)
        return None
    loss = (math.log2(cfg.lr) + 3) ** 2 / 10 + 2 - 0.1 * math.log2(cfg.model.width) + 0.01 * cfg.seed
    return {"final_val_loss": loss, "steps": 3, "curve": {"steps": [0, 1, 2], "losses": [5.0, 4.0, loss]},
            "cwd": os.getcwd()}
'''

SWEEP = '''
run:
  target: mypkg.train:main
  schema: mypkg.train:Config
model: {width: 8}
lr: 0.1
seed: 0
mode: ok
sweep:
  name: mine
  axis: {key: model.width, values: [8, 16, 32]}
  grid:
    lr: {log2: [-5, -1], step: 1}
  seeds: [0]
'''


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's project: a package with a training function, and a sweep file beside it.

    The plan imports its schema in this process: each test's project is imported afresh."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m.split(".")[0] == "mypkg"]:
        monkeypatch.delitem(sys.modules, name)
    pkg = tmp_path / "proj" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(CALLABLES)
    (tmp_path / "proj" / "sweep.yaml").write_text(SWEEP)
    return tmp_path / "proj"


def sweep(project: Path, root: Path, *args: str) -> "object":
    return hpt("sweep", str(project / "sweep.yaml"), "--root", str(root), "-j", "2", *args)


def results(root: Path, tmp_path: Path) -> "object":
    out = tmp_path / "r.parquet"
    proc = hpt("collect", "--root", str(root), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return pq.read_table(out).to_pandas()


def test_a_callable_sweep_runs_dedupes_collects_and_analyzes(project, tmp_path):
    root = tmp_path / "runs"
    proc = sweep(project, root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = sweep(project, root)  # the same command: nothing to do, nothing trained twice
    assert again.returncode == 0 and "nothing to launch: all 15 runs have results" in again.stdout, again.stdout
    df = results(root, tmp_path)
    assert len(df) == 15 and set(df.status) == {"completed"}
    # the user's keys are cfg.* columns; the contract's coordinates come from them
    assert {"cfg.model.width", "cfg.lr", "cfg.seed", "cfg.mode", "cfg.run.target"} <= set(df.columns)
    assert (df["width"] == df["cfg.model.width"]).all() and (df["lr"] == df["cfg.lr"]).all()
    assert set(df["parameterization"]) == {"mine"}  # no key names one: the sweep's name stands for it
    assert df["curve_loss"].map(len).eq(3).all()
    result = json.loads((root / "mine" / df.run_id[0] / "result.json").read_text())
    assert result["status"] == "completed" and result["final_train_loss"] is None and result["env"]["hptransfer"]
    out = tmp_path / "report"
    proc = hpt("analyze", str(tmp_path / "r.parquet"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    (group,) = summary["groups"]  # one group: the user's lr and seed keys are recognised as swept, not context
    assert group["label"] == "mine × width" and group["scales"] == [8, 16, 32]
    assert "lr" not in group["fixed"] and "model.width" not in group["fixed"] and group["fixed"]["mode"] == "ok"
    assert [round(o["lr_opt"], 6) for o in group["optima"]] == [0.125] * 3  # the bowl's bottom, at every width
    proc = hpt("predict", str(tmp_path / "r.parquet"), "--at", "width=128", "--json")
    assert proc.returncode == 0, proc.stderr
    (pred,) = json.loads(proc.stdout)
    assert pred["lr"] == pytest.approx(0.125, rel=1e-6) and pred["per_class_lr"] is None  # not a preset of hpt's
    assert pred["command"].startswith("hpt sweep <your sweep file> model.width=128 lr=0.125 mode=ok")


def test_widening_the_grid_runs_only_the_new_points(project, tmp_path):
    root = tmp_path / "runs"
    assert sweep(project, root, "lr=0.5", "model.width=8,16").returncode == 0
    proc = sweep(project, root, "lr=0.5,0.25", "model.width=8,16")
    assert proc.returncode == 0, proc.stderr
    assert "2 runs ended (2 completed)" in proc.stdout and "lr=2^-1" not in proc.stdout, proc.stdout


def test_user_keys_are_hashed_into_the_run_id(project):
    f = project / "sweep.yaml"
    ids = {r.run_id for r in plan.expand(plan.load(f, ["lr=0.5", "model.width=8"]))}
    other = {r.run_id for r in plan.expand(plan.load(f, ["lr=0.5", "model.width=8", "mode=raises"]))}
    assert len(ids) == 1 and ids != other
    moved = plan.load(f, ["lr=0.5", "model.width=8", "seed=0"])
    assert {r.run_id for r in plan.expand(moved)} == ids  # the same point: the same id


def test_a_command_sweep_reads_the_last_json_line_or_result_json(tmp_path):
    (tmp_path / "train.py").write_text(textwrap.dedent('''
        import json, os, sys
        cfg = dict(a.split("=", 1) for a in sys.argv[1:])
        lr, width = float(cfg["lr"]), int(cfg["width"])
        loss = (lr - 0.01) ** 2 + 1 / width
        print("training...")
        if cfg["how"] == "file":
            with open(os.path.join(os.environ["HPT_RUN_DIR"], "result.json"), "w") as f:
                json.dump({"final_val_loss": loss}, f)
        else:
            print(json.dumps({"final_val_loss": loss, "tokens": 100}))
    '''))
    (tmp_path / "sweep.yaml").write_text(textwrap.dedent('''
        run: {command: "python train.py {overrides}"}
        width: 8
        lr: 0.01
        how: stdout
        seed: 0
        sweep:
          name: cmd
          axis: {key: width, values: [8, 16]}
          grid: {how: [stdout, file]}
    '''))
    proc = hpt("sweep", str(tmp_path / "sweep.yaml"), "--root", str(tmp_path / "runs"), "-j", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = results(tmp_path / "runs", tmp_path)
    assert set(df.status) == {"completed"} and len(df) == 4
    assert sorted(df.final_val_loss.round(6)) == sorted([1 / 8, 1 / 8, 1 / 16, 1 / 16])
    assert set(df.tokens.dropna()) == {100}


@pytest.mark.parametrize("mode,needle", [
    ("raises", "ZeroDivisionError"),
    ("none", "returned None and wrote no result.json"),
    ("no_loss", "no final loss"),
    ("not_a_dict", "returned a list, not a dict"),
])
def test_a_callable_that_fails_is_a_failed_run_with_the_reason(project, tmp_path, mode, needle):
    root = tmp_path / "runs"
    proc = sweep(project, root, f"mode={mode}", "lr=0.5", "model.width=8")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a failed run: exit 1, --retry-failed named
    assert "--retry-failed" in proc.stdout
    (run_dir,) = [p for p in (root / "mine").iterdir() if (p / "config.yaml").exists()]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and needle in result["error"], result["error"]
    status = hpt("status", "mine", "--root", str(root))
    assert needle in status.stdout, status.stdout


def test_a_callable_may_write_its_result_json_itself(project, tmp_path):
    root = tmp_path / "runs"
    assert sweep(project, root, "mode=writes", "lr=0.5", "model.width=8").returncode == 0
    (run_dir,) = [p for p in (root / "mine").iterdir() if (p / "config.yaml").exists()]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["final_train_loss"] == 1.5 and result["run_id"] == run_dir.name


def test_a_command_that_exits_non_zero_is_failed_with_its_log_tail(tmp_path):
    (tmp_path / "sweep.yaml").write_text(textwrap.dedent('''
        run: {command: "echo loading data; echo 'CUDA out of memory' >&2; exit 3"}
        lr: 0.1
        seed: 0
        sweep: {name: bad, axis: {key: lr, values: [0.1]}}
    '''))
    proc = hpt("sweep", str(tmp_path / "sweep.yaml"), "--root", str(tmp_path / "runs"))
    assert proc.returncode == 1
    (run_dir,) = [p for p in (tmp_path / "runs" / "bad").iterdir() if p.is_dir()]
    error = json.loads((run_dir / "result.json").read_text())["error"]
    assert "exited with status 3" in error and "CUDA out of memory" in error and "loading data" in error


def test_a_command_that_prints_no_result_is_failed(tmp_path):
    (tmp_path / "sweep.yaml").write_text(textwrap.dedent('''
        run: {command: "echo done"}
        lr: 0.1
        seed: 0
        sweep: {name: quiet, axis: {key: lr, values: [0.1]}}
    '''))
    assert hpt("sweep", str(tmp_path / "sweep.yaml"), "--root", str(tmp_path / "runs")).returncode == 1
    (run_dir,) = [p for p in (tmp_path / "runs" / "quiet").iterdir() if p.is_dir()]
    assert "printed no JSON object" in json.loads((run_dir / "result.json").read_text())["error"]


@pytest.mark.parametrize("args,needle", [
    (["lrr=0.1"], "config key 'lrr' is not in your config (did you mean lr?)"),
    (["model.widht=0.1"], "did you mean model.width?"),
    (["run.target=mypkg.nothere:main"], "no module mypkg.nothere"),
    (["run.target=not a target"], "is not 'package.module:function'"),
    (["+run.command=python x.py"], "exactly one of run.target"),
    (["+run.colums={}"], "did you mean run.columns?"),
    (["model.width=wide"], "config key 'model.width'"),  # the schema types it
    (["sweep.axis.key=model.depth"], "cannot sweep 'model.depth'"),
    (["launcher=nope"], "'nope' is not one of local, slurm"),
])
def test_bad_input_is_one_line_before_anything_launches(project, tmp_path, args, needle):
    root = tmp_path / "runs"
    proc = cli("sweep", str(project / "sweep.yaml"), "--root", str(root), *args)
    assert_one_line_error(proc, needle)
    assert not root.exists()  # nothing written, nothing launched


def test_the_launcher_is_hpts_and_the_users_keys_are_theirs(project):
    """A key of the user's named like one of hpt's config groups (param, model) stays theirs."""
    f = project / "sweep.yaml"
    f.write_text(f.read_text().replace("mode: ok", "mode: ok\nparam: sp\nlauncher: {name: slurm, partition: cpu}"))
    (project / "mypkg" / "train.py").write_text(CALLABLES.replace('    mode: str = "ok"', '    mode: str = "ok"\n'
                                                                  '    param: str = "sp"'))
    spec = plan.load(f, ["param=mup", "launcher.timeout_min=7"])
    assert spec.launcher["name"] == "slurm" and spec.launcher["partition"] == "cpu"
    assert spec.launcher["timeout_min"] == 7 and "array_parallelism" in spec.launcher  # the group's defaults
    assert {r.config["param"] for r in plan.expand(spec)} == {"mup"}
    assert plan.load(f, ["launcher=local"]).launcher["name"] == "local"


def test_a_sweep_of_user_code_needs_a_seed_key(project):
    f = project / "sweep.yaml"
    f.write_text(f.read_text().replace("seed: 0\nmode", "mode"))
    f.write_text(f.read_text().replace("  seed: int = 0\n", ""))
    (project / "mypkg" / "train.py").write_text(CALLABLES.replace("    seed: int = 0\n", ""))
    assert_one_line_error(cli("sweep", str(f), "--dry-run"), "needs a seed key")


def test_the_script_example_sweeps_end_to_end(tmp_path):
    """examples/char_mlp: a plain training script, run by command, trained for real."""
    root = tmp_path / "runs"
    proc = hpt("sweep", str(REPO / "examples/char_mlp/sweep.yaml"), "--root", str(root), "-j", "2",
               "steps=20", "width=16,32", "lr=0.003,0.03")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = results(root, tmp_path)
    assert len(df) == 4 and set(df.status) == {"completed"}
    assert df["curve_loss"].map(len).eq(20).all() and (df.final_val_loss < 5.6).all()  # ln 256 = 5.55 at the start
    assert sorted(df.width.unique()) == [16, 32]


def test_the_callable_example_sweeps_end_to_end(tmp_path):
    """examples/custom_lm: its own model under hptransfer.parameterize, run as a callable, trained for real.
    At the base width (32) every parameterization is the same model: sp and mup give the same loss."""
    root = tmp_path / "runs"
    proc = hpt("sweep", str(REPO / "examples/custom_lm/sweep.yaml"), "--root", str(root), "-j", "2",
               "train.steps=10", "model.width=32,64", "optim.lr=0.01")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = results(root, tmp_path)
    assert len(df) == 4 and set(df.status) == {"completed"} and set(df.parameterization) == {"sp", "mup"}
    assert df["curve_loss"].map(len).eq(10).all()  # the curve main() appended to metrics.jsonl
    base = df[df.width == 32].set_index("parameterization").final_val_loss
    assert base["sp"] == base["mup"]
    wide = df[df.width == 64].set_index("parameterization").final_val_loss
    assert wide["sp"] != wide["mup"]


def test_a_killed_run_of_the_users_code_resumes_from_its_own_checkpoint(tmp_path):
    """The callable example checkpoints in its run folder; a run killed by SIGKILL (what a node failure or a
    SLURM requeue does to it) is run again in the same folder and picks up at its checkpoint: every step once."""
    from tests.test_local import records, wait_for

    root = tmp_path / "runs"
    args = ["train.steps=400", "train.checkpoint_every=40", "model.width=32", "optim.lr=0.01", "param=mup",
            "--name", "resume"]
    example = str(REPO / "examples/custom_lm/sweep.yaml")
    assert hpt("sweep", example, "--root", str(root), *args, "--detach").returncode == 0
    started = wait_for(lambda: (root / "resume" / "jobs.jsonl").exists() and records(root, "started", "resume"),
                       what="the run to start")[0]
    run_dir = root / "resume" / started["run_id"]
    wait_for(lambda: (run_dir / "checkpoint.pt").exists(), what="a checkpoint")
    os.kill(started["pid"], signal.SIGKILL)
    wait_for(lambda: json.loads(hpt("status", "resume", "--json", "--root", str(root)).stdout)["resume"]["runs"][0]
             ["state"] == "failed", what="failed")
    retry = hpt("sweep", example, "--root", str(root), *args, "--retry-failed")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "hpt: resuming from" in (run_dir / "logs" / "attempt-2.log").read_text()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(400))  # none lost, none twice
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
