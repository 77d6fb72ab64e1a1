"""Launch a sweep's runs: claim them under the sweep's lock, hand them to a backend.

Every launch starts from `prepare` (write the sweep folder: frozen configs) and `claiming`: under
the sweep's lock, find the runs of this grid that have no result and no live job, and claim them
with a job record before the lock is released, so a second `hpt sweep` on the same sweep never
launches a run twice. The backends (sweeps/backends) then run them: locally in N slots, in the
foreground or detached (`python -m hptransfer.sweeps.launch`), or on SLURM as job arrays.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from hptransfer.config import user
from hptransfer.config.derived import run_flops
from hptransfer.config.schema import check_processes, unknown_key_message
from hptransfer.errors import HptError
from hptransfer.provenance import git_state
from hptransfer.sweeps.backends import backend
from hptransfer.sweeps.backends.base import now
from hptransfer.sweeps.backends.local import LocalScheduler, Progress, local_gpus, queued_records, reserved_space
from hptransfer.sweeps.plan import Run, SweepSpec
from hptransfer.sweeps.state import is_launchable, run_states
from hptransfer.sweeps.store import RunState, SweepFolder, set_aside_result
from hptransfer.sweeps.tasks import ONE_PER_JOB, Packing, Task, plan_tasks

if TYPE_CHECKING:
    from hptransfer.sweeps.backends.slurm import SlurmLauncher


def launcher_config(launcher: dict[str, Any]) -> Any:
    """The validated launcher block as its backend's dataclass (unknown keys and wrong types name the key)."""
    kind = backend(launcher.get("name", "local")).launcher
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(kind), launcher))
    except OmegaConfBaseException as err:
        key = f"launcher.{getattr(err, 'full_key', '')}"
        if isinstance(err, ConfigKeyError):  # +launcher.partiton=x: the nearest key of this launcher
            raise HptError(unknown_key_message(key, [f"launcher.{f}" for f in kind.__dataclass_fields__])) from None
        raise HptError(f"config key '{key}': {str(err).splitlines()[0]}") from None


def check_placement(spec: SweepSpec, runs: list[Run], launcher: Any) -> None:
    """Before anything is written: a launcher that gives each run several processes (launcher.nodes x
    launcher.tasks_per_node) needs runs that can train on them (train.parallel, an even split of the batch).
    The user's own code places itself."""
    processes = getattr(launcher, "nodes", 1) * getattr(launcher, "tasks_per_node", 1)
    if processes > 1 and not spec.is_user:
        for r in runs:
            check_processes(r.config["train"], processes)


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
    folder.same_definition(spec)
    known = {s.run_id: s for s in run_states(folder)} if folder.path.exists() else {}
    return [r.run_id for r in runs if r.run_id not in known or is_launchable(known[r.run_id], retry_failed)]


def failed_runs(folder: SweepFolder, run_ids: list[str]) -> int:
    """How many runs of this grid are failed now (after a launch: `hpt sweep` exits 1 while any are)."""
    ids = set(run_ids)
    return sum(s.state == "failed" for s in run_states(folder) if s.run_id in ids)


def largest_first(runs: list[Run]) -> list[str]:
    """Run ids, most compute first: a sweep on N slots ends sooner when its long runs do not start last.
    The user's code has no FLOPs formula here: its runs go in the plan's order."""
    if any(user.is_user_config(r.config) for r in runs):
        return [r.run_id for r in runs]
    return [r.run_id for r in sorted(runs, key=lambda r: -run_flops(r.config))]


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


def packing_of(launcher: Any, jobs: int | None = None) -> Packing:
    """How the launcher's runs share jobs (sweeps/tasks.py): launcher.fuse (auto: within `fuse_budget`) and
    launcher.runs_per_task; `jobs`: the local slots, which auto fusion keeps busy."""
    auto = launcher.fuse == "auto"
    return Packing(None if auto else launcher.fuse, launcher.runs_per_task,
                   fuse_budget(launcher, jobs or 1) if auto else None, jobs if launcher.name == "local" else None)


def fuse_budget(launcher: Any, jobs: int) -> int:
    """Bytes a fused group may take: launcher.fuse_mem_gb; else on SLURM 0.8 x launcher.mem_gb (CPU tasks: GPU
    tasks must say, SlurmLauncher checks); locally 0.8 x the first GPU's memory, or half the free memory per job."""
    if launcher.fuse_mem_gb is not None:
        return int(launcher.fuse_mem_gb * 2**30)
    if launcher.name == "slurm":
        return int(0.8 * launcher.mem_gb * 2**30)
    if local_gpus():
        import torch  # here: only to size a local GPU, when fusion is automatic

        return int(0.8 * torch.cuda.get_device_properties(0).total_memory)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2 // jobs


def tasks_for(folder: SweepFolder, run_ids: list[str], packing: Packing,
              configs: dict[str, dict[str, Any]] | None = None) -> list[Task]:
    """The tasks of these runs (in order); their configs from `configs` or the sweep's manifest."""
    if not packing.trivial and configs is None:
        configs = {r["run_id"]: json.loads(r["config"]) for r in folder.manifest()}
    return plan_tasks(run_ids, configs or {}, packing)


def describe_tasks(tasks: list[Task]) -> str | None:
    """One line on how runs share jobs (None: one run per job)."""
    fused = [u for t in tasks for u in t.units if len(u) > 1]
    packed = [t for t in tasks if len(t.units) > 1]
    if not fused and not packed:
        return None
    runs = sum(len(t.run_ids) for t in tasks)
    parts = [f"{sum(len(u) for u in fused)} of {runs} runs fused into {len(fused)} batched models "
             f"({min(map(len, fused))}-{max(map(len, fused))} runs each)"] if fused else []
    parts += [f"{len(tasks)} jobs of up to {max(len(t.units) for t in tasks)} runs or groups each"] if packed else []
    return "; ".join(parts)


def run_local(folder: SweepFolder, run_ids: list[str], *, jobs: int, retry_failed: bool,
              on_event: Callable[[str, RunState | None, Progress], None], packing: Packing = ONE_PER_JOB) -> Progress:
    """Claim this grid's launchable runs for this process and run them `jobs` at a time, in `run_ids` order,
    in tasks as `packing` says.

    Space for the runs' last records is set aside before any is claimed (a full disk: DiskFull, nothing claimed).
    """
    with reserved_space(folder, len(run_ids)) as reserve:
        with claiming(folder, run_ids, retry_failed) as todo:
            folder.append_jobs(queued_records(todo, git_state()))
        tasks = tasks_for(folder, [s.run_id for s in todo], packing)
        return LocalScheduler(folder, todo, jobs, local_gpus(), on_event, reserve, tasks).schedule()


def detach_local(folder: SweepFolder, run_ids: list[str], *, jobs: int, retry_failed: bool,
                 packing: Packing = ONE_PER_JOB) -> int:
    """Start the local scheduler as a detached process (its own session) and return its pid."""
    log = open(folder.path / "scheduler.log", "ab")  # noqa: SIM115 (the child owns it)
    cmd = [sys.executable, "-m", "hptransfer.sweeps.launch", str(folder.path), "--jobs", str(jobs)]
    cmd += ["--retry-failed"] if retry_failed else []
    cmd += [] if packing.trivial else ["--packing", json.dumps(packing.__dict__)]
    proc = subprocess.Popen([*cmd, *run_ids], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    return proc.pid


def submit_slurm(folder: SweepFolder, run_ids: list[str], launcher: "SlurmLauncher", *,
                 retry_failed: bool) -> list[dict[str, Any]]:
    """Submit this grid's launchable runs as SLURM job arrays; returns their job records."""
    from hptransfer.sweeps.backends.slurm import submit  # here: a local sweep never imports submitit

    with claiming(folder, run_ids, retry_failed) as todo:
        return submit(folder, todo, launcher, git_state(), tasks_for(folder, [s.run_id for s in todo],
                                                                     packing_of(launcher)))


def cancel(folder: SweepFolder, wait_s: float = 30) -> int:
    """Cancel the sweep's pending and running runs; returns how many.

    Each backend stops its own jobs; what it cannot leave to a scheduler of its own is recorded
    cancelled here. Local schedulers record their own runs: wait until they have.
    """
    active = [s for s in run_states(folder) if s.active]
    records = folder.job_records()
    by_backend: dict[str, list[RunState]] = {}
    for s in active:
        by_backend.setdefault(s.executor or "local", []).append(s)
    here = [s for name, runs in by_backend.items() for s in backend(name).cancel(folder, runs, records)]
    folder.append_jobs([{"event": "cancelled", "run_id": s.run_id, "executor": s.executor, "job_id": s.job_id,
                         "reason": "cancelled by hpt cancel", "at": now()} for s in here])
    deadline = time.time() + wait_s
    while time.time() < deadline and any(s.active and s.executor == "local" for s in run_states(folder)):
        time.sleep(0.5)
    return len(active)


def main(argv: list[str]) -> int:
    """`python -m hptransfer.sweeps.launch SWEEP_DIR --jobs N [--retry-failed] RUN_ID...`: the detached scheduler."""
    parser = argparse.ArgumentParser(prog="python -m hptransfer.sweeps.launch")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument("--packing", type=lambda v: Packing(**json.loads(v)), default=ONE_PER_JOB)
    parser.add_argument("run_ids", nargs="+")
    args = parser.parse_args(argv)

    def log(event: str, s: RunState | None, p: Progress) -> None:
        if event == "ended":
            print(f"{now()} {s.state:9} {s.run_id} {s.reason}", flush=True)

    folder = SweepFolder(args.sweep_dir)
    print(f"{now()} scheduler {os.getpid()} for {folder.path}", flush=True)
    try:
        p = run_local(folder, args.run_ids, jobs=args.jobs, retry_failed=args.retry_failed, on_event=log,
                      packing=args.packing)
    except KeyboardInterrupt:
        print(f"{now()} stopped: running runs recorded cancelled", flush=True)
        return 130
    except HptError as err:  # a full disk: one line, as `hpt sweep` in the foreground says it
        print(f"{now()} hpt: error: {err}", flush=True)
        return err.exit_code
    print(f"{now()} done: {p.done}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
