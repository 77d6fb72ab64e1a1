"""Local sweeps with real training in real processes: dedupe, resume, and the faults of the issue.

Each test drives the installed `hpt` command; runs are tiny (width 16, one layer) so process
start-up dominates. Faults are real: kill -9, SIGINT, a truncated result.json, two schedulers.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import HPT, hpt
from tests.test_sweep import TINY_SWEEP

# Long enough to be caught running (~1000 steps of a tiny model, ~5 ms each), with checkpoints to resume from.
LONG = ["train.steps=1000", "train.log_every=50", "train.checkpoint_every=200"]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.yaml"
    f.write_text(TINY_SWEEP)
    return f


def sweep(tiny: Path, root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return hpt("sweep", str(tiny), "--root", str(root), "-j", "2", *args, timeout=timeout)


def status(root: Path, name: str = "tiny") -> dict[str, dict]:
    proc = hpt("status", name, "--json", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    return {r["run_id"]: r for r in json.loads(proc.stdout)[name]["runs"]}


def records(root: Path, event: str, name: str = "tiny") -> list[dict]:
    lines = (root / name / "jobs.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def wait_for(predicate, timeout: float = 120, what: str = "condition"):  # noqa: ANN001, ANN201
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_second_sweep_launches_nothing_and_a_wider_grid_only_new_points(tiny, tmp_path):
    root = tmp_path / "runs"
    first = sweep(tiny, root, "optim.lr=0.004,0.008", "param=sp", "model.width=16", "sweep.seeds=[0]")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("completed") >= 2
    assert len(records(root, "started")) == 2
    again = sweep(tiny, root, "optim.lr=0.004,0.008", "param=sp", "model.width=16", "sweep.seeds=[0]")
    assert again.returncode == 0 and "nothing to launch" in again.stdout
    assert len(records(root, "started")) == 2
    wider = sweep(tiny, root, "optim.lr=0.004,0.008,0.016", "param=sp", "model.width=16", "sweep.seeds=[0]")
    assert wider.returncode == 0, wider.stderr
    started = records(root, "started")
    assert len(started) == 3 and len({r["run_id"] for r in started}) == 3
    runs = status(root)
    assert len(runs) == 3 and {r["state"] for r in runs.values()} == {"completed"}
    assert all(r["final_val_loss"] > 0 and r["attempts"] == 1 and r["reason"] == "" for r in runs.values())
    view = hpt("status", "tiny", "--root", str(root)).stdout
    assert "opt lr" in view and "0.016" in view  # the grid: width x lr with the optimum named
    watched = hpt("status", "--watch", "--root", str(root), timeout=60)  # nothing live: one refresh, done
    assert watched.returncode == 0 and "tiny" in watched.stdout
    # A changed definition under the same name is refused, one line, nothing launched.
    changed = sweep(tiny, root, "optim.lr=0.004", "param=sp", "model.width=16", "sweep.seeds=[0]", "train.steps=11")
    assert changed.returncode == 2 and "different definition" in changed.stderr
    assert len(records(root, "started")) == 3


def test_kill_9_is_failed_with_its_log_tail_and_retry_failed_resumes_it(tiny, tmp_path):
    root = tmp_path / "runs"
    args = ["optim.lr=0.004", "param=sp", "model.width=16", "sweep.seeds=[0]", *LONG]
    detached = sweep(tiny, root, *args, "--detach")
    assert detached.returncode == 0 and "in the background" in detached.stdout
    started = wait_for(lambda: records(root, "started") if (root / "tiny" / "jobs.jsonl").exists() else None,
                       what="the run to start")[0]
    run_dir = root / "tiny" / started["run_id"]
    wait_for(lambda: (run_dir / "checkpoint.pt").exists(), what="a checkpoint")
    os.kill(started["pid"], signal.SIGKILL)
    run = wait_for(lambda: (r := status(root)[started["run_id"]])["state"] == "failed" and r, what="failed")
    assert run["reason"] == "killed by SIGKILL without a result"
    assert "[hpt] attempt 1 killed by SIGKILL" in run["log_tail"]
    assert "nothing to launch" in sweep(tiny, root, *args).stdout  # failed is not retried unasked
    retry = sweep(tiny, root, *args, "--retry-failed")
    assert retry.returncode == 0, retry.stderr
    run = status(root)[started["run_id"]]
    assert run["state"] == "completed" and run["attempts"] == 2
    assert "hpt: resuming from" in (run_dir / "logs" / "attempt-2.log").read_text()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 1000 and not (run_dir / "checkpoint.pt").exists()


def test_ctrl_c_records_cancelled_and_the_next_sweep_resumes(tiny, tmp_path):
    root = tmp_path / "runs"
    args = ["optim.lr=0.004,0.008", "param=sp", "model.width=16", "sweep.seeds=[0]", *LONG]
    proc = subprocess.Popen([HPT, "sweep", str(tiny), "--root", str(root), "-j", "1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list((root / "tiny").glob("*/checkpoint.pt")) if (root / "tiny").exists() else None,
             what="a checkpoint")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Resume with the same command" in err
    runs = status(root)
    assert {r["state"] for r in runs.values()} == {"cancelled"}  # the running one and the queued one
    assert {r["reason"] for r in runs.values()} == {"interrupted (Ctrl-C)"}
    pid = records(root, "started")[0]["pid"]
    assert not Path(f"/proc/{pid}").exists()  # the run's process was stopped, not orphaned
    resumed = sweep(tiny, root, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert {r["state"] for r in status(root).values()} == {"completed"}
    logs = "".join(p.read_text() for p in (root / "tiny").glob("*/logs/attempt-2.log"))
    assert "hpt: resuming from" in logs


def test_two_sweeps_at_once_never_run_a_point_twice(tiny, tmp_path):
    root = tmp_path / "runs"
    args = ["optim.lr=0.004,0.008", "param=sp,mup", "model.width=32", "sweep.seeds=[0]"]
    cmd = [HPT, "sweep", str(tiny), "--root", str(root), "-j", "2", *args]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    started = [r["run_id"] for r in records(root, "started")]
    assert len(started) == 4 and len(set(started)) == 4
    assert {r["state"] for r in status(root).values()} == {"completed"}


def test_corrupt_result_is_reported_by_status_and_collect_and_can_be_retried(tiny, tmp_path):
    root = tmp_path / "runs"
    args = ["optim.lr=0.004,0.008", "param=sp", "model.width=16", "sweep.seeds=[0]"]
    assert sweep(tiny, root, *args).returncode == 0
    bad_id = sorted(status(root))[0]
    result = root / "tiny" / bad_id / "result.json"
    result.write_text(result.read_text()[:40])
    run = status(root)[bad_id]
    assert run["state"] == "failed" and run["reason"].startswith("corrupt result.json")
    out = tmp_path / "results.parquet"
    proc = hpt("collect", "tiny", "--root", str(root), "--out", str(out))
    assert proc.returncode == 0 and f"tiny/{bad_id}: corrupt result.json" in proc.stderr
    rows = {r["run_id"]: r for r in pq.read_table(out).to_pylist()}
    assert rows[bad_id]["status"] == "failed" and rows[bad_id]["final_val_loss"] is None
    good = next(r for k, r in rows.items() if k != bad_id)
    assert good["status"] == "completed" and len(good["curve_loss"]) == 10 and good["width"] == 16
    assert sweep(tiny, root, *args, "--retry-failed").returncode == 0
    assert status(root)[bad_id]["state"] == "completed"
    assert list((root / "tiny" / bad_id / "logs").glob("result-*.json"))  # the bad file is kept aside


def test_hpt_cancel_stops_a_detached_sweep(tiny, tmp_path):
    root = tmp_path / "runs"
    args = ["optim.lr=0.004", "param=sp", "model.width=16", "sweep.seeds=[0]", *LONG]
    assert sweep(tiny, root, *args, "--detach").returncode == 0
    wait_for(lambda: (root / "tiny" / "jobs.jsonl").exists() and records(root, "started"), what="a start")
    proc = hpt("cancel", "tiny", "--root", str(root))
    assert proc.returncode == 0 and "cancelled 1" in proc.stdout
    (run,) = status(root).values()
    assert run["state"] == "cancelled" and "SIGTERM" in run["reason"]
    shutil.rmtree(root)


def test_a_diverged_run_is_a_result_never_retried(tiny, tmp_path):
    root = tmp_path / "runs"
    args = ["optim.lr=30", "param=sp", "model.width=16", "sweep.seeds=[0]", "optim.grad_clip=0"]
    first = sweep(tiny, root, *args)
    assert first.returncode == 0, first.stderr  # diverged is not a failure of the sweep
    (run,) = status(root).values()
    assert run["state"] == "diverged" and run["attempts"] == 1
    again = sweep(tiny, root, *args, "--retry-failed")
    assert again.returncode == 0 and "nothing to launch" in again.stdout
    assert len(records(root, "started")) == 1
