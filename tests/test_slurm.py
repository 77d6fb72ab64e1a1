"""Sweeps on the real single-node SLURM cluster that .ci/run starts (../shared/slurm/setup-slurm.sh).

All sweeps are submitted at once by one fixture (they run side by side on the node's 8 CPUs),
then each test waits for its own (one run is signalled by a thread the fixture starts). Distributed runs
are jobs of 2 tasks (ranks) on the node's CPUs. Skipped only where there is no SLURM and CI is not "true".
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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq
import pytest

from hptransfer.files import json_lines
from hptransfer.sweeps.backends import slurm
from hptransfer.sweeps.store import RunState, attempt_log, log_tail
from tests.conftest import HPT, REPO, TINY, assert_one_line_error, cli
from tests.test_fused import alone, assert_same_folders
from tests.test_sweep import TINY_SWEEP
from tests.test_targets import synthetic

pytestmark = pytest.mark.slurm

ON = ["launcher=slurm", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1", "launcher.mem_gb=0.5",
      "launcher.timeout_min=5", "model.width=16", "sweep.seeds=[0]"]
# Never ends by itself: cut by a one-minute limit, then requeued; checkpoints every few seconds.
ENDLESS = ["optim.lr=0.004", "param=sp", "train.steps=1000000", "train.log_every=100", "train.checkpoint_every=500"]


FUSED = ["optim.lr=0.004,0.008,0.016", "param=sp,mup", "train.dtype=float64"]  # float64: fused == unfused to 1e-6
EXAMPLE = REPO / "examples" / "custom_lm" / "sweep.yaml"
EXAMPLE_ARGS = ["train.steps=10", "model.width=32,64", "optim.lr=0.01", "param=mup"]

RANKS = ["launcher.tasks_per_node=2"]  # one run, two tasks: ranks 0 and 1 on the node's CPUs
DDP = [*RANKS, "train.parallel=ddp"]
EXACT = ["optim.lr=0.004", "param=sp", "train.dtype=float64"]  # float64: one process and two agree to 1e-6
REQUEUED = [*EXACT, "train.steps=400", "train.log_every=50", "train.checkpoint_every=50"]  # signalled mid-way
HEARTBEATS = ("heartbeat.json", "heartbeat-rank1.json")  # rank 0's, rank 1's
# A user's command run by every task of a 2-task job: each prints the torch.distributed variables it got, and
# rank 0 alone the result, as a distributed trainer does (another rank's output is no result, nor a failure).
RANKS_SWEEP = """\
run: {command: "python ranks.py"}
width: 8
param: sp
seed: 0
sweep:
  name: ranks
  axis: {key: width, values: [8]}
"""
RANKS_PY = """\
import json, os
env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                      "MASTER_PORT")}
result = {"final_val_loss": 1.0, "curve": {"steps": [0], "losses": [1.0]}} if env["RANK"] == "0" else {}
print(json.dumps({**result, "ranks": env}))
"""


@pytest.fixture(scope="module")
def cluster() -> None:
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no SLURM cluster answers: .ci/run must start ../shared/slurm/setup-slurm.sh")
        pytest.skip("no SLURM cluster here (sinfo)")


class Submitted(NamedTuple):
    runs: Path
    requeued: Future  # requeue_after_a_checkpoint of the ddp-requeue run, running while the other tests wait


@pytest.fixture(scope="module")
def root(submitted: Submitted) -> Path:
    return submitted.runs


@pytest.fixture(scope="module")
def submitted(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Submitted]:
    base = tmp_path_factory.mktemp("slurm")
    (base / "tiny.yaml").write_text(TINY_SWEEP)
    runs = base / "runs"

    def sweep(file: Path, *args: str) -> None:
        res = cli("sweep", str(file), "--root", str(runs), *args)
        assert res.returncode == 0 and "submitted to SLURM" in res.stdout, res.stdout + res.stderr

    submissions = {
        # the requeue run first: it needs the most wall time
        # checkpoints every ~1 s and requeues enough: SLURM may send the signal up to a minute early
        "requeue": [*(a for a in ENDLESS if "checkpoint_every" not in a), "train.checkpoint_every=100",
                    "launcher.timeout_min=1", "launcher.signal_delay_s=20", "launcher.gpus_per_node=1",
                    "launcher.max_requeue=10"],
        "ddp": [*DDP, *EXACT],
        "ddp-one": EXACT,  # the same run in one process
        "ddp-whole": [*DDP, *REQUEUED],  # the requeued run, uninterrupted
        "array": ["optim.lr=0.004,0.008", "param=sp,mup", "launcher.max_array_size=3"],  # split: 3 + 1
        # a GPU asked of a node without CUDA: passes submission (a login node has none either), fails in the job
        "fail": ["optim.lr=0.004", "param=sp", "train.device=cuda"],
        "scancel": ENDLESS,
        # one array task: two fused groups of three (SP and muP copies side by side), one after the other
        "fused": [*FUSED, "launcher.fuse=3", "launcher.runs_per_task=2"],
    }
    with ThreadPoolExecutor(1) as pool:
        # 2 ranks signalled after their first checkpoints: watched from their start, while the rest is
        # submitted and the other tests wait
        sweep(base / "tiny.yaml", "--name", "ddp-requeue", *ON, *DDP, *REQUEUED)
        requeued = pool.submit(requeue_after_a_checkpoint, runs / "ddp-requeue")
        for name, args in submissions.items():
            sweep(base / "tiny.yaml", "--name", name, *ON, *args)
        # a user's project (examples/custom_lm: a callable using hptransfer.parameterize), swept on the cluster
        sweep(EXAMPLE, "--name", "example", *ON[:5], *EXAMPLE_ARGS)
        (base / "ranks").mkdir()
        (base / "ranks" / "sweep.yaml").write_text(RANKS_SWEEP)
        (base / "ranks" / "ranks.py").write_text(RANKS_PY)
        sweep(base / "ranks" / "sweep.yaml", *ON[:5], *RANKS)
        # the prediction's target run, launched from the prediction as a 2-task DDP job
        target = [a for o in [*ON[:5], *DDP, *TINY] if not o.startswith("model.width") for a in ("--set", o)]
        res = cli("predict", str(synthetic(base)), "--at", "width=32", "--param", "mup", "--launch", "--root",
                  str(runs), *target)
        assert res.returncode == 0 and "submitted to SLURM" in res.stdout, res.stdout + res.stderr
        yield Submitted(runs, requeued)
        cli("cancel", "--root", str(runs))  # whatever a failed test left running (the endless runs)


def requeue_after_a_checkpoint(sweep: Path) -> tuple[int, dict[str, int]]:
    """Send the sweep's one run (2 ranks) SLURM's time-limit signal (USR2 to every task, launcher.signal_delay_s
    before the limit) once it has a checkpoint at step 100 or later; return that step and each rank's first
    heartbeat step in the next attempt: the step it resumed from. Sent here, not by a one-minute limit: SLURM checks
    limits every 30 s, and a run that must finish would be cut at random. (A thread: no `cli`, which swaps
    sys.stdout.)"""
    (rec,) = (r for r in json_lines(sweep / "jobs.jsonl") if r["event"] == "submitted")
    run_dir, deadline, saved = sweep / rec["run_id"], time.time() + 120, 0
    while saved < 100:  # a rank restarted from step 0 would beat at step 0 or 50 first
        assert time.time() < deadline and not (run_dir / "result.json").exists(), "no checkpoint at step >= 100"
        saved = max((int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoint").glob("step-*")), default=0)
        time.sleep(0.1)
    old = {name: (read_heartbeat(run_dir / name) or {}).get("pid") for name in HEARTBEATS}
    subprocess.run(["scancel", "--signal=USR2", rec["job_id"]], check=True)
    first: dict[str, int] = {}
    deadline = time.time() + 120
    while len(first) < len(HEARTBEATS) and time.time() < deadline:
        for name in HEARTBEATS:
            hb = read_heartbeat(run_dir / name)
            if hb and hb.get("pid") != old[name]:
                first.setdefault(name, hb["step"])
        time.sleep(0.05)
    return saved, first


def read_heartbeat(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not yet written, or being replaced
        return None


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


def wait_job_gone(job_id: str, timeout: float = 120) -> None:
    """Until SLURM no longer lists the job: a run is completed at rank 0's result.json, its other ranks later."""
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, f"job {job_id} still queued after {timeout} s"
        time.sleep(0.5)


def rank_logs(run_dir: Path, attempt: int) -> list[str]:
    """The log files every rank of a 2-task job writes for an attempt."""
    return [attempt_log(attempt, suffix, rank) for rank in (0, 1) for suffix in ("out", "err")]


def test_a_distributed_run_gives_the_one_process_result_and_every_rank_leaves_its_traces(root):
    (ddp,) = wait_states(root, "ddp", {"completed"}).values()
    (one,) = wait_states(root, "ddp-one", {"completed"}).values()
    wait_job_gone(ddp["job_id"])  # rank 1's last heartbeat may follow rank 0's result
    assert ddp["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-6)
    run_dir = root / "ddp" / ddp["run_id"]
    assert json.loads((run_dir / "result.json").read_text())["env"]["processes"] == 2
    assert all(read_heartbeat(run_dir / name)["step"] == 10 for name in HEARTBEATS)
    assert {p.name for p in (run_dir / "logs").iterdir()} == set(rank_logs(run_dir, 1))
    assert ddp["attempts"] == 1


def test_a_distributed_run_signalled_to_requeue_restarts_every_rank_from_its_checkpoint_and_completes(submitted):
    saved, first = submitted.requeued.result(timeout=300)
    assert sorted(first) == sorted(HEARTBEATS) and all(step >= saved for step in first.values()), (saved, first)
    (run,) = wait_states(submitted.runs, "ddp-requeue", {"completed"}, timeout=120).values()
    assert run["attempts"] == 2 and run["final_val_loss"] > 0
    logs = submitted.runs / "ddp-requeue" / run["run_id"] / "logs"
    assert {p.name for p in logs.iterdir()} == {*rank_logs(logs.parent, 1), *rank_logs(logs.parent, 2)}
    assert all("hpt: resuming from" in (logs / attempt_log(2, "out", rank)).read_text() for rank in (0, 1))
    sacct = subprocess.run(["sacct", "-j", run["job_id"], "-D", "-X", "-n", "-o", "State"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert sacct.count("REQUEUED") == 1, sacct  # one requeue, though every rank got the signal
    # The requeued run's loss curve is the uninterrupted one's.
    (whole,) = wait_states(submitted.runs, "ddp-whole", {"completed"}).values()
    curves = [[(r["step"], r.get("loss", r.get("val_loss"))) for r in json_lines(d / "metrics.jsonl")]
              for d in (logs.parent, submitted.runs / "ddp-whole" / whole["run_id"])]
    assert [step for step, _ in curves[0]] == [step for step, _ in curves[1]] and len(curves[0]) > 400
    assert max(abs(a - b) for (_, a), (_, b) in zip(*curves, strict=True)) < 1e-6


def test_each_task_of_a_distributed_job_gets_its_rank_and_writes_its_own_logs(root):
    (run,) = wait_states(root, "ranks", {"completed"}).values()
    wait_job_gone(run["job_id"])  # rank 1 may still be printing when rank 0's result makes the run completed
    logs = root / "ranks" / run["run_id"] / "logs"
    assert {p.name for p in logs.iterdir()} == set(rank_logs(logs.parent, 1)) and run["attempts"] == 1
    assert json.loads((logs.parent / "result.json").read_text())["final_val_loss"] == 1.0  # rank 0's
    env = []
    for rank in (0, 1):  # each rank's command printed its variables to that rank's log
        lines = (logs / attempt_log(1, "out", rank)).read_text().splitlines()
        env.append(json.loads(next(line for line in reversed(lines) if line.startswith("{")))["ranks"])
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in env] == [("0", "0"), ("1", "1")]
    assert all(e["WORLD_SIZE"] == e["LOCAL_WORLD_SIZE"] == "2" for e in env)
    assert env[0]["MASTER_ADDR"] and env[0]["MASTER_PORT"] and env[0]["MASTER_PORT"] == env[1]["MASTER_PORT"]


def test_predict_launch_trains_the_target_as_a_2_task_job_and_analyze_sets_it_beside_the_law(root, tmp_path):
    (run,) = wait_states(root, "target-mup-width32", {"completed"}).values()
    result = json.loads((root / "target-mup-width32" / run["run_id"] / "result.json").read_text())
    assert result["env"]["processes"] == 2 and run["attempts"] == 1
    out, report = tmp_path / "target.parquet", tmp_path / "report"
    assert cli("collect", "target-mup-width32", "--root", str(root), "--out", str(out)).returncode == 0
    (row,) = pq.read_table(out).to_pylist()
    assert row["prediction.lr"] == pytest.approx(row["lr"]) and row["prediction.at"] == 32
    res = cli("analyze", str(synthetic(tmp_path)), str(out), "--out", str(report))
    assert res.returncode == 0 and "Target runs" in res.stdout, res.stdout + res.stderr
    (t,) = json.loads((report / "summary.json").read_text())["targets"]
    assert t["group"] == "mup × width" and t["runs"] == 1
    assert t["loss_at_predicted"] == pytest.approx(row["final_val_loss"])


def test_the_log_tail_is_rank_0s_unless_only_a_dead_rank_has_a_traceback(tmp_path):
    (tmp_path / "logs").mkdir()
    logs = {attempt_log(1, "out", 0): "old attempt", attempt_log(2, "out", 0): "step 10",
            attempt_log(2, "err", 0): "", attempt_log(2, "out", 1): "step 10",
            attempt_log(2, "err", 1): "Traceback (most recent call last):\nValueError: bad"}
    for name, text in logs.items():
        (tmp_path / "logs" / name).write_text(text)
    assert log_tail(tmp_path) == "[attempt-2.rank1.err]\nTraceback (most recent call last):\nValueError: bad"
    (tmp_path / "logs" / attempt_log(2, "err", 0)).write_text("Traceback (most recent call last):\nOSError: gone")
    assert log_tail(tmp_path) == "Traceback (most recent call last):\nOSError: gone"


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


def test_a_fused_and_packed_array_task_leaves_the_folders_of_unfused_runs(root, tmp_path):
    runs = wait_states(root, "fused", {"completed"}, timeout=300)
    assert len(runs) == 6 and len({r["job_id"] for r in runs.values()}) == 1  # one array task for all six
    for rid in runs:  # the same curves and results as the runs trained alone, here
        assert_same_folders(root / "fused" / rid, alone(root / "fused" / rid, tmp_path), 1e-6)
    outs = {rid: (root / "fused" / rid / "logs" / "attempt-1.out").read_text() for rid in runs}
    assert sum("trained in a fused group of 3 runs" in text for text in outs.values()) == 4  # two groups' copies
    assert sum("fused group 2 of 2 of this task" in text for text in outs.values()) == 1


def test_a_packed_run_waits_in_its_task_and_one_its_task_never_reached_is_free_to_launch():
    running, failed = {"job_id": "7_0", "position": 1}, {"job_id": "7_1", "position": 2}
    states = {"7_0": "RUNNING", "7_1": "FAILED"}
    waiting = RunState("a", {}, "pending")
    slurm._judge(waiting, running, states, None)
    assert (waiting.state, waiting.active) == ("pending", True) and "packed" in waiting.reason
    slurm._judge(started := RunState("b", {}, "pending"), running, states, {"step": 3, "time": time.time()})
    assert started.state == "running"
    slurm._judge(never := RunState("c", {}, "pending"), failed, states, None)
    assert never.state == "cancelled" and "before reaching it" in never.reason  # launchable again
    slurm._judge(crashed := RunState("d", {}, "pending"), failed, states, {"step": 3, "time": time.time()})
    assert crashed.state == "failed"


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
                        "scancel": ["cancelled"], "refused": ["pending"], "example": ["completed"] * 2,
                        "ddp": ["completed"], "ddp-one": ["completed"], "ddp-requeue": ["completed"],
                        "ddp-whole": ["completed"], "ranks": ["completed"], "target-mup-width32": ["completed"],
                        "fused": ["completed"] * 6}
    done = [r for r in rows if r["status"] == "completed"]
    assert all(r["curve_loss"] and r["job_id"] for r in done)
    assert all(r["flops"] > 0 for r in done if r["sweep"] not in ("example", "ranks"))  # the user's code reports none
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
