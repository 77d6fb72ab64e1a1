"""What one job executes: the run folder's runner, then the run indexed in its sweep.

Local runs start `python -m hptransfer.sweeps.job RUN_DIR` (the scheduler owns its log file), or a task of
several units (sweeps/tasks.py) `python -m hptransfer.sweeps.job '[{"runs": [DIR, ...], "log": PATH}, ...]'`;
SLURM array tasks call `execute(run_dir)` or `execute_unit` through the SLURM backend's `RunJob`, every task of
a distributed run's job too (each is a rank: the runner trains on all of them, rank 0 indexes the result).
A diverged or failed run is a result in result.json, never an exception: nothing retries it. A unit of
several runs is a fused group (train/fused.py): the built-in runner trains them as one batched model.
"""

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from hptransfer.files import DISK_FULL_EXIT, disk_full
from hptransfer.sweeps.runners import builtin, runner_for


def execute(run_dir: Path) -> str:
    """Run the folder's runner and return the run's status (completed, diverged or failed)."""
    run_dir = Path(run_dir)
    _prepare(run_dir)
    result = runner_for(run_dir)(run_dir)
    if os.environ.get("RANK", "0") != "0":  # a task of a distributed run (torch's RANK): rank 0 indexes it
        return result["status"]
    _index([run_dir], [result])
    return result["status"]


def _prepare(run_dir: Path) -> None:
    """Before a run: the task's threads; and a line in the attempt's log when the run resumes from a checkpoint."""
    threads = os.environ.get("SLURM_CPUS_PER_TASK")
    if threads:  # torch would otherwise start one thread per core of the whole node
        import torch  # here: only a SLURM task sets its threads, and torch is the runner's import

        torch.set_num_threads(int(threads))
    # Training resumes from checkpoint.pt, or a distributed run's sharded checkpoint/: say so in this attempt's log.
    if ckpt := next((p for p in (run_dir / "checkpoint.pt", run_dir / "checkpoint") if p.exists()), None):
        try:
            print(f"hpt: resuming from {ckpt}", flush=True)
        except OSError as err:  # the log's disk is full: the job stops as the trainer does on a full disk
            if disk_full(err):
                raise SystemExit(DISK_FULL_EXIT) from None
            raise


def execute_unit(run_dirs: list[Path]) -> list[str]:
    """One run (`execute`), or a fused group of the built-in trainer's runs: their statuses, in order."""
    run_dirs = [Path(d) for d in run_dirs]
    if len(run_dirs) == 1 or any(runner_for(d) is not builtin.run for d in run_dirs):  # only the GPT fuses
        return [execute(d) for d in run_dirs]
    for d in run_dirs:
        _prepare(d)
    print(f"hpt: training {len(run_dirs)} runs as one fused group: {', '.join(d.name for d in run_dirs)}", flush=True)
    results = builtin.run_group(run_dirs)
    _index(run_dirs, results)
    return [r["status"] for r in results]


def execute_task(units: list[list[Path]], before: Callable[[list[Path]], None] | None = None) -> int:
    """A task's units one after another, `before(unit)` first (where its output goes); a unit that raises is
    reported and the next one runs (its runs without a result are seen as failed, or, never started, as
    cancelled by the scheduler). Returns how many runs failed; a full disk stops the task (DISK_FULL_EXIT)."""
    failed = 0
    for i, unit in enumerate(units):
        if before is not None:
            before(unit)
        if len(units) > 1:  # the line that says, in the run's log, that its task reached it
            print(f"hpt: {'run' if len(unit) == 1 else 'fused group'} {i + 1} of {len(units)} of this task: "
                  f"{', '.join(Path(d).name for d in unit)}", flush=True)
        try:
            failed += sum(status == "failed" for status in execute_unit(unit))
        except Exception:  # noqa: BLE001 - one unit's crash must not take the task's other runs with it
            traceback.print_exc()
            failed += len(unit)
    return failed


def _index(run_dirs: list[Path], results: list[dict]) -> None:
    """Index the finished runs in their sweep, so `hpt status` need not open their folders."""
    # After the runs: the store imports Arrow, which a job needs only now.
    from hptransfer.sweeps.store import SweepFolder, attempt_count, index_entry, result_key

    entries = [index_entry(result_key(d), r, attempt_count(d)) for d, r in zip(run_dirs, results, strict=True)]
    SweepFolder(run_dirs[0].parent).index_results([e for e in entries if e])


def _to_log(path: str) -> None:
    """This process's stdout and stderr from now on: appended to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.exit("usage: python -m hptransfer.sweeps.job RUN_DIR | '[{\"runs\": [RUN_DIR, ...], \"log\": PATH}, ...]'")
    if not argv[0].startswith("["):
        return 1 if execute(Path(argv[0])) == "failed" else 0
    spec = json.loads(argv[0])
    logs = {tuple(u["runs"]): u.get("log") for u in spec}

    def before(unit: list[Path]) -> None:
        if log := logs[tuple(str(d) for d in unit)]:
            _to_log(log)

    return 1 if execute_task([[Path(d) for d in u["runs"]] for u in spec], before) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
