"""The SLURM backend: job arrays through submitit, the sbatch preview, and job states from sacct/squeue.

Runs go as arrays of `RunJob` split at the cluster's MaxArraySize; submitit requeues a job on
timeout or preemption and training resumes from its checkpoint. An array element is a job of
`launcher.nodes` x `launcher.tasks_per_node` tasks (one per GPU): with several, each task runs the same
`RunJob` as one rank of the run, torch.distributed's variables exported, and logs as that rank
(docs/design.md#runs-of-several-tasks-on-slurm). Submission returns at once. A SLURM run's state is
what one batched `sacct` call says, or `squeue` when accounting does not answer, or its heartbeat
when neither does.

Each array's runs are recorded `submitting` (with the submitit folder) before sbatch is called and
`submitted` once it returns. A `submitting` record still the latest after its submitter died marks
an array sbatch may have accepted without anyone recording it: the next `hpt sweep` or `hpt status`
looks for it (the folder's `<id>_submission.sh`, squeue's jobs of that folder) and adopts each task
whose run submitit had handed over (its pickle is in place), cancelling any other, so no run ever
runs twice (docs/usage.md#where-the-runs-execute).
"""

import getpass
import io
import math
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import SlurmJobEnvironment, _make_sbatch_string  # private: sbatch_script, a task

from hptransfer.errors import HptError
from hptransfer.files import exit_process
from hptransfer.sweeps import job
from hptransfer.sweeps.backends.base import Backend, Judge, age_s, check_packing, fresh, now
from hptransfer.sweeps.backends.local import process_alive, process_start
from hptransfer.sweeps.store import RunState, SweepFolder, attempt_log, new_attempt
from hptransfer.sweeps.tasks import Task

SCHEDULER_TIMEOUT_S = 20  # a hung sacct/squeue must not hang `hpt status`
UNLISTED_GRACE_S = 120  # a job neither sacct nor squeue lists this long after submission is gone
MIN_ATTEMPT_S = 30  # an attempt's time before the requeue signal: to start, train and write a checkpoint
SUBMIT_GRACE_S = 300  # a submission from another host (its process cannot be probed) is in flight this long


@dataclass
class SlurmLauncher:
    """config/groups/launcher/slurm.yaml: one array task per run."""

    name: str = "slurm"
    partition: str | None = None
    gpus_per_node: int = 1
    nodes: int = 1  # per run: its tasks are the ranks of one distributed run
    tasks_per_node: int = 1  # one per GPU
    cpus_per_task: int = 8
    mem_gb: float = 32
    timeout_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = 64
    max_array_size: int | None = None  # None: the cluster's MaxArraySize
    signal_delay_s: int = 90
    max_requeue: int = 3
    setup: list[str] = field(default_factory=list)
    additional: dict[str, Any] = field(default_factory=dict)
    fuse: Any = 1  # runs per fused group (one batched model, one array task), or "auto"; 1: none
    fuse_mem_gb: float | None = None  # auto's memory per task; None: 0.8 x mem_gb on CPUs (GPUs: set it)
    runs_per_task: int = 1  # units (a run or a fused group) one after another in one array task

    def __post_init__(self) -> None:
        """Values sbatch would refuse, or accept to no purpose, are one-line errors before anything is written."""
        def bad(key: str, why: str) -> HptError:
            return HptError(f"config key 'launcher.{key}': {why}")

        check_packing(self)
        if self.nodes * self.tasks_per_node > 1 and (self.fuse != 1 or self.runs_per_task != 1):
            raise bad("fuse" if self.fuse != 1 else "runs_per_task", (
                f"a run of {self.nodes * self.tasks_per_node} tasks (launcher.nodes x launcher.tasks_per_node) "
                f"cannot share its job: set launcher.fuse=1 and launcher.runs_per_task=1, or one task per run"))
        if self.fuse == "auto" and self.gpus_per_node and self.fuse_mem_gb is None:
            raise bad("fuse_mem_gb", "launcher.fuse=auto on GPUs needs the memory of one GPU: set "
                      "launcher.fuse_mem_gb (e.g. 80 for an H100), or a number of runs in launcher.fuse")

        if not (math.isfinite(self.mem_gb) and self.mem_gb > 0):
            raise bad("mem_gb", f"must be positive, got {self.mem_gb}")
        for key, low in (("timeout_min", 1), ("cpus_per_task", 1), ("array_parallelism", 1), ("gpus_per_node", 0),
                         ("nodes", 1), ("tasks_per_node", 1), ("max_requeue", 0), ("signal_delay_s", 0)):
            if (value := getattr(self, key)) < low:
                raise bad(key, f"must be >= {low}, got {value}")
        if 0 < self.gpus_per_node < self.tasks_per_node:  # each task takes one GPU of its node (RunJob)
            raise bad("tasks_per_node", (
                f"{self.tasks_per_node} tasks per node but launcher.gpus_per_node={self.gpus_per_node}: each task "
                f"needs a GPU of its own: set launcher.gpus_per_node={self.tasks_per_node} (or 0 for tasks on CPUs)"))
        if self.max_array_size is not None and self.max_array_size < 1:
            raise bad("max_array_size", f"must be >= 1 (null: the cluster's MaxArraySize), got {self.max_array_size}")
        limit = self.timeout_min * 60
        if limit - self.signal_delay_s < MIN_ATTEMPT_S:
            raise bad("signal_delay_s", (
                f"{self.signal_delay_s} s before a {self.timeout_min} min time limit leaves each attempt "
                f"{max(limit - self.signal_delay_s, 0)} s before it is signalled and requeued, less than the "
                f"{MIN_ATTEMPT_S} s it needs to start, train and checkpoint: set launcher.signal_delay_s to at most "
                f"{limit - MIN_ATTEMPT_S} or launcher.timeout_min to at least "
                f"{math.ceil((self.signal_delay_s + MIN_ATTEMPT_S) / 60)}"))


# SLURM job states -> (run state, reason, whether the job still holds the run)
SLURM_STATES: dict[str, tuple[str, str, bool]] = {
    "PENDING": ("pending", "queued in SLURM", True),
    "REQUEUED": ("pending", "requeued; resumes from its checkpoint", True),
    "REQUEUE_HOLD": ("pending", "requeued, held", True),
    "REQUEUE_FED": ("pending", "requeued", True),
    "RESIZING": ("pending", "resizing", True),
    "SUSPENDED": ("pending", "suspended", True),
    "CONFIGURING": ("running", "starting", True),
    "RUNNING": ("running", "", True),
    "COMPLETING": ("running", "completing", True),
    "SIGNALING": ("running", "being signalled", True),
    "STAGE_OUT": ("running", "staging out", True),
    "COMPLETED": ("failed", "job ended without writing result.json", False),
    "FAILED": ("failed", "job failed", False),
    "CANCELLED": ("cancelled", "cancelled (scancel)", False),
    "TIMEOUT": ("failed", "time limit reached and not requeued: raise launcher.timeout_min, set "
                "train.checkpoint_every, or launcher.max_requeue", False),
    "OUT_OF_MEMORY": ("failed", "out of memory: raise launcher.mem_gb", False),
    "NODE_FAIL": ("failed", "node failure", False),
    "PREEMPTED": ("failed", "preempted and not requeued", False),
    "BOOT_FAIL": ("failed", "node failed to boot", False),
    "DEADLINE": ("failed", "deadline reached", False),
    "REVOKED": ("failed", "revoked", False),
}


def _expand_ids(job_id: str) -> list[str]:
    """`12_[0-3,7%2]` (pending array tasks as sacct/squeue print them) -> 12_0 ... 12_3, 12_7."""
    if "_[" not in job_id:
        return [job_id]
    base, ranges = job_id.split("_[", 1)
    out = []
    for part in ranges.rstrip("]").split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _query(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SCHEDULER_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    """SLURM state of each job id: one sacct call; squeue for what accounting does not know (yet).

    None when neither answers (no SLURM here, or its controller is down).
    """
    if not job_ids:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    states: dict[str, str] = {}
    out = _query(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(bases)])
    for line in (out or "").splitlines():
        jid, _, state = line.partition("|")
        for j in _expand_ids(jid.strip()):
            states[j] = state.split()[0] if state.split() else "UNKNOWN"
    if out is not None and all(j in states for j in job_ids):
        return states
    queue = _query(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"])
    if queue is None:
        return states if out is not None else None
    for line in queue.splitlines():
        jid, _, state = line.partition("|")
        for j in _expand_ids(jid.strip()):
            states.setdefault(j, state.strip())
    if out is None:  # no accounting: a job that left the queue is over, its folder tells how
        states.update({j: "GONE" for j in job_ids if j not in states})
    return states


def sbatch_parameters(launcher: SlurmLauncher, name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for the launcher block (the same for the script and the dry run).

    sbatch's meanings: `mem` and `gpus_per_node` per node, `cpus_per_task` per task. A task that fails
    ends the job's other tasks (`--kill-on-bad-exit`): its peers would otherwise wait in a collective
    until the time limit.
    """
    params: dict[str, Any] = {
        "job_name": f"hpt-{name}", "partition": launcher.partition, "time": launcher.timeout_min,
        "nodes": launcher.nodes, "ntasks_per_node": launcher.tasks_per_node,
        "mem": f"{math.ceil(launcher.mem_gb * 1024)}MB", "cpus_per_task": launcher.cpus_per_task,
        "gpus_per_node": launcher.gpus_per_node or None, "account": launcher.account, "qos": launcher.qos,
        "constraint": launcher.constraint, "array_parallelism": launcher.array_parallelism,
        "signal_delay_s": launcher.signal_delay_s, "setup": list(launcher.setup) or None,
        "srun_args": ["--kill-on-bad-exit=1"], "additional_parameters": dict(launcher.additional) or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def array_size(launcher: SlurmLauncher) -> int:
    """Runs per job array: the cluster's MaxArraySize (1001 when unreadable), or less if the launcher says so."""
    cluster = 1001
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize" and value.strip().isdigit():
            cluster = int(value.strip())
    return min(cluster, launcher.max_array_size or cluster)


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def submitit_folder(folder: SweepFolder) -> Path:
    """A fresh submitit folder per submission: SLURM job ids restart at 1 on a new cluster. Absolute: squeue
    names a job's script by its absolute path, and `hpt status` may run elsewhere."""
    return folder.path.absolute() / "slurm" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def sbatch_script(launcher: SlurmLauncher, name: str, folder: Path, n_runs: int) -> str:
    """The sbatch script of the first array, as submitit writes it (for --dry-run).

    submitit has no public function for the script text: its private `_make_sbatch_string` is used
    here only (pinned submitit range; tests/golden/sbatch_width.sh and sbatch_ddp.sh hold the expected text).
    """
    command = " ".join([sys.executable, "-u -m submitit.core._submit", str(folder)])
    return _make_sbatch_string(command=command, folder=folder, map_count=min(n_runs, array_size(launcher)),
                               **sbatch_parameters(launcher, name))


def submit(folder: SweepFolder, todo: list[RunState], launcher: SlurmLauncher, prov: dict[str, Any],
           tasks: list[Task] | None = None) -> list[dict[str, Any]]:
    """Submit claimed runs as job arrays, one array task per task (default: per run; sweeps/tasks.py), and
    record each array's jobs as it is accepted; returns the records."""
    records: list[dict[str, Any]] = []
    if not todo:
        return records
    tasks = tasks if tasks is not None else [Task(((s.run_id,),)) for s in todo]
    sub = submitit_folder(folder)
    executor = submitit.SlurmExecutor(folder=sub, max_num_timeout=launcher.max_requeue)
    executor.update_parameters(**sbatch_parameters(launcher, folder.name))
    me = {"pid": os.getpid(), "start": process_start(os.getpid()), "host": socket.gethostname()}
    for part in chunks(tasks, array_size(launcher)):
        # The intent first: if this process dies after sbatch accepts the array but before the array is
        # recorded, the next `hpt sweep` or `hpt status` finds the array by its folder (see `settle`).
        folder.append_jobs([{"event": "submitting", "run_id": rid, "executor": "slurm", "folder": str(sub),
                             "task": i, "tasks": len(part), "submitter": me, "at": now(), **prov}
                            for i, t in enumerate(part) for rid in t.run_ids])
        try:  # submitit prints sbatch's stderr itself on failure: it goes into our one-line error instead
            with redirect_stderr(io.StringIO()):
                jobs = executor.map_array(RunJob(), *zip(*(_job_args(folder, t) for t in part), strict=True))
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as err:
            sbatch = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise HptError(f"sbatch refused the job array: {sbatch}") from None
        batch = [{"event": "submitted", "run_id": rid, "executor": "slurm", "job_id": j.job_id,
                  "folder": str(sub), "submitted_at": now(), **prov,
                  **({"tasks": len(t.run_ids), "position": t.position(rid)} if len(t.run_ids) > 1 else {})}
                 for t, j in zip(part, jobs, strict=True) for rid in t.run_ids]
        folder.append_jobs(batch)  # recorded per array: a later failure loses no submitted job
        records += batch
    return records


def _job_args(folder: SweepFolder, task: Task) -> tuple[Any, Any]:
    """RunJob's arguments for a task: a run's folder and next attempt; several: each unit's folders and attempts."""
    if len(task.run_ids) == 1:
        d = folder.run_dir(task.run_ids[0])
        return str(d), new_attempt(d)
    units = [[folder.run_dir(rid) for rid in unit] for unit in task.units]
    return [[str(d) for d in u] for u in units], [[new_attempt(d) for d in u] for u in units]


class RunJob(submitit.helpers.Checkpointable):
    """A SLURM array task: send this attempt's output to the run's logs, then execute it.

    SLURM appends every attempt of a requeued task to the same file of submitit's folder, so each
    attempt writes its own files instead: its stdout and stderr are redirected there once it
    starts, and submitit's file keeps what came before (submitit's start-up, `launcher.setup`) and
    SLURM's own messages (an out-of-memory kill), with a line naming the attempt's files.
    Rank 0 writes logs/attempt-N.out and .err, rank r > 0 attempt-N.rank<r>.out and .err
    (`store.attempt_log`). `checkpoint` (inherited) resubmits the same call: the requeued job
    trains the same folder. On the requeue signal submitit has rank 0 alone checkpoint and requeue,
    and SLURM restarts every task; the other ranks carry on until then (a rank that stopped could hold
    rank 0 in a collective, where it cannot act on its signal).
    """

    def __call__(self, run_dir: str | list[list[str]], first_attempt: int | list[list[int]] | None = None) -> str:
        """`first_attempt`: the run's next attempt number when the job was submitted (None: a job an older
        hpt queued, of one task, which counts its attempt from the logs as it did). A task of several runs
        (sweeps/tasks.py): the folders and first attempts of each unit, trained one unit after another."""
        _survive_requeue_race()
        env = submitit.JobEnvironment()
        if isinstance(run_dir, list):
            failed = job.execute_task([[Path(d) for d in unit] for unit in run_dir],
                                      _unit_logs(dict(zip((d for u in run_dir for d in u),
                                                          (a for u in first_attempt for a in u), strict=True))))
            return f"{failed} failed"
        if env.num_tasks > 1:
            export_distributed()
        folder = Path(run_dir)
        # Every task of the job computes the same number, without counting the logs its peers are creating.
        attempt = (new_attempt(folder) if first_attempt is None
                   else first_attempt + int(os.environ.get("SLURM_RESTART_COUNT", 0)))
        _to_logs(folder, attempt, env.global_rank, env.num_tasks)
        status = job.execute(folder)
        if env.num_tasks > 1:  # a rank's gloo threads can abort the interpreter's teardown (files.exit_process)
            exit_process(0)
        return status


def _to_logs(folder: Path, attempt: int, rank: int = 0, ranks: int = 1) -> None:
    """This process's stdout and stderr from now on: the run's logs/attempt-N.out and .err (`attempt_log`)."""
    (folder / "logs").mkdir(exist_ok=True)
    files = [folder / "logs" / attempt_log(attempt, suffix, rank) for suffix in ("out", "err")]
    of = f" (rank {rank} of {ranks})" if ranks > 1 else ""
    print(f"hpt: attempt {attempt} of run {folder.name}{of} writes to {files[0]} and {files[1]}", flush=True)
    sys.stderr.flush()
    for fd, path in zip((1, 2), files, strict=True):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, fd)
        os.close(out)


def _unit_logs(first_attempts: dict[str, int]) -> Callable[[list[Path]], None]:
    """Before each unit of a task: its output to its first run's attempt logs; each other run of a fused group
    gets its attempt's .out with a line naming them (attempts count from the submission, as a lone run's)."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))

    def before(unit: list[Path]) -> None:
        attempts = {d: first_attempts[str(d)] + restarts for d in unit}
        first = unit[0]
        for d in unit[1:]:
            (d / "logs").mkdir(exist_ok=True)
            with open(d / "logs" / attempt_log(attempts[d], "out"), "a") as f:
                f.write(f"hpt: attempt {attempts[d]}: trained in a fused group of {len(unit)} runs; its output: "
                        f"{first / 'logs' / attempt_log(attempts[first], 'out')} and .err\n")
        _to_logs(first, attempts[first])

    return before


def export_distributed() -> None:
    """In a task of a multi-task job: torch.distributed's env:// variables, as torchrun sets them (RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; MASTER_ADDR: the job's first node, MASTER_PORT: drawn from the
    job id, so the array's jobs sharing a node differ).

    CUDA_VISIBLE_DEVICES stays SLURM's (all the GPUs of the task's node): a rank takes cuda:LOCAL_RANK, as
    under torchrun. The job's values win over any the submitting shell passed on (sbatch exports its environment).
    """
    os.environ.pop("MASTER_PORT", None)  # submitit keeps a set port: one for every job of the array
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def _survive_requeue_race() -> None:
    """In a task: let a requeue whose `scontrol` SLURM stopped count as done.

    On the requeue signal submitit runs `scontrol requeue`; SLURM then stops the task, and can
    SIGTERM that scontrol before it exits. submitit then raises from its signal handler, inside
    training, which would record the run `failed` although it was requeued. A scontrol ended by
    SIGTERM means SLURM acted on the requeue: submitit goes on exiting as after any requeue.
    """
    requeue = SlurmJobEnvironment._requeue
    if getattr(requeue, "hpt", False):
        return

    def _requeue(env: SlurmJobEnvironment, countdown: int) -> None:
        try:
            requeue(env, countdown)
        except subprocess.CalledProcessError as err:
            if err.returncode != -signal.SIGTERM:
                raise
            print("hpt: scontrol requeue was stopped by the requeue itself: requeued", file=sys.stderr, flush=True)

    _requeue.hpt = True  # type: ignore[attr-defined]
    SlurmJobEnvironment._requeue = _requeue  # type: ignore[method-assign]


class Slurm(Backend):
    name = "slurm"
    launcher = SlurmLauncher

    def observe(self, records: list[dict[str, Any]]) -> Judge:
        """One sacct call (squeue for what accounting lacks) for every submitted job of these records, after
        settling the submissions whose submitter died before recording them."""
        settled = settle([r for r in records if r.get("event") == "submitting"])
        current = [settled.get(r["run_id"], r) if r.get("event") == "submitting" else r for r in records]
        scheduler = slurm_states([r["job_id"] for r in current if r.get("event") == "submitted"])

        def judge(s: RunState, rec: dict[str, Any], hb: dict[str, Any] | None) -> None:
            if rec.get("event") == "submitting":
                rec = settled.get(s.run_id, rec)
                s.job_id = rec.get("job_id")
            if rec.get("event") == "submitting":  # still in flight, or sbatch never took it
                live = in_flight(rec)
                s.state, s.active = "pending", live
                s.reason = "being submitted to SLURM" if live else "not launched (sbatch did not take its array)"
            elif rec.get("event") == "cancelled":
                s.state, s.reason = "cancelled", rec.get("reason", "cancelled")
            else:
                _judge(s, rec, scheduler, hb)

        return judge

    def cancel(self, folder: SweepFolder, active: list[RunState], records: list[dict[str, Any]]) -> list[RunState]:
        """One scancel for every job; all are recorded cancelled here (SLURM tells no one else). A run still
        being submitted has no job yet: its submitter records it."""
        jobs = [s for s in active if s.job_id]
        if jobs:
            subprocess.run(["scancel", *sorted({s.job_id for s in jobs})], check=False, timeout=60)
        return jobs


def in_flight(rec: dict[str, Any]) -> bool:
    """Is the process that wrote this `submitting` record still submitting? (This process never is: its
    submission has returned or was interrupted.) From another host, for SUBMIT_GRACE_S."""
    who = rec.get("submitter") or {}
    if who.get("pid") == os.getpid() and who.get("host") == socket.gethostname():
        return False
    alive = process_alive(who) if who else False
    return age_s(rec.get("at")) < SUBMIT_GRACE_S if alive is None else alive


def arrays_in(sub: Path, sweep: str) -> set[str]:
    """The job ids sbatch gave submissions from submitit folder `sub`: its `<id>_submission.sh` files (written
    once sbatch returned) and the queued jobs of sweep `sweep` whose script lies in it (squeue)."""
    ids = {m.group(1) for p in sub.glob("*_submission.sh") if (m := re.fullmatch(r"(\d+)_submission\.sh", p.name))}
    queue = _query(["squeue", "-h", "-u", getpass.getuser(), "-n", f"hpt-{sweep}", "-o", "%F|%o"])
    for line in (queue or "").splitlines():
        jid, _, script = line.partition("|")
        if script.strip().startswith(f"{sub}/") and jid.strip().isdigit():
            ids.add(jid.strip())
    return ids


def settle(pending: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Settle the `submitting` records of dead submitters: returns the record that now stands for each run.

    Per submitit folder, the array sbatch accepted and no `submitted` record names is adopted task by
    task: a task whose run submitit handed over (`<job>_submitted.pkl` in place) is recorded
    `submitted`; any other is scancel'd (it would wait for its pickle and fail) and its run recorded
    `cancelled`, so the next `hpt sweep` launches it. Several such arrays (never expected) are all
    cancelled. Nothing found: sbatch never took it, and the run is free (no record is written).
    """
    by_folder: dict[str, list[dict[str, Any]]] = {}
    for r in pending:
        by_folder.setdefault(r["folder"], []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for sub_name, recs in by_folder.items():
        if any(in_flight(r) for r in recs):
            continue
        sub = Path(sub_name)
        sweep = SweepFolder(sub.parent.parent)
        recorded = {str(r.get("job_id", "")).split("_")[0] for r in sweep.job_records()
                    if r.get("event") == "submitted" and r.get("folder") == sub_name}
        ghosts = sorted(arrays_in(sub, sweep.name) - recorded, key=int)
        if not ghosts:
            continue
        new, doomed = [], []
        for r in recs:
            base = {"run_id": r["run_id"], "executor": "slurm", "folder": sub_name}
            array = ghosts[0] if len(ghosts) == 1 else None
            jid = None if array is None else (f"{array}_{r['task']}" if r.get("tasks", 2) > 1 else array)
            if jid is not None and (sub / f"{jid}_submitted.pkl").exists():
                new.append({"event": "submitted", **base, "job_id": jid, "submitted_at": r.get("at"),
                            "git_commit": r.get("git_commit"), "git_dirty": r.get("git_dirty"), "adopted": True})
                continue
            doomed.append(jid)
            new.append({"event": "cancelled", **base, "job_id": jid, "at": now(),
                        "reason": "its submission was cut before it was recorded: job cancelled; the next "
                                  "hpt sweep launches the run"})
        if doomed:
            cancel = ghosts if None in doomed else doomed
            subprocess.run(["scancel", *cancel], check=False, timeout=60, capture_output=True)
        sweep.append_jobs(new)
        out.update({r["run_id"]: r for r in new})
    return out


def _judge(s: RunState, rec: dict[str, Any], scheduler: dict[str, str] | None, hb: dict[str, Any] | None) -> None:
    if scheduler is None:  # no SLURM answers here: judge by the heartbeat
        alive = fresh(hb)
        s.state, s.active = ("running" if alive else "pending"), True
        s.reason = "SLURM not reachable" + ("" if alive else "; no recent heartbeat")
        return
    slurm = scheduler.get(rec["job_id"])
    if slurm is None and age_s(rec.get("submitted_at")) < UNLISTED_GRACE_S:
        s.state, s.reason, s.active = "pending", "submitted", True  # accounting and the queue may lag
    elif slurm is None:
        s.state, s.reason = "failed", f"job {rec['job_id']} is unknown to SLURM (sacct, squeue) and left no result"
    elif slurm == "GONE":
        s.state, s.reason = "failed", f"job {rec['job_id']} left the queue without a result"
    else:
        s.state, s.reason, s.active = SLURM_STATES.get(slurm, ("pending", slurm.lower(), True))
        if rec.get("position", 0) > 0 and hb is None:  # a packed run its task has not reached (yet, or ever)
            if s.active:
                s.state, s.reason = "pending", "packed: waits for the runs before it in its task"
            elif s.state == "failed":  # its task ended first: free to launch again
                s.state, s.reason = "cancelled", f"its task (job {rec['job_id']}) ended before reaching it"
