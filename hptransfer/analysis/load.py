"""Read a `results.parquet` table, check it, and split it into scaling groups.

A *group* is the set of runs that answers one transfer question: one
parameterization, one scaling axis (width, depth, batch size or tokens), every
other hyperparameter held fixed, the learning rate (and the seed) swept. The
table's columns are the Parquet contract of docs/design.md#resultsparquet: `status`, `lr`,
`parameterization`, the scaling coordinates and every config value as
`cfg.<dotted.key>`.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hptransfer.errors import HptError

# Scaling axis -> the config columns that set it. Tokens are set by train.tokens or, when that
# is null, by train.steps; either one varying along a tokens axis is the axis itself.
AXES: dict[str, tuple[str, ...]] = {
    "width": ("cfg.model.width",),
    "depth": ("cfg.model.n_layers",),
    "batch_size": ("cfg.train.batch_size",),
    "tokens": ("cfg.train.tokens", "cfg.train.steps"),
}
# Along the tokens axis the other axes are causes, never consequences: tokens follow the batch size at fixed
# steps, or width and depth at a fixed train.tokens_per_param, never the other way round. So a tokens group
# holds them fixed instead of merging, say, a fixed-ratio width sweep's widths into a duration law.
CAUSES: dict[str, tuple[str, ...]] = {
    "tokens": tuple(c for a in ("width", "depth", "batch_size") for c in (a, *AXES[a])),
}
LR_COLUMN = "lr"
SEED_COLUMN = "seed"
# Swept within a group (lr, seed) or the group's own name (param.name = the parameterization); a sweep of
# the user's code names its own keys for them (any config column equal to one of these columns, run for run).
SWEPT_COLUMNS = ("cfg.optim.lr", "cfg.train.seed", "cfg.param.name")
ROLE_COLUMNS = (LR_COLUMN, SEED_COLUMN, "parameterization")
# Settings that do not change what is trained, so runs differing only in them belong together.
BOOKKEEPING = ("cfg.launcher.", "cfg.train.log_every", "cfg.train.checkpoint_every", "cfg.train.device",
               "cfg.train.compile")
# Only these runs carry a loss; diverged ones are shown but never fitted. Other states are ignored.
USED_STATUSES = ("completed", "diverged")


@dataclass
class Group:
    """The runs of one parameterization along one scaling axis, other hyperparameters fixed."""

    parameterization: str
    axis: str
    fixed: dict[str, Any]          # config key (without "cfg.") -> value, constant across the group
    varies_with_scale: list[str]   # config keys that change only because the axis does (e.g. n_heads)
    runs: pd.DataFrame             # completed and diverged runs
    label: str = ""                # parameterization, axis, and the fixed values that tell groups apart

    @property
    def scales(self) -> list[float]:
        return sorted(self.runs[self.axis].unique().tolist())


def load_results(paths: Sequence[Path], metric: str) -> pd.DataFrame:
    """Read and concatenate results tables; every problem is a one-line `HptError`."""
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise HptError(f"no such file: {path}")
        try:
            frames.append(pd.read_parquet(path))
        except Exception as err:  # pyarrow raises several types; all mean "not a readable table"
            raise HptError(f"cannot read {path} as Parquet: {str(err).splitlines()[0]}") from None
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    required = ("status", LR_COLUMN, "parameterization", metric)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise HptError(
            f"{', '.join(map(str, paths))} has no {', '.join(repr(c) for c in missing)} column "
            "(expected the table of `hpt collect`)"
        )
    if not any(axis in df.columns for axis in AXES):
        raise HptError(f"the table has none of the scaling columns {', '.join(AXES)}")
    for col in df.columns:
        if col.startswith("cfg.") and df[col].dtype == object:
            df[col] = df[col].map(_hashable)
    return df


def _hashable(value: Any) -> Any:
    """Lists and dicts in config columns become strings, so runs can be grouped by them."""
    if isinstance(value, list | tuple | dict | np.ndarray):
        return repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return value


def used_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The runs that enter the analysis: completed or diverged, with a positive finite learning rate."""
    lr = pd.to_numeric(df[LR_COLUMN], errors="coerce")
    keep = df["status"].isin(USED_STATUSES) & np.isfinite(lr) & (lr > 0) & df["parameterization"].notna()
    return _planned_tokens(df[keep])


def _planned_tokens(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs with `tokens` set to the planned budget, the scale of a tokens axis.

    A diverged run records the tokens it trained before it stopped; its scale point is the
    budget its config planned: train.tokens, or train.steps x batch size x sequence length.
    """
    parts = ("cfg.train.steps", "cfg.train.batch_size", "cfg.train.seq_len")
    if "cfg.train.tokens" not in runs.columns or not all(c in runs.columns for c in parts):
        return runs
    steps, batch, seq = (pd.to_numeric(runs[c], errors="coerce") for c in parts)
    planned = pd.to_numeric(runs["cfg.train.tokens"], errors="coerce").fillna(steps * batch * seq)
    return runs.assign(tokens=planned.fillna(runs["tokens"]) if "tokens" in runs.columns else planned)


def find_groups(df: pd.DataFrame) -> list[Group]:
    """Split the used runs into groups along every axis that varies with the rest held fixed.

    Within a parameterization, for each axis, the runs are grouped by the config columns
    that neither are swept (lr, seed), nor set the axis, nor are determined by it (a column
    like `model.n_heads` that changes only because the width does). A group needs at least
    two scale points. A run can sit in two groups: the shared point of a width and a depth sweep.
    """
    runs = used_runs(df)
    groups = []
    for param, param_rows in runs.groupby("parameterization", sort=True):
        for axis in (a for a in AXES if a in param_rows.columns):
            rows = param_rows[param_rows[axis].notna()]
            if rows[axis].nunique() < 2:
                continue
            candidates = _candidate_columns(rows, axis)
            context = _context_columns(rows, axis, candidates)
            parts = rows.groupby(context, dropna=False, sort=True) if context else [((), rows)]
            for _, part in parts:
                if part[axis].nunique() >= 2:
                    groups.append(_make_group(str(param), axis, part, candidates))
    _label(groups)
    return groups


def _candidate_columns(rows: pd.DataFrame, axis: str) -> list[str]:
    """Config columns (and the other axes' coordinates) that could hold a group's fixed values."""
    own = AXES[axis]
    roles = [c for c in (axis, *ROLE_COLUMNS) if c in rows.columns]
    cfg = [
        c for c in rows.columns
        if c.startswith("cfg.") and c not in own and c not in SWEPT_COLUMNS and not c.startswith(BOOKKEEPING)
        and not any(_same(rows[c], rows[r]) for r in roles)
    ]
    return cfg + [a for a in AXES if a != axis and a in rows.columns]


def _same(a: pd.Series, b: pd.Series) -> bool:
    """Whether two columns hold the same values run for run (the user's key behind a column of the contract)."""
    if not a.isna().equals(b.isna()):
        return False
    a, b = a[a.notna()], b[b.notna()]
    if pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
        return bool(np.array_equal(a.to_numpy(float), b.to_numpy(float)))
    return bool((a.astype(str) == b.astype(str)).all())


def _context_columns(rows: pd.DataFrame, axis: str, candidates: list[str]) -> list[str]:
    """The fewest varying columns whose values, with the axis value, determine all the others.

    Start from every varying column and drop one at a time while the axis still explains the
    dropped ones. Dropping only merges groups, so a column that cannot be dropped now cannot
    be dropped later either: one pass finds the coarsest grouping. Coordinates go first, so that
    of two columns that determine each other (tokens and train.steps along a batch axis) the
    config value the user set is the one kept.
    """
    varying = sorted((c for c in candidates if rows[c].nunique(dropna=False) > 1), key=lambda c: c.startswith("cfg."))
    context = list(varying)
    for col in (c for c in varying if c not in CAUSES.get(axis, ())):
        trial = [c for c in context if c != col]
        dropped = [c for c in varying if c not in trial]
        if _axis_explains(rows, trial, axis, dropped):
            context = trial
    return context


def _axis_explains(rows: pd.DataFrame, context: list[str], axis: str, dropped: list[str]) -> bool:
    """True when, within each context group, every dropped column has one value per scale point."""
    counts = rows.groupby([*context, axis], dropna=False)[dropped].nunique(dropna=False)
    return bool((counts <= 1).all().all())


def _make_group(param: str, axis: str, runs: pd.DataFrame, candidates: list[str]) -> Group:
    fixed, derived = {}, []
    for col in candidates:
        if not col.startswith("cfg."):
            continue
        values = runs[col].unique()
        if len(values) == 1:
            fixed[col.removeprefix("cfg.")] = _plain(values[0])
        else:
            derived.append(col.removeprefix("cfg."))
    return Group(param, axis, fixed, derived, runs.reset_index(drop=True))


def _plain(value: Any) -> Any:
    """numpy scalars and NaN become plain Python values (NaN: None), ready for JSON."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _label(groups: list[Group]) -> None:
    """Name each group by parameterization and axis, plus the fixed values that tell its twins apart.

    Labels are unique (reports and metrics are keyed by them): twins that no config value tells
    apart are numbered.
    """
    seen: dict[str, int] = {}
    for group in groups:
        twins = [g for g in groups if (g.parameterization, g.axis) == (group.parameterization, group.axis)]
        keys = sorted({k for g in twins for k in g.fixed if any(t.fixed.get(k) != g.fixed.get(k) for t in twins)})
        extra = ", ".join(f"{k}={group.fixed.get(k)}" for k in keys)
        label = f"{group.parameterization} × {group.axis}" + (f" [{extra}]" if extra else "")
        seen[label] = seen.get(label, 0) + 1
        group.label = label if seen[label] == 1 else f"{label} #{seen[label]}"
