"""Tasks: which runs share a job (docs/design.md#fused-and-packed-tasks).

A task is what one job (a local process, a SLURM array task) executes, in order: units, each one run or a
fused group (several runs of one shape trained as one batched model, train/fused.py). `launcher.fuse: K`
puts up to K runs of one fusion key (config/derived.py `fusion_key`: the same shapes, data, steps and
logging) in a unit, split evenly (14 runs at K=8: two groups of 7); `auto` as many as the memory budget holds
(`fused_bytes` per copy), at most FUSE_MAX, and small enough that each of several slots gets about BALANCE.
`launcher.runs_per_task: N` puts N units one after another in a task: one interpreter start, data load and (on a
GPU) CUDA context for all of them, each unit still its own folders, state and result.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hptransfer.config.derived import fused_bytes, fusion_key

FUSE_MAX = 64  # copies of one fused group at most (launcher.fuse=auto)
# Groups per slot (launcher.fuse=auto, several local slots): a sweep's groups differ in cost (its widths), so
# with a few groups each, a slot that ends early takes more and the slots end together (runs come largest
# first). On CPUs, where a step's compute is the cost, a larger group would not be faster.
BALANCE = 3


@dataclass(frozen=True)
class Task:
    """Units of run ids, executed in order; a unit of several runs is one fused group."""

    units: tuple[tuple[str, ...], ...]

    @property
    def run_ids(self) -> list[str]:
        return [rid for unit in self.units for rid in unit]

    def position(self, run_id: str) -> int:
        """The index of the run's unit in the task (0: the task starts with it)."""
        return next(i for i, unit in enumerate(self.units) if run_id in unit)


@dataclass(frozen=True)
class Packing:
    """How runs share jobs: fuse (copies per group; None: auto within `budget` bytes), runs_per_task (units per
    task), slots (jobs that run at once: auto fuses no more than keeps them all busy; None: no such bound)."""

    fuse: int | None = 1
    runs_per_task: int = 1
    budget: int | None = None
    slots: int | None = None

    @property
    def trivial(self) -> bool:
        return self.fuse == 1 and self.runs_per_task == 1


ONE_PER_JOB = Packing()  # no fusion, no packing: a job per run


def plan_tasks(run_ids: list[str], configs: Mapping[str, Mapping[str, Any]], packing: Packing) -> list[Task]:
    """The runs' tasks, in `run_ids` order (each unit where its first run was): fused groups of one fusion key,
    the user's code and multi-process runs alone; then `runs_per_task` units to a task."""
    if packing.trivial:
        return [Task(((rid,),)) for rid in run_ids]
    by_key: dict[str, list[str]] = {}
    units: list[tuple[str, ...] | str] = []  # a str: the key whose groups go here
    for rid in run_ids:
        key = fusion_key(configs[rid]) if packing.fuse != 1 else None
        if key is None:
            units.append((rid,))
        elif key not in by_key:
            by_key[key] = [rid]
            units.append(key)
        else:
            by_key[key].append(rid)
    out: list[tuple[str, ...]] = []
    for u in units:
        if isinstance(u, tuple):
            out.append(u)
            continue
        ids = by_key[u]
        k = group_size(configs[ids[0]], packing, len(ids), len(run_ids))
        n = math.ceil(len(ids) / k)
        out += [tuple(ids[i * len(ids) // n:(i + 1) * len(ids) // n]) for i in range(n)]  # even splits
    per = packing.runs_per_task
    return [Task(tuple(out[i:i + per])) for i in range(0, len(out), per)]


def group_size(cfg: Mapping[str, Any], packing: Packing, n: int, total: int) -> int:
    """Copies per fused group of runs like `cfg` (n of them, of `total` runs): launcher.fuse, or auto: as many as
    the budget holds, at most FUSE_MAX, and few enough that several `slots` get BALANCE groups each."""
    if packing.fuse is not None:
        return max(1, min(packing.fuse, n))
    fit = FUSE_MAX if packing.budget is None else packing.budget // fused_bytes(cfg)
    groups = (packing.slots or 0) * (BALANCE if (packing.slots or 0) > 1 else 1)  # 0: no bound by slots
    busy = math.ceil(total / groups) if groups else FUSE_MAX
    return max(1, min(fit, FUSE_MAX, busy, n))
