"""The `hpt` command line: thin Typer commands that parse, call the library, and render with rich.

Each command imports its library inside its function: `hpt status` must start without torch,
Hydra or pandas (bench/startup.py measures each command's start-up), so every such import below
is marked `# per command`.
"""

import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.live import Live
from rich.table import Table

from hptransfer import __version__
from hptransfer.errors import HptError

SWEEPS_DIR = Path(__file__).parent / "config" / "sweeps"  # the packaged sweep files (conf/ in a clone links them)
PIPE_WIDTH = 200  # piped or logged output: the width tables get (text is never hard-wrapped there)


class Out(Console):
    """A console that draws as rich does on a terminal, and never hard-wraps when it is not one.

    Piped or logged, a printed line stays one line (soft wrap: a pasted hint or launch line is never
    broken mid-word), and tables get PIPE_WIDTH columns instead of being squeezed to 80.
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return size if self.is_terminal else ConsoleDimensions(max(size.width, PIPE_WIDTH), size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:
        super().print(*objects, soft_wrap=(not self.is_terminal) if soft_wrap is None else soft_wrap, **kwargs)


app = typer.Typer(
    help="Find a large model's hyperparameters by tuning small ones.\n\n"
    "Sweep small models along width, depth, batch size or duration under several "
    "parameterizations, collect the final losses, and measure how well the optimum transfers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion, --show-completion: for the shell hpt was started from
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Out()
err_console = Out(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from hptransfer.provenance import git_state  # per command: runs git, only for --version

        git = git_state()
        dirty = ", dirty" if git["git_dirty"] else ""
        where = f" (git {git['git_commit'][:10]}{dirty})" if git["git_commit"] else ""
        print(f"hpt {__version__}{where}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_print_version, is_eager=True,
                                          help="Print hptransfer's version and exit.")] = False,
) -> None:
    """The command group; --version and the shell completion options belong to it."""


def _extras(folder: Any, states: list[Any]) -> Any:
    """What status adds to a sweep, cheaply: its job records (one file) and, for running runs only, the
    latest training loss (the tail of metrics.jsonl) and the steps they train (config.yaml)."""
    from hptransfer import views  # per command
    from hptransfer.sweeps.store import latest_loss, planned_steps  # per command

    ex = views.Extras(records=folder.job_records())
    for s in states:
        if s.state == "running":
            run_dir = folder.run_dir(s.run_id)
            ex.losses[s.run_id] = latest_loss(run_dir)
            steps = planned_steps(run_dir)
            if steps:
                ex.total_steps[s.run_id] = steps
    return ex


Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Hydra overrides, e.g. model.width=256 param=mup optim.lr=0.01", show_default=False),
]


Results = Annotated[
    list[Path], typer.Argument(help="results.parquet from `hpt collect` (several are joined).", show_default=False)
]
Metric = Annotated[str, typer.Option("--metric", help="The loss column to minimize.")]
Params = Annotated[list[str] | None, typer.Option("--param", help="Only this parameterization (repeatable).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of tables.")]


def wide(c: Console) -> Console:
    """The console as it is: an `Out` is already wide when piped (kept for the commands that say so)."""
    return c


Root = Annotated[Path | None, typer.Option("--root", help="Folder of sweeps (default: $HPT_ROOT, else ./runs).")]
PrintConfig = Annotated[bool, typer.Option("--print-config", help="Print the composed config as YAML and exit.")]


def hint(*words: str, root: Path | None = None) -> str:
    """A command to paste: `hpt WORDS`, with the --root it was given (or $HPT_ROOT's), quoted for the shell."""
    where = root if root is not None else os.environ.get("HPT_ROOT")
    return " ".join(["hpt", *(shlex.quote(str(w)) for w in words)]
                    + (["--root", shlex.quote(str(where))] if where else []))


def find_sweep_file(given: Path) -> Path:
    """The sweep file: the path as given, else the packaged sweep of that name (`width`, `width.yaml`)."""
    if given.is_file() or given.parent != Path("."):  # a path: as given (a folder named `width` is no sweep file)
        return given
    packaged = SWEEPS_DIR / (given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml")
    if packaged.is_file():
        return packaged
    names = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
    raise HptError(f"no such config file: {given} (nor a packaged sweep of that name: {names}; "
                   f"`hpt init` copies them into a folder to edit)")


def _estimate(runs: list[Any], to_launch: list[str], launcher: Any, jobs: int | None) -> dict[str, Any] | None:
    """What launching costs: GPU-hours when SLURM GPUs are the target, else the wall time at the training
    rate measured here on the largest run's shape (a few steps), with as many runs at once as will run."""
    from hptransfer import views  # per command
    from hptransfer.config import user  # per command
    from hptransfer.config.derived import run_flops  # per command
    from hptransfer.sweeps.backends.local import cpu_count, default_jobs, local_gpus  # per command
    from hptransfer.sweeps.plan import GPU_FLOPS_PER_S  # per command

    wanted = set(to_launch)
    launching = [r for r in runs if r.run_id in wanted]
    if any(user.is_user_config(r.config) for r in launching):
        return views.estimate([0.0] * len(launching),
                              error="not estimated: hpt does not time your own code; one run of it tells")
    flops = [run_flops(r.config) for r in launching]
    if launcher.name == "slurm" and launcher.gpus_per_node > 0:
        return views.estimate(flops, gpu_flops_per_s=GPU_FLOPS_PER_S)
    if not launching:
        return views.estimate(flops, error="nothing to launch")
    if launcher.name == "slurm":  # CPU nodes: timed here, on this machine, with a task's threads
        parallel, threads = launcher.array_parallelism, launcher.cpus_per_task
    else:
        gpus = local_gpus()
        parallel = jobs or default_jobs(launcher, gpus)
        threads = None if gpus else max(1, cpu_count() // parallel)  # as the local scheduler shares the cores
    from hptransfer.train import speed  # per command: torch, only for a dry run's estimate

    try:
        seconds, timed = speed.run_seconds([r.config for r in launching], threads=threads)
    except (RuntimeError, ValueError, MemoryError, HptError) as err:  # no estimate is no reason to fail a dry run
        return views.estimate(flops, error=f"not measured: {type(err).__name__}: {str(err)[:200]}")
    startup = _job_startup_s()
    return views.estimate(flops, run_s=[s + startup for s in seconds], parallel=min(parallel, len(launching)),
                          how=f"{speed.summary(timed)}; each run: its steps and validation at its shape's rate, "
                              f"plus {startup:.1f} s to start its process (timed)")


_STARTUP: list[float] = []


def _job_startup_s() -> float:
    """Seconds a job spends before training: a fresh Python importing the job and the trainer (timed once)."""
    if not _STARTUP:
        import subprocess  # per command: only a dry run times a job's start-up

        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import hptransfer.sweeps.job, hptransfer.train.loop"],
                       capture_output=True, check=False, timeout=120)
        _STARTUP.append(time.perf_counter() - t0)
    return _STARTUP[0]


@app.command(rich_help_panel="Sweeps")
def init(
    folder: Annotated[Path, typer.Argument(help="Folder to copy the sweep files into (made if missing).")]
    = Path("conf"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite sweep files that exist there.")] = False,
) -> None:
    """Copy the packaged sweep files (width, depth, batch, duration) into a folder to edit.

    A file that exists is kept unless --force. Each file composes the
    package's run config, so an edited copy works from anywhere; `hpt sweep
    width` (a name, not a path) always finds the packaged original.

    Examples:
      hpt init
      hpt init studies && hpt sweep studies/width.yaml --dry-run
      hpt init conf --force
    """
    if folder.exists() and not folder.is_dir():
        raise HptError(f"{folder} exists and is not a folder")
    sources = sorted(SWEEPS_DIR.glob("*.yaml"))
    folder.mkdir(parents=True, exist_ok=True)
    copied, kept = [], []
    for src in sources:
        dest = folder / src.name
        if dest.exists() and not force:
            kept.append(dest.name)
            continue
        shutil.copyfile(src, dest)
        copied.append(dest.name)
    if kept:
        err_console.print(f"[yellow]hpt: warning:[/yellow] kept {len(kept)} existing file(s) in {folder}: "
                          f"{', '.join(kept)} (--force overwrites them)", highlight=False)
    if copied:
        first = folder / ("width.yaml" if "width.yaml" in copied else copied[0])
        console.print(f"copied {len(copied)} sweep file(s) into {folder}: {', '.join(copied)}; edit one, then: "
                      f"{hint('sweep', first, '--dry-run')}", highlight=False)


@app.command(rich_help_panel="Sweeps")
def sweep(
    sweep_file: Annotated[Path, typer.Argument(
        help="A sweep file, e.g. conf/width.yaml, or a packaged sweep by name: width, depth, batch, duration.",
        show_default=False)],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="Hydra overrides: key=value for every run; key=a,b, choice(...) or range(...) to sweep a key; "
             "launcher=slurm.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the grid, run count and compute; launch nothing.")]
    = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Also relaunch failed runs (never diverged).")]
    = False,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1,
                                             help="Local: runs at once (default: one per GPU, else one per core).")]
    = None,
    detach: Annotated[bool, typer.Option("--detach", help="Local: run in the background and return at once.")]
    = False,
    name: Annotated[str | None, typer.Option("--name", help="Sweep name (default: sweep.name of the file).")] = None,
    root: Root = None,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the composed sweep (YAML, as sweep.yaml would hold it) and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print the plan as JSON.")] = False,
) -> None:
    """Expand a sweep file's grid and launch every run that has no result yet.

    The file is a path, or a packaged sweep's name (width, depth, batch,
    duration; `hpt init` copies them to edit). A file with a `run:` block
    sweeps your own code instead of hpt's GPT: a function
    (run: {target: pkg.mod:main}) or a command (run: {command: "python
    train.py {overrides}"}); see examples/ and docs/design.md.

    Each run's config is frozen in runs/<sweep>/<run_id>/config.yaml (its id
    is a hash of it), so the same command again launches nothing, a widened
    grid launches only the new points, and an interrupted sweep resumes.
    Locally the runs go N at a time with a live display (Ctrl-C stops them,
    recorded cancelled); with launcher=slurm they go as job arrays and the
    command returns. The dry run estimates the time from a few training
    steps timed here (GPU-hours when the target is SLURM with GPUs).

    Examples:
      hpt sweep width --dry-run
      hpt sweep conf/width.yaml
      hpt sweep width model.width=64,128,256 'param=choice(sp,mup)' \\
          train.steps=200
      hpt sweep width --retry-failed
      hpt sweep width launcher.fuse=auto   # runs of one shape: one model
      hpt sweep width --dry-run --json | jq .estimate
      hpt sweep depth --print-config
      hpt sweep examples/char_mlp/sweep.yaml width=32,64 steps=50
      hpt sweep depth launcher=slurm launcher.partition=gpu \\
          launcher.timeout_min=120
    """
    from hptransfer import views  # per command
    from hptransfer.provenance import git_state  # per command
    from hptransfer.sweeps import launch, plan  # per command
    from hptransfer.sweeps.backends.local import default_jobs, local_gpus  # per command
    from hptransfer.sweeps.store import SweepFolder, root_dir  # per command

    if as_json and not dry_run:
        raise HptError("--json goes with --dry-run (hpt status SWEEP --json follows a launched sweep)")
    spec = plan.load(find_sweep_file(sweep_file), overrides, name=name)
    if print_config:
        from omegaconf import OmegaConf  # per command

        from hptransfer.sweeps.store import sweep_definition  # per command

        print(OmegaConf.to_yaml(OmegaConf.create(sweep_definition(spec))), end="")
        return
    runs = plan.expand(spec)
    for note in spec.notes:  # what the data check could only sample
        err_console.print(f"[yellow]hpt: note:[/yellow] {note}", highlight=False)
    launcher = launch.launcher_config(spec.launcher)
    launch.check_placement(spec, runs, launcher)
    folder = SweepFolder(root_dir(root) / spec.name)
    ids = [r.run_id for r in runs]
    records = folder.job_records() if folder.path.exists() else []
    mixed = views.commit_warning(spec.name, views.commits(records), launching=views.commit_label(git_state()))
    if mixed:
        err_console.print(f"[yellow]hpt: warning:[/yellow] {mixed}", highlight=False)
    n_jobs = jobs or default_jobs(launcher, local_gpus()) if launcher.name == "local" else None
    packing = launch.packing_of(launcher, n_jobs)

    def sharing(to_launch: list[str]) -> str | None:  # how the runs share jobs: said before they launch
        if packing.trivial:
            return None
        line = launch.describe_tasks(launch.tasks_for(folder, to_launch, packing, {r.run_id: r.config for r in runs}))
        return line and (f"sweep '{spec.name}': {line} (launcher.fuse={launcher.fuse}, "
                         f"launcher.runs_per_task={launcher.runs_per_task})")

    if dry_run:
        to_launch = launch.launchable(folder, spec, runs, retry_failed)
        data = views.plan_data(spec, runs, to_launch, launcher.name, _estimate(runs, to_launch, launcher, jobs))
        shared = sharing(to_launch)
        if as_json:
            print(json.dumps({**data, "shared_jobs": shared}, indent=1, default=str))
            return
        out = wide(console)
        out.print(views.plan(data))
        if shared:
            out.print(shared, highlight=False)
        if launcher.name == "slurm":
            from hptransfer.sweeps.backends import slurm  # per command, and a local sweep never imports submitit

            size = slurm.array_size(launcher)
            script = slurm.sbatch_script(launcher, folder.name, slurm.submitit_folder(folder), max(len(to_launch), 1))
            out.print(views.slurm_plan(launcher, size, script, len(to_launch), runs), soft_wrap=True)  # no wrap
        return
    launch.prepare(folder, spec, runs)
    if not packing.trivial and (shared := sharing(launch.launchable(folder, spec, runs, retry_failed))):
        console.print(shared, highlight=False)
    if launcher.name == "slurm":
        records = launch.submit_slurm(folder, ids, launcher, retry_failed=retry_failed)
        arrays = sorted({r["job_id"].split("_")[0] for r in records})
        failed = launch.failed_runs(folder, ids)
        console.print(f"sweep '{spec.name}': {len(records)} of {len(runs)} runs submitted to SLURM"
                      + (f" as job {', '.join(arrays)}" if arrays else " (the rest have results or live jobs)")
                      + views.failed_hint(failed)
                      + f"; follow with: {hint('status', spec.name, '--watch', root=root)}", soft_wrap=True)
        if failed:
            raise typer.Exit(1)
        return
    order = launch.largest_first(runs)
    if detach:
        pid = launch.detach_local(folder, order, jobs=n_jobs, retry_failed=retry_failed, packing=packing)
        console.print(f"sweep '{spec.name}': scheduler {pid} runs it in the background, {n_jobs} at a time "
                      f"(log: {folder.path / 'scheduler.log'}); follow with: "
                      f"{hint('status', spec.name, '--watch', root=root)}",
                      soft_wrap=True)
        return
    keys = [d.key for d in spec.dims if len(d.values) > 1]
    try:
        with views.LiveProgress(console, n_jobs, keys) as live:
            progress = launch.run_local(folder, order, jobs=n_jobs, retry_failed=retry_failed, on_event=live,
                                        packing=packing)
    except KeyboardInterrupt:
        err_console.print("hpt: stopped; unfinished runs are recorded cancelled. Resume with the same command.",
                          soft_wrap=True)
        raise typer.Exit(130) from None
    failed = launch.failed_runs(folder, ids)  # this launch's and earlier ones not relaunched: exit 1
    console.print(views.sweep_done(spec.name, progress, len(runs), failed, again=hint("status", spec.name, root=root)),
                  soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command(rich_help_panel="Sweeps")
def search(
    search_file: Annotated[str, typer.Argument(
        help="A search file (e.g. conf/search.yaml; `search` is the packaged one), or `status` and then a "
             "search's name.", show_default=False)],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="Hydra overrides (key=value) for every run, e.g. search.budget.generations=8 launcher=slurm.",
        show_default=False)] = None,
    show_status: Annotated[bool, typer.Option("--status", help="Show the search's progress and best point; run "
                                              "nothing.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the space and the budget; launch nothing.")]
    = False,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1,
                                             help="Local: runs at once (default: one per GPU, else one per core).")]
    = None,
    name: Annotated[str | None, typer.Option("--name", help="Search name (default: search.name of the file).")]
    = None,
    root: Root = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --status: print the summary as JSON.")] = False,
) -> None:
    """Search per-module constants with an evolution strategy at small scale.

    The constants: per-class LR, init and output multipliers, Adam betas,
    weight decay, any float key. The file composes like a sweep file and has
    a `search:` block: space ({key: {low, high, log}}), budget
    ({generations, population}), objective (final_val_loss), seeds, strategy
    (cmaes or random) and, optionally, transfer (the larger scale).

    Each generation asks `population` points of Optuna's CMA-ES, runs each
    (x seeds) through the sweep engine, locally or as one SLURM array, and
    tells it the mean loss; a diverged or failed point scores search.penalty
    (the worst). The search folder is a sweep folder (hpt status and hpt
    collect see its runs) with the strategy's journal, generations.jsonl and
    report.md. Stopped at any point, the same command resumes it; a finished
    run is never run again. With transfer: the best point and the best LR of
    a grid (the baseline) run again at the search scale and the larger one,
    several seeds each, and the report says whether the gain holds beyond
    the seeds' noise.

    Examples:
      hpt search search --dry-run
      hpt search conf/search.yaml
      hpt search conf/search.yaml search.budget.generations=10
      hpt search status search
      hpt search search --status --json | jq .best
      hpt search conf/search.yaml launcher=slurm launcher.partition=cpu
    """
    from hptransfer.sweeps import search as searching  # per command
    from hptransfer.sweeps.store import root_dir  # per command

    base = root_dir(root)
    args = list(overrides or [])
    if search_file == "status" and not Path(search_file).is_file():
        if len(args) != 1:
            raise HptError("hpt search status takes one search name, e.g. hpt search status search")
        search_file, args, show_status = args[0], [], True
    given = Path(search_file)
    file = given if given.is_file() else SWEEPS_DIR / (given.name if given.suffix in (".yaml", ".yml")
                                                       else f"{given.name}.yaml")
    if show_status:
        found = name or (searching.load(given, args).name if given.is_file() else search_file)
        data = searching.summary(searching.open_search(found, base))
        if as_json:
            print(json.dumps(data, indent=1, default=str))
            return
        _print_search(data, hint("search", "status", data["name"], root=root))
        return
    if as_json:
        raise HptError("--json goes with --status")
    if not file.is_file():
        names = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml") if "\nsearch:" in p.read_text()))
        raise HptError(f"no such search file: {search_file} (nor a packaged search of that name: {names})")
    spec = searching.load(file, args, name=name)
    launcher = searching.launcher_of(spec)
    n_jobs = searching.jobs_default(launcher, jobs)
    if dry_run:
        space = Table("key", "low", "high", "log", "base", box=None, header_style="bold")
        for k, b in spec.space.items():
            space.add_row(k, f"{b.low:g}", f"{b.high:g}", str(b.log), f"{spec.base_values[k]:g}")
        console.print(space)
        t = spec.transfer
        console.print(f"search '{spec.name}': {spec.strategy}, {spec.generations} generations x {spec.population} "
                      f"points x {len(spec.seeds)} seeds = {searching.total_runs(spec)} runs on {launcher.name}"
                      + (f"; then a baseline LR grid and the transfer check at "
                         f"{' '.join(f'{k}={v}' for k, v in t.scale.items())} ({len(t.seeds)} seeds)" if t else "")
                      + f"; run it with: {hint('search', search_file, *args, root=root)}", highlight=False)
        return

    def on_event(event: str, s: Any, progress: Any) -> None:
        if event == "ended":
            loss = (s.result or {}).get(spec.objective)
            console.print(f"  {s.run_id} {s.state}" + (f" {spec.objective} {loss:.4f}"
                                                       if isinstance(loss, float) else f" {s.reason}"),
                          highlight=False)

    engine = searching.Engine(launcher, n_jobs, on_event, lambda line: console.print(line, highlight=False))
    try:
        data = searching.run_search(spec, base, engine)
    except KeyboardInterrupt:
        err_console.print("hpt: stopped; resume with the same command (finished runs are kept).", soft_wrap=True)
        raise typer.Exit(130) from None
    _print_search(data, hint("search", "status", spec.name, root=root))


def _print_search(data: dict[str, Any], again: str) -> None:
    """A search's best per generation, its best point and its transfer check (from `search.summary`)."""
    table = Table("generation", "trials", "diverged/failed", "best", "best so far", box=None, header_style="bold")
    for g in data["generations"]:
        table.add_row(str(g["generation"] + 1), str(g["trials"]), str(g["failed"]),
                      *("-" if x is None else f"{x:.4f}" for x in (g["best"], g["best_so_far"])))
    console.print(f"search '{data['name']}' ({data['path']}): {len(data['generations'])} generations logged",
                  highlight=False)
    console.print(table)
    best = data["best"]
    if best:
        console.print(f"best point (trial {best['number']}, {best['value']:.4f}): "
                      + " ".join(f"{k}={v:.4g}" for k, v in best["params"].items()), highlight=False)
    if data.get("sensitivities"):  # which keys mattered near the optimum found
        console.print("sensitivities (share of the objective's variation): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in data["sensitivities"].items()), highlight=False)
    for scale, c in ((data.get("transfer") or {}).get("scales") or {}).items():
        console.print(f"transfer at the {scale} scale: {c['verdict']}", highlight=False)
    console.print(f"report: {Path(data['path']) / 'report.md'}; again: {again}", highlight=False)


@app.command(rich_help_panel="Sweeps")
def status(
    sweep: Annotated[str | None, typer.Argument(help="Sweep name or folder (default: every sweep).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: counts and every run.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until no run is pending or running.")] = False,
    every: Annotated[float, typer.Option("--every", help="Seconds between refreshes with --watch.")] = 5.0,
    root: Root = None,
) -> None:
    """Show each sweep's runs: pending, running, completed, diverged, failed, cancelled.

    States come from the run folders and, for SLURM runs, from one sacct call
    (squeue when accounting is missing). For one sweep: a grid of final
    validation loss with the scaling axis against learning rate (best per
    row highlighted, `div` = diverged), an ETA (the finished runs' wall times
    and the running ones' progress), every run with its job id, attempts and
    loss (a running run's latest training loss), and the log tail of failed
    runs. --watch fits the screen: the runs that need attention first, cut
    with a count of what is hidden. A sweep whose runs come from more than
    one git commit is warned about.

    Examples:
      hpt status
      hpt status width
      hpt status width --watch
      hpt status width --json | jq '.width.runs[] | select(.state == "failed")'
    """

    from hptransfer import views  # per command
    from hptransfer.sweeps.state import counts, run_states  # per command
    from hptransfer.sweeps.store import list_sweeps, open_sweep, root_dir  # per command

    base = root_dir(root)
    folders = [open_sweep(sweep, base)] if sweep else list_sweeps(base)
    if not folders:
        raise HptError(f"no sweeps in {base}")
    again = hint("status", *([folders[0].name] if sweep else []), root=root)

    def snapshot() -> tuple[dict[str, list], dict[str, Any]]:
        states = {f.name: run_states(f, summaries=True) for f in folders}
        return states, {f.name: _extras(f, states[f.name]) for f in folders}

    if as_json:
        snap, extras = snapshot()
        data = {name: {"counts": counts(states), "commits": views.commits(extras[name].records),
                       "runs": [{**s.as_dict(), **({"latest_train_loss": extras[name].losses.get(s.run_id)}
                                                  if s.state == "running" else {})} for s in states]}
                for name, states in snap.items()}
        print(json.dumps(data, indent=1, default=str))
        return
    if not watch or not console.is_terminal:  # piped, --watch shows each refresh in full
        while True:
            snap, extras = snapshot()
            console.print(views.status_view(snap, folders, detail=sweep is not None, extras=extras, hint=again))
            if not watch or not any(s.active for states in snap.values() for s in states):
                return
            time.sleep(every)
    with Live(console=console, auto_refresh=False, vertical_overflow="crop") as live:
        while True:
            snap, extras = snapshot()
            size = console.size
            live.update(views.status_view(snap, folders, detail=sweep is not None, extras=extras, hint=again,
                                          height=size.height, width=size.width), refresh=True)
            if not any(s.active for states in snap.values() for s in states):
                break
            time.sleep(every)


@app.command(rich_help_panel="Sweeps")
def collect(
    sweeps: Annotated[list[str] | None, typer.Argument(help="Sweep names or folders (default: every sweep).")]
    = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")] = Path("results.parquet"),
    root: Root = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print what was written as JSON: path, rows, runs per status, warnings.")] = False,
) -> None:
    """Write one row per run of the sweeps to Parquet: results, states, config, loss curve.

    Columns (docs/design.md#resultsparquet): run_id, sweep, status, the
    result metrics, width, depth, batch_size, tokens, parameterization, lr,
    every config value as cfg.<key>, the training curve curve_step/curve_loss
    and the validation curve curve_val_step/curve_val_loss. Runs without a
    result keep their state (pending, running, cancelled, failed) with null
    metrics; a corrupt result.json is reported and skipped.

    Examples:
      hpt collect
      hpt collect width depth --out results.parquet
      hpt collect width --json | jq .counts
    """

    from hptransfer.sweeps import collect as collecting  # per command
    from hptransfer.sweeps.store import list_sweeps, open_sweep, root_dir  # per command

    if out.is_dir() or not out.parent.is_dir():  # a mistyped path creates nothing: the folder must exist
        raise HptError(f"--out {out}: " + ("is a folder; name the .parquet file to write" if out.is_dir() else
                                           f"no folder {out.parent} to write it in (create it first)"))
    base = root_dir(root)
    folders = [open_sweep(s, base) for s in sweeps] if sweeps else list_sweeps(base)
    if not folders:
        raise HptError(f"no sweeps in {base}")
    table, problems = collecting.collect(folders)
    for p in problems:
        err_console.print(f"[yellow]hpt: warning:[/yellow] {p}", highlight=False, soft_wrap=True)
    collecting.write(table, out)
    by_state = Counter(table.column("status").to_pylist())
    if as_json:
        print(json.dumps({"path": str(out), "rows": table.num_rows, "sweeps": [f.name for f in folders],
                          "counts": dict(sorted(by_state.items())), "warnings": list(problems)}, indent=1))
        return
    console.print(f"wrote {table.num_rows} runs of {', '.join(f.name for f in folders)} to {out} "
                  f"({', '.join(f'{v} {k}' for k, v in sorted(by_state.items()))})", soft_wrap=True)


@app.command(rich_help_panel="Sweeps")
def cancel(
    sweep: Annotated[str | None, typer.Argument(help="Sweep name or folder (default: every sweep).")] = None,
    root: Root = None,
) -> None:
    """Cancel a sweep's pending and running jobs (scancel on SLURM; locally, stop its scheduler).

    Cancelled runs are recorded as such; the next `hpt sweep` launches them
    again.

    Examples:
      hpt cancel width
      hpt cancel
    """
    from hptransfer.sweeps import launch  # per command
    from hptransfer.sweeps.store import list_sweeps, open_sweep, root_dir  # per command

    base = root_dir(root)
    folders = [open_sweep(sweep, base)] if sweep else list_sweeps(base)
    for f in folders:
        n = launch.cancel(f)
        if n or sweep:
            console.print(f"sweep '{f.name}': cancelled {n} pending or running runs", soft_wrap=True)


@app.command(rich_help_panel="Analysis")
def analyze(
    results: Results,
    out: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default: <results>_report beside the table).")
    ] = None,
    metric: Metric = "final_val_loss",
    param: Params = None,
    axis: Annotated[
        list[str] | None, typer.Option("--axis", help="Only this axis: width, depth, batch_size, tokens (repeatable).")
    ] = None,
    boot: Annotated[int, typer.Option("--boot", help="Bootstrap resamples over seeds, used with 3 or more seeds "
                                      "where wider than the curvature interval (0: none).")] = 200,
    as_json: AsJson = False,
) -> None:
    """Find the best learning rate per scale, its law, and which parameterization transfers best.

    Groups runs by parameterization and scaling axis (width, depth, batch
    size, tokens), every other hyperparameter fixed. Per scale: the optimum
    of a local cubic in log2(lr) and of an Akima spline, averaged over the
    seeds present at every LR; diverged runs dropped (drawn as crosses);
    edge optima flagged with the learning rates to add; a 95% interval (the
    fit's curvature and the loss noise; the seed bootstrap with 3+ seeds,
    where wider). Per group: the law log lr* = log a + b log s (b: log2 per
    doubling), each optimum weighted by its own uncertainty, with a test of
    whether it bends; its fit quality, the loss cost of a mis-set LR, the
    asymptotic loss (only with 4+ scales: it has 3 parameters), and a
    warning when gradient clipping differs across scales. Every verdict line
    says whether it rests on measured or fitted losses. Writes report.md,
    summary.json and figures to --out.

    Examples:
      hpt analyze results.parquet
      hpt analyze results.parquet --param sp --param mup --out report/
      hpt analyze results.parquet --json | jq '.groups[] | [.label, .law.b]'
    """

    from hptransfer.analysis.analyze import analyze as run_analysis  # per command
    from hptransfer.analysis.load import AXES, load_results  # per command
    from hptransfer.analysis.report import print_terminal, write_report  # per command

    unknown = [a for a in axis or [] if a not in AXES]
    if unknown:
        raise HptError(f"--axis {unknown[0]}: not one of {', '.join(AXES)}")
    df = load_results(results, metric)
    analysis = run_analysis(df, metric, params=param, axes=axis, n_boot=max(boot, 0))
    folder = out or results[0].with_name(f"{results[0].stem}_report")
    summary = write_report(analysis, folder, results)
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        print_terminal(summary, console, folder)


@app.command(rich_help_panel="Analysis")
def predict(
    results: Results,
    at: Annotated[str, typer.Option("--at", help="Target scale: width=4096, depth=48, batch_size=512, tokens=2e10.")],
    param: Params = None,
    metric: Metric = "final_val_loss",
    launch: Annotated[bool, typer.Option("--launch", help="Run the target: a sweep of one point (or the bracket) "
                                         "at the predicted learning rate, its prediction recorded.")] = False,
    bracket: Annotated[int, typer.Option("--bracket", help="With --launch: K learning rates (odd), the outermost "
                                         "at the interval's ends (x0.5 and x2 at least).")] = 1,
    name: Annotated[str | None, typer.Option("--name", help="With --launch: the target sweep's name (default: "
                                             "target-<param>-<axis><scale>).")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="With --launch: an override of the target run (repeatable), e.g. -s launcher=slurm "
                            "-s launcher.nodes=2 -s train.parallel=fsdp.", show_default=False)] = None,
    root: Root = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --launch: show the target sweep's plan, "
                                          "launch nothing.")] = False,
    as_json: AsJson = False,
) -> None:
    """Predict a large run's learning rate from a sweep's transfer law, and launch it.

    Evaluates the law log lr* = log a + b log s of each group on the target's
    axis at the target, with a 95% interval from the optima's own
    uncertainties, the law's extra scatter and the extrapolation distance
    (checked by simulation to cover the truth 95-97% of the time on straight
    laws); widened, with a warning, when the law bends. An unflagged
    prediction says how far a bend too small to detect could move it. For a
    width target, also each parameter class's learning rate (eta * gamma_X *
    m^-c_X, the abc table). Prints the `hpt train` line for the run, with the
    group's non-default settings.

    --launch runs it: a sweep named target-<param>-<axis><scale> (in --root)
    of the target point at the predicted learning rate, with --bracket K
    also K-1 neighbours out to the interval's ends, on the launcher the
    --set overrides choose (local by default; launcher=slurm with
    launcher.nodes/tasks_per_node and train.parallel for a multi-GPU run).
    Every target run records its prediction; collect the target sweep with
    the small ones and `hpt analyze` sets the realized optimum and loss
    beside the law.

    Examples:
      hpt predict results.parquet --at width=4096 --param mup
      hpt predict results.parquet --at tokens=2e10 --json
      hpt predict results.parquet --at width=256 --launch --bracket 3
      hpt predict results.parquet --at width=4096 --launch -s launcher=slurm \\
          -s launcher.nodes=2 -s launcher.tasks_per_node=8 \\
          -s train.parallel=fsdp
    """

    from hptransfer.analysis.load import load_results  # per command
    from hptransfer.analysis.predict import as_dict, render  # per command
    from hptransfer.analysis.predict import predict as run_predict  # per command

    if not launch and (overrides or bracket != 1 or name or dry_run):
        raise HptError("--set, --bracket, --name and --dry-run go with --launch")
    predictions = run_predict(load_results(results, metric), at, metric, params=param)
    if launch:
        _launch_target(predictions, overrides or [], bracket=bracket, name=name, root=root, dry_run=dry_run,
                       as_json=as_json)
    elif as_json:
        print(json.dumps([as_dict(p) for p in predictions], indent=1))
    else:
        render(predictions, console)


def _launch_target(predictions: list[Any], overrides: list[str], *, bracket: int, name: str | None,
                   root: Path | None, dry_run: bool, as_json: bool) -> None:
    """Write the target sweep file beside the target sweep's folder and launch it as `hpt sweep` would."""
    from omegaconf import OmegaConf  # per command

    from hptransfer.analysis import predict as pr  # per command
    from hptransfer.files import write_atomic  # per command
    from hptransfer.sweeps.store import root_dir  # per command

    if len(predictions) != 1:
        labels = ", ".join(p.label for p in predictions)
        raise HptError(f"--launch runs one prediction, and there are {len(predictions)} ({labels}): choose one "
                       "with --param")
    (p,) = predictions
    lrs = pr.bracket(p, bracket)
    scale = int(p.target) if float(p.target).is_integer() else p.target
    name = name or f"target-{p.parameterization}-{p.axis}{scale}"
    spec = pr.target_sweep(p, name, lrs)
    if not as_json:
        pr.render([p], console)
    file = root_dir(root) / f"{name}.target.yaml"
    write_atomic(file, "# The target sweep of `hpt predict --launch` (hpt sweep runs it as any sweep file)\n"
                       + OmegaConf.to_yaml(OmegaConf.create(spec)))
    sweep(file, [*pr.target_overrides(p), *overrides], dry_run=dry_run, root=root, as_json=as_json and dry_run)


@app.command(rich_help_panel="One run")
def train(
    overrides: Overrides = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Run folder (default: runs/train/<run_id>).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    print_config: PrintConfig = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result record (result.json) as JSON; no "
                                          "progress bar.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="Train as N processes on this machine (torchrun): one per "
                                       "GPU, or CPU workers sharing the cores; train.parallel defaults to ddp.")] = 1,
) -> None:
    """Train one model and write config.yaml, metrics.jsonl and result.json.

    A diverged run (non-finite loss or loss above train.diverge_factor x its
    initial value) stops early with status 'diverged' and exit code 0: it is
    a result, not an error. A run folder that already holds a result is not
    trained again: the cached result is said so and printed. With --nproc N
    the run is N processes (DDP, or FSDP2 with train.parallel=fsdp) training
    the same global batches; killed, the same command resumes it.

    Examples:
      hpt train model.width=256 param=mup optim.lr=0.01 train.steps=300
      hpt train param=mup --print-config
      hpt train model.width=64 --json | jq .final_val_loss
      hpt train --nproc 4 train.parallel=fsdp train.grad_accum=2
    """
    from hptransfer.config.compose import compose_run  # per command
    from hptransfer.config.frozen import run_id, to_yaml  # per command
    from hptransfer.sweeps.store import root_dir  # per command

    cfg = compose_run(overrides)
    if nproc > 1 and cfg.train.parallel == "none":  # several processes share the model as replicas by default
        cfg.train.parallel = "ddp"
    if print_config:
        print(to_yaml(cfg), end="")  # what the run folder's config.yaml will hold
        return
    from hptransfer.train.loop import train as train_run  # per command: torch, only to train
    from hptransfer.train.loop import train_local  # per command: torch, only to train

    folder = run_dir or root_dir() / "train" / run_id(cfg)
    cached = (folder / "result.json").exists()
    progress = not (quiet or as_json or cached)
    result = train_run(cfg, folder, progress=progress) if nproc == 1 else train_local(cfg, folder, nproc,
                                                                                      progress=progress)
    if cached:
        err_console.print(f"hpt: cached: {folder} already holds this run's result, which is not trained again "
                          f"(another --run-dir, or removing its result.json, trains it anew)", highlight=False)
    if as_json:
        print(json.dumps(result, indent=1, default=str))
    if result["status"] == "failed":
        err_console.print(result["error"].rstrip(), highlight=False)
        raise typer.Exit(1)
    if as_json:
        return

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    console.print(
        f"[bold]{result['status']}[/bold]{' (cached)' if cached else ''} run {result['run_id']} in {folder}: "
        f"val loss {fmt(result['final_val_loss'])}, train loss {fmt(result['final_train_loss'])}, "
        f"{result['steps']} steps, {result['wall_s']:.1f} s", highlight=False,
    )


@app.command(rich_help_panel="One run")
def params(
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show what the parameterization does to every parameter tensor.

    First the width exponents per class (a: forward multiplier m^-a, b: init std
    m^-b, c: learning rate m^-c, g: Adam epsilon m^-g), overridden ones marked
    *; then one row per tensor: shape, class (E embedding, H hidden, R readout,
    V vector-like), width multiplier m, init std, forward multiplier, learning
    rate, weight decay, Adam epsilon (- where the optimizer has none). The
    learning-rate exponents c are the optimizer's (sgd, adafactor and muon
    have their own: docs/science.md#other-optimizer-families). Any exponent
    can be overridden to define a parameterization of one's own
    (param.exponents.<E|H|R>.<a|b|c|g>); check it with coord-check.

    Examples:
      hpt params param=mup model.width=512 param.base_width=128
      hpt params param=mup model.width=512 param.exponents.R.c=1
      hpt params param=mup optim=sgd model.width=512
    """
    from hptransfer.config.compose import compose_run  # per command
    from hptransfer.train.model import param_specs  # per command
    from hptransfer.train.param import SPEC_COLUMNS, preset_of  # per command

    cfg = compose_run(overrides)
    specs = param_specs(cfg)
    if as_json:
        print(json.dumps([dataclasses.asdict(s) for s in specs.values()], indent=1))
        return

    out = wide(console)  # piped output gets a wide console: tensor names must not be cut
    preset, given = preset_of(cfg), cfg.param.exponents
    out.print(f"{cfg.param.name} with optim={cfg.optim.name}: width exponents per class, c the optimizer's "
              f"(* overridden by param.exponents)", highlight=False)
    exponents = Table("class", "a", "b", "c", "g", box=None, header_style="bold")
    for cls in ("E", "H", "R"):
        abc = getattr(preset, cls)
        exponents.add_row(cls, *(f"{getattr(abc, e):g}" + ("*" if given[cls][e] is not None else "") for e in "abcg"))
    if preset.V.c:  # vector-like tensors scale only under an optimizer's own rule (SGD's LR x length)
        exponents.add_row("V", *(f"{getattr(preset.V, e):g}" for e in "abcg"))
    out.print(exponents)
    table = Table(*SPEC_COLUMNS, box=None, header_style="bold")
    for s in specs.values():
        table.add_row(*s.cells())
    out.print(table)
    if cfg.optim.name == "muon":
        out.print("muon: the H rows' lr is torch.optim.Muon's, which scales it by sqrt(max(1, fan_out / fan_in)); "
                  "E, R and V train with AdamW", highlight=False)


@app.command("coord-check", rich_help_panel="One run")
def coord_check(
    overrides: Overrides = None,
    axis: Annotated[str, typer.Option("--axis", help="Scale the model along width (model.width) or depth "
                                      "(model.n_layers).")] = "width",
    widths: Annotated[str | None, typer.Option(
        "--widths", help="Comma-separated widths (default: param.base_width x 1, 2, 4, 8, 16).", show_default=False)]
    = None,
    depths: Annotated[str | None, typer.Option(
        "--depths", help="With --axis depth: comma-separated depths (default: param.base_depth x 1, 2, 4, 8).",
        show_default=False)] = None,
    steps: Annotated[int, typer.Option("--steps", help="Steps to record; step 1 is before any update.")] = 5,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds to average (train.seed, train.seed + 1, ...).")] = 2,
    tol: Annotated[float | None, typer.Option("--tol", help="Largest |slope| of a flat row; the most a size may "
                                              "grow (default: 0.2 along width, 0.25 along depth).", show_default=False)]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (rows, slopes, verdict) instead of a table.")]
    = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write log-log plots of the rows against the scale "
                                              "(.png, .pdf, .svg).", show_default=False)] = None,
) -> None:
    """The coordinate check: does training change each layer's output the same way at every width (or depth)?

    Trains the model at each scale for a few steps on one fixed batch at a
    constant, fairly large LR and records, per module (embedding, each
    attention's logits and output, each MLP, the residual stream, the final
    norm, the logits) and step: its size mean |h_t|, its change since step 1
    mean |h_t - h_1| (what the updates did: muP's promise is that this is the
    same at every width), and the readout's own update (W_t - W_1) x_t (so a
    wrong readout LR or multiplier cannot hide behind the layers below). Fits
    the log-log slope of each against the scale, per step.

    PASS when every change and the readout's update are flat (|slope| < --tol)
    and no size grows (init parts may shrink; so may the logits' change, which
    carries the readout's init part). What each error does: a wrong LR exponent
    makes its class's change grow or shrink, a wrong multiplier moves its
    output's change (the readout's update row for R), a wrong init makes a size
    grow; an abc-symmetric shift of a preset changes nothing and passes. sp
    fails; mup, mup_everett and completep pass. Along depth (first and last
    block, residual stream, logits): completep passes; without its residual
    multiplier (param.exponents.depth.residual=0) or with another LR depth
    factor (param.exponents.depth.lr) it fails; depth_mup's blocks learn less as
    they multiply (mL^-1/2), and it fails.

    The check's defaults, each overridable: optim.lr=0.001, optim.grad_clip=0,
    optim.weight_decay=0, train.batch_size=8, train.seq_len=32,
    param.base_width=32, model.head_dim=8 (so widths 32-512). Any width exponent
    can be changed to check a parameterization of one's own:
    param.exponents.<E|H|R>.<a|b|c|g>, param.exponents.depth.<residual|lr> (see
    hpt params). Exit code 0: pass, 1: fail, 2: bad input.

    Examples:
      hpt coord-check param=mup
      hpt coord-check param=mup param.exponents.R.c=1    # readout LR / m: fails
      hpt coord-check param=sp --plot sp.png
      hpt coord-check param=completep --axis depth
      hpt coord-check param=completep model.n_layers=4 \\
          --widths 128,256,512,1024,2048 --json
    """
    from hptransfer.train import coord  # per command

    if plot is not None:
        coord.plot_format(str(plot))  # a bad file name fails now, not after the training
    if axis not in coord.AXES:
        raise HptError(f"--axis: '{axis}' is not one of {', '.join(coord.AXES)}")
    given, wrong = (widths, depths) if axis == "width" else (depths, widths)
    if wrong is not None:
        raise HptError(f"--{'depths' if axis == 'width' else 'widths'} goes with --axis "
                       f"{'depth' if axis == 'width' else 'width'}; along {axis} use --{axis}s")
    scales = None if given is None else coord.parse_scales(given, f"--{axis}s")
    with err_console.status("coordinate check", spinner="dots") as status:
        result = coord.coord_check(overrides or [], scales, steps=steps, seeds=seeds, tol=tol, axis=axis,
                                   progress=lambda what: status.update(f"coordinate check: training {what}"))
    if plot is not None:
        coord.plot(result, str(plot))
    if as_json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        out = wide(console)
        out.print(coord.render_table(result))
        out.print(f"[{'green' if result.passed else 'red'}]{coord.verdict(result)}[/]", highlight=False)
    if not result.passed:
        raise typer.Exit(1)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    if ({"-h", "--help"} & set(sys.argv[1:]) or len(sys.argv) < 2) and not sys.stdout.isatty():
        from typer import rich_utils  # here: only help needs it; piped, help is laid out at 80 columns

        rich_utils.MAX_WIDTH = rich_utils.MAX_WIDTH or 80  # every help line is written to fit (examples too)
    try:
        app(prog_name="hpt")  # completion scripts and usage lines say `hpt`, however it was started
    except HptError as err:
        err_console.print(f"[red]hpt: error:[/red] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("hpt: interrupted")
        sys.exit(130)
