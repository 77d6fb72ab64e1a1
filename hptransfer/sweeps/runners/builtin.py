"""The built-in runner: train hptransfer's GPT on the frozen config (train/loop.py)."""

from pathlib import Path
from typing import Any


def run(run_dir: Path) -> dict[str, Any]:
    """Train the run folder's config.yaml; the result record (also in result.json). Never raises for a bad run."""
    from hptransfer.train.loop import train_folder  # here: torch loads in the job, not where runners are listed

    return train_folder(run_dir)


def run_group(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """Train the run folders (of one sweep) as fused groups of the runs that can share one batched model."""
    from hptransfer.train.loop import train_group  # here: torch loads in the job, not where runners are listed

    return train_group(run_dirs, sweep=run_dirs[0].parent.name)
