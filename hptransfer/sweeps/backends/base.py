"""The backend interface: where runs execute. One module per backend (local.py, slurm.py).

A backend brings its launcher block (a dataclass: the `launcher` config group, `launcher.name`
picks the backend), judges the job records it wrote (is the job alive, and if not, why), and
cancels jobs. Launching is each backend's own (local: a slot scheduler in the foreground or
detached; SLURM: job arrays); `sweeps/launch.py` claims the runs and hands them over. Backends never
import the run states or the launcher that use them (docs/design.md#backends).
"""

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

from hptransfer.errors import HptError
from hptransfer.sweeps.store import RunState, SweepFolder

HEARTBEAT_STALE_S = 600  # no heartbeat for this long, and no scheduler to ask: the run is not alive

# Sets a run's state, reason and `active` from its latest job record and its heartbeat.
Judge = Callable[[RunState, dict[str, Any], dict[str, Any] | None], None]


class Backend(ABC):
    name: ClassVar[str]
    launcher: ClassVar[type]  # the launcher block's dataclass

    @abstractmethod
    def observe(self, records: list[dict[str, Any]]) -> Judge:
        """Ask the scheduler once about these job records (the latest of runs without a result)."""

    @abstractmethod
    def cancel(self, folder: SweepFolder, active: list[RunState], records: list[dict[str, Any]]) -> list[RunState]:
        """Stop the jobs of these active runs; return the runs this call must record as cancelled."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def age_s(iso: str | None) -> float:
    return time.time() - datetime.fromisoformat(iso).timestamp() if iso else float("inf")


def fresh(hb: dict[str, Any] | None) -> bool:
    """A heartbeat written within HEARTBEAT_STALE_S."""
    return hb is not None and time.time() - hb.get("time", 0) < HEARTBEAT_STALE_S


def check_packing(launcher: Any) -> None:
    """launcher.fuse (a number >= 1 or auto), launcher.fuse_mem_gb and launcher.runs_per_task (>= 1): one-line
    errors before anything is written; `fuse` becomes an int or "auto"."""
    fuse = launcher.fuse
    if isinstance(fuse, str) and fuse.strip().isdigit():
        fuse = int(fuse)
    if not (fuse == "auto" or (isinstance(fuse, int) and not isinstance(fuse, bool) and fuse >= 1)):
        raise HptError(f"config key 'launcher.fuse': must be a number of runs >= 1 (1: no fusion) or auto, "
                       f"got {fuse!r}")
    launcher.fuse = fuse
    if launcher.runs_per_task < 1:
        raise HptError(f"config key 'launcher.runs_per_task': must be >= 1, got {launcher.runs_per_task}")
    if launcher.fuse_mem_gb is not None and not launcher.fuse_mem_gb > 0:
        raise HptError(f"config key 'launcher.fuse_mem_gb': must be positive (null: estimated), "
                       f"got {launcher.fuse_mem_gb}")
