"""What `hpt sweep` and `hpt status` show: rich tables for the plan, the runs, the loss grid, live progress.

Pure presentation: everything here takes states, specs and figures computed elsewhere and returns
renderables (or, for the live display, prints them). Nothing here asks a scheduler anything.
"""

import math
import time
from collections import defaultdict
from itertools import product
from statistics import mean
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hptransfer.config.derived import run_flops
from hptransfer.sweeps.state import counts
from hptransfer.sweeps.store import STATES, RunState

if TYPE_CHECKING:  # the status views must not import Hydra: the plan's figures come from sweeps.plan
    from hptransfer.sweeps.backends.local import Progress
    from hptransfer.sweeps.backends.slurm import SlurmLauncher
    from hptransfer.sweeps.plan import Run, SweepSpec

LR_KEY = "optim.lr"
STATE_STYLE = {"pending": "dim", "running": "yellow", "completed": "green", "diverged": "magenta",
               "failed": "red", "cancelled": "cyan"}
CELL = {"pending": ("·", "dim"), "running": ("run", "yellow"), "diverged": ("div", "magenta"),
        "failed": ("fail", "red"), "cancelled": ("cxl", "cyan")}


def fmt_value(v: Any) -> str:
    """Numbers as people read sweeps: powers of two as 2^k, others compactly."""
    if isinstance(v, float) and v > 0:
        k = math.log2(v)
        if abs(k * 2 - round(k * 2)) < 1e-9 and not float(v).is_integer():
            return f"2^{k:g}"
        return f"{v:.4g}"
    return str(v)


def short(key: str) -> str:
    return {"model.width": "width", "model.n_layers": "depth", "optim.lr": "lr", "train.seed": "seed",
            "train.batch_size": "batch", "train.tokens": "tokens"}.get(key, key)


def fmt_flops(x: float) -> str:
    return f"{x:.3g}"


# ---- hpt sweep --dry-run -----------------------------------------------------------------------------


def plan(spec: "SweepSpec", runs: "list[Run]", to_launch: int, launcher_name: str) -> Group:
    """Run count, the grid, derived fields and compute per axis value, and totals."""
    from hptransfer.sweeps.plan import GPU_FLOPS_PER_S, derived_fields  # here: it imports Hydra, status must not

    dims = Table("dimension", "values", "n", title=f"sweep '{spec.name}': {len(runs)} runs", box=None,
                 header_style="bold", title_justify="left")
    for d in spec.dims:
        dims.add_row(d.key + (" (axis)" if d is spec.axis else ""), ", ".join(fmt_value(v) for v in d.values),
                     str(len(d.values)))
    per_axis: dict[Any, list] = defaultdict(list)
    for r in runs:
        per_axis[r.point[spec.axis.key]].append(r)
    derived = Table(short(spec.axis.key), "runs", "heads", "steps", "tokens/run", "FLOPs/run", "lr x (rules)",
                    box=None, header_style="bold", title="derived per axis value", title_justify="left")
    total = 0.0
    for value, group in per_axis.items():
        fields = [derived_fields(r.config) for r in group]
        flops = [run_flops(r.config) for r in group]
        total += sum(flops)
        rule = {f["lr_effective"] / r.config["optim"]["lr"] for f, r in zip(fields, group, strict=True)}

        def uniq(key: str, fields: list[dict[str, Any]] = fields) -> str:
            return ", ".join(str(v) for v in sorted({f[key] for f in fields}))

        derived.add_row(fmt_value(value), str(len(group)), uniq("n_heads"), uniq("steps"), uniq("tokens"),
                        ", ".join(fmt_flops(f) for f in sorted(set(flops))), ", ".join(f"{x:.3g}" for x in rule))
    hours = total / GPU_FLOPS_PER_S / 3600
    totals = Text.assemble(
        ("total: ", "bold"), f"{len(runs)} runs, {to_launch} to launch ({len(runs) - to_launch} done or live), ",
        f"{fmt_flops(total)} training FLOPs, {hours:.3g} GPU-hours at {GPU_FLOPS_PER_S:.0e} FLOP/s sustained; ",
        f"launcher: {launcher_name}")
    return Group(dims, Text(), derived, Text(), totals)


def slurm_plan(launcher: "SlurmLauncher", size: int, script: str, to_launch: int, runs: "list[Run]") -> Group:
    """How the runs would go to SLURM (arrays of at most `size`), requeue readiness, and the sbatch script."""
    n_arrays = math.ceil(to_launch / size) if to_launch else 0
    lines = [Text(f"SLURM: {to_launch} runs as {n_arrays} job array(s) of at most {size} (MaxArraySize), "
                  f"{launcher.array_parallelism} at once, {launcher.timeout_min} min each, requeued up to "
                  f"{launcher.max_requeue} times on timeout")]
    if any(r.config["train"]["checkpoint_every"] == 0 for r in runs):
        lines.append(Text("warning: train.checkpoint_every is 0: a requeued run restarts from step 0", "yellow"))
    return Group(Text(), *lines, Text("sbatch script of the first array:", "bold"),
                 Text(script))


def sweep_done(name: str, progress: "Progress", total: int) -> Text:
    launched = sum(progress.done.values())
    if not launched:
        return Text(f"sweep '{name}': nothing to launch: all {total} runs have results or live jobs "
                    f"(hpt status {name}; --retry-failed relaunches failed runs)")
    done = ", ".join(f"{n} {k}" for k, n in progress.done.items() if n)
    return Text(f"sweep '{name}': {launched} runs ended ({done}); see: hpt status {name}")


# ---- hpt status --------------------------------------------------------------------------------------


def summary(per_sweep: dict[str, list[RunState]]) -> Table:
    table = Table("sweep", "runs", *STATES, box=None, header_style="bold")
    for name, states in per_sweep.items():
        c = counts(states)
        table.add_row(name, str(len(states)), *(Text(str(c[k]), style=STATE_STYLE[k] if c[k] else "dim")
                                                 for k in STATES))
    return table


RUN_ROWS = 100  # a longer sweep's table shows only runs that need attention (its grids show the losses)
ATTENTION = {"failed": 0, "running": 1, "pending": 2, "cancelled": 3}


def runs_table(states: list[RunState], keys: list[str]) -> Table:
    if len(states) <= RUN_ROWS:
        shown = states
    else:
        shown = sorted((s for s in states if s.state in ATTENTION), key=lambda s: ATTENTION[s.state])[:RUN_ROWS]
    more = len(states) - len(shown)
    table = Table("run", *(short(k) for k in keys), "state", "job", "att", "step", "val loss", "reason",
                  box=None, header_style="bold", caption_justify="left",
                  caption=f"... and {more} more runs (finished ones first left out): hpt status --json lists "
                          f"every run" if more else None)
    for s in shown:
        loss = s.final_loss
        table.add_row(s.run_id, *(fmt_value(s.point.get(k)) for k in keys), Text(s.state, STATE_STYLE[s.state]),
                      s.job_id or "", str(s.attempts or ""), "" if s.step is None else str(s.step),
                      "" if loss is None else f"{loss:.4f}", Text(s.reason[:60], "dim"))
    return table


def grids(states: list[RunState], axis: str, grid_keys: list[str]) -> list[Table]:
    """One table per setting of the other dimensions: axis rows x learning-rate columns, final val loss.

    Seeds are averaged; the best cell of each row is bold, and `opt` names its learning rate.
    """
    col = LR_KEY if LR_KEY in grid_keys else next(iter(grid_keys), None)
    if col is None:
        return []
    others = [k for k in grid_keys if k != col]
    values = {k: _ordered(s.point.get(k) for s in states) for k in [axis, col, *others]}
    cells_of: dict[tuple[Any, ...], list[RunState]] = defaultdict(list)  # one pass, not one per cell
    for s in states:
        cells_of[tuple(s.point.get(k) for k in [*others, axis, col])].append(s)
    tables = []
    for combo in product(*(values[k] for k in others)):
        fixed = dict(zip(others, combo, strict=True))
        title = " ".join(f"{k}={v}" for k, v in fixed.items()) or "all runs"
        table = Table(short(axis), *(fmt_value(v) for v in values[col]), "opt " + short(col), box=None,
                      header_style="bold", title=title, title_justify="left")
        for a in values[axis]:
            cells = [_cell(cells_of.get((*combo, a, c), [])) for c in values[col]]
            losses = [loss for loss, _ in cells]
            finite = [x for x in losses if x is not None]
            best = min(finite) if finite else None
            row = [Text(text, style + (" bold reverse" if loss is not None and loss == best else ""))
                   for loss, (text, style) in cells]
            opt = fmt_value(values[col][losses.index(best)]) if best is not None else ""
            table.add_row(fmt_value(a), *row, opt)
        tables.append(table)
    return tables


def _ordered(values: Any) -> list[Any]:
    """Numbers ascending; anything else (parameterizations) in the order the grid lists them."""
    seen = list(dict.fromkeys(v for v in values if v is not None))
    return sorted(seen) if all(isinstance(v, int | float) for v in seen) else seen


def _cell(states: list[RunState]) -> tuple[float | None, tuple[str, str]]:
    """(mean completed loss over seeds, (text, style)); without a loss, the most telling state."""
    losses = [s.final_loss for s in states if s.state == "completed" and s.final_loss is not None]
    if losses:
        loss = mean(losses)
        return loss, (f"{loss:.3f}", "green" if len(losses) == len(states) else "yellow")
    if not states:
        return None, ("", "")
    for state in ("diverged", "failed", "running", "cancelled", "pending"):
        if any(s.state == state for s in states):
            return None, CELL[state]
    return None, ("?", "dim")


def status_view(per_sweep: dict[str, list[RunState]], folders: list[Any], detail: bool) -> Group:
    """All sweeps' counts; for one sweep (`detail`) also its loss grids, its runs and its failures."""
    out: list[RenderableType] = [summary(per_sweep)]
    if not detail:
        return Group(*out)
    for folder in folders:
        states = per_sweep[folder.name]
        keys = list(states[0].point) if states else []  # the manifest's swept keys: axis, grid..., seed
        for table in grids(states, keys[0], keys[1:-1]) if keys else []:
            out += [Text(), table]
        out += [Text(), runs_table(states, keys), *failures(states)]
    return Group(*out)


def failures(states: list[RunState], limit: int = 5, lines: int = 8) -> list[RenderableType]:
    failed = [s for s in states if s.state == "failed"]
    out: list[RenderableType] = []
    for s in failed[:limit]:
        out.append(Text.assemble((f"failed {s.run_id}", "bold red"), f": {s.reason}"))
        if s.log_tail:
            out.append(Text("\n".join("    " + ln for ln in s.log_tail.splitlines()[-lines:]), style="dim"))
    if len(failed) > limit:
        out.append(Text(f"... and {len(failed) - limit} more failed runs (hpt status --json for all)", "dim"))
    return out


# ---- the live display of a local sweep ---------------------------------------------------------------


class LiveProgress:
    """`on_event` of the local scheduler: a live status line and a line per finished run."""

    def __init__(self, console: Console, slots: int, keys: list[str]):
        self.console, self.slots, self.keys = console, slots, keys
        self.live = Live(console=console, refresh_per_second=2, transient=True)
        self.t0 = time.time()

    def __enter__(self) -> "LiveProgress":
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def __call__(self, event: str, s: RunState | None, p: "Progress") -> None:
        if event == "ended":
            done = sum(p.done.values())
            loss = s.final_loss
            point = " ".join(f"{short(k)}={fmt_value(s.point.get(k))}" for k in self.keys)
            self.live.console.print(
                Text.assemble((f"{s.state:9}", STATE_STYLE[s.state]), f" {s.run_id} {point}",
                              f"  val loss {loss:.4f}" if loss is not None else f"  {s.reason}",
                              (f"  [{done}/{p.total}]", "dim")), highlight=False, soft_wrap=True)
        self.live.update(self._status(p))

    def _status(self, p: "Progress") -> RenderableType:
        done = sum(p.done.values())
        eta = p.eta_s(self.slots)
        bar_w = 30
        filled = int(bar_w * done / max(p.total, 1))
        line = Text.assemble(
            ("━" * filled, "green"), ("━" * (bar_w - filled), "dim"), f" {done}/{p.total} done ",
            (f"{p.done['completed']} completed ", "green"), (f"{p.done['diverged']} diverged ", "magenta"),
            (f"{p.done['failed']} failed ", "red"), (f"{len(p.running)} running ", "yellow"),
            f"· {time.time() - self.t0:.0f} s elapsed" + (f" · ETA {eta:.0f} s" if eta is not None else ""))
        return Group(line)
