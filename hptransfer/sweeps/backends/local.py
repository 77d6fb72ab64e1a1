"""The local backend: runs as processes on this machine, N at a time, and how to tell they are alive.

`LocalScheduler` runs `python -m hptransfer.sweeps.job RUN_DIR` in N slots (one GPU each when
there are GPUs, else an equal share of the cores), each in its own session so Ctrl-C reaches only
the scheduler, which then stops its runs and records them cancelled; the next `hpt sweep` resumes
them. A local job is alive while its process is (pid and start time, so a reused pid does not count).

A full disk stops the sweep cleanly: no new run starts, the running ones end by themselves (a job
stopped by the disk exits with DISK_FULL_EXIT and no result), and every run not finished is
recorded cancelled ("disk full"), in space the scheduler set aside before claiming its runs; then
a DiskFull error says so, and the same command resumes once space is freed.
"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hptransfer.files import DISK_FULL_EXIT, DiskFull, disk_full, disk_full_error, free_bytes, human_bytes
from hptransfer.sweeps.backends.base import Backend, Judge, check_packing, fresh, now
from hptransfer.sweeps.store import RunState, SweepFolder, new_attempt, read_result
from hptransfer.sweeps.tasks import Task

# Space set aside for the records of a sweep's ends (~150 bytes each): freed to write them when the disk is full.
RESERVE_BYTES, RESERVE_PER_RUN, RESERVE_MAX = 16 * 1024, 512, 8 * 1024 * 1024
RESERVE_NAME = re.compile(r"\.reserve-(\d+)-(\d+)$")


@dataclass
class LocalLauncher:
    """config/groups/launcher/local.yaml"""

    name: str = "local"
    jobs: int | None = None  # jobs at once; None: one per GPU, else one per CPU core
    fuse: Any = 1  # runs per fused group (one batched model), or "auto"; 1: none
    fuse_mem_gb: float | None = None  # auto's memory per job; None: a GPU's, or half the free memory per job
    runs_per_task: int = 1  # units (a run or a fused group) one after another in one process

    def __post_init__(self) -> None:
        check_packing(self)


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


def exit_reason(code: int | None) -> str:
    if code is None:
        return "ended without a result"
    if code < 0:
        return f"killed by {signal.Signals(-code).name} without a result"
    if code == DISK_FULL_EXIT:
        return "stopped by a full disk without a result"
    return f"exited with code {code} without a result"


class Reserve:
    """A file of zeros in the sweep folder, deleted to make room for the last job records when the disk fills."""

    def __init__(self, folder: SweepFolder, runs: int):
        me = os.getpid()
        self.path: Path | None = folder.path / f".reserve-{me}-{process_start(me)}"
        size = min(RESERVE_MAX, RESERVE_BYTES + RESERVE_PER_RUN * runs)
        with suppress(OSError):  # those of schedulers that died without removing theirs
            for entry in os.scandir(folder.path):
                m = RESERVE_NAME.match(entry.name)
                if m and process_start(int(m.group(1))) != int(m.group(2)):
                    os.unlink(entry.path)
        try:
            folder.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                try:
                    os.posix_fallocate(fd, 0, size)  # real blocks, even on a file system that compresses zeros
                except OSError as err:
                    if disk_full(err):
                        raise
                    os.write(fd, bytes(size))  # a file system without fallocate
            finally:
                os.close(fd)
        except OSError as err:
            self.release()
            if disk_full(err):
                raise disk_full_error(err, folder.path, size) from err
            raise

    def release(self) -> None:
        if self.path is not None:
            with suppress(OSError):
                os.unlink(self.path)
            self.path = None


@contextmanager
def reserved_space(folder: SweepFolder, runs: int) -> Iterator[Reserve]:
    """Set space aside for the job records of `runs` runs (DiskFull if there is none), removed on exit."""
    reserve = Reserve(folder, runs)
    try:
        yield reserve
    finally:
        reserve.release()


def remove_strays(run_dir: Path, pid: int) -> None:
    """Temp files a dead job left: its checkpoint.tmp and its atomic writes' .<name>.<pid>-*.tmp."""
    with suppress(OSError):
        for entry in os.scandir(run_dir):
            if entry.name == "checkpoint.tmp" or (entry.name.startswith(".") and f".{pid}-" in entry.name
                                                  and entry.name.endswith(".tmp")):
                os.unlink(entry.path)


def local_gpus() -> list[str]:
    """GPU ids to hand out, one per slot (as CUDA_VISIBLE_DEVICES names them)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        import torch  # here: only to count GPUs, when CUDA_VISIBLE_DEVICES does not say

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs(launcher: LocalLauncher, gpus: list[str]) -> int:
    """One run per GPU; without GPUs one per core: small models train ~2x faster per core single-threaded."""
    if launcher.jobs:
        return launcher.jobs
    return len(gpus) or cpu_count()


@dataclass
class Slot:
    gpu: str | None
    task: Task | None = None
    proc: subprocess.Popen | None = None
    log: IO[bytes] | None = None  # the process's output: the log of the task's first run
    logs: dict[str, Path] = field(default_factory=dict)  # each run's attempt log
    started: float = 0.0


@dataclass
class Progress:
    """What a display shows: outcomes so far, runs in flight, and run times to estimate the rest from."""

    total: int
    done: dict[str, int] = field(default_factory=lambda: {"completed": 0, "diverged": 0, "failed": 0})
    running: dict[str, float] = field(default_factory=dict)  # run_id -> start time
    durations: list[float] = field(default_factory=list)

    def eta_s(self, slots: int) -> float | None:
        if not self.durations:
            return None
        left = self.total - sum(self.done.values())
        return sum(self.durations) / len(self.durations) * left / max(1, min(slots, left or 1))


class LocalScheduler:
    """Run claimed runs N at a time, each in its own process, until all have ended or it is stopped."""

    def __init__(self, folder: SweepFolder, runs: list[RunState], jobs: int, gpus: list[str],
                 on_event: Callable[[str, RunState | None, Progress], None], reserve: Reserve | None = None,
                 tasks: list[Task] | None = None):
        self.folder = folder
        self.queue = list(tasks) if tasks is not None else [Task(((s.run_id,),)) for s in runs]
        self.slots = [Slot(gpus[i % len(gpus)] if gpus else None) for i in range(jobs)]
        self.threads = max(1, cpu_count() // jobs)
        self.progress = Progress(total=len(runs))
        self.by_id = {s.run_id: s for s in runs}
        self.on_event = on_event
        self.stop_reason: str | None = None
        self.reserve = reserve
        self.disk_full: str | None = None  # what the full disk stopped first (a file, or a run's folder)
        self.unrecorded: list[dict[str, Any]] = []  # job records the full disk refused: written at the end
        self.stopped_by_disk = 0  # runs whose job the full disk stopped
        self.notes: list[tuple[str, str]] = []  # (log, line): notes a full disk refused, written at the end

    def schedule(self) -> Progress:
        """Schedule until every run has ended; Ctrl-C or SIGTERM stops the runs and records them cancelled.

        Signals only set `stop_reason`; the loop acts on it, so no run is ever half-started or half-recorded.
        A full disk stops new starts; once the running runs have ended, the rest are recorded cancelled
        and a DiskFull error is raised (exit code 1 when some runs had ended, else 2).
        """
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while (self.queue or self._busy()) and self.stop_reason is None:
                for slot in self.slots:
                    if slot.proc is not None and slot.proc.poll() is not None:
                        self._ended(slot)
                    if slot.proc is None and self.queue and self.disk_full is None:
                        self._start(slot, self.queue.pop(0))
                if self.disk_full is not None and not self._busy():
                    break
                self.on_event("tick", None, self.progress)
                time.sleep(0.2)
            if self.stop_reason is not None:
                self._stop(self.stop_reason)
                raise KeyboardInterrupt
            if self.disk_full is not None:
                self._stop_disk_full()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.progress

    def _busy(self) -> bool:
        return any(slot.proc for slot in self.slots)

    def _record(self, records: list[dict[str, Any]], *, last: bool = False) -> int:
        """Append job records; those a full disk refuses wait (the disk may free up) until the `last` call,
        which first frees the reserved space. Returns how many are still unrecorded."""
        records, self.unrecorded = self.unrecorded + records, []
        for attempt in range(2 if last else 1):
            if attempt and self.reserve is not None:
                self.reserve.release()
            try:
                self.folder.append_jobs(records)
                return 0
            except DiskFull:
                self._full(self.folder.jobs_file)
        self.unrecorded = records
        return len(records)

    def _full(self, where: Path | str) -> None:
        self.disk_full = self.disk_full or str(where)

    def _stop_disk_full(self) -> None:
        """Record the runs never started cancelled (the stopped ones are already), then raise DiskFull."""
        queued = [rid for task in self.queue for rid in task.run_ids]
        self.queue.clear()
        lost = self._record([{"event": "cancelled", "run_id": rid, "executor": "local", "reason": "disk full",
                              "at": now()} for rid in queued], last=True)
        if self.reserve is not None:
            self.reserve.release()
        for path, line in self.notes:  # in the space the reserve left: each log says why its attempt stopped
            with suppress(OSError), open(path, "ab") as f:
                f.write(line.encode())
        ended = sum(self.progress.done.values())
        free = free_bytes(self.disk_full)
        unrecorded = f" ({lost} of them could not be recorded: `hpt status` may show them failed)" if lost else ""
        stopped = self.stopped_by_disk + len(queued)
        err = DiskFull(f"disk full at {self.disk_full} ({'?' if free is None else human_bytes(free)} free): "
                       f"{ended} run{'s' * (ended != 1)} ended, {stopped} stopped and recorded cancelled"
                       f"{unrecorded}; free some space and run the same command again: it resumes them")
        err.exit_code = 1 if ended else 2
        raise err

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_reason = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "stopped (SIGTERM, e.g. hpt cancel)"

    def _start(self, slot: Slot, task: Task) -> None:
        """Start the task's process, its output in its first run's new attempt log; each other run's attempt log
        is created (a fused run's says where the group's output is; a packed run's is where the job writes
        once it reaches it). Every run is recorded started by that process."""
        runs = [self.by_id[rid] for rid in task.run_ids]
        attempts = {s.run_id: new_attempt(self.folder.run_dir(s.run_id)) for s in runs}
        logs = {rid: self.folder.run_dir(rid) / "logs" / f"attempt-{n}.log" for rid, n in attempts.items()}
        first = task.run_ids[0]
        try:
            for rid, log in logs.items():
                log.parent.mkdir(exist_ok=True)
                with open(log, "ab") as f:
                    unit = task.units[task.position(rid)]
                    if rid != unit[0]:  # a fused run: the group's output is its first run's
                        f.write(f"[hpt] attempt {attempts[rid]}: trained in a fused group of {len(unit)} runs; "
                                f"its output: {logs[unit[0]]}\n".encode())
            # Unbuffered: the job writes to it directly, and closing it never flushes into a full disk.
            slot.log = open(logs[first], "ab", buffering=0)  # noqa: SIM115 (closed in _ended)
        except OSError as err:
            if not disk_full(err):
                raise
            self._full(self.folder.run_dir(first))
            self.queue.insert(0, task)  # not started: recorded cancelled with the rest
            return
        env = {"OMP_NUM_THREADS": str(self.threads), **os.environ}  # an explicit OMP_NUM_THREADS wins
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.gpu
        dirs = {rid: str(self.folder.run_dir(rid)) for rid in task.run_ids}
        what = [dirs[first]] if len(task.run_ids) == 1 else [json.dumps(
            [{"runs": [dirs[rid] for rid in unit], "log": str(logs[unit[0]])} for unit in task.units])]
        # Its own session: the terminal's Ctrl-C reaches only the scheduler, which stops runs itself.
        slot.proc = subprocess.Popen([sys.executable, "-m", "hptransfer.sweeps.job", *what], stdout=slot.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        slot.task, slot.logs, slot.started = task, logs, time.time()
        pid = slot.proc.pid
        shared = {"tasks": len(task.run_ids)} if len(task.run_ids) > 1 else {}
        try:
            self.folder.append_jobs([{"event": "started", "run_id": rid, "executor": "local",
                                      "job_id": f"local-{pid}", "pid": pid, "start": process_start(pid),
                                      "host": socket.gethostname(), "attempt": attempts[rid], "gpu": slot.gpu,
                                      "started_at": now(), **shared,
                                      **({"position": task.position(rid)} if shared else {})}
                                     for rid in task.run_ids])
        except DiskFull:  # a run nobody knows was started must not run: stop it, as if it never had
            _signal_group(pid, signal.SIGKILL)
            slot.proc.wait()
            _close(slot.log)
            for rid, log in logs.items():
                remove_strays(self.folder.run_dir(rid), pid)
                with suppress(OSError):
                    if log.stat().st_size == 0 or rid != first:
                        log.unlink()
            slot.proc, slot.task, slot.log = None, None, None
            self._full(self.folder.jobs_file)
            self.queue.insert(0, task)
            return
        for s in runs:
            self.progress.running[s.run_id] = slot.started
            s.job_id, s.attempts = f"local-{pid}", attempts[s.run_id]
            self.on_event("started", s, self.progress)

    def _ended(self, slot: Slot, stopped: str | None = None) -> None:
        """Record each run of the slot's ended task: its result, or why it has none (`stopped`: the task was
        stopped for this reason, and a run without a result is cancelled, to be resumed by the same command)."""
        code = slot.proc.returncode
        task = slot.task
        duration = (time.time() - slot.started) / len(task.run_ids)  # a slot's time per run: what ETAs divide
        records = []

        def cancel(s: RunState, reason: str) -> None:  # no result, not the run's fault: launchable again
            s.state, s.reason = "cancelled", reason
            records.append({"event": "cancelled", "run_id": s.run_id, "executor": "local", "job_id": s.job_id,
                            "reason": reason, "at": now()})

        for rid in task.run_ids:
            s, run_dir = self.by_id[rid], self.folder.run_dir(rid)
            remove_strays(run_dir, slot.proc.pid)
            result, why = read_result(run_dir)
            if result is None and stopped is not None:  # said once for all by whoever stopped the sweep
                self._note(slot, rid, f"[hpt] attempt cancelled: {stopped}\n")
                cancel(s, stopped)
            # The disk's fault, not the run's (said by the job, or any exit without a result once the disk is
            # known full): cancelled, to be resumed by the same command.
            elif result is None and (code == DISK_FULL_EXIT or (self.disk_full is not None and (code or 0) > 0)):
                self._note(slot, rid, f"[hpt] attempt {s.attempts} stopped: disk full; the same command resumes it\n")
                self._full(run_dir)
                self.stopped_by_disk += 1
                cancel(s, "disk full")
            elif result is None and task.position(rid) > 0 and _empty(slot.logs[rid]):
                # A packed run its task never reached (its process died first): free to launch again.
                slot.logs[rid].unlink(missing_ok=True)
                cancel(s, f"its task's process ended before reaching it ({exit_reason(code)})")
            else:
                if result is None:  # say in the log itself why it stopped: `hpt status` shows its tail
                    self._note(slot, rid, f"[hpt] attempt {s.attempts} {why or exit_reason(code)}\n")
                records.append({"event": "ended", "run_id": rid, "executor": "local",
                                "job_id": s.job_id, "returncode": code, "ended_at": now()})
                s.state, s.result = (result["status"], result) if result else ("failed", None)
                s.reason = why or ("" if result else exit_reason(code))
                self.progress.done[s.state] += 1
                self.progress.durations.append(duration)
            self.progress.running.pop(rid, None)
        _close(slot.log)
        self._record(records)
        ended = [self.by_id[rid] for rid in task.run_ids if not (stopped and self.by_id[rid].state == "cancelled")]
        slot.proc, slot.task, slot.log, slot.logs = None, None, None, {}
        for s in ended:
            self.on_event("ended", s, self.progress)

    def _stop(self, reason: str) -> None:
        """Terminate running tasks (SIGTERM, then SIGKILL), record their runs and the queued ones cancelled."""
        busy = [slot for slot in self.slots if slot.proc is not None]
        for slot in busy:
            _signal_group(slot.proc.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for slot in busy:
            try:
                slot.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                _signal_group(slot.proc.pid, signal.SIGKILL)
                slot.proc.wait()
        for slot in busy:  # a run that finished while being stopped has its result; the others are cancelled
            self._ended(slot, stopped=reason)
        cancelled = [rid for task in self.queue for rid in task.run_ids]
        self.queue.clear()
        if self._record([{"event": "cancelled", "run_id": rid, "executor": "local", "reason": reason, "at": now()}
                         for rid in cancelled], last=True):
            raise disk_full_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), self.folder.jobs_file)

    def _note(self, slot: Slot, run_id: str, line: str) -> None:
        """A line of the scheduler's in a run's log; one a full disk refuses is tried again at the end."""
        log = slot.logs[run_id]
        try:
            if run_id == slot.task.run_ids[0]:
                slot.log.write(line.encode())
            else:
                with open(log, "ab") as f:
                    f.write(line.encode())
        except OSError:
            self.notes.append((str(log), line))


def _empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return True


def _close(log: IO[bytes] | None) -> None:
    with suppress(OSError):
        log.close()


def _signal(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def _signal_group(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pid, sig)


def queued_records(todo: list[RunState], prov: dict[str, Any]) -> list[dict[str, Any]]:
    """The records that claim runs for this process's scheduler (appended under the sweep's lock)."""
    me = {"pid": os.getpid(), "start": process_start(os.getpid()), "host": socket.gethostname()}
    return [{"event": "queued", "run_id": s.run_id, "executor": "local", "job_id": None, "scheduler": me,
             "submitted_at": now(), **prov} for s in todo]


class Local(Backend):
    name = "local"
    launcher = LocalLauncher

    def observe(self, records: list[dict[str, Any]]) -> Judge:
        return _judge  # each record names its own process: nothing to ask in advance

    def cancel(self, folder: SweepFolder, active: list[RunState], records: list[dict[str, Any]]) -> list[RunState]:
        """SIGTERM each run's scheduler, which records its runs cancelled itself; a run whose scheduler is
        gone is stopped (its process group) and returned, to be recorded here."""
        schedulers = {r["run_id"]: r["scheduler"] for r in records if r["event"] == "queued"}
        started = {r["run_id"]: r for r in records if r["event"] == "started"}
        here = []
        for s in active:
            sched = schedulers.get(s.run_id)
            if sched and process_alive(sched):
                _signal(sched["pid"], signal.SIGTERM)
                continue
            if s.run_id in started and process_alive(started[s.run_id]):
                _signal_group(started[s.run_id]["pid"], signal.SIGTERM)
            here.append(s)
        return here


def _judge(s: RunState, rec: dict[str, Any], hb: dict[str, Any] | None) -> None:
    event = rec["event"]
    if event == "queued":
        alive = process_alive(rec["scheduler"])
        if alive is None:
            alive = fresh(hb)
        s.state, s.active = "pending", bool(alive)
        s.reason = "queued" if alive else "its scheduler exited before starting it"
    elif event == "started":
        alive = process_alive(rec)
        if alive is None:
            alive = fresh(hb)
        if alive and rec.get("position", 0) > 0 and hb is None:  # a packed run its task has not reached
            s.state, s.reason, s.active = "pending", "packed: waits for the runs before it in its task", True
        elif alive:
            s.state, s.reason, s.active = "running", "", True
        else:
            s.state, s.reason = "failed", f"process {rec['pid']} died without a result"
    elif event == "ended":
        s.state, s.reason = "failed", exit_reason(rec.get("returncode"))
