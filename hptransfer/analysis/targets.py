"""Target runs: what `hpt predict --launch` ran at the target scale, set beside the small-scale law.

A target run carries its prediction (`prediction.*` columns, from its sweep's sweep.yaml): the learning
rate the law predicted, its 95% interval and the group it came from. Target runs never enter the
groups whose law made the prediction (the law is the small-scale one). For each target scale:

- with a bracket (3+ learning rates that completed), the realized optimum, found as at any scale
  point (optimum.find_optimum), and whether the prediction's interval holds it;
- the loss at the predicted learning rate, against what the group's loss law (fitted to the small
  scales' minima) says at the target, when that law is identified.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hptransfer.analysis.laws import fit_loss_law
from hptransfer.analysis.load import LR_COLUMN, USED_STATUSES
from hptransfer.analysis.optimum import Curve, Optimum, find_optimum

if TYPE_CHECKING:
    from hptransfer.analysis.analyze import GroupResult

PREDICTION = "prediction.lr"  # a target run's row has it; every other row has it null


@dataclass
class TargetResult:
    group: str                     # the label of the group whose law predicted it
    axis: str
    scale: float
    lr_predicted: float
    interval: tuple[float, float] | None
    runs: int                      # completed and diverged target runs at this scale
    lrs: list[float]               # the learning rates run
    optimum: Optimum | None        # the realized optimum from the bracket (None: fewer than 3 learning rates)
    loss_at_predicted: float | None
    loss_law_at_scale: float | None  # the group's small-scale loss law at the target scale (None: not identified)
    from_sweeps: str

    @property
    def lr_realized(self) -> float | None:
        return None if self.optimum is None or self.optimum.edge else 2.0 ** self.optimum.x_opt

    @property
    def inside(self) -> bool | None:
        """Whether the prediction's interval holds the realized optimum (None: no interval or no optimum)."""
        if self.interval is None or self.lr_realized is None:
            return None
        return self.interval[0] <= self.lr_realized <= self.interval[1]


def split_targets(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the sweep's runs, the target runs)."""
    if PREDICTION not in df.columns:
        return df, df.iloc[0:0]
    target = pd.to_numeric(df[PREDICTION], errors="coerce").notna()
    return df[~target], df[target]


def analyze_targets(targets: pd.DataFrame, results: "list[GroupResult]", metric: str) -> list[TargetResult]:
    """One TargetResult per (group, axis, target scale) of the target runs."""
    used = targets[targets["status"].isin(USED_STATUSES)]
    if used.empty:
        return []
    out = []
    for (label, axis, scale), runs in used.groupby(["prediction.group", "prediction.axis", "prediction.at"]):
        first = runs.iloc[0]
        lrs = sorted(pd.to_numeric(runs[LR_COLUMN]).unique().tolist())
        curve = Curve.from_runs(runs, float(scale), metric)
        optimum = find_optimum(curve, n_boot=0) if len(lrs) >= 3 else None
        predicted = float(first["prediction.lr"])
        at = runs[np.isclose(pd.to_numeric(runs[LR_COLUMN]), predicted, rtol=1e-9)]
        values = pd.to_numeric(at[at["status"] == "completed"][metric], errors="coerce").dropna()
        low, high = first.get("prediction.lr_low"), first.get("prediction.lr_high")
        out.append(TargetResult(
            group=str(label), axis=str(axis), scale=float(scale), lr_predicted=predicted,
            interval=None if pd.isna(low) or pd.isna(high) else (float(low), float(high)),
            runs=len(runs), lrs=lrs, optimum=optimum,
            loss_at_predicted=float(values.mean()) if len(values) else None,
            loss_law_at_scale=_loss_law_at(results, str(label), float(scale)),
            from_sweeps=str(first.get("prediction.from") or ""),
        ))
    return out


def _loss_law_at(results: "list[GroupResult]", label: str, scale: float) -> float | None:
    """The group's loss law through its small-scale fitted minima, at `scale`; None when not identified."""
    group = next((r for r in results if r.group.label == label), None)
    if group is None:
        return None
    points = [(c.scale, o.loss_opt) for c, o in zip(group.curves, group.optima, strict=True) if o and not o.edge]
    law, _ = fit_loss_law([s for s, _ in points], [v for _, v in points])
    return None if law is None or law.at_bound else float(law(scale))


def target_entry(t: TargetResult) -> dict[str, Any]:
    """A target's summary.json entry."""
    return {
        "group": t.group, "axis": t.axis, "scale": t.scale, "lr_predicted": t.lr_predicted,
        "lr_interval": None if t.interval is None else list(t.interval), "runs": t.runs, "lrs": t.lrs,
        "lr_realized": t.lr_realized, "realized_at_edge": bool(t.optimum and t.optimum.edge),
        "inside_interval": t.inside, "loss_at_predicted": t.loss_at_predicted,
        "loss_law_at_scale": t.loss_law_at_scale, "from": t.from_sweeps,
    }
