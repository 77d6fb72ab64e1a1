"""Sweeps on the real single-node SLURM cluster that .ci/run starts (../shared/slurm/setup-slurm.sh).

All sweeps are submitted at once by one fixture (they run side by side on the node's 8 CPUs),
then each test waits for its own. Skipped only where there is no SLURM and CI is not "true".
The last tests cut an `hpt sweep` between sbatch and its record (a SIGKILL in a subprocess) and
check that the next command adopts or cancels the array it left, never running a point twice.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import HPT, REPO, assert_one_line_error, cli
from tests.test_sweep import TINY_SWEEP

pytestmark = pytest.mark.slurm

ON = ["launcher=slurm", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1", "launcher.mem_gb=0.5",
      "launcher.timeout_min=5", "model.width=16", "sweep.seeds=[0]"]
# Never ends by itself: cut by a one-minute limit, then requeued; checkpoints every few seconds.
ENDLESS = ["optim.lr=0.004", "param=sp", "train.steps=1000000", "train.log_every=100", "train.checkpoint_every=500"]


EXAMPLE = REPO / "examples" / "custom_lm" / "sweep.yaml"
EXAMPLE_ARGS = ["train.steps=10", "model.width=32,64", "optim.lr=0.01", "param=mup"]


@pytest.fixture(scope="module")
def cluster() -> None:
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no SLURM cluster answers: .ci/run must start ../shared/slurm/setup-slurm.sh")
        pytest.skip("no SLURM cluster here (sinfo)")


@pytest.fixture(scope="module")
def root(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("slurm")
    (base / "tiny.yaml").write_text(TINY_SWEEP)
    runs = base / "runs"
    submissions = {
        # the requeue run first: it needs the most wall time
        # checkpoints every ~1 s and requeues enough: SLURM may send the signal up to a minute early
        "requeue": [*(a for a in ENDLESS if "checkpoint_every" not in a), "train.checkpoint_every=100",
                    "launcher.timeout_min=1", "launcher.signal_delay_s=20", "launcher.gpus_per_node=1",
                    "launcher.max_requeue=10"],
        "array": ["optim.lr=0.004,0.008", "param=sp,mup", "launcher.max_array_size=3"],  # split: 3 + 1
        # a GPU asked of a node without CUDA: passes submission (a login node has none either), fails in the job
        "fail": ["optim.lr=0.004", "param=sp", "train.device=cuda"],
        "scancel": ENDLESS,
    }
    for name, args in submissions.items():
        res = cli("sweep", str(base / "tiny.yaml"), "--name", name, "--root", str(runs), *ON, *args)
        assert res.returncode == 0 and "submitted to SLURM" in res.stdout, res.stdout + res.stderr
    # a user's project (examples/custom_lm: a callable using hptransfer.parameterize), swept on the cluster
    res = cli("sweep", str(EXAMPLE), "--name", "example", "--root", str(runs), *ON[:5], *EXAMPLE_ARGS)
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


def attempt_outs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "logs").glob("attempt-*.out"), key=lambda p: int(p.stem.split("-")[1]))


def assert_own_attempt_logs(run_dir: Path) -> None:
    """Each attempt writes its own logs/attempt-N.out (SLURM appends them all to one file of submitit's)."""
    outs = attempt_outs(run_dir)
    assert len(outs) >= 2 and not any(p.is_symlink() for p in outs)
    assert "hpt: resuming from" not in outs[0].read_text()  # the first attempt started from step 0
    assert "hpt: resuming from" in "".join(p.read_text() for p in outs[1:])
    submitit_log = next((run_dir.parent / "slurm").glob("*/*_log.out")).read_text()
    for n in (1, 2):  # where to look, said where SLURM writes
        assert f"hpt: attempt {n} of run {run_dir.name} writes to" in submitit_log


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


def test_a_sweep_of_the_users_code_runs_on_slurm(root, tmp_path):
    runs = wait_states(root, "example", {"completed"}, timeout=300)
    assert len(runs) == 2 and all(r["final_val_loss"] > 0 for r in runs.values())
    out = tmp_path / "r.parquet"
    assert cli("collect", "example", "--root", str(root), "--out", str(out)).returncode == 0
    df = pq.read_table(out).to_pandas()
    assert sorted(df.width) == [32, 64] and set(df["cfg.run.target"]) == {"custom_lm.train:main"}
    assert df["curve_loss"].map(len).eq(10).all()  # the curve the user's code wrote to metrics.jsonl


def test_a_failing_run_surfaces_its_traceback(root):
    (run,) = wait_states(root, "fail", {"failed"}).values()
    assert run["reason"].startswith("HptError: config key 'train.device': cuda requested")
    assert "Traceback" in run["log_tail"] and "pick_device" in run["log_tail"]
    text = cli("status", "fail", "--root", str(root)).stdout
    assert "failed" in text and "cuda requested" in text


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
    assert_own_attempt_logs(run_dir)
    subprocess.run(["scancel", run["job_id"]], check=True)
    (run,) = wait_states(root, "scancel", {"cancelled"}, timeout=60).values()
    assert run["reason"] == "cancelled (scancel)"


def test_a_timed_out_run_is_requeued_and_resumes_from_its_checkpoint(root):
    (run_id,) = states(root, "requeue")
    run_dir = root / "requeue" / run_id
    # SLURM may signal up to a minute early (its event resolution), even before an attempt's first
    # checkpoint: wait for the first requeued attempt that had one to resume from.
    deadline, resumed = time.time() + 180, None
    while time.time() < deadline and resumed is None:
        resumed = next((p for p in attempt_outs(run_dir)[1:] if "hpt: resuming from" in p.read_text()), None)
        time.sleep(0.5)
    assert resumed is not None, f"no requeued attempt resumed within 180 s: {attempt_outs(run_dir)}"
    assert_own_attempt_logs(run_dir)
    assert not (run_dir / "result.json").exists()  # a requeue is never a result (nor a failure)
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
    assert (run["state"], run["reason"]) == ("pending", "not launched (sbatch did not take its array)")


def test_collect_reads_it_all(root, tmp_path):
    out = tmp_path / "results.parquet"
    res = cli("collect", "--root", str(root), "--out", str(out))
    assert res.returncode == 0, res.stderr
    rows = pq.read_table(out).to_pylist()
    by_sweep: dict[str, list[str]] = {}
    for r in rows:
        by_sweep.setdefault(r["sweep"], []).append(r["status"])
    assert by_sweep == {"array": ["completed"] * 4, "fail": ["failed"], "requeue": ["cancelled"],
                        "scancel": ["cancelled"], "refused": ["pending"], "example": ["completed"] * 2}
    done = [r for r in rows if r["status"] == "completed"]
    assert all(r["curve_loss"] and r["job_id"] for r in done)
    assert all(r["flops"] > 0 for r in done if r["sweep"] != "example")  # the user's code reports none
    assert {r["parameterization"] for r in done} == {"sp", "mup"}
    # one table of both kinds: the union of their cfg.* columns, null where a sweep has none
    assert all(r["cfg.model.head_dim"] is None and r["cfg.model.base_width"] == 32 for r in rows
               if r["sweep"] == "example")
    assert all(r["cfg.model.base_width"] is None for r in rows if r["sweep"] != "example")



# ---- an `hpt sweep` killed between sbatch and its record ------------------------------------------------

# Run `hpt sweep` in a subprocess whose process dies (SIGKILL) at a chosen point after sbatch accepted the array.
KILLED_SWEEP = """
import os, signal, sys
{patch}
from hptransfer.cli import main
sys.argv = ["hpt", *sys.argv[1:]]
main()
"""
# After submitit has handed every task its run, before the array is recorded in jobs.jsonl.
BEFORE_RECORD = """
from hptransfer.sweeps.store import SweepFolder
append = SweepFolder.append_jobs
def append_or_die(self, records):
    if records and records[0].get("event") == "submitted":
        os.kill(os.getpid(), signal.SIGKILL)
    append(self, records)
SweepFolder.append_jobs = append_or_die
"""
# Right after sbatch returned, before submitit renames its files (no task will find its run).
BEFORE_HANDOVER = """
from submitit.core import utils
def move_or_die(self, tmp_path, name, keep_as_symlink=False):
    os.kill(os.getpid(), signal.SIGKILL)
utils.JobPaths.move_temporary_file = move_or_die
"""


def killed_sweep(patch: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_SWEEP.replace("{patch}", patch), "sweep", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


def job_records(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / name / "jobs.jsonl").read_text().splitlines()]


def queued_arrays(name: str) -> set[str]:
    out = subprocess.run(["squeue", "-h", "-n", f"hpt-{name}", "-o", "%F"], capture_output=True, text=True).stdout
    return set(out.split())


def ghost_args(tmp_path: Path, name: str) -> list[str]:
    (tmp_path / "tiny.yaml").write_text(TINY_SWEEP)
    return [str(tmp_path / "tiny.yaml"), "--name", name, "--root", str(tmp_path / "runs"), *ON,
            "optim.lr=0.004,0.008", "param=sp"]


def test_an_array_sbatch_took_but_no_one_recorded_is_adopted_never_launched_twice(cluster, tmp_path):
    name, root = "ghost-adopt", tmp_path / "runs"
    args = ghost_args(tmp_path, name)
    killed_sweep(BEFORE_RECORD, *args)
    assert {r["event"] for r in job_records(root, name)} == {"submitting"}  # the intent, and nothing more
    (array,) = {p.name.split("_")[0] for p in (root / name / "slurm").glob("*/*_submission.sh")}
    runs = states(root, name)  # hpt status finds the array and adopts it
    assert sorted(r["job_id"] for r in runs.values()) == [f"{array}_0", f"{array}_1"]
    assert {r["state"] for r in runs.values()} <= {"pending", "running", "completed"}
    again = cli("sweep", *args)
    assert again.returncode == 0 and "0 of 2 runs submitted" in again.stdout, again.stdout + again.stderr
    runs = wait_states(root, name, {"completed"}, timeout=240)
    assert all(r["attempts"] == 1 for r in runs.values())  # each point ran once, in the adopted array
    submitted = [r for r in job_records(root, name) if r["event"] == "submitted"]
    assert {r["job_id"].split("_")[0] for r in submitted} == {array} and all(r["adopted"] for r in submitted)


def test_an_array_cut_before_submitit_handed_over_its_runs_is_cancelled_and_relaunched_once(cluster, tmp_path):
    name, root = "ghost-cancel", tmp_path / "runs"
    args = ghost_args(tmp_path, name)
    killed_sweep(BEFORE_HANDOVER, *args)
    (ghost,) = queued_arrays(name)  # sbatch took it; its tasks wait for pickles that never come
    assert not list((root / name / "slurm").glob("*/*_submission.sh"))
    again = cli("sweep", *args)  # finds the ghost through squeue, cancels it, launches the runs once
    assert again.returncode == 0 and "2 of 2 runs submitted" in again.stdout, again.stdout + again.stderr
    records = job_records(root, name)
    cancelled = sorted(r["job_id"] for r in records if r["event"] == "cancelled")
    assert cancelled == [f"{ghost}_0", f"{ghost}_1"]
    (new,) = {r["job_id"].split("_")[0] for r in records if r["event"] == "submitted"}
    assert new != ghost
    deadline = time.time() + 60
    while ghost in queued_arrays(name) and time.time() < deadline:
        time.sleep(1)
    assert ghost not in queued_arrays(name)
    runs = wait_states(root, name, {"completed"}, timeout=240)
    assert all(r["attempts"] == 1 and r["job_id"].startswith(f"{new}_") for r in runs.values())
