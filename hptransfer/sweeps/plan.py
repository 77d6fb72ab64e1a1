"""The plan: compose a sweep file, expand its grid into runs with stable ids, estimate their compute.

A sweep file is a Hydra config that composes the base run config and adds a `sweep` block:

    defaults: [config, _self_]
    sweep:
      name: width
      axis: {key: model.width, values: [32, 64, 128]}
      grid:
        optim.lr: {log2: [-10, -4], step: 0.5}   # 2^-10, 2^-9.5, ..., 2^-4
        param: [sp, mup]                          # a config group: composed as `param=mup`
      seeds: [0]

`load` composes it with the command line. Hydra's sweep grammar (`key=a,b`, `choice(...)`,
`range(...)`; `tag(log2, range(-10,-3.5,0.5))` for powers of two) sets or replaces one dimension
(the axis when the key is the axis key); a plain override of a swept key narrows that dimension
to its one value; every other override applies to every run. `expand` crosses axis x grid x
seeds: each point is composed (config groups as group overrides, keys set on the composed config,
as Hydra's own command line would), its derived fields filled in, validated, and identified by
`config.frozen.run_id`. The file's format: docs/usage.md#sweep-files.
"""

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf

from hptransfer.config import user
from hptransfer.config.compose import compose_file, compose_user_file
from hptransfer.config.derived import SEED_KEY, fill_tokens, flatten, heads_and_dim, steps_for_tokens, tokens_of
from hptransfer.config.frozen import canonical_json, id_of, identity_json, run_config
from hptransfer.config.schema import RUN_KEYS, RunConfig, check_values, nearest_key, typed_value, validate
from hptransfer.errors import HptError
from hptransfer.train.data import check_source
from hptransfer.train.rules import apply_rules

SCALING_COLUMNS = ("width", "depth", "batch_size", "tokens")  # the results table's scaling coordinates
GROUPS = frozenset({"model", "param", "optim", "data", "train", "launcher"})  # Hydra config groups
# Sustained training throughput assumed for GPU-hour estimates: an H100 at ~40% of its bf16 peak.
GPU_FLOPS_PER_S = 4e14


@dataclass(frozen=True)
class Dim:
    """One dimension of the grid: a Hydra override key (a config group or a dotted key) and its values."""

    key: str
    values: tuple[Any, ...]


@dataclass
class SweepSpec:
    """A composed sweep: its name, its dimensions (axis first, seeds last) and what every run shares."""

    name: str
    file: Path
    dims: list[Dim]
    overrides: list[str]  # plain overrides, composed into every run
    composed: DictConfig  # the file composed with `overrides`, with the `sweep` block as written
    notes: list[str] = field(default_factory=list)  # what `expand` checked only in part (a sampled data file)
    run: dict[str, Any] | None = None  # the resolved `run:` block of a sweep of the user's code (config/user.py)
    seed_key: str = SEED_KEY  # the key the seeds set

    @property
    def is_user(self) -> bool:
        return self.run is not None

    @property
    def axis(self) -> Dim:
        return self.dims[0]

    @property
    def launcher(self) -> dict[str, Any]:
        return OmegaConf.to_container(self.composed.launcher, resolve=True)


@dataclass
class Run:
    """One point of the grid: its swept values and its validated, resolved config as plain data (the
    `config.run_config` form: what is frozen in its folder and hashed into its id)."""

    run_id: str
    point: dict[str, Any]
    config: dict[str, Any]
    config_json: str  # `config` as the canonical JSON its id hashes (what the manifest stores)


def load(path: Path, overrides: list[str] | None = None, *, name: str | None = None) -> SweepSpec:
    """Compose the sweep file with the command line's overrides into a SweepSpec."""
    sweeps, plain = _parse_overrides(list(overrides or []))
    path = Path(path)
    run = None
    if user.is_user_file(path):  # a sweep of the user's code: their keys, no config groups but the launcher
        composed = compose_user_file(path, [o.input_line for o in plain])
        run = user.run_block(composed.get("run"), path)
        user.check_runnable(run)
    else:
        composed = compose_file(path, [o.input_line for o in plain])
    block = composed.get("sweep")
    if not isinstance(block, DictConfig):
        if isinstance(composed.get("search"), DictConfig):  # a search file (hpt search), not a sweep file
            raise HptError(f"{path} is a search file (a 'search:' block, no 'sweep:'): run it with hpt search {path}")
        raise HptError(f"{path} has no 'sweep:' block (see conf/width.yaml)")
    axis = block.get("axis")
    if not isinstance(axis, DictConfig) or "key" not in axis or "values" not in axis:
        raise HptError("sweep.axis needs 'key' and 'values', e.g. axis: {key: model.width, values: [64, 128]}")
    dims = [Dim(str(axis.key), _values("sweep.axis.values", axis["values"]))]
    grid = OmegaConf.to_container(block.get("grid") or OmegaConf.create({}), resolve=True)
    # `{optim: {lr: [...]}}` and `{optim.lr: [...]}` both name the dimension 'optim.lr'.
    dims += [Dim(k, _values(f"sweep.grid.{k}", v)) for k, v in flatten(grid, keep=lambda v: "log2" in v).items()]
    keys = user.user_keys(OmegaConf.to_container(composed)) if run else None
    seed_key = SEED_KEY if keys is None else _user_seed_key(keys, run)
    if any(d.key == seed_key for d in dims):
        raise HptError(f"set seeds with sweep.seeds, not with a '{seed_key}' grid entry")
    dims.append(Dim(seed_key, _values("sweep.seeds", block.get("seeds", [0]))))
    for key, values in sweeps.items():
        dims = _set_dim(dims, Dim(key, values))
    swept = {d.key for d in dims}
    for o in plain:  # a plain override of a swept key narrows that dimension to its value
        if o.key_or_group in swept:
            dims = _set_dim(dims, Dim(o.key_or_group, (o.value(),)))
    for d in dims:
        if keys is not None:
            if not user.has(keys, d.key):
                raise user.unknown_key(d.key, keys, "cannot sweep")
        elif d.key.split(".")[0] not in RunConfig.__dataclass_fields__ or d.key == "launcher":
            near = nearest_key(d.key) if d.key != "launcher" else None
            raise HptError(f"cannot sweep '{d.key}': not a run config key or group"
                           + (f" (did you mean {near}?)" if near and not near.startswith("launcher") else ""))
    sweep_name = str(name or block.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", sweep_name):
        raise HptError(f"bad sweep name '{sweep_name}': use letters, digits, '.', '_' and '-'")
    shared = [o.input_line for o in plain if o.key_or_group not in swept]
    if len(shared) < len(plain):  # the shared config must not carry one point's group choice
        composed = compose_user_file(path, shared) if run else compose_file(path, shared)
    if run is not None:
        run["columns"] = user.find_columns(keys, run["columns"])
    return SweepSpec(sweep_name, path, dims, shared, composed, run=run, seed_key=seed_key)


def _user_seed_key(keys: dict[str, Any], run: dict[str, Any]) -> str:
    """The user's key that takes each run's seed (`run.columns.seed`, else train.seed or seed)."""
    found = user.find_columns(keys, run["columns"]).get("seed")
    if found is None:
        raise HptError("a sweep of your code needs a seed key its runs read: add 'seed: 0' to the sweep file "
                       "(or name yours with run.columns.seed)")
    return found


def _parse_overrides(overrides: list[str]) -> tuple[dict[str, tuple[Any, ...]], list[Override]]:
    """Split Hydra overrides into sweeps (key=a,b / choice / range), as dimensions, and plain ones."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # Hydra's grammar errors
        raise HptError(f"bad override: {str(err).splitlines()[0]}") from None
    sweeps: dict[str, tuple[Any, ...]] = {}
    plain: list[Override] = []
    for o in parsed:
        if not o.is_sweep_override():
            plain.append(o)
        elif o.is_discrete_sweep():
            values = list(o.sweep_iterator())
            if "log2" in o.value().tags:  # tag(log2, range(-10,-3.5,0.5)): the values are exponents
                values = [_pow2(e) for e in values]
            sweeps[o.key_or_group] = _values(o.input_line, values)
        else:
            raise HptError(f"'{o.input_line}': only lists, choice() and range() can be swept here")
    return sweeps, plain


def _set_dim(dims: list[Dim], new: Dim) -> list[Dim]:
    """Replace the dimension with the same key, or add the new one before the seeds."""
    if any(d.key == new.key for d in dims):
        return [new if d.key == new.key else d for d in dims]
    return [*dims[:-1], new, dims[-1]]


def _values(where: str, spec: Any) -> tuple[Any, ...]:
    """A dimension's values: a list, a scalar, or a log2 range `{log2: [lo, hi], step: s}`."""
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, dict):
        values = _log2_range(where, spec)
    elif isinstance(spec, list | tuple):
        values = list(spec)
    else:
        values = [spec]
    if not values:
        raise HptError(f"empty grid: {where} has no values")
    if len(set(map(repr, values))) != len(values):
        raise HptError(f"{where} repeats a value: {values}")
    return tuple(values)


def _log2_range(where: str, spec: dict[str, Any]) -> list[float | int]:
    """`{log2: [lo, hi], step: s}`: 2^lo, 2^(lo+s), ..., 2^hi (integers when the exponent is a whole >= 0)."""
    bounds, step = spec.get("log2"), spec.get("step", 1)
    extra = set(spec) - {"log2", "step"}
    if extra or not isinstance(bounds, list) or len(bounds) != 2 or not all(
        isinstance(x, int | float) for x in [*bounds, step]
    ):
        raise HptError(f"{where}: a log2 range is {{log2: [lo, hi], step: s}}, got {spec}")
    lo, hi = bounds
    if hi < lo or step <= 0:
        raise HptError(f"{where}: log2 range needs lo <= hi and step > 0, got {spec}")
    n = math.floor((hi - lo) / step + 1e-9)
    return [_pow2(lo + i * step) for i in range(n + 1)]


def _pow2(e: float) -> float | int:
    """2^e, an integer when e is a whole number >= 0 (widths, batch sizes)."""
    return int(2**e) if e >= 0 and float(e).is_integer() else 2.0**e


def expand(spec: SweepSpec) -> list[Run]:
    """Every point of axis x grid x seeds as a Run; two points with the same config are an error.

    Each combination of config groups is composed and validated once; a point is its base with the
    swept values (typed by the schema, once per value) set, checked and hashed as plain data: the
    same config, to the bit, as validating every point through OmegaConf (a test), ~100x faster.
    """
    if spec.is_user:
        return _expand_user(spec)
    keys = [d.key for d in spec.dims]
    group_keys = [k for k in keys if k in GROUPS]
    for d in spec.dims:
        if d.key in GROUPS and (bad := next((v for v in d.values if not isinstance(v, str)), None)) is not None:
            raise HptError(f"config group '{d.key}' takes an option's name, got {bad!r}: write {d.key}=NAME, or "
                           f"{d.key}=A,B to sweep several")
    typed = [None if d.key in GROUPS else [typed_value(d.key, v) for v in d.values] for d in spec.dims]
    bases: dict[tuple[Any, ...], tuple[dict[str, Any], bool]] = {}
    runs: dict[str, Run] = {}
    for index in itertools.product(*(range(len(d.values)) for d in spec.dims)):
        point = {d.key: d.values[i] for d, i in zip(spec.dims, index, strict=True)}
        choice = tuple(point[k] for k in group_keys)
        if choice not in bases:  # compose once per combination of config groups
            groups = [f"{k}={v}" for k, v in zip(group_keys, choice, strict=True)]
            composed = compose_file(spec.file, [*spec.overrides, *groups])
            # Unresolved, so interpolations see the swept values (as on Hydra's command line).
            raw = {k: OmegaConf.to_container(composed[k]) for k in RUN_KEYS}
            bases[choice] = (raw, "${" in json.dumps(raw))
        base, interpolated = bases[choice]
        if interpolated:  # resolve after setting the values: through OmegaConf, point by point
            cfg = run_config(validate(_with_values(base, {k: v for k, v in point.items() if k not in GROUPS})))
        else:
            cfg = fill_tokens(_with_values(base, {d.key: t[i] for d, t, i in zip(spec.dims, typed, index, strict=True)
                                                  if t}))
            check_values(cfg)
        cfg = fill_steps(cfg)
        canon = canonical_json(cfg)
        rid = id_of(identity_json(cfg))
        if rid in runs:
            raise HptError(f"grid points {runs[rid].point} and {point} are the same run: a swept key has no effect")
        runs[rid] = Run(rid, point, cfg, canon)
    spec.notes = check_data(list(runs.values()))
    return list(runs.values())


def _expand_user(spec: SweepSpec) -> list[Run]:
    """Every point of a sweep of the user's code: their keys with the swept values set (interpolations
    resolved after, as on Hydra's command line), checked by their schema, with the resolved run block."""
    base = user.user_keys(OmegaConf.to_container(spec.composed))
    interpolated = "${" in json.dumps(base)
    runs: dict[str, Run] = {}
    for index in itertools.product(*(range(len(d.values)) for d in spec.dims)):
        point = {d.key: d.values[i] for d, i in zip(spec.dims, index, strict=True)}
        keys = _with_values(base, point)
        if interpolated:
            keys = OmegaConf.to_container(OmegaConf.create(keys), resolve=True)
        cfg = {**user.validate(keys, spec.run), "run": spec.run}
        rid = id_of(identity_json(cfg))
        if rid in runs:
            raise HptError(f"grid points {runs[rid].point} and {point} are the same run: a swept key has no effect")
        runs[rid] = Run(rid, point, cfg, canonical_json(cfg))
    columns = spec.run["columns"]
    spec.notes = []
    if "lr" not in columns:
        spec.notes.append("no key of your config is the lr column, which `hpt analyze` optimizes: name it, "
                          "e.g. run.columns.lr: optim.lr")
    if spec.axis.key not in [columns.get(a) for a in SCALING_COLUMNS]:
        spec.notes.append(f"the axis '{spec.axis.key}' is none of the scaling columns ({', '.join(SCALING_COLUMNS)}) "
                          f"`hpt analyze` reads: name it, e.g. run.columns.width: {spec.axis.key}")
    return list(runs.values())


def check_data(runs: list[Run]) -> list[str]:
    """Check each distinct data source once (`train.data.check_source`: the file, its splits, its token ids),
    so a sweep whose runs would all fail at start is an HptError before anything is written; returns the notes
    of what was checked only in part."""
    seen: set[tuple[str, int]] = set()
    notes: list[str] = []
    for r in runs:
        data, seq_len = r.config["data"], r.config["train"]["seq_len"]
        key = (json.dumps(data, sort_keys=True), seq_len)
        if key not in seen:
            seen.add(key)
            note = check_source(data, seq_len)
            if note and note not in notes:
                notes.append(note)
    return notes


def _with_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the base with `values` set by dotted key (only the sections they touch are copied)."""
    cfg = dict(base)
    for key, value in values.items():
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[leaf] = value
    return cfg


def fill_steps(cfg: dict[str, Any]) -> dict[str, Any]:
    """Set train.steps from train.tokens when tokens are set: the frozen config says how long the run trains.

    Heads follow width at fixed model.head_dim, and the batch/duration rules are applied by
    training from scaling.*; both stay as configured so the frozen config keeps the base values.
    """
    t = cfg["train"]
    if t["tokens"] is not None:
        cfg["train"] = {**t, "steps": steps_for_tokens(t["tokens"], t["batch_size"], t["seq_len"])}
    return cfg


def derived_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a run's config implies: heads, steps, tokens and the learning rate after the scaling rules."""
    n_heads, _, _ = heads_and_dim(SimpleNamespace(**cfg["model"]), cfg["model"]["width"])
    _, effective = apply_rules(cfg)
    return {"n_heads": n_heads, "steps": cfg["train"]["steps"], "tokens": tokens_of(cfg["train"]),
            "lr_effective": effective["lr"]}
