"""Runners: what one run executes in its run folder (docs/design.md#runners).

A runner takes a run folder holding the frozen config.yaml and returns the run's result record,
which it has written to result.json (the contract of docs/design.md#resultjson). Today every run
is the built-in GPT trainer; a user's Python callable or command will be runners beside it, chosen
by the frozen config. Runners and backends never import each other: the job pairs them.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hptransfer.sweeps.runners import builtin

Runner = Callable[[Path], dict[str, Any]]


def runner_for(run_dir: Path) -> Runner:
    """The runner of this run folder: the built-in trainer (the only one so far)."""
    return builtin.run
