"""The state of every run: from its folder always, from its backend when that answers.

A run with a result.json is finished, with the status the file holds (a corrupt file makes it
`failed`, with the reason). Otherwise its latest job record in jobs.jsonl decides, checked by the
backend that wrote it (sweeps/backends: a local process probe, or SLURM's accounting). A job that
ended without a result is `failed`, with the tail of its log (docs/design.md#job-states).
"""

import os
from collections import Counter
from pathlib import Path
from typing import Any

from hptransfer.sweeps.backends import backend
from hptransfer.sweeps.backends.base import Judge
from hptransfer.sweeps.store import (
    STATES,
    RunState,
    SweepFolder,
    attempt_count,
    heartbeat,
    index_entry,
    log_tail,
    read_result,
    result_key,
)


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
    judges = _judges(folder, latest)
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
            _state(folder.run_dir(rid), s, rec, judges)
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


def _judges(folder: SweepFolder, latest: dict[str, dict[str, Any]]) -> dict[str, Judge]:
    """Each backend named by a latest record asked once, about its runs that have no result yet."""
    waiting: dict[str, list[dict[str, Any]]] = {}
    for rid, rec in latest.items():
        if not os.path.exists(f"{folder.path}/{rid}/result.json"):
            waiting.setdefault(rec.get("executor") or "local", []).append(rec)
    return {name: backend(name).observe(records) for name, records in waiting.items()}


def _state(run_dir: Path, s: RunState, rec: dict[str, Any] | None, judges: dict[str, Judge]) -> RunState:
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
    judges[rec.get("executor") or "local"](s, rec, hb)
    if s.state == "failed":
        s.log_tail = log_tail(run_dir)
    return s


def counts(states: list[RunState]) -> dict[str, int]:
    c = Counter(s.state for s in states)
    return {k: c.get(k, 0) for k in STATES}


def is_launchable(s: RunState, retry_failed: bool) -> bool:
    """Launch a run that has no result and no live job; a failed one only when asked; diverged never."""
    if s.active:
        return False
    return s.state in ("pending", "cancelled") or (retry_failed and s.state == "failed")
