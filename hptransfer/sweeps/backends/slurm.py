"""The SLURM backend: job arrays through submitit, the sbatch preview, and job states from sacct/squeue.

Runs go as arrays of `RunJob` split at the cluster's MaxArraySize; submitit requeues a task on
timeout or preemption and training resumes from its checkpoint. Submission returns at once. A
SLURM run's state is what one batched `sacct` call says, or `squeue` when accounting does not
answer, or its heartbeat when neither does.
"""

import getpass
import io
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string  # private: sbatch_script alone uses it

from hptransfer.errors import HptError
from hptransfer.sweeps import job
from hptransfer.sweeps.backends.base import Backend, Judge, age_s, fresh, now
from hptransfer.sweeps.store import RunState, SweepFolder, new_attempt

SCHEDULER_TIMEOUT_S = 20  # a hung sacct/squeue must not hang `hpt status`
UNLISTED_GRACE_S = 120  # a job neither sacct nor squeue lists this long after submission is gone


@dataclass
class SlurmLauncher:
    """config/groups/launcher/slurm.yaml: one array task per run."""

    name: str = "slurm"
    partition: str | None = None
    gpus_per_node: int = 1
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
    """submitit SlurmExecutor parameters for the launcher block (the same for the script and the dry run)."""
    params: dict[str, Any] = {
        "job_name": f"hpt-{name}", "partition": launcher.partition, "time": launcher.timeout_min,
        "mem": f"{math.ceil(launcher.mem_gb * 1024)}MB", "cpus_per_task": launcher.cpus_per_task,
        "gpus_per_node": launcher.gpus_per_node or None, "account": launcher.account, "qos": launcher.qos,
        "constraint": launcher.constraint, "array_parallelism": launcher.array_parallelism,
        "signal_delay_s": launcher.signal_delay_s, "setup": list(launcher.setup) or None,
        "additional_parameters": dict(launcher.additional) or None,
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
    """A fresh submitit folder per submission: SLURM job ids restart at 1 on a new cluster."""
    return folder.path / "slurm" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def sbatch_script(launcher: SlurmLauncher, name: str, folder: Path, n_runs: int) -> str:
    """The sbatch script of the first array, as submitit writes it (for --dry-run).

    submitit has no public function for the script text: its private `_make_sbatch_string` is used
    here only (pinned submitit range; tests/golden/sbatch_width.sh holds the expected text).
    """
    command = " ".join([sys.executable, "-u -m submitit.core._submit", str(folder)])
    return _make_sbatch_string(command=command, folder=folder, map_count=min(n_runs, array_size(launcher)),
                               **sbatch_parameters(launcher, name))


def submit(folder: SweepFolder, todo: list[RunState], launcher: SlurmLauncher,
           prov: dict[str, Any]) -> list[dict[str, Any]]:
    """Submit claimed runs as job arrays and record each array's jobs as it is accepted; returns the records."""
    records: list[dict[str, Any]] = []
    if not todo:
        return records
    sub = submitit_folder(folder)
    executor = submitit.SlurmExecutor(folder=sub, max_num_timeout=launcher.max_requeue)
    executor.update_parameters(**sbatch_parameters(launcher, folder.name))
    for part in chunks(todo, array_size(launcher)):
        try:  # submitit prints sbatch's stderr itself on failure: it goes into our one-line error instead
            with redirect_stderr(io.StringIO()):
                jobs = executor.map_array(RunJob(), [str(folder.run_dir(s.run_id)) for s in part])
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as err:
            sbatch = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise HptError(f"sbatch refused the job array: {sbatch}") from None
        batch = [{"event": "submitted", "run_id": s.run_id, "executor": "slurm", "job_id": j.job_id,
                  "folder": str(sub), "submitted_at": now(), **prov} for s, j in zip(part, jobs, strict=True)]
        folder.append_jobs(batch)  # recorded per array: a later failure loses no submitted job
        records += batch
    return records


class RunJob(submitit.helpers.Checkpointable):
    """A SLURM array task: link submitit's logs into the run folder as this attempt's, then execute it.

    `checkpoint` (inherited) resubmits the same call: the requeued task trains the same folder.
    """

    def __call__(self, run_dir: str) -> str:
        folder = Path(run_dir)
        paths = submitit.JobEnvironment().paths
        attempt = new_attempt(folder)
        (folder / "logs").mkdir(exist_ok=True)
        for target, suffix in ((paths.stdout, "out"), (paths.stderr, "err")):
            link = folder / "logs" / f"attempt-{attempt}.{suffix}"
            link.symlink_to(os.path.relpath(target.resolve(), link.parent))  # relative: the sweep folder can move
        return job.execute(folder)


class Slurm(Backend):
    name = "slurm"
    launcher = SlurmLauncher

    def observe(self, records: list[dict[str, Any]]) -> Judge:
        """One sacct call (squeue for what accounting lacks) for every submitted job of these records."""
        scheduler = slurm_states([r["job_id"] for r in records if r.get("event") == "submitted"])

        def judge(s: RunState, rec: dict[str, Any], hb: dict[str, Any] | None) -> None:
            _judge(s, rec, scheduler, hb)

        return judge

    def cancel(self, folder: SweepFolder, active: list[RunState], records: list[dict[str, Any]]) -> list[RunState]:
        """One scancel for every job; all are recorded cancelled here (SLURM tells no one else)."""
        if active:
            subprocess.run(["scancel", *sorted({s.job_id for s in active})], check=False, timeout=60)
        return list(active)


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
