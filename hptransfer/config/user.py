"""Runs of the user's own code: a sweep file with a `run:` block (docs/design.md#runs-of-your-code).

Such a file holds the user's config keys at its top level beside three blocks of hpt's own:

    run:    {target: "pkg.module:function"} or {command: "python train.py {overrides}"}, plus optional
            schema ("pkg.module:Dataclass", validates the user's keys), path (import folders, relative
            to the file), cwd (where the code runs; default the file's folder), columns (which of the
            user's keys are the results table's width, lr, seed, ...)
    sweep:  the grid, as for the built-in trainer
    launcher: where runs execute, as for the built-in trainer

A run's frozen config is the user's keys plus the resolved `run` block. Its id hashes the user's keys
and what runs (target or command), not where the project lies (`identity`).
"""

import dataclasses
import difflib
import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hptransfer.config.derived import flatten
from hptransfer.errors import HptError

RESERVED = ("run", "sweep", "launcher")  # top-level blocks of hpt's own in a user's sweep file
RUN_KEYS = ("target", "command", "schema", "path", "cwd", "columns")
PLACEHOLDERS = ("{overrides}", "{config}", "{run_dir}")
# The results table's coordinates and the keys a training config usually keeps them under, first match wins;
# `run.columns` names them outright. `steps` is not a column: `hpt status` shows a run's progress with it.
COLUMNS: dict[str, tuple[str, ...]] = {
    "width": ("model.width", "width", "model.d_model", "d_model", "model.n_embd", "n_embd"),
    "depth": ("model.n_layers", "n_layers", "model.n_layer", "n_layer", "model.depth", "depth"),
    "batch_size": ("train.batch_size", "batch_size"),
    "tokens": ("train.tokens", "tokens"),
    "steps": ("train.steps", "steps", "max_iters"),
    "lr": ("optim.lr", "lr", "learning_rate"),
    "seed": ("train.seed", "seed"),
    "parameterization": ("param.name", "param", "parameterization", "preset"),
}
TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
PLAIN = re.compile(r"[A-Za-z_][\w./-]*")  # a string Hydra reads back as itself, unquoted ...
WORDS = ("true", "false", "null", "nan", "inf")  # ... unless it is one of these


def is_user_file(path: Path) -> bool:
    """Whether a sweep file runs the user's code (has a top-level `run:` block)."""
    from omegaconf import DictConfig, OmegaConf  # here: `hpt status` reads frozen configs without OmegaConf

    try:
        raw = OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the composition that follows
        return False
    return isinstance(raw, DictConfig) and "run" in raw


def is_user_config(config: Mapping[str, Any]) -> bool:
    """Whether a frozen run config runs the user's code."""
    return "run" in config


def user_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """The user's own keys of a composed file or frozen config (hpt's blocks removed)."""
    return {k: v for k, v in config.items() if k not in RESERVED}


def get(config: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key; KeyError when absent."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def has(config: Mapping[str, Any], key: str) -> bool:
    try:
        get(config, key)
    except KeyError:
        return False
    return True


def unknown_key(key: str, config: Mapping[str, Any], what: str = "config key") -> HptError:
    """'config key 'lrr' is not in your config: did you mean lr?' (the nearest of the user's keys)."""
    keys = list(flatten(user_keys(config)))
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}?" if near else f"its keys are {', '.join(keys[:12]) or 'none'}"
    return HptError(f"{what} '{key}' is not in your config ({hint}); add it to the sweep file to set it")


def run_block(block: Any, file: Path) -> dict[str, Any]:
    """The `run:` block checked and resolved: exactly one of target and command, absolute cwd and path."""
    if not isinstance(block, Mapping):
        raise HptError(f"{file}: 'run' must be a block, e.g. run: {{target: 'mypkg.train:main'}}")
    extra = [k for k in block if k not in RUN_KEYS]
    if extra:
        near = difflib.get_close_matches(str(extra[0]), RUN_KEYS, n=1)
        raise HptError(f"{file}: run.{extra[0]} is not a key of the run block"
                       + (f": did you mean run.{near[0]}?" if near else f" (it has: {', '.join(RUN_KEYS)})"))
    target, command = block.get("target"), block.get("command")
    if (target is None) == (command is None):
        raise HptError(f"{file}: the run block needs exactly one of run.target ('pkg.module:function') "
                       "and run.command ('python train.py {overrides}')")
    if target is not None and not (isinstance(target, str) and TARGET.fullmatch(target)):
        raise HptError(f"run.target: '{target}' is not 'package.module:function'")
    if command is not None and not (isinstance(command, str) and command.strip()):
        raise HptError("run.command: must be a non-empty command line, e.g. 'python train.py {overrides}'")
    schema = block.get("schema")
    if schema is not None and not (isinstance(schema, str) and TARGET.fullmatch(schema)):
        raise HptError(f"run.schema: '{schema}' is not 'package.module:Dataclass'")
    here = file.resolve().parent
    paths = block.get("path", ["."])
    paths = [paths] if isinstance(paths, str) else list(paths)
    columns = dict(block.get("columns") or {})
    for name in columns:
        if name not in COLUMNS:
            raise HptError(f"run.columns.{name}: not a column hpt knows (it knows: {', '.join(COLUMNS)})")
    return {
        "target": target, "command": command, "schema": schema,
        "cwd": str((here / str(block.get("cwd", "."))).resolve()),
        "path": [str((here / str(p)).resolve()) for p in paths],
        "columns": columns,
    }


def check_runnable(run: Mapping[str, Any]) -> None:
    """What can be checked before anything launches: the working folder exists, the target's module is found."""
    if not Path(run["cwd"]).is_dir():
        raise HptError(f"run.cwd: no such folder {run['cwd']} (it is relative to the sweep file)")
    if run["target"]:
        module = run["target"].split(":")[0]
        for p in reversed(run["path"]):
            if p not in sys.path:
                sys.path.insert(0, p)
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package that is missing or fails to import
            found = False
        if not found:
            raise HptError(f"run.target '{run['target']}': no module {module} in {', '.join(run['path'])} or the "
                           "installed packages (set run.path to the folder that holds it)")


def find_columns(config: Mapping[str, Any], given: Mapping[str, str]) -> dict[str, str]:
    """Which of the user's keys is each column: `run.columns` first (each must exist), else the usual names."""
    out = {}
    for name, candidates in COLUMNS.items():
        if name in given:
            if not has(config, given[name]):
                raise unknown_key(given[name], config, f"run.columns.{name}:")
            out[name] = given[name]
        else:
            found = next((k for k in candidates if has(config, k) and not isinstance(get(config, k), Mapping)), None)
            if found:
                out[name] = found
    return out


def import_object(spec: str, paths: Iterable[str], what: str) -> Any:
    """`pkg.module:name` imported, with the run's import folders first on sys.path; an HptError saying why not."""
    module_name, _, attr = spec.partition(":")
    for p in reversed(list(paths)):
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the user's module failing as it imports
        raise HptError(f"{what} '{spec}' cannot be imported: {type(err).__name__}: {str(err).splitlines()[0]} "
                       f"(searched {', '.join(paths)} first: set run.path to the folder holding {module_name})"
                       ) from None
    if not hasattr(module, attr):
        raise HptError(f"{what} '{spec}': module {module_name} has no '{attr}'")
    return getattr(module, attr)


def validate(config: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    """The user's keys, typed and checked by `run.schema` (a dataclass) when one is named; as written otherwise."""
    from omegaconf import OmegaConf  # here: `hpt status` reads frozen configs without OmegaConf
    from omegaconf.errors import OmegaConfBaseException  # likewise

    from hptransfer.config.schema import error_message  # likewise (the schema module imports OmegaConf)

    keys = user_keys(config)
    if not run.get("schema"):
        return keys
    schema = import_object(run["schema"], run["path"], "run.schema")
    if not dataclasses.is_dataclass(schema):
        raise HptError(f"run.schema: '{run['schema']}' is not a dataclass")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), keys)
        return OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        raise HptError(f"config key '{key}' ({run['schema']}): {error_message(err)}" if key
                       else f"{run['schema']}: {error_message(err)}") from None


def identity(frozen: Mapping[str, Any]) -> dict[str, Any]:
    """What a user run's id hashes: the user's keys and what runs (target or command), not where it lies."""
    run = frozen["run"]
    return {**user_keys(frozen), "run": {"target": run["target"], "command": run["command"]}}


def overrides(frozen: Mapping[str, Any]) -> list[str]:
    """The user's keys as Hydra-style overrides `key=value`, one per leaf, each value as Hydra's grammar reads it
    back to the same type (a string that would read as a number or a boolean is quoted)."""
    return [f"{key}={_override_value(value)}" for key, value in flatten(user_keys(frozen)).items()]


def _override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str) and PLAIN.fullmatch(value) and value.lower() not in WORDS:
        return value
    return json.dumps(value)  # lists, mappings and other strings: JSON is valid in Hydra's grammar
