"""What `hpt sweep` and `hpt status` show: rich tables for the plan, the runs, the loss grid, live progress.

Pure presentation: everything here takes states, specs and figures computed elsewhere and returns
renderables (or, for the live display, prints them). Nothing here asks a scheduler anything.
"""

import io
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from itertools import product
from statistics import mean
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hptransfer.config import user
from hptransfer.config.derived import FLOPS_FORMULA, run_flops
from hptransfer.formats import fmt_lr, pow2_exponent
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
    """Numbers as people read sweeps: powers of two as 2^k, others compactly (learning rates: `fmt_dim`)."""
    if isinstance(v, float) and v > 0:
        k = pow2_exponent(v)
        return f"2^{k:g}" if k is not None and not v.is_integer() else f"{v:.4g}"
    return str(v)


def fmt_dim(key: str, v: Any, sep: str = " ") -> str:
    """A swept value: a learning rate as every command shows one (formats.fmt_lr), anything else by fmt_value."""
    if key == LR_KEY and isinstance(v, int | float) and not isinstance(v, bool):
        return fmt_lr(v, sep)
    return fmt_value(v)


def short(key: str) -> str:
    return {"model.width": "width", "model.n_layers": "depth", "optim.lr": "lr", "train.seed": "seed",
            "train.batch_size": "batch", "train.tokens": "tokens"}.get(key, key)


def fmt_flops(x: float) -> str:
    return f"{x:.3g}"


# ---- hpt sweep --dry-run -----------------------------------------------------------------------------


def plan_data(spec: "SweepSpec", runs: "list[Run]", to_launch: list[str], launcher_name: str,
              estimate: dict[str, Any] | None) -> dict[str, Any]:
    """What a dry run shows, as plain data (`hpt sweep --dry-run --json`): the grid, the derived fields and
    compute per axis value, totals, and the estimate of what launching costs (`estimate`)."""
    from hptransfer.sweeps.plan import derived_fields  # here: it imports Hydra, status must not

    per_axis: dict[Any, list] = defaultdict(list)
    for r in runs:
        per_axis[r.point[spec.axis.key]].append(r)
    rows, total = [], 0
    for value, group in per_axis.items():
        if spec.is_user:  # the user's code: what hpt knows of it is its config (steps, if a key says)
            steps_key = spec.run["columns"].get("steps")
            steps = sorted({user.get(r.config, steps_key) for r in group}) if steps_key else []
            rows.append({"value": value, "runs": len(group), "heads": [], "steps": steps, "tokens_per_run": [],
                         "flops_per_run": [], "lr_factor": []})
            continue
        fields = [derived_fields(r.config) for r in group]
        flops = [run_flops(r.config) for r in group]
        total += sum(flops)
        rows.append({
            "value": value, "runs": len(group),
            "heads": sorted({f["n_heads"] for f in fields}), "steps": sorted({f["steps"] for f in fields}),
            "tokens_per_run": sorted({f["tokens"] for f in fields}), "flops_per_run": sorted(set(flops)),
            "lr_factor": sorted({f["lr_effective"] / r.config["optim"]["lr"]
                                 for f, r in zip(fields, group, strict=True)}),
        })
    return {
        "sweep": spec.name, "file": str(spec.file), "launcher": launcher_name,
        "runs": len(runs), "to_launch": len(to_launch), "done_or_live": len(runs) - len(to_launch),
        "run_ids_to_launch": list(to_launch),
        "dims": [{"key": d.key, "axis": d is spec.axis, "values": list(d.values)} for d in spec.dims],
        "axis": spec.axis.key, "per_axis": rows, "flops": None if spec.is_user else total,
        "flops_formula": None if spec.is_user else FLOPS_FORMULA, "estimate": estimate,
        "run": spec.run and {k: spec.run[k] for k in ("target", "command", "columns")},
    }


def estimate(flops: list[float], *, gpu_flops_per_s: float | None = None, run_s: list[float] | None = None,
             how: str = "", parallel: int = 1, error: str | None = None) -> dict[str, Any] | None:
    """What the runs to launch (their FLOPs) cost: GPU-hours at an assumed rate when a GPU is the target
    (`gpu_flops_per_s`), else the wall time of their measured run times `run_s`, `parallel` at once."""
    total = float(sum(flops))
    if gpu_flops_per_s is not None:
        return {"kind": "gpu_hours", "runs": len(flops), "flops": total,
                "gpu_hours": total / gpu_flops_per_s / 3600, "flops_per_s": gpu_flops_per_s,
                "how": f"assumed: {gpu_flops_per_s:.0e} FLOP/s sustained per GPU (an H100 at ~40% of its bf16 peak)"}
    if run_s is None:
        return None if error is None else {"kind": "none", "runs": len(flops), "how": error}
    wall = max(sum(run_s) / max(parallel, 1), max(run_s, default=0.0))
    return {"kind": "measured", "runs": len(flops), "flops": total, "run_s": sum(run_s), "wall_s": wall,
            "parallel": parallel, "how": how}


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan(data: dict[str, Any]) -> Group:
    """Run count, the grid, derived fields and compute per axis value, totals and the cost estimate."""
    dims = Table("dimension", "values", "n", title=f"sweep '{data['sweep']}': {data['runs']} runs", box=None,
                 header_style="bold", title_justify="left")
    for d in data["dims"]:
        dims.add_row(d["key"] + (" (axis)" if d["axis"] else ""), ", ".join(fmt_dim(d["key"], v) for v in d["values"]),
                     str(len(d["values"])))
    derived = Table(short(data["axis"]), "runs", "heads", "steps", "tokens/run", "FLOPs/run", "lr x (rules)",
                    box=None, header_style="bold", title="derived per axis value", title_justify="left")
    if data.get("run"):  # the user's code: what it runs instead of the derived figures hpt cannot know
        derived = Table(short(data["axis"]), "runs", "steps", box=None, header_style="bold", title_justify="left",
                        title=f"runs {data['run']['target'] or data['run']['command']}")
    for row in data["per_axis"]:
        def join(key: str, fmt: Any = str, row: dict[str, Any] = row) -> str:
            return ", ".join(fmt(v) for v in row[key])

        if data.get("run"):
            derived.add_row(fmt_value(row["value"]), str(row["runs"]), join("steps"))
            continue
        derived.add_row(fmt_value(row["value"]), str(row["runs"]), join("heads"), join("steps"), join("tokens_per_run"),
                        join("flops_per_run", fmt_flops), join("lr_factor", lambda x: f"{x:.3g}"))
    totals = Text.assemble(
        ("total: ", "bold"),
        f"{data['runs']} runs, {data['to_launch']} to launch ({data['done_or_live']} done or live), ",
        f"{'unknown' if data['flops'] is None else fmt_flops(data['flops'])} training FLOPs; "
        f"launcher: {data['launcher']}")
    return Group(dims, Text(), derived, Text(), totals, *_estimate_lines(data["estimate"]))


def _estimate_lines(e: dict[str, Any] | None) -> list[Text]:
    if e is None:
        return []
    if e["kind"] == "gpu_hours":
        line = f"{e['runs']} runs to launch: {fmt_flops(e['flops'])} FLOPs, {e['gpu_hours']:.3g} GPU-hours"
    elif e["kind"] == "measured":
        line = (f"{e['runs']} runs to launch: about {fmt_duration(e['wall_s'])} here, {e['parallel']} at once "
                f"({fmt_duration(e['run_s'])} of run time)")
    else:
        line = f"{e['runs']} runs to launch: no time estimate"
    return [Text.assemble(("estimate: ", "bold"), line), Text(f"  ({e['how']})", "dim")]


def slurm_plan(launcher: "SlurmLauncher", size: int, script: str, to_launch: int, runs: "list[Run]") -> Group:
    """How the runs would go to SLURM (arrays of at most `size`), requeue readiness, and the sbatch script."""
    n_arrays = math.ceil(to_launch / size) if to_launch else 0
    lines = [Text(f"SLURM: {to_launch} runs as {n_arrays} job array(s) of at most {size} (MaxArraySize), "
                  f"{launcher.array_parallelism} at once, {launcher.timeout_min} min each, requeued up to "
                  f"{launcher.max_requeue} times on timeout")]
    if any(r.config.get("train", {}).get("checkpoint_every") == 0 for r in runs):
        lines.append(Text("warning: train.checkpoint_every is 0: a requeued run restarts from step 0", "yellow"))
    return Group(Text(), *lines, Text("sbatch script of the first array:", "bold"),
                 Text(script))


def failed_hint(failed: int) -> str:
    """What `hpt sweep` adds while runs of its grid are failed (it then exits 1)."""
    if not failed:
        return ""
    one = failed == 1
    return f"; {failed} failed {'run' if one else 'runs'}: --retry-failed relaunches {'it' if one else 'them'}"


def sweep_done(name: str, progress: "Progress", total: int, failed: int = 0, again: str | None = None) -> Text:
    """The last line of a local sweep; `failed`: the grid's runs failed now, this launch's and earlier ones;
    `again`: the status command to paste (with the --root the sweep was given)."""
    again = again or f"hpt status {name}"
    launched = sum(progress.done.values())
    if not launched:
        return Text(f"sweep '{name}': nothing to launch: all {total} runs have results or live jobs"
                    f"{failed_hint(failed)} ({again})")
    done = ", ".join(f"{n} {k}" for k, n in progress.done.items() if n)
    return Text(f"sweep '{name}': {launched} runs ended ({done}){failed_hint(failed)}; see: {again}")


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


@dataclass
class Extras:
    """What `hpt status` adds to one sweep's states, all read cheaply: for the running runs only, the latest
    training loss (the tail of metrics.jsonl) and the steps they train; the job records (start and end
    times for the ETA, the git commits the runs were launched from); the time of the snapshot."""

    losses: dict[str, float | None] = field(default_factory=dict)
    total_steps: dict[str, int] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    now: float = field(default_factory=time.time)


def _attention_order(s: RunState) -> int:
    """Failed first, then running, queued, cancelled, and pending runs nothing holds last."""
    return ATTENTION[s.state] + (2 if s.state == "pending" and not s.active else 0)


def _most_urgent(attention: list[RunState], limit: int) -> list[RunState]:
    """`limit` of the runs that need attention, in attention order; cut short, the failed and the running runs
    share the rows (half each, when both have that many), so neither hides the other."""
    if limit >= len(attention):
        return attention
    failed = [s for s in attention if s.state == "failed"]
    running = [s for s in attention if s.state == "running"]
    rest = [s for s in attention if s.state not in ("failed", "running")]
    n_failed = min(len(failed), max(limit - len(running), (limit + 1) // 2))
    n_running = min(len(running), limit - n_failed)
    return failed[:n_failed] + running[:n_running] + rest[:limit - n_failed - n_running]


def runs_table(states: list[RunState], keys: list[str], *, extras: Extras | None = None,
               hint: str = "hpt status", limit: int | None = None, compact: bool = False) -> Table | Group:
    """The runs, each with its job, attempts, step and loss (a running run's latest training loss).

    `limit=None`: every run up to RUN_ROWS, else only those that need attention (at most RUN_ROWS).
    `limit=n`: the n that need attention most (failed, running, queued, cancelled, pending), always.
    `compact`: one line per run (long cells cut), no job or attempts column, the count of the runs left out
    on a line of its own (a Group): for a screen that must fit.
    """
    attention = sorted((s for s in states if s.state in ATTENTION), key=_attention_order)
    if limit is None:
        shown = states if len(states) <= RUN_ROWS else attention[:RUN_ROWS]
    else:
        shown = _most_urgent(attention, limit)
    more = len(states) - len(shown)
    hidden = len(attention) - len(shown) if limit is not None or len(states) > RUN_ROWS else 0
    caption = None
    if more:
        caption = (f"... and {more} more runs ({hidden} that need attention, {more - hidden} finished): "
                   f"{hint} --json lists every run")
    columns = ["run", *(short(k) for k in keys), "state"] + ([] if compact else ["job", "att"]) + \
              ["step", "loss", "reason"]
    table = Table(box=None, header_style="bold", caption_justify="left", caption=None if compact else caption,
                  caption_style="dim")
    ex = extras or Extras()
    rows = []
    for s in shown:
        total = ex.total_steps.get(s.run_id) if s.state == "running" else None
        step = "" if s.step is None else f"{s.step}/{total}" if total else str(s.step)
        if s.state == "running" and ex.losses.get(s.run_id) is not None:
            loss = Text(f"{ex.losses[s.run_id]:.4f} train", "yellow")
        else:
            loss = Text("" if s.final_loss is None else f"{s.final_loss:.4f}")
        job = [] if compact else [s.job_id or "", str(s.attempts or "")]
        rows.append([s.run_id, *(fmt_dim(k, s.point.get(k)) for k in keys), Text(s.state, STATE_STYLE[s.state]),
                     *job, step, loss, Text(s.reason[:60], "dim")])
    for i, name in enumerate(columns):
        # Compact: one line per run; every column keeps its width but the learning rate (its number stays)
        # and the reason, which takes what is left.
        natural = max([len(name), *(Text(r[i]).cell_len if isinstance(r[i], str) else r[i].cell_len for r in rows)])
        least = None if not compact or name == "reason" else min(natural, 8) if name == "lr" else natural
        table.add_column(name, no_wrap=compact, overflow="ellipsis" if compact else "fold", min_width=least)
    for r in rows:
        table.add_row(*r)
    return Group(table, Text(caption, "dim")) if compact and caption else table


def grids(states: list[RunState], axis: str, grid_keys: list[str]) -> list[Table]:
    """One table per setting of the other dimensions: axis rows x learning-rate columns, final val loss.

    Seeds are averaged; the best cell of each row is bold, and `opt` names its learning rate.
    """
    col = LR_KEY if LR_KEY in grid_keys else next(iter(grid_keys), None)
    if col is None:
        return []
    others = [k for k in grid_keys if k != col]
    values = {k: _ordered(s.point.get(k) for s in states) for k in [axis, col, *others]}
    if math.prod(len(v) for v in values.values()) > 4 * len(states):  # scattered points (a search's), no grid
        return []
    cells_of: dict[tuple[Any, ...], list[RunState]] = defaultdict(list)  # one pass, not one per cell
    for s in states:
        cells_of[tuple(s.point.get(k) for k in [*others, axis, col])].append(s)
    tables = []
    for combo in product(*(values[k] for k in others)):
        fixed = dict(zip(others, combo, strict=True))
        title = " ".join(f"{k}={v}" for k, v in fixed.items()) or "all runs"
        table = Table(short(axis), *(fmt_dim(col, v, "\n") for v in values[col]), "opt " + short(col), box=None,
                      header_style="bold", title=title, title_justify="left")
        for a in values[axis]:
            cells = [_cell(cells_of.get((*combo, a, c), [])) for c in values[col]]
            losses = [loss for loss, _ in cells]
            finite = [x for x in losses if x is not None]
            best = min(finite) if finite else None
            row = [Text(text, style + (" bold reverse" if loss is not None and loss == best else ""))
                   for loss, (text, style) in cells]
            opt = fmt_dim(col, values[col][losses.index(best)]) if best is not None else ""
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


# ---- what status adds: the commits a sweep's runs came from, the ETA ---------------------------------


def commit_label(record: dict[str, Any]) -> str:
    commit = record.get("git_commit")
    if not commit:
        return "no git commit (an installed copy)"
    return commit[:10] + ("+dirty" if record.get("git_dirty") else "")


def commits(records: list[dict[str, Any]]) -> dict[str, int]:
    """Runs per commit of the code that launched them (each run's latest job record that names one)."""
    latest = {r["run_id"]: commit_label(r) for r in records if "git_commit" in r and "run_id" in r}
    return dict(Counter(latest.values()).most_common())


def commit_warning(name: str, per_commit: dict[str, int], launching: str | None = None) -> str | None:
    """A warning when a sweep's runs come from more than one commit (with `launching`: the code about to launch
    more of them), naming each commit; None when they all come from one."""
    labels = dict(per_commit)
    if launching is not None and launching not in labels:
        labels[launching] = 0
    if len(labels) < 2:
        return None
    parts = ", ".join(f"{c} ({n} runs)" if n or c != launching else f"{c} (this code, launching now)"
                      for c, n in labels.items())
    return (f"sweep '{name}': its runs come from {len(labels)} commits: {parts}; a difference between its points "
            f"may be the code's, not the hyperparameters'")


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def eta(states: list[RunState], extras: Extras) -> tuple[float, str] | None:
    """(seconds until the running and queued runs are done, how that was estimated), or None without a basis.

    A run's time: the mean wall time of the finished runs (their job records' start and end); a running run's
    time left: its elapsed time x (steps left / steps done). The work left is shared among as many slots as
    runs are running.
    """
    start: dict[str, float] = {}
    took: dict[str, float] = {}
    for r in extras.records:
        rid, event = r.get("run_id"), r.get("event")
        if event == "started" and r.get("started_at"):
            start[rid] = _timestamp(r["started_at"])
            took.pop(rid, None)
        elif event == "ended" and r.get("ended_at") and rid in start:
            took[rid] = _timestamp(r["ended_at"]) - start[rid]
    finished = [took[s.run_id] for s in states if s.state in ("completed", "diverged") and s.run_id in took]
    running = [s for s in states if s.state == "running"]
    queued = [s for s in states if s.state == "pending" and s.active]
    if not running and not queued:
        return None
    left, per_run = [], []
    for s in running:
        elapsed = extras.now - start[s.run_id] if s.run_id in start else None
        total = extras.total_steps.get(s.run_id)
        if elapsed is not None and s.step and total:
            frac = min(s.step / total, 1.0)
            left.append(elapsed * (1 - frac) / frac)
            per_run.append(elapsed / frac)
        elif finished:
            left.append(max(mean(finished) - (elapsed or 0.0), 0.0))
    typical = mean(finished) if finished else mean(per_run) if per_run else None
    if typical is None:
        return None
    total_left = sum(left) + len(queued) * typical
    seconds = max(max(left, default=0.0), total_left / max(len(running), 1))
    basis = (f"the mean wall time of {len(finished)} finished runs" if finished
             else "the running runs' progress")
    return seconds, (f"{len(running)} running, {len(queued)} queued; a run takes about {fmt_duration(typical)} "
                     f"({basis})")


def eta_line(states: list[RunState], extras: Extras) -> Text | None:
    e = eta(states, extras)
    if e is None:
        return None
    return Text.assemble(("ETA ", "bold"), f"about {fmt_duration(e[0])}: {e[1]}")


# ---- the status view ---------------------------------------------------------------------------------


def status_view(per_sweep: dict[str, list[RunState]], folders: list[Any], detail: bool, *,
                extras: dict[str, Extras] | None = None, hint: str = "hpt status",
                height: int | None = None, width: int = 80) -> Group:
    """All sweeps' counts (and a warning for a sweep whose runs come from several commits); for one sweep
    (`detail`) also its loss grids, the ETA, its runs and its failures.

    With `height` (hpt status --watch), the view fits a screen of `height` x `width`: the counts, the ETA,
    then the runs that need attention most (failed, running, queued), cut with a count of what is hidden,
    the failed runs' log tail, and the loss grids when they still fit.
    """
    extras = extras or {}
    head: list[RenderableType] = [summary(per_sweep)]
    for name, ex in extras.items():
        warning = commit_warning(name, commits(ex.records))
        if warning:
            head.append(Text(f"warning: {warning}", "yellow"))
    if not detail:
        return Group(*head)
    out = list(head)
    for folder in folders:
        states = per_sweep[folder.name]
        ex = extras.get(folder.name) or Extras()
        keys = list(states[0].point) if states else []  # the manifest's swept keys: axis, grid..., seed
        grid: list[RenderableType] = []
        for table in grids(states, keys[0], keys[1:-1]) if keys else []:
            grid += [Text(), table]
        line = eta_line(states, ex)
        top = [Text(), line] if line else []
        if height is not None:
            return _fit(out + top, grid, states, keys, ex, hint, height, width)
        out += grid + top + [Text(), runs_table(states, keys, extras=ex, hint=hint), *failures(states, hint=hint)]
    return Group(*out)


def lines_of(renderable: RenderableType, width: int) -> int:
    """How many lines `renderable` takes at `width` columns."""
    console = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
    return len(console.render_lines(renderable, console.options, pad=False, new_lines=False))


def _fit(head: list[RenderableType], grid: list[RenderableType], states: list[RunState], keys: list[str],
         ex: Extras, hint: str, height: int, width: int) -> Group:
    """The view of one sweep cut to `height` lines (less one: a live display keeps its cursor on the last).

    In order of preference: everything; the grids with the runs that need attention cut (at least 5 of them)
    and a shorter log tail; no grids (a line says so) and as many runs as fit; then no log tail.
    """
    budget = max(height - 1, 1)
    n = sum(1 for s in states if s.state in ATTENTION)
    failed = any(s.state == "failed" for s in states)
    hidden_grid = [Text(f"(loss grids hidden to fit the screen: {hint} shows them)", "dim")] if grid else []

    def build(rows: int, tail: int, with_grid: bool) -> Group:
        parts = list(head) + (grid if with_grid else hidden_grid)
        if n:
            parts += [Text(), runs_table(states, keys, extras=ex, hint=hint, limit=rows, compact=True)]
        if tail and failed:
            parts += failures(states, limit=1, lines=tail, hint=hint)
        return Group(*parts)

    def most_rows(tail: int, with_grid: bool) -> tuple[int, Group] | None:
        rows = n
        for _ in range(4):  # a table's height is its rows plus a header and, once cut, a caption
            view = build(rows, tail, with_grid)
            over = lines_of(view, width) - budget
            if over <= 0:
                return rows, view
            if rows == 0:
                return None
            rows = max(rows - over, 0)
        return None

    for tail, with_grid in ((8, True), (3, True), (3, False), (0, False)):
        fit = most_rows(tail if failed else 0, with_grid and bool(grid))
        if fit is not None and (fit[0] >= min(n, 5) or (tail, with_grid) == (0, False)):
            return fit[1]
    return Group(*head)  # not even the counts fit: show them, cut by the display


def failures(states: list[RunState], limit: int = 5, lines: int = 8, hint: str = "hpt status") -> list[RenderableType]:
    failed = [s for s in states if s.state == "failed"]
    out: list[RenderableType] = []
    for s in failed[:limit]:
        out.append(Text.assemble((f"failed {s.run_id}", "bold red"), f": {s.reason}"))
        if s.log_tail:
            out.append(Text("\n".join("    " + ln for ln in s.log_tail.splitlines()[-lines:]), style="dim"))
    if len(failed) > limit:
        out.append(Text(f"... and {len(failed) - limit} more failed runs ({hint} --json for all)", "dim"))
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
            point = " ".join(f"{short(k)}={fmt_dim(k, s.point.get(k))}" for k in self.keys)
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
