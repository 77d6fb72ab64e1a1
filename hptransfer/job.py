"""What one job runs: train the frozen config of one run folder.

Local runs start `python -m hptransfer.job RUN_DIR` (the scheduler owns its log file); SLURM
array tasks call `RunJob()(run_dir)` through submitit, which requeues the task on timeout or
preemption (`Checkpointable`): training then resumes from the folder's checkpoint.pt.
A diverged or failed run is a result in result.json, never an exception: nothing retries it.
"""

import os
import sys
from pathlib import Path

import submitit


def run(run_dir: Path) -> str:
    """Train the run folder and return its status (completed, diverged or failed)."""
    threads = os.environ.get("SLURM_CPUS_PER_TASK")
    if threads:  # torch would otherwise start one thread per core of the whole node
        import torch

        torch.set_num_threads(int(threads))
    from hptransfer.train.loop import run_folder

    run_dir = Path(run_dir)
    if (run_dir / "checkpoint.pt").exists():  # training resumes from it; say so in this attempt's log
        print(f"hpt: resuming from {run_dir / 'checkpoint.pt'}", flush=True)
    result = run_folder(run_dir)
    from hptransfer.store import SweepFolder, attempt_count, index_entry, result_key  # after: Arrow, not on start-up

    # Index the finished run in its sweep, so `hpt status` need not open its folder.
    entry = index_entry(result_key(run_dir), result, attempt_count(run_dir))  # this job's own result.json
    SweepFolder(run_dir.parent).index_results([entry] if entry else [])
    return result["status"]


class RunJob(submitit.helpers.Checkpointable):
    """A SLURM array task: link submitit's logs into the run folder as this attempt's, then train.

    `checkpoint` (inherited) resubmits the same call: the requeued task trains the same folder.
    """

    def __call__(self, run_dir: str) -> str:
        from hptransfer.store import new_attempt

        folder = Path(run_dir)
        paths = submitit.JobEnvironment().paths
        attempt = new_attempt(folder)
        (folder / "logs").mkdir(exist_ok=True)
        for target, suffix in ((paths.stdout, "out"), (paths.stderr, "err")):
            link = folder / "logs" / f"attempt-{attempt}.{suffix}"
            link.symlink_to(os.path.relpath(target.resolve(), link.parent))  # relative: the sweep folder can move
        return run(folder)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m hptransfer.job RUN_DIR")
    sys.exit(1 if run(Path(sys.argv[1])) == "failed" else 0)
