"""The state of every run: from its folder always, from the scheduler when it answers.

A run with a result.json is finished, with the status the file holds (a corrupt file makes it
`failed`, with the reason). Otherwise its latest job record in jobs.jsonl decides, checked against
the living: a local run is alive only while its process is (pid and start time, so a reused pid
does not count), a SLURM run is what one batched `sacct` call says, or `squeue` when accounting
does not answer, or its heartbeat when neither does. A job that ended without a result is
`failed`, with the tail of its log.
"""

import getpass
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hptransfer.store import (
    SweepFolder,
    attempt_count,
    heartbeat,
    index_entry,
    log_tail,
    read_result,
    result_key,
)

STATES = ("pending", "running", "completed", "diverged", "failed", "cancelled")
HEARTBEAT_STALE_S = 600  # no heartbeat for this long, and no scheduler to ask: the run is not alive
SCHEDULER_TIMEOUT_S = 20  # a hung sacct/squeue must not hang `hpt status`
UNLISTED_GRACE_S = 120  # a job neither sacct nor squeue lists this long after submission is gone

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


@dataclass
class RunState:
    run_id: str
    point: dict[str, Any]
    state: str
    reason: str = ""
    active: bool = False  # a live job (queued or running) holds the run: it must not be launched again
    job_id: str | None = None
    executor: str | None = None
    attempts: int = 0
    step: int | None = None
    result: dict[str, Any] | None = None
    log_tail: str | None = None

    @property
    def final_loss(self) -> float | None:
        return None if self.result is None else self.result.get("final_val_loss")

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, **self.point, "state": self.state, "reason": self.reason,
                "job_id": self.job_id, "executor": self.executor, "attempts": self.attempts, "step": self.step,
                "final_val_loss": self.final_loss,
                "final_train_loss": None if self.result is None else self.result.get("final_train_loss"),
                "log_tail": self.log_tail}


# ---- processes ---------------------------------------------------------------------------------------


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # fields after the command name, which may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])


def process_alive(proc: dict[str, Any]) -> bool | None:
    """Is the process of a job record ({pid, start, host}) alive? None when it ran on another host."""
    if proc.get("host") != socket.gethostname():
        return None
    return process_start(proc["pid"]) == proc.get("start")


# ---- the scheduler -----------------------------------------------------------------------------------


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


def _run(cmd: list[str]) -> str | None:
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
    out = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(bases)])
    for line in (out or "").splitlines():
        jid, _, state = line.partition("|")
        for j in _expand_ids(jid.strip()):
            states[j] = state.split()[0] if state.split() else "UNKNOWN"
    if out is not None and all(j in states for j in job_ids):
        return states
    queue = _run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"])
    if queue is None:
        return states if out is not None else None
    for line in queue.splitlines():
        jid, _, state = line.partition("|")
        for j in _expand_ids(jid.strip()):
            states.setdefault(j, state.strip())
    if out is None:  # no accounting: a job that left the queue is over, its folder tells how
        states.update({j: "GONE" for j in job_ids if j not in states})
    return states


# ---- runs --------------------------------------------------------------------------------------------


def run_states(folder: SweepFolder, *, summaries: bool = False) -> list[RunState]:
    """Every run of the sweep, in manifest order, with its state.

    `summaries=True` (what `hpt status` shows): a finished run's `result` holds only SUMMARY_KEYS,
    and comes from the sweep's results.jsonl while its result.json is the one indexed (one stat,
    instead of reading the file and listing its logs); results read anyway are indexed for next time.
    """
    points = folder.manifest(configs=False)
    latest: dict[str, dict[str, Any]] = {}
    for rec in folder.job_records():
        latest[rec["run_id"]] = rec
    slurm_ids = [r["job_id"] for rid, r in latest.items()
                 if r.get("executor") == "slurm" and r.get("event") == "submitted"
                 and not os.path.exists(f"{folder.path}/{rid}/result.json")]
    scheduler = slurm_states(slurm_ids)
    index = folder.result_index() if summaries else None
    new_entries = []
    states = []
    for point in points:
        rid = point.pop("run_id")
        s = RunState(rid, point, "pending", "not launched")
        rec = latest.get(rid)
        if index is not None and _from_index(folder, s, index.get(rid)):
            s.job_id, s.executor = (rec.get("job_id"), rec.get("executor")) if rec else (None, None)
        else:
            key = result_key(f"{folder.path}/{rid}") if index is not None else None  # before the read
            _state(folder.run_dir(rid), s, rec, scheduler)
            entry = index_entry(key, s.result, s.attempts) if s.result else None
            if entry is not None:
                s.result = entry["result"]
                new_entries.append(entry)
        states.append(s)
    folder.index_results(new_entries)
    return states


def _from_index(folder: SweepFolder, s: RunState, entry: list[Any] | None) -> bool:
    if entry is None or entry[0] != result_key(f"{folder.path}/{s.run_id}"):
        return False
    _, s.attempts, s.result = entry
    s.state, s.step, s.reason = s.result["status"], s.result.get("steps"), ""
    return True


def _state(run_dir: Path, s: RunState, rec: dict[str, Any] | None, scheduler: dict[str, str] | None) -> RunState:
    s.attempts = attempt_count(run_dir)
    if rec is not None:
        s.job_id, s.executor = rec.get("job_id"), rec.get("executor")
    # The scheduler was asked before the result is read: a job seen finished has its result on disk.
    result, corrupt = read_result(run_dir)
    if result is not None:
        s.state, s.result, s.step, s.reason = result["status"], result, result.get("steps"), ""
        if result["status"] == "failed":  # the error's first line is the reason; the traceback is the tail
            s.reason = next(iter((result.get("error") or "failed").strip().splitlines()), "failed")
            s.log_tail = result.get("error")
        return s
    if corrupt:
        s.state, s.reason, s.log_tail = "failed", corrupt, log_tail(run_dir)
        return s
    if rec is None:
        return s
    if rec["event"] == "cancelled":
        s.state, s.reason = "cancelled", rec.get("reason", "cancelled")
        return s
    hb = heartbeat(run_dir)
    s.step = hb.get("step") if hb else None
    if rec.get("executor") == "slurm":
        _slurm_state(s, rec, scheduler, hb)
    else:
        _local_state(s, rec, hb)
    if s.state == "failed":
        s.log_tail = log_tail(run_dir)
    return s


def _local_state(s: RunState, rec: dict[str, Any], hb: dict[str, Any] | None) -> None:
    event = rec["event"]
    if event == "queued":
        alive = process_alive(rec["scheduler"])
        if alive is None:
            alive = _fresh(hb)
        s.state, s.active = "pending", bool(alive)
        s.reason = "queued" if alive else "its scheduler exited before starting it"
    elif event == "started":
        alive = process_alive(rec)
        if alive is None:
            alive = _fresh(hb)
        if alive:
            s.state, s.reason, s.active = "running", "", True
        else:
            s.state, s.reason = "failed", f"process {rec['pid']} died without a result"
    elif event == "ended":
        s.state, s.reason = "failed", exit_reason(rec.get("returncode"))


def _slurm_state(s: RunState, rec: dict[str, Any], scheduler: dict[str, str] | None,
                 hb: dict[str, Any] | None) -> None:
    if scheduler is None:  # no SLURM answers here: judge by the heartbeat
        alive = _fresh(hb)
        s.state, s.active = ("running" if alive else "pending"), True
        s.reason = "SLURM not reachable" + ("" if alive else "; no recent heartbeat")
        return
    slurm = scheduler.get(rec["job_id"])
    if slurm is None and _age_s(rec.get("submitted_at")) < UNLISTED_GRACE_S:
        s.state, s.reason, s.active = "pending", "submitted", True  # accounting and the queue may lag
    elif slurm is None:
        s.state, s.reason = "failed", f"job {rec['job_id']} is unknown to SLURM (sacct, squeue) and left no result"
    elif slurm == "GONE":
        s.state, s.reason = "failed", f"job {rec['job_id']} left the queue without a result"
    else:
        s.state, s.reason, s.active = SLURM_STATES.get(slurm, ("pending", slurm.lower(), True))


def _age_s(iso: str | None) -> float:
    return time.time() - datetime.fromisoformat(iso).timestamp() if iso else float("inf")


def _fresh(hb: dict[str, Any] | None) -> bool:
    return hb is not None and time.time() - hb.get("time", 0) < HEARTBEAT_STALE_S


def exit_reason(code: int | None) -> str:
    if code is None:
        return "ended without a result"
    if code < 0:
        return f"killed by {signal.Signals(-code).name} without a result"
    return f"exited with code {code} without a result"


def counts(states: list[RunState]) -> dict[str, int]:
    c = Counter(s.state for s in states)
    return {k: c.get(k, 0) for k in STATES}


def is_launchable(s: RunState, retry_failed: bool) -> bool:
    """Launch a run that has no result and no live job; a failed one only when asked; diverged never."""
    if s.active:
        return False
    return s.state in ("pending", "cancelled") or (retry_failed and s.state == "failed")
