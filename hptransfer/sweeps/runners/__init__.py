"""Runners: what one run executes in its run folder (docs/design.md#runners).

A runner takes a run folder holding the frozen config.yaml and returns the run's result record,
which it has written to result.json (the contract of docs/design.md#resultjson): the built-in GPT
trainer, or the user's own code (a callable or a command) when the frozen config has a `run:` block.
Runners and backends never import each other: the job pairs them.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hptransfer.sweeps.runners import builtin

Runner = Callable[[Path], dict[str, Any]]


def runner_for(run_dir: Path) -> Runner:
    """The runner of this run folder: the user's code when its config.yaml has a top-level `run:` block."""
    with open(run_dir / "config.yaml") as f:
        if any(line.startswith("run:") for line in f):
            from hptransfer.sweeps.runners import user  # here: OmegaConf and subprocess only for the user's code

            return user.run
    return builtin.run
