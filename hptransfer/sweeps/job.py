"""What one job executes: the run folder's runner, then the run indexed in its sweep.

Local runs start `python -m hptransfer.sweeps.job RUN_DIR` (the scheduler owns its log file);
SLURM array tasks call `execute(run_dir)` through the SLURM backend's `RunJob`, every task of a
distributed run's job too (each is a rank: the runner trains on all of them, rank 0 indexes the
result). A diverged or failed run is a result in result.json, never an exception: nothing retries it.
"""

import os
import sys
from pathlib import Path

from hptransfer.files import DISK_FULL_EXIT, disk_full
from hptransfer.sweeps.runners import runner_for


def execute(run_dir: Path) -> str:
    """Run the folder's runner and return the run's status (completed, diverged or failed)."""
    threads = os.environ.get("SLURM_CPUS_PER_TASK")
    if threads:  # torch would otherwise start one thread per core of the whole node
        import torch  # here: only a SLURM task sets its threads, and torch is the runner's import

        torch.set_num_threads(int(threads))
    run_dir = Path(run_dir)
    # Training resumes from checkpoint.pt, or a distributed run's sharded checkpoint/: say so in this attempt's log.
    if ckpt := next((p for p in (run_dir / "checkpoint.pt", run_dir / "checkpoint") if p.exists()), None):
        try:
            print(f"hpt: resuming from {ckpt}", flush=True)
        except OSError as err:  # the log's disk is full: the job stops as the trainer does on a full disk
            if disk_full(err):
                raise SystemExit(DISK_FULL_EXIT) from None
            raise
    result = runner_for(run_dir)(run_dir)
    if os.environ.get("RANK", "0") != "0":  # a task of a distributed run (torch's RANK): rank 0 indexes it
        return result["status"]
    # After the run: the store imports Arrow, which a job needs only now.
    from hptransfer.sweeps.store import SweepFolder, attempt_count, index_entry, result_key

    # Index the finished run in its sweep, so `hpt status` need not open its folder.
    entry = index_entry(result_key(run_dir), result, attempt_count(run_dir))  # this job's own result.json
    SweepFolder(run_dir.parent).index_results([entry] if entry else [])
    return result["status"]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m hptransfer.sweeps.job RUN_DIR")
    sys.exit(1 if execute(Path(sys.argv[1])) == "failed" else 0)
