"""Searches: per-module constants found by an evolution strategy at small scale (`hpt search`).

A search file composes like a sweep file (the base run config, or the user's keys with a `run:`
block) and adds a `search:` block instead of `sweep:`:

    search:
      name: search
      space:                                  # float keys of the run config, each a range
        param.lr_mult.H: {low: 0.125, high: 8, log: true}
        optim.beta2: {low: 0.9, high: 0.999}
      budget: {generations: 6, population: 8}
      objective: final_val_loss               # a number of result.json: the mean over seeds is minimized
      seeds: [0]
      strategy: {name: cmaes, seed: 0}        # cmaes (Optuna's CmaEsSampler) or random
      penalty: 1.0e9                          # the value of a diverged or failed point (the worst)
      transfer:                               # optional: does the best point beat a tuned LR at scale?
        scale: {model.width: 128, model.n_layers: 4}
        seeds: [0, 1, 2]

The search folder is a sweep folder (`<root>/<name>`: its runs are ordinary run folders, seen by
`hpt status` and `hpt collect`) plus search.json (the definition), study.journal (Optuna's journal:
the strategy's state), generations.jsonl (each generation's trials, their runs and values, appended
once the generation is told) and report.md with best.png. Each generation asks `population` points,
expands each into runs (the base config with the point's values, x seeds) and launches them through
the sweep engine (`launch.run_local` or `launch.submit_slurm`, then waits on `state.run_states`).
The same command resumes: trials asked but not logged are re-derived from the journal, their runs
found by their content-hashed ids, so a finished run is never run again (docs/design.md#searches).
"""

import dataclasses
import fcntl
import json
import math
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from hptransfer.config import user
from hptransfer.config.compose import compose_file, compose_user_file
from hptransfer.config.derived import SEED_KEY, flatten
from hptransfer.config.schema import typed_value, unknown_key_message
from hptransfer.errors import HptError
from hptransfer.files import append_lines, json_lines, read_json, write_atomic, write_figure, write_json_atomic
from hptransfer.sweeps import launch
from hptransfer.sweeps.backends.base import now
from hptransfer.sweeps.plan import Dim, Run, SweepSpec, expand
from hptransfer.sweeps.state import run_states
from hptransfer.sweeps.store import RunState, SweepFolder

SEARCH_FILE, JOURNAL, GENERATIONS = "search.json", "study.journal", "generations.jsonl"
REPORT, FIGURE, TRANSFER_FILE = "report.md", "best.png", "transfer.json"
BLOCK_KEYS = ("name", "space", "budget", "objective", "seeds", "strategy", "penalty", "transfer")
STRATEGIES = ("cmaes", "random")
DEFAULT_PENALTY = 1e9  # finite: CMA-ES ranks points, so the worst value only has to be the largest
MAX_ATTEMPTS = 2  # a run whose process died without a result is launched again once, then counts as failed
POLL_S = 2.0  # between looks at runs held by other jobs (a SLURM array, a killed search's orphans)
LR_SPAN = 8.0  # the baseline's LR grid spans base lr / 8 .. base lr x 8


@dataclass(frozen=True)
class Bound:
    low: float
    high: float
    log: bool


@dataclass
class Transfer:
    """The check after the search: best point vs the best LR of a grid, at the search scale and `scale`."""

    scale: dict[str, Any]  # overrides of the larger scale (model.width, model.n_layers, ...)
    seeds: list[int]
    lr_points: int  # the baseline grid's size (default: as many points as the search evaluated)
    lr_span: float


@dataclass
class SearchSpec:
    name: str
    file: Path
    space: dict[str, Bound]
    generations: int
    population: int
    objective: str
    seeds: list[int]
    strategy: str
    sampler_seed: int
    penalty: float
    transfer: Transfer | None
    base: SweepSpec  # the composed file (search block removed) as a sweep of the space keys x seeds
    base_values: dict[str, Any]  # the base config's value of each space key
    lr_key: str | None  # the learning-rate key (optim.lr, or the user's lr column)

    def definition(self) -> dict[str, Any]:
        """What must not change under the search's name (the budget may: more generations continue it)."""
        return {"space": {k: dataclasses.asdict(b) for k, b in self.space.items()}, "population": self.population,
                "objective": self.objective, "seeds": self.seeds, "strategy": self.strategy,
                "seed": self.sampler_seed, "penalty": self.penalty}


# ---- the search file -------------------------------------------------------------------------------------


def load(path: Path, overrides: list[str] | None = None, *, name: str | None = None) -> SearchSpec:
    """Compose a search file with plain Hydra overrides; every problem is an HptError before anything runs."""
    path = Path(path)
    overrides = list(overrides or [])
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # Hydra's grammar errors
        raise HptError(f"bad override: {str(err).splitlines()[0]}") from None
    for o in parsed:
        if o.is_sweep_override():
            raise HptError(f"'{o.input_line}': a search takes plain overrides (key=value); what it varies is "
                           "its search.space")
    is_user = user.is_user_file(path)
    composed = compose_user_file(path, overrides) if is_user else compose_file(path, overrides)
    OmegaConf.set_struct(composed, False)
    if "sweep" in composed:
        raise HptError(f"{path} has a 'sweep:' block: a search file has a 'search:' block instead (hpt sweep runs "
                       "sweep files)")
    block = composed.pop("search", None)
    if not isinstance(block, DictConfig):
        raise HptError(f"{path} has no 'search:' block (see conf/search.yaml)")
    s = OmegaConf.to_container(block, resolve=True)
    extra = [k for k in s if k not in BLOCK_KEYS]
    if extra:
        raise HptError(f"search.{extra[0]} is not a key of the search block (it has: {', '.join(BLOCK_KEYS)})")
    run = None
    if is_user:
        run = user.run_block(composed.get("run"), path)
        user.check_runnable(run)
        keys = user.user_keys(OmegaConf.to_container(composed))
        run["columns"] = user.find_columns(keys, run["columns"])
        seed_key = run["columns"].get("seed")
        if seed_key is None:
            raise HptError("a search of your code needs a seed key its runs read: add 'seed: 0' to the search file "
                           "(or name yours with run.columns.seed)")
        lr_key = run["columns"].get("lr")
        plain = keys
    else:
        seed_key, lr_key = SEED_KEY, "optim.lr"
        plain = OmegaConf.to_container(composed, resolve=True)
    space = _space(s.get("space"), plain, is_user)
    budget = s.get("budget") or {}
    if not isinstance(budget, dict) or set(budget) - {"generations", "population"}:
        raise HptError(f"search.budget is {{generations: G, population: P}}, got {budget}")
    generations, population = budget.get("generations", 4), budget.get("population", 8)
    if not _is_int(generations) or generations < 1:
        raise HptError(f"search.budget.generations must be a whole number >= 1, got {generations}")
    if not _is_int(population) or population < 2:
        raise HptError(f"search.budget.population must be a whole number >= 2 (an evolution strategy compares "
                       f"points), got {population}")
    objective = s.get("objective", "final_val_loss")
    if not isinstance(objective, str) or not objective:
        raise HptError(f"search.objective must name a number of result.json (e.g. final_val_loss), got {objective}")
    seeds = s.get("seeds", [0])
    seeds = [seeds] if _is_int(seeds) else seeds
    if not isinstance(seeds, list) or not seeds or not all(_is_int(x) for x in seeds) or len(set(seeds)) < len(seeds):
        raise HptError(f"search.seeds must be a list of distinct whole numbers, got {seeds}")
    strategy, sampler_seed = _strategy(s.get("strategy", "cmaes"))
    penalty = s.get("penalty", DEFAULT_PENALTY)
    if not _is_number(penalty) or not math.isfinite(penalty):
        raise HptError(f"search.penalty must be a finite number (the value of a diverged or failed point), "
                       f"got {penalty}")
    search_name = str(name or s.get("name") or path.stem)
    base_values = {k: user.get(plain, k) for k in space}
    dims = [Dim(k, (v,)) for k, v in base_values.items()] + [Dim(seed_key, tuple(seeds))]
    base = SweepSpec(search_name, path, dims, overrides, composed, run=run, seed_key=seed_key)
    transfer = _transfer(s.get("transfer"), plain, is_user, lr_key, seed_key, space)
    spec = SearchSpec(search_name, path, space, generations, population, objective, seeds, strategy, sampler_seed,
                      float(penalty), transfer, base, base_values, lr_key)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.name):
        raise HptError(f"bad search name '{spec.name}': use letters, digits, '.', '_' and '-'")
    # The corners and the base point must make valid runs: a bad bound fails here, not in generation 3.
    for point in (_clip(spec, base_values), {k: b.low for k, b in space.items()},
                  {k: b.high for k, b in space.items()}):
        runs_for(spec, point)
    return spec


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _space(raw: Any, plain: dict[str, Any], is_user: bool) -> dict[str, Bound]:
    if not isinstance(raw, dict) or not raw:
        raise HptError("search.space needs at least one key, e.g. space: {param.lr_mult.H: {low: 0.125, high: 8, "
                       "log: true}}")
    space: dict[str, Bound] = {}
    for key, b in flatten(raw, keep=lambda v: bool({"low", "high", "log"} & set(v))).items():
        where = f"search.space.{key}"
        if not user.has(plain, key):
            raise user.unknown_key(key, plain, "cannot search") if is_user else HptError(unknown_key_message(key))
        if not is_user:
            typed_value(key, 0.5)  # an int or str key of the schema fails on its type, naming the key
        value = user.get(plain, key)
        if not _is_number(value):
            raise HptError(f"{where}: the base config's value is {value!r}, not a number (a search sets numbers)")
        if not isinstance(b, dict) or set(b) - {"low", "high", "log"} or not {"low", "high"} <= set(b):
            raise HptError(f"{where} is {{low: L, high: H, log: true|false}}, got {b}")
        low, high, log = b["low"], b["high"], b.get("log", False)
        if not (_is_number(low) and _is_number(high) and math.isfinite(low) and math.isfinite(high)):
            raise HptError(f"{where}: low and high must be finite numbers, got {low} and {high}")
        if not isinstance(log, bool):
            raise HptError(f"{where}.log must be true or false, got {log}")
        if low >= high:
            raise HptError(f"{where}: low must be below high, got low={low} >= high={high}")
        if log and low <= 0:
            raise HptError(f"{where}: a log range needs low > 0, got low={low} (set log: false, or a positive low)")
        space[key] = Bound(float(low), float(high), log)
    return space


def _strategy(raw: Any) -> tuple[str, int]:
    block = {"name": raw} if isinstance(raw, str) else raw
    if not isinstance(block, dict) or set(block) - {"name", "seed"}:
        raise HptError(f"search.strategy is a name ({', '.join(STRATEGIES)}) or {{name: cmaes, seed: 0}}, got {raw}")
    name, seed = block.get("name", "cmaes"), block.get("seed", 0)
    if name not in STRATEGIES:
        raise HptError(f"search.strategy.name: '{name}' is not one of {', '.join(STRATEGIES)}")
    if not _is_int(seed):
        raise HptError(f"search.strategy.seed must be a whole number, got {seed}")
    return name, seed


def _transfer(raw: Any, plain: dict[str, Any], is_user: bool, lr_key: str | None, seed_key: str,
              space: dict[str, Bound]) -> Transfer | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"scale", "seeds", "lr_points", "lr_span"}:
        raise HptError(f"search.transfer is {{scale: {{model.width: 128}}, seeds: [0, 1, 2], lr_points: N, "
                       f"lr_span: 8}}, got {raw}")
    if lr_key is None:
        raise HptError("search.transfer compares with a tuned learning rate, and no key of your config is the lr "
                       "column: name it, e.g. run.columns.lr: optim.lr")
    scale = flatten(raw.get("scale") or {})
    if not scale:
        raise HptError("search.transfer.scale needs the larger scale's keys, e.g. {model.width: 128, "
                       "model.n_layers: 4}")
    for key in scale:
        if key in space or key in (lr_key, seed_key):
            raise HptError(f"search.transfer.scale.{key}: a searched, lr or seed key cannot be a scale key")
        if is_user and not user.has(plain, key):
            raise user.unknown_key(key, plain, "cannot scale")
        if not is_user:
            typed_value(key, scale[key])
    seeds = raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(_is_int(x) for x in seeds) or len(set(seeds)) < len(seeds):
        raise HptError(f"search.transfer.seeds must be a list of distinct whole numbers, got {seeds}")
    points, span = raw.get("lr_points"), raw.get("lr_span", LR_SPAN)
    if points is not None and (not _is_int(points) or points < 2):
        raise HptError(f"search.transfer.lr_points must be a whole number >= 2, got {points}")
    if not _is_number(span) or span <= 1:
        raise HptError(f"search.transfer.lr_span must be a number > 1 (the grid spans lr / span .. lr x span), "
                       f"got {span}")
    return Transfer(scale, seeds, points or 0, float(span))


def _clip(spec: SearchSpec, values: dict[str, Any]) -> dict[str, float]:
    """The values inside the space's bounds (the base point may lie outside them)."""
    return {k: min(max(float(values[k]), b.low), b.high) for k, b in spec.space.items()}


def runs_for(spec: SearchSpec, point: dict[str, Any], seeds: list[int] | None = None) -> list[Run]:
    """The runs of one point: the base config with the point's values (any keys of the base's), x seeds."""
    dims = [Dim(k, (v,)) for k, v in point.items()] + [Dim(spec.base.seed_key, tuple(seeds or spec.seeds))]
    return expand(dataclasses.replace(spec.base, dims=dims))


def folder_spec(spec: SearchSpec, name: str, runs: list[Run]) -> SweepSpec:
    """A sweep spec that stands for these runs in their sweep folder (sweep.yaml, the manifest's columns):
    each dimension holds the values its runs take, in order of appearance."""
    keys = list(runs[0].point)
    dims = [Dim(k, tuple(dict.fromkeys(json.dumps(r.point[k]) for r in runs))) for k in keys]
    dims = [Dim(d.key, tuple(json.loads(v) for v in d.values)) for d in dims]
    return dataclasses.replace(spec.base, name=name, dims=dims)


# ---- launching runs through the sweep engine --------------------------------------------------------------


@dataclass
class Engine:
    """Where runs go: the launcher (local or SLURM), local slots, and the display's callbacks."""

    launcher: Any
    jobs: int
    on_event: Callable[[str, RunState | None, Any], None]
    say: Callable[[str], None]


def evaluate(folder: SweepFolder, spec: SweepSpec, runs: list[Run], engine: Engine) -> dict[str, RunState]:
    """Launch what of `runs` has no result, wait for every one of them, and return their states.

    A run with a result is never run again; one whose process died without a result (a killed job) is
    launched once more; one held by a live job (a killed search's orphan, a SLURM task) is waited for.
    """
    unique = list({r.run_id: r for r in runs}.values())
    ids = [r.run_id for r in unique]
    launch.prepare(folder, spec, unique)
    states = _states(folder, ids)
    todo = [rid for rid in ids if states[rid].state in ("pending", "cancelled") and not states[rid].active]
    todo += [rid for rid in ids if states[rid].state == "failed" and states[rid].result is None
             and states[rid].attempts < MAX_ATTEMPTS]
    if todo:
        if engine.launcher.name == "slurm":
            records = launch.submit_slurm(folder, todo, engine.launcher, retry_failed=True)
            arrays = sorted({r["job_id"].split("_")[0] for r in records})
            engine.say(f"{folder.name}: {len(records)} runs submitted to SLURM as job {', '.join(arrays) or '-'}")
        else:
            launch.run_local(folder, todo, jobs=engine.jobs, retry_failed=True, on_event=engine.on_event,
                             packing=launch.packing_of(engine.launcher, engine.jobs))
    states = _states(folder, ids)
    while any(s.active for s in states.values()):
        time.sleep(POLL_S)
        states = _states(folder, ids)
    unfinished = [s for s in states.values() if s.state in ("pending", "cancelled", "running")]
    if unfinished:
        s = unfinished[0]
        raise HptError(f"{len(unfinished)} runs of {folder.name} did not finish ({s.run_id}: {s.state}, "
                       f"{s.reason or 'no reason'}); run the same command again to resume")
    return states


def _states(folder: SweepFolder, ids: list[str]) -> dict[str, RunState]:
    wanted = set(ids)
    return {s.run_id: s for s in run_states(folder) if s.run_id in wanted}


def score(states: list[RunState], objective: str, penalty: float) -> tuple[float, str]:
    """A point's value and outcome: the mean of `objective` over its seeds' runs when every one completed
    with a finite value; else `penalty` (the worst) and why (diverged, failed, no value)."""
    values = []
    for s in states:
        value = (s.result or {}).get(objective)
        if s.state != "completed":
            return penalty, s.state
        if not _is_number(value) or not math.isfinite(value):
            return penalty, f"no {objective}"
        values.append(float(value))
    return statistics.fmean(values), "completed"


# ---- the strategy ----------------------------------------------------------------------------------------


def _study(spec: SearchSpec, folder: SweepFolder) -> Any:
    """The Optuna study in the folder's journal (created on first use), with its sampler seeded from the file."""
    import optuna  # here: Optuna is slow to import, and `hpt search status` needs none of it
    from optuna.storages.journal import JournalFileBackend  # likewise

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    x0 = _clip(spec, spec.base_values)
    if spec.strategy == "cmaes":
        # No x0 (deprecated in Optuna 4.9): CMA-ES starts at the space's centre (in log space for a log
        # range: x1 for multipliers x1/8..x8), and the first generation holds the base point itself.
        sampler = optuna.samplers.CmaEsSampler(
            seed=spec.sampler_seed, popsize=spec.population, n_startup_trials=1,
            independent_sampler=optuna.samplers.RandomSampler(seed=spec.sampler_seed),
            warn_independent_sampling=False)
    else:
        sampler = optuna.samplers.RandomSampler(seed=spec.sampler_seed)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(folder.path / JOURNAL)))
    study = optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler, direction="minimize",
                                load_if_exists=True)
    if not study.get_trials(deepcopy=False):  # the first generation starts with the base point
        study.enqueue_trial(x0)
    return study


def _distributions(spec: SearchSpec) -> dict[str, Any]:
    from optuna.distributions import FloatDistribution  # here: as in _study

    return {k: FloatDistribution(b.low, b.high, log=b.log) for k, b in spec.space.items()}


@contextmanager
def _exclusive(folder: SweepFolder) -> Iterator[None]:
    """One `hpt search` at a time per search folder (a second one would ask its own points)."""
    folder.path.mkdir(parents=True, exist_ok=True)
    with open(folder.path / ".search.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HptError(f"another hpt search is running {folder.path}: wait for it, or stop it first") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_definition(spec: SearchSpec, folder: SweepFolder) -> None:
    """Refuse a search folder that holds a search defined otherwise; record the definition when new."""
    f = folder.path / SEARCH_FILE
    new = spec.definition()
    if f.exists():
        try:
            old = json.loads(f.read_text())
        except (OSError, ValueError) as err:
            raise HptError(f"{f} is unreadable ({err}): restore it, or start a new search with --name") from None
        if old != new:
            changed = [k for k in new if old.get(k) != new[k]]
            raise HptError(f"search '{spec.name}' exists with a different definition ({', '.join(changed)} changed); "
                           f"only search.budget and search.transfer may change: pass --name to start a new search")
        return
    write_json_atomic(f, new)


def generations(folder: SweepFolder) -> list[dict[str, Any]]:
    """The logged generations, in order (a torn last line is skipped: that generation is told again)."""
    lines = [g for g in json_lines(folder.path / GENERATIONS) if isinstance(g, dict) and _is_int(g.get("generation"))]
    out: list[dict[str, Any]] = []
    for g in lines:
        if g["generation"] == len(out):
            out.append(g)
    return out


def run_search(spec: SearchSpec, root: Path, engine: Engine) -> dict[str, Any]:
    """Run (or resume) the search to its budget, then its transfer check; returns the summary."""
    folder = SweepFolder(root / spec.name)
    with _exclusive(folder):
        check_definition(spec, folder)
        study = _study(spec, folder)
        dists = _distributions(spec)
        from optuna.trial import TrialState  # here: as in _study

        logged = generations(folder)
        while len(logged) < spec.generations:
            g = len(logged)
            told = {t["number"] for line in logged for t in line["trials"]}
            trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))
                      if t.number not in told]  # asked in this generation by a search that was stopped
            if trials:
                engine.say(f"generation {g}: resuming {len(trials)} asked trials")
            while len(trials) < spec.population:
                trial = study.ask(dists)
                trials.append(study.get_trials(deepcopy=False)[trial.number])
            points = {t.number: {k: t.params[k] for k in spec.space} for t in trials}
            runs = {n: runs_for(spec, p) for n, p in points.items()}
            engine.say(f"generation {g + 1}/{spec.generations}: {len(trials)} points x {len(spec.seeds)} seeds")
            all_runs = [r for rs in runs.values() for r in rs]
            states = evaluate(folder, folder_spec(spec, spec.name, all_runs), all_runs, engine)
            line = {"generation": g, "trials": [], "at": now()}
            for t in trials:
                value, outcome = score([states[r.run_id] for r in runs[t.number]], spec.objective, spec.penalty)
                if t.state == TrialState.RUNNING:
                    study.tell(t.number, value)
                else:
                    value = t.value  # told before the stop: the journal's value stands
                line["trials"].append({"number": t.number, "params": points[t.number], "value": value,
                                       "outcome": outcome, "run_ids": [r.run_id for r in runs[t.number]]})
            append_lines(folder.path / GENERATIONS, json.dumps(line) + "\n")
            logged = generations(folder)
            write_report(spec, folder)
            engine.say(_generation_line(summary(folder)["generations"][-1]))
        if spec.transfer is not None and best_trial(logged) is not None:
            transfer_check(spec, root, engine, best_trial(logged))
        write_report(spec, folder)
        return summary(folder)


def _generation_line(g: dict[str, Any]) -> str:
    bad = f", {g['failed']} diverged or failed" if g["failed"] else ""
    best = "-" if g["best"] is None else f"{g['best']:.4f}"
    so_far = "-" if g["best_so_far"] is None else f"{g['best_so_far']:.4f}"
    return f"generation {g['generation'] + 1}: best {best}, best so far {so_far}{bad}"


def best_trial(logged: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best completed trial of all logged generations (a penalized one never counts)."""
    done = [t for g in logged for t in g["trials"] if t["outcome"] == "completed"]
    return min(done, key=lambda t: (t["value"], t["number"])) if done else None


# ---- the transfer check ----------------------------------------------------------------------------------


def baseline_lrs(spec: SearchSpec, evaluated: int) -> list[float]:
    """The baseline grid: lr_points log-spaced LRs from base/span to base x span (as many as the search
    evaluated unless set: the same number of runs)."""
    t = spec.transfer
    base = float(user.get(spec.base.composed, spec.lr_key))
    n = t.lr_points or max(2, evaluated)
    return [base * t.lr_span ** (2 * i / (n - 1) - 1) for i in range(n)]


def transfer_check(spec: SearchSpec, root: Path, engine: Engine, best: dict[str, Any]) -> dict[str, Any]:
    """Run the baseline LR grid at the search scale, then best point and best LR at both scales x seeds."""
    t = spec.transfer
    folder = SweepFolder(root / spec.name)
    evaluated = sum(len(g["trials"]) for g in generations(folder))
    lrs = baseline_lrs(spec, evaluated)
    engine.say(f"baseline: {len(lrs)} learning rates x {len(spec.seeds)} seeds at the search scale")
    grid = {lr: runs_for(spec, {spec.lr_key: lr}) for lr in lrs}
    runs = [r for rs in grid.values() for r in rs]
    base_folder = SweepFolder(root / f"{spec.name}-baseline")
    states = evaluate(base_folder, folder_spec(spec, base_folder.name, runs), runs, engine)
    scored = {lr: score([states[r.run_id] for r in rs], spec.objective, spec.penalty) for lr, rs in grid.items()}
    ok = {lr: v for lr, (v, outcome) in scored.items() if outcome == "completed"}
    if not ok:
        raise HptError(f"every run of the baseline grid {base_folder.name} diverged or failed: widen or move it "
                       f"(search.transfer.lr_span, or the base {spec.lr_key})")
    best_lr = min(ok, key=ok.get)
    lr_base = float(user.get(spec.base.composed, spec.lr_key))
    # The baseline is the base config (its own constants, even outside the space's bounds) at the best LR.
    arms = {"search": {**best["params"]}, "baseline": {**spec.base_values, spec.lr_key: best_lr}}
    if spec.lr_key not in spec.space:
        arms["search"][spec.lr_key] = lr_base
    scales = {"search": {k: user.get(spec.base.composed, k) for k in t.scale}, "large": dict(t.scale)}
    cells: dict[tuple[str, str], list[Run]] = {}
    for scale, overrides in scales.items():
        for arm, values in arms.items():
            cells[(arm, scale)] = runs_for(spec, {**values, **overrides}, t.seeds)
    engine.say(f"transfer: best point and baseline at the search scale and at {_kv(t.scale)}, "
               f"{len(t.seeds)} seeds each")
    runs = [r for rs in cells.values() for r in rs]
    tf_folder = SweepFolder(root / f"{spec.name}-transfer")
    states = evaluate(tf_folder, folder_spec(spec, tf_folder.name, runs), runs, engine)
    out: dict[str, Any] = {"baseline_lr": best_lr, "base_lr": lr_base, "lr_grid": [[lr, scored[lr][0],
                           scored[lr][1]] for lr in lrs], "best_trial": best["number"], "best_params": best["params"],
                           "search_value": best["value"], "scale": t.scale, "seeds": t.seeds,
                           "baseline_runs": len(runs_of(grid)), "search_runs": evaluated * len(spec.seeds),
                           "scales": {}, "at": now()}
    for scale in scales:
        per_arm = {arm: [_loss(states[r.run_id], spec.objective) for r in cells[(arm, scale)]] for arm in arms}
        out["scales"][scale] = compare(per_arm["search"], per_arm["baseline"], t.seeds)
    write_json_atomic(folder.path / TRANSFER_FILE, out)
    for scale, c in out["scales"].items():
        engine.say(f"transfer at the {scale} scale: {c['verdict']}")
    return out


def runs_of(grid: dict[Any, list[Run]]) -> list[Run]:
    return [r for rs in grid.values() for r in rs]


def _kv(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def _loss(s: RunState, objective: str) -> float | None:
    value = (s.result or {}).get(objective) if s.state == "completed" else None
    return float(value) if _is_number(value) and math.isfinite(value) else None


def compare(search: list[float | None], baseline: list[float | None], seeds: list[int]) -> dict[str, Any]:
    """Per seed, baseline - search (positive: the searched constants are better); the mean, its standard
    error over seeds, and a verdict that says when the difference is within the seeds' noise."""
    pairs = [(s, b) for s, b in zip(search, baseline, strict=True)]
    diffs = [b - s for s, b in pairs if s is not None and b is not None]
    out: dict[str, Any] = {"seeds": seeds, "search": search, "baseline": baseline, "diff": diffs,
                           "mean_diff": statistics.fmean(diffs) if diffs else None, "se": None,
                           "search_mean": _mean(search), "baseline_mean": _mean(baseline),
                           "search_sd": _sd(search), "baseline_sd": _sd(baseline)}
    lost = [("search", s is None) for s, _ in pairs] + [("baseline", b is None) for _, b in pairs]
    failed = sorted({arm for arm, bad in lost if bad})
    if failed:
        out["verdict"] = f"not comparable: some runs of {' and '.join(failed)} diverged or failed"
        return out
    if len(diffs) < 2:
        out["verdict"] = (f"gain {out['mean_diff']:+.4f} from one seed: no spread to tell it from noise "
                          "(use several transfer seeds)")
        return out
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    out["se"] = se
    m = out["mean_diff"]
    if m > 2 * se:
        word = "holds"
    elif m < -2 * se:
        word = "reversed: the baseline is better"
    else:
        word = "within noise"
    out["verdict"] = f"{word} (baseline - search = {m:+.4f} +- {se:.4f} s.e. over {len(diffs)} seeds)"
    return out


def _mean(xs: list[float | None]) -> float | None:
    ok = [x for x in xs if x is not None]
    return statistics.fmean(ok) if ok else None


def _sd(xs: list[float | None]) -> float | None:
    ok = [x for x in xs if x is not None]
    return statistics.stdev(ok) if len(ok) > 1 else None


# ---- status and report -----------------------------------------------------------------------------------


def open_search(name: str, root: Path) -> SweepFolder:
    """A search by name under root, or by its folder's path."""
    for path in (root / name, Path(name)):
        if (path / SEARCH_FILE).exists():
            return SweepFolder(path)
    known = ", ".join(sorted(p.parent.name for p in root.glob(f"*/{SEARCH_FILE}"))) or "none"
    raise HptError(f"no search '{name}' in {root} (searches there: {known})")


def summary(folder: SweepFolder) -> dict[str, Any]:
    """Best per generation and so far, the best point, and the transfer check when it ran."""
    logged = generations(folder)
    rows, best_so_far = [], None
    for g in logged:
        ok = [t["value"] for t in g["trials"] if t["outcome"] == "completed"]
        best = min(ok) if ok else None
        if best is not None:
            best_so_far = best if best_so_far is None else min(best_so_far, best)
        rows.append({"generation": g["generation"], "trials": len(g["trials"]), "failed": len(g["trials"]) - len(ok),
                     "best": best, "best_so_far": best_so_far})
    best = best_trial(logged)
    transfer, definition = read_json(folder.path / TRANSFER_FILE), read_json(folder.path / SEARCH_FILE)
    return {"name": folder.name, "path": str(folder.path), "generations": rows, "best": best,
            "definition": definition, "transfer": transfer,
            "sensitivities": sensitivities(logged, definition["space"]) if definition else {}}


MIN_TRIALS_FOR_SENSITIVITY = 10  # fewer completed trials than this: no ranking worth printing


def sensitivities(logged: list[dict[str, Any]], space: dict[str, dict[str, Any]]) -> dict[str, float]:
    """How much of the objective's variation each key accounts for among the completed trials: Optuna's
    PED-ANOVA importances (they sum to 1; no scikit-learn needed), largest first; {} with too few trials.
    The trials come from a strategy that concentrates where it found good points, so this says which keys
    the objective was sensitive to *near the optimum found*, not across the whole space."""
    import optuna  # here: Optuna loads in ~1 s, and only a report ranks the keys

    done = [t for g in logged for t in g["trials"] if t["outcome"] == "completed"]
    if len(done) < MIN_TRIALS_FOR_SENSITIVITY:
        return {}
    dists = {k: optuna.distributions.FloatDistribution(b["low"], b["high"], log=b["log"]) for k, b in space.items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")  # in memory: the importances only read the trials
    study.add_trials([optuna.trial.create_trial(params=t["params"], distributions=dists, value=t["value"])
                      for t in done])
    with warnings.catch_warnings():  # PED-ANOVA is marked experimental: said once here, not in every report
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        ranked = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {k: float(v) for k, v in ranked.items()}


def write_report(spec: SearchSpec, folder: SweepFolder) -> None:
    """report.md and best.png (best so far per generation) in the search folder."""
    s = summary(folder)
    write_atomic(folder.path / REPORT, report_markdown(s))
    if s["generations"]:
        _plot(s, folder.path / FIGURE)


def report_markdown(s: dict[str, Any]) -> str:
    lines = [f"# Search '{s['name']}'", ""]
    d = s["definition"] or {}
    if d:
        lines += [f"Strategy {d['strategy']} (seed {d['seed']}), population {d['population']}, objective "
                  f"{d['objective']} (mean over seeds {d['seeds']}); a diverged or failed point scores "
                  f"{d['penalty']:g}.", "", "| key | low | high | log |", "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {b['low']:g} | {b['high']:g} | {b['log']} |" for k, b in d["space"].items()]
        lines.append("")
    lines += ["## Best so far per generation", "", f"![best so far]({FIGURE})", "",
              "| generation | trials | diverged or failed | best | best so far |", "| --- | --- | --- | --- | --- |"]
    for g in s["generations"]:
        lines.append(f"| {g['generation'] + 1} | {g['trials']} | {g['failed']} | {_f(g['best'])} | "
                     f"{_f(g['best_so_far'])} |")
    b = s["best"]
    if b:
        lines += ["", f"## Best point (trial {b['number']}: {b['value']:.4f})", "", "| key | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in b["params"].items()]
        lines += ["", f"Runs: {', '.join(b['run_ids'])}"]
    if s.get("sensitivities"):
        lines += ["", "## Sensitivities", "",
                  "The share of the objective's variation each key accounts for among the completed trials "
                  "(Optuna's PED-ANOVA importance; the shares sum to 1). The strategy samples densely near the "
                  "best points, so this ranks the keys by how much they matter there, not over the whole space.",
                  "", "| key | share |", "| --- | --- |"]
        lines += [f"| {k} | {v:.3f} |" for k, v in s["sensitivities"].items()]
    t = s["transfer"]
    if t:
        lines += ["", "## Transfer check", "",
                  f"Baseline: the best of {len(t['lr_grid'])} learning rates around {t['base_lr']:.4g} "
                  f"({t['baseline_runs']} runs; the search ran {t['search_runs']}): {t['baseline_lr']:.4g}. "
                  f"Both re-run with seeds {t['seeds']}; the larger scale: {_kv(t['scale'])}.", "",
                  "| scale | search (mean +- sd) | baseline (mean +- sd) | baseline - search | verdict |",
                  "| --- | --- | --- | --- | --- |"]
        for scale, c in t["scales"].items():
            diff = "-" if c["mean_diff"] is None else f"{c['mean_diff']:+.4f}" + (
                f" +- {c['se']:.4f}" if c["se"] is not None else "")
            lines.append(f"| {scale} | {_f(c['search_mean'])} +- {_f(c['search_sd'])} | {_f(c['baseline_mean'])} "
                         f"+- {_f(c['baseline_sd'])} | {diff} | {c['verdict']} |")
        lines += ["", "The difference is paired by seed (same data order and init draw); +- is its standard error "
                  "over seeds. A gain smaller than twice that is within the seeds' noise."]
        reused = sorted(set(t["seeds"]) & set(d.get("seeds") or []))
        if reused:  # the best point was picked on these seeds: at the search scale its luck is in the number
            lines += ["", f"Seed(s) {reused} are the search's own: the best point was picked as the best of "
                      f"{t['search_runs']} runs on them, so at the search scale their difference includes that "
                      "selection's luck; the other seeds are fresh draws."]
    return "\n".join(lines) + "\n"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _plot(s: dict[str, Any], path: Path) -> None:
    import matplotlib  # here: matplotlib is slow to import, and only a report draws

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # likewise

    rows = [g for g in s["generations"] if g["best_so_far"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if rows:
        ax.plot([g["generation"] + 1 for g in rows], [g["best_so_far"] for g in rows], "o-", label="best so far")
        per = [g for g in rows if g["best"] is not None]
        ax.plot([g["generation"] + 1 for g in per], [g["best"] for g in per], "x", color="gray",
                label="best of generation")
    ax.set_xlabel("generation")
    ax.set_ylabel("objective")
    ax.set_title(f"search '{s['name']}'")
    ax.legend()
    write_figure(fig, path, dpi=110)


def launcher_of(spec: SearchSpec) -> Any:
    return launch.launcher_config(spec.base.launcher)


def jobs_default(launcher: Any, jobs: int | None) -> int:
    from hptransfer.sweeps.backends.local import default_jobs, local_gpus  # here: a SLURM search needs neither

    return jobs or default_jobs(launcher, local_gpus()) if launcher.name == "local" else 1


def total_runs(spec: SearchSpec) -> int:
    return spec.generations * spec.population * len(spec.seeds)
