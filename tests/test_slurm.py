"""Sweeps on the real single-node SLURM cluster that .ci/run starts (../shared/slurm/setup-slurm.sh).

All sweeps are submitted at once by one fixture (they run side by side on the node's 8 CPUs),
then each test waits for its own. Skipped only where there is no SLURM and CI is not "true".
"""

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import HPT, assert_one_line_error, cli
from tests.test_sweep import TINY_SWEEP

pytestmark = pytest.mark.slurm

ON = ["launcher=slurm", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1", "launcher.mem_gb=0.5",
      "launcher.timeout_min=5", "model.width=16", "sweep.seeds=[0]"]
# Never ends by itself: cut by a one-minute limit, then requeued; checkpoints every few seconds.
ENDLESS = ["optim.lr=0.004", "param=sp", "train.steps=1000000", "train.log_every=100", "train.checkpoint_every=500"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no SLURM cluster answers: .ci/run must start ../shared/slurm/setup-slurm.sh")
        pytest.skip("no SLURM cluster here (sinfo)")
    base = tmp_path_factory.mktemp("slurm")
    (base / "tiny.yaml").write_text(TINY_SWEEP)
    bad = base / "bad_tokens.bin"
    np.full(4096, 300, dtype=np.uint16).tofile(bad)  # token ids beyond the vocabulary: training raises
    runs = base / "runs"
    submissions = {
        # the requeue run first: it needs the most wall time
        "requeue": [*ENDLESS, "launcher.timeout_min=1", "launcher.signal_delay_s=20", "launcher.gpus_per_node=1"],
        "array": ["optim.lr=0.004,0.008", "param=sp,mup", "launcher.max_array_size=3"],  # split: 3 + 1
        "fail": ["optim.lr=0.004", "param=sp", "data=tokens", f"data.path={bad}", "data.vocab_size=256"],
        "scancel": ENDLESS,
    }
    for name, args in submissions.items():
        res = cli("sweep", str(base / "tiny.yaml"), "--name", name, "--root", str(runs), *ON, *args)
        assert res.returncode == 0 and "submitted to SLURM" in res.stdout, res.stdout + res.stderr
    yield runs
    cli("cancel", "--root", str(runs))  # whatever a failed test left running (the endless runs)


def states(root: Path, name: str, env_path: str | None = None) -> dict[str, dict]:
    if env_path is None:
        res = cli("status", name, "--json", "--root", str(root))
        out = res.stdout
    else:  # a machine whose SLURM has no accounting: the real command, with sacct absent from PATH
        proc = subprocess.run([HPT, "status", name, "--json", "--root", str(root)],
                              capture_output=True, text=True, env={**os.environ, "PATH": env_path})
        out = proc.stdout
    return {r["run_id"]: r for r in json.loads(out)[name]["runs"]}


def wait_states(root: Path, name: str, want: set[str], timeout: float = 180) -> dict[str, dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = states(root, name)
        if {r["state"] for r in runs.values()} <= want:
            return runs
        time.sleep(1)
    raise AssertionError(f"{name}: states {[r['state'] for r in runs.values()]}, wanted {want}")


def no_sacct_path(tmp: Path) -> str:
    """A PATH with every SLURM command but sacct (real binaries, linked)."""
    bin_dir = tmp / "bin-no-sacct"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("squeue", "scontrol", "sinfo", "scancel", "sbatch", "srun"):
        link = bin_dir / tool
        if not link.exists():
            link.symlink_to(shutil.which(tool))
    return str(bin_dir)


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.5)


def test_an_array_of_runs_completes_and_status_shows_it(root):
    runs = wait_states(root, "array", {"completed"})
    assert len(runs) == 4
    jobs = sorted(r["job_id"] for r in runs.values())
    arrays = sorted({j.split("_")[0] for j in jobs}, key=int)
    assert len(arrays) == 2  # split at launcher.max_array_size: an array of three, then one job
    assert [j for j in jobs if j.startswith(f"{arrays[0]}_")] == [f"{arrays[0]}_{i}" for i in range(3)]
    assert arrays[1] in jobs
    assert all(r["attempts"] == 1 and r["final_val_loss"] > 0 for r in runs.values())
    text = cli("status", "array", "--root", str(root)).stdout
    assert "opt lr" in text and text.count("completed") >= 5  # grid, summary and every run
    run_dir = root / "array" / next(iter(runs))
    assert (run_dir / "logs" / "attempt-1.out").resolve().is_file()  # submitit's log, linked into the run


def test_a_failing_run_surfaces_its_traceback(root):
    (run,) = wait_states(root, "fail", {"failed"}).values()
    assert run["reason"].startswith("IndexError")
    assert "Traceback" in run["log_tail"] and "embedding" in run["log_tail"]
    text = cli("status", "fail", "--root", str(root)).stdout
    assert "failed" in text and "IndexError" in text


def test_preemption_requeues_then_scancel_shows_cancelled(root, tmp_path):
    (run,) = wait_states(root, "scancel", {"running"}).values()
    # Without sacct (no accounting), squeue still tells a running job from a dead one.
    (blind,) = states(root, "scancel", env_path=no_sacct_path(tmp_path)).values()
    assert blind["state"] == "running"
    run_dir = root / "scancel" / run["run_id"]
    wait_for_file(run_dir / "checkpoint.pt", 60)
    subprocess.run(["scontrol", "requeue", run["job_id"]], check=True)  # what preemption with requeue does
    wait_for_file(run_dir / "logs" / "attempt-2.out", 90)
    deadline = time.time() + 60
    while "hpt: resuming from" not in (run_dir / "logs" / "attempt-2.out").read_text() and time.time() < deadline:
        time.sleep(0.5)
    assert "hpt: resuming from" in (run_dir / "logs" / "attempt-2.out").read_text()
    subprocess.run(["scancel", run["job_id"]], check=True)
    (run,) = wait_states(root, "scancel", {"cancelled"}, timeout=60).values()
    assert run["reason"] == "cancelled (scancel)"


def test_a_timed_out_run_is_requeued_and_resumes_from_its_checkpoint(root):
    (run_id,) = states(root, "requeue")
    run_dir = root / "requeue" / run_id

    def heartbeat() -> dict:
        try:
            return json.loads((run_dir / "heartbeat.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    deadline = time.time() + 150
    first = heartbeat()
    while time.time() < deadline and not (run_dir / "logs" / "attempt-2.out").exists():
        first = heartbeat() or first
        time.sleep(0.5)
    assert (run_dir / "logs" / "attempt-2.out").exists(), "not requeued within 150 s"
    cut_at = first["step"]
    while time.time() < deadline + 60 and heartbeat().get("pid", first["pid"]) == first["pid"]:
        time.sleep(0.2)
    resumed = heartbeat()
    assert resumed["pid"] != first["pid"], "the requeued attempt never trained"
    assert resumed["step"] >= cut_at // 2 > 0  # it went on from its checkpoint, not from step 0
    assert "hpt: resuming from" in (run_dir / "logs" / "attempt-2.out").read_text()
    (run,) = states(root, "requeue").values()
    # Still held by its job; SLURM may already have cut the second attempt too (each gets < 1 min).
    assert run["state"] in ("running", "pending") and run["attempts"] >= 2
    res = cli("cancel", "requeue", "--root", str(root))
    assert res.returncode == 0 and "cancelled 1" in res.stdout
    (run,) = wait_states(root, "requeue", {"cancelled"}, timeout=30).values()


def test_a_refused_submission_is_one_line_and_launches_nothing(root):
    res = cli("sweep", str(root.parent / "tiny.yaml"), "--name", "refused", "--root", str(root), *ON,
              "optim.lr=0.004", "param=sp", "launcher.partition=no_such_partition")
    assert_one_line_error(res, "sbatch refused the job array")
    (run,) = states(root, "refused").values()
    assert (run["state"], run["reason"]) == ("pending", "not launched")


def test_collect_reads_it_all(root, tmp_path):
    out = tmp_path / "results.parquet"
    res = cli("collect", "--root", str(root), "--out", str(out))
    assert res.returncode == 0, res.stderr
    rows = pq.read_table(out).to_pylist()
    by_sweep: dict[str, list[str]] = {}
    for r in rows:
        by_sweep.setdefault(r["sweep"], []).append(r["status"])
    assert by_sweep == {"array": ["completed"] * 4, "fail": ["failed"], "requeue": ["cancelled"],
                        "scancel": ["cancelled"], "refused": ["pending"]}
    done = [r for r in rows if r["status"] == "completed"]
    assert all(r["curve_loss"] and r["job_id"] and r["flops"] > 0 for r in done)
    assert {r["parameterization"] for r in done} == {"sp", "mup"}

