"""Launch a sweep's runs: locally with a slot scheduler, or on SLURM as submitit job arrays.

Both start from `prepare`: under the sweep's lock, save the folder (frozen configs), find the runs
of this grid that have no result and no live job, and claim them with a job record, so a second
`hpt sweep` on the same sweep never launches a run twice.

Local: `LocalScheduler` runs `python -m hptransfer.job RUN_DIR` in N slots (one GPU each when there
are GPUs, else an equal share of the cores), each in its own session so Ctrl-C reaches only the
scheduler, which then stops its runs and records them cancelled; the next `hpt sweep` resumes them.
SLURM: arrays of `job.RunJob` split at the cluster's MaxArraySize; submitit requeues a task on
timeout or preemption and training resumes from its checkpoint. Submission returns at once.
"""

import io
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hptransfer.errors import HptError
from hptransfer.provenance import git_state
from hptransfer.status import RunState, exit_reason, is_launchable, process_alive, process_start, run_states
from hptransfer.store import SweepFolder, new_attempt, read_result, set_aside_result
from hptransfer.sweep import Run, SweepSpec


@dataclass
class LocalLauncher:
    """conf/launcher/local.yaml"""

    name: str = "local"
    jobs: int | None = None  # runs at once; None: one per GPU, else one per CPU core


@dataclass
class SlurmLauncher:
    """conf/launcher/slurm.yaml: one array task per run."""

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


LAUNCHERS = {"local": LocalLauncher, "slurm": SlurmLauncher}


def launcher_config(launcher: dict[str, Any]) -> LocalLauncher | SlurmLauncher:
    """The validated launcher block (unknown keys and wrong types are errors naming the key)."""
    kind = LAUNCHERS.get(launcher.get("name", "local"))
    if kind is None:
        raise HptError(f"config key 'launcher.name': '{launcher.get('name')}' is not one of {', '.join(LAUNCHERS)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(kind), launcher))
    except OmegaConfBaseException as err:
        raise HptError(f"config key 'launcher.{getattr(err, 'full_key', '')}': {str(err).splitlines()[0]}") from None


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def config_header(prov: dict[str, Any]) -> str:
    """The first line of a frozen config.yaml: when, and from which code."""
    commit = prov["git_commit"] or "none"
    dirty = " (dirty working tree)" if prov["git_dirty"] else ""
    return f"# frozen by hpt sweep at {now()}; hptransfer git commit {commit}{dirty}\n"


def prepare(folder: SweepFolder, spec: SweepSpec, runs: list[Run]) -> int:
    """Write the sweep folder (under its lock); returns how many runs are new to it."""
    with folder.lock():
        return folder.save(spec, runs, header=config_header(git_state()))


def launchable(folder: SweepFolder, spec: SweepSpec, runs: list[Run], retry_failed: bool) -> list[str]:
    """What `hpt sweep` would launch now (for --dry-run: reads the folder, writes nothing)."""
    folder.check(spec)
    known = {s.run_id: s for s in run_states(folder)} if folder.path.exists() else {}
    return [r.run_id for r in runs if r.run_id not in known or is_launchable(known[r.run_id], retry_failed)]


def largest_first(runs: list[Run]) -> list[str]:
    """Run ids, most compute first: a sweep on N slots ends sooner when its long runs do not start last."""
    from hptransfer.sweep import estimate_flops

    return [r.run_id for r in sorted(runs, key=lambda r: -estimate_flops(r.config))]


@contextmanager
def claiming(folder: SweepFolder, run_ids: list[str], retry_failed: bool) -> Iterator[list[RunState]]:
    """Hold the sweep's lock and yield the runs to launch now, in `run_ids` order.

    The caller launches them and appends their job records before the block ends: a second
    `hpt sweep` then sees them held by a live job. A failed run's old result moves to logs/
    (a folder with a result is never trained again).
    """
    with folder.lock():
        states = {s.run_id: s for s in run_states(folder)}
        todo = [states[r] for r in run_ids if is_launchable(states[r], retry_failed)]
        for s in todo:
            if s.state == "failed":
                set_aside_result(folder.run_dir(s.run_id))
        yield todo


# ---- local -------------------------------------------------------------------------------------------


def local_gpus() -> list[str]:
    """GPU ids to hand out, one per slot (as CUDA_VISIBLE_DEVICES names them)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        import torch

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

    def run(self) -> Progress:
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
        slot.proc = subprocess.Popen([sys.executable, "-m", "hptransfer.job", str(run_dir)], stdout=slot.log,
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


def run_local(folder: SweepFolder, run_ids: list[str], *, jobs: int, retry_failed: bool,
              on_event: Callable[[str, RunState | None, Progress], None]) -> Progress:
    """Claim this grid's launchable runs for this process and run them `jobs` at a time, in `run_ids` order."""
    me = {"pid": os.getpid(), "start": process_start(os.getpid()), "host": socket.gethostname()}
    prov = git_state()
    with claiming(folder, run_ids, retry_failed) as todo:
        folder.append_jobs([{"event": "queued", "run_id": s.run_id, "executor": "local", "job_id": None,
                             "scheduler": me, "submitted_at": now(), **prov} for s in todo])
    return LocalScheduler(folder, todo, jobs, local_gpus(), on_event).run()


def detach_local(folder: SweepFolder, run_ids: list[str], *, jobs: int, retry_failed: bool) -> int:
    """Start the local scheduler as a detached process (its own session) and return its pid."""
    log = open(folder.path / "scheduler.log", "ab")  # noqa: SIM115 (the child owns it)
    cmd = [sys.executable, "-m", "hptransfer.launch", str(folder.path), "--jobs", str(jobs)]
    cmd += ["--retry-failed"] if retry_failed else []
    proc = subprocess.Popen([*cmd, *run_ids], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    return proc.pid


# ---- SLURM -------------------------------------------------------------------------------------------


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
    """The sbatch script of the first array, as submitit writes it (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([sys.executable, "-u -m submitit.core._submit", str(folder)])
    return _make_sbatch_string(command=command, folder=folder, map_count=min(n_runs, array_size(launcher)),
                               **sbatch_parameters(launcher, name))


def submit_slurm(folder: SweepFolder, run_ids: list[str], launcher: SlurmLauncher, *,
                 retry_failed: bool) -> list[dict[str, Any]]:
    """Submit this grid's launchable runs as job arrays; returns their job records."""
    import submitit

    from hptransfer.job import RunJob

    prov = git_state()
    records: list[dict[str, Any]] = []
    with claiming(folder, run_ids, retry_failed) as todo:
        if not todo:
            return []
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
            batch = [{"event": "submitted", "run_id": s.run_id, "executor": "slurm", "job_id": job.job_id,
                      "folder": str(sub), "submitted_at": now(), **prov} for s, job in zip(part, jobs, strict=True)]
            folder.append_jobs(batch)  # recorded per array: a later failure loses no submitted job
            records += batch
    return records


def cancel(folder: SweepFolder, wait_s: float = 30) -> int:
    """Cancel the sweep's pending and running runs; returns how many.

    SLURM jobs: one scancel, recorded cancelled. Local runs: their scheduler gets SIGTERM and records
    its runs cancelled itself; a run whose scheduler is gone is stopped and recorded here.
    """
    active = [s for s in run_states(folder) if s.active]
    slurm = [s for s in active if s.executor == "slurm"]
    if slurm:
        subprocess.run(["scancel", *sorted({s.job_id for s in slurm})], check=False, timeout=60)
    records = folder.job_records()
    schedulers = {r["run_id"]: r["scheduler"] for r in records if r["event"] == "queued"}
    started = {r["run_id"]: r for r in records if r["event"] == "started"}
    stopped_here = list(slurm)
    for s in active:
        if s.executor != "local":
            continue
        sched = schedulers.get(s.run_id)
        if sched and process_alive(sched):
            _signal(sched["pid"], signal.SIGTERM)
        elif s.run_id in started and process_alive(started[s.run_id]):
            _signal_group(started[s.run_id]["pid"], signal.SIGTERM)
            stopped_here.append(s)
        else:
            stopped_here.append(s)
    folder.append_jobs([{"event": "cancelled", "run_id": s.run_id, "executor": s.executor, "job_id": s.job_id,
                         "reason": "cancelled by hpt cancel", "at": now()} for s in stopped_here])
    deadline = time.time() + wait_s  # local schedulers record their own runs: wait until they have
    while time.time() < deadline and any(s.active and s.executor == "local" for s in run_states(folder)):
        time.sleep(0.5)
    return len(active)


def main(argv: list[str]) -> int:
    """`python -m hptransfer.launch SWEEP_DIR --jobs N [--retry-failed] RUN_ID...`: the detached scheduler."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hptransfer.launch")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument("run_ids", nargs="+")
    args = parser.parse_args(argv)

    def log(event: str, s: RunState | None, p: Progress) -> None:
        if event == "ended":
            print(f"{now()} {s.state:9} {s.run_id} {s.reason}", flush=True)

    folder = SweepFolder(args.sweep_dir)
    print(f"{now()} scheduler {os.getpid()} for {folder.path}", flush=True)
    try:
        p = run_local(folder, args.run_ids, jobs=args.jobs, retry_failed=args.retry_failed, on_event=log)
    except KeyboardInterrupt:
        print(f"{now()} stopped: running runs recorded cancelled", flush=True)
        return 130
    print(f"{now()} done: {p.done}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
