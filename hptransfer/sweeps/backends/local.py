"""The local backend: runs as processes on this machine, N at a time, and how to tell they are alive.

`LocalScheduler` runs `python -m hptransfer.sweeps.job RUN_DIR` in N slots (one GPU each when
there are GPUs, else an equal share of the cores), each in its own session so Ctrl-C reaches only
the scheduler, which then stops its runs and records them cancelled; the next `hpt sweep` resumes
them. A local job is alive while its process is (pid and start time, so a reused pid does not count).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hptransfer.sweeps.backends.base import Backend, Judge, fresh, now
from hptransfer.sweeps.store import RunState, SweepFolder, new_attempt, read_result


@dataclass
class LocalLauncher:
    """config/groups/launcher/local.yaml"""

    name: str = "local"
    jobs: int | None = None  # runs at once; None: one per GPU, else one per CPU core


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
    return f"exited with code {code} without a result"


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
    run_id: str | None = None
    proc: subprocess.Popen | None = None
    log: IO[bytes] | None = None
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
                 on_event: Callable[[str, RunState | None, Progress], None]):
        self.folder = folder
        self.queue = list(runs)
        self.slots = [Slot(gpus[i % len(gpus)] if gpus else None) for i in range(jobs)]
        self.threads = max(1, cpu_count() // jobs)
        self.progress = Progress(total=len(runs))
        self.by_id = {s.run_id: s for s in runs}
        self.on_event = on_event
        self.stop_reason: str | None = None

    def schedule(self) -> Progress:
        """Schedule until every run has ended; Ctrl-C or SIGTERM stops the runs and records them cancelled.

        Signals only set `stop_reason`; the loop acts on it, so no run is ever half-started or half-recorded.
        """
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while (self.queue or any(slot.proc for slot in self.slots)) and self.stop_reason is None:
                for slot in self.slots:
                    if slot.proc is not None and slot.proc.poll() is not None:
                        self._ended(slot)
                    if slot.proc is None and self.queue:
                        self._start(slot, self.queue.pop(0))
                self.on_event("tick", None, self.progress)
                time.sleep(0.2)
            if self.stop_reason is not None:
                self._stop(self.stop_reason)
                raise KeyboardInterrupt
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.progress

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_reason = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "stopped (SIGTERM, e.g. hpt cancel)"

    def _start(self, slot: Slot, s: RunState) -> None:
        run_dir = self.folder.run_dir(s.run_id)
        attempt = new_attempt(run_dir)
        (run_dir / "logs").mkdir(exist_ok=True)
        slot.log = open(run_dir / "logs" / f"attempt-{attempt}.log", "ab")  # noqa: SIM115 (closed in _ended)
        env = {"OMP_NUM_THREADS": str(self.threads), **os.environ}  # an explicit OMP_NUM_THREADS wins
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.gpu
        # Its own session: the terminal's Ctrl-C reaches only the scheduler, which stops runs itself.
        slot.proc = subprocess.Popen([sys.executable, "-m", "hptransfer.sweeps.job", str(run_dir)], stdout=slot.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        slot.run_id, slot.started = s.run_id, time.time()
        pid = slot.proc.pid
        self.folder.append_jobs([{"event": "started", "run_id": s.run_id, "executor": "local",
                                  "job_id": f"local-{pid}", "pid": pid, "start": process_start(pid),
                                  "host": socket.gethostname(), "attempt": attempt, "gpu": slot.gpu,
                                  "started_at": now()}])
        self.progress.running[s.run_id] = slot.started
        s.job_id, s.attempts = f"local-{pid}", attempt
        self.on_event("started", s, self.progress)

    def _ended(self, slot: Slot) -> None:
        code = slot.proc.returncode
        s = self.by_id[slot.run_id]
        result, why = read_result(self.folder.run_dir(slot.run_id))
        if result is None:  # say in the log itself why it stopped: `hpt status` shows its tail
            slot.log.write(f"[hpt] attempt {s.attempts} {why or exit_reason(code)}\n".encode())
        slot.log.close()
        self.folder.append_jobs([{"event": "ended", "run_id": slot.run_id, "executor": "local",
                                  "job_id": s.job_id, "returncode": code, "ended_at": now()}])
        s.state, s.result = (result["status"], result) if result else ("failed", None)
        s.reason = why or ("" if result else exit_reason(code))
        self.progress.done[s.state] += 1
        self.progress.durations.append(time.time() - slot.started)
        self.progress.running.pop(slot.run_id, None)
        slot.proc, slot.run_id, slot.log = None, None, None
        self.on_event("ended", s, self.progress)

    def _stop(self, reason: str) -> None:
        """Terminate running runs (SIGTERM, then SIGKILL), record them and the queued ones cancelled."""
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
        cancelled = []
        for slot in busy:
            if read_result(self.folder.run_dir(slot.run_id))[0] is not None:
                self._ended(slot)  # it finished while being stopped: a result, not a cancellation
                continue
            slot.log.write(f"[hpt] attempt cancelled: {reason}\n".encode())
            slot.log.close()
            cancelled.append(slot.run_id)
        cancelled += [s.run_id for s in self.queue]
        self.folder.append_jobs([{"event": "cancelled", "run_id": rid, "executor": "local", "reason": reason,
                                  "at": now()} for rid in cancelled])
        self.queue.clear()


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
        if alive:
            s.state, s.reason, s.active = "running", "", True
        else:
            s.state, s.reason = "failed", f"process {rec['pid']} died without a result"
    elif event == "ended":
        s.state, s.reason = "failed", exit_reason(rec.get("returncode"))
