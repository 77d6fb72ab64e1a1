"""Hydra composition: one run's config from the package's groups, or a user's file built on them.

`compose_run(overrides)` builds one run's config from `config/groups/`; `compose_file(path,
overrides)` composes a user's file (a sweep file) whose `defaults` name `config`, with the
package's groups on the search path. Both return a validated `DictConfig`.
"""

import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from hptransfer.config import user
from hptransfer.config.schema import RunConfig, error_message, is_key, nearest_key, unknown_key_message, validate
from hptransfer.errors import HptError

GROUPS_DIR = Path(__file__).parent / "groups"
# Hydra's answer to an override of a key the config lacks: "use +key=value", which only fails later.
NO_SUCH_KEY = re.compile(r"Could not override '([^']+)'\.\s+To append to your config use \+")


@cache
def launcher_keys() -> tuple[str, ...]:
    """The keys of every launcher group (launcher.partition, launcher.jobs, ...): the schema holds only the name."""
    return tuple(sorted({f"launcher.{k}" for f in GROUPS_DIR.glob("launcher/*.yaml")
                         for k in OmegaConf.load(f)}))


def _message(err: Exception) -> str:
    """Hydra's error in one line; for a key that does not exist, the nearest keys that do instead of '+key'."""
    text = str(err)
    missing = NO_SUCH_KEY.search(text)
    key = missing.group(1) if missing else ""
    run_key = key.split(".")[0] in RunConfig.__dataclass_fields__ or nearest_key(key, launcher_keys())
    if missing and run_key and not is_key(key, launcher_keys()):  # a sweep file's own blocks: Hydra's message
        return unknown_key_message(key, launcher_keys())
    return error_message(err)


def _compose(config_dir: Path, config_name: str, overrides: list[str],
             explain: Callable[[Exception], str] = _message, *, groups: bool = True) -> DictConfig:
    """Hydra's composition, with the package's groups on the search path unless `groups` is false."""
    GlobalHydra.instance().clear()
    search = [f"hydra.searchpath=[file://{GROUPS_DIR}]"] if groups else []
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=[*search, *overrides])
    except HptError:
        raise
    except Exception as err:  # Hydra raises many types; all mean "this config is wrong"
        raise HptError(explain(err)) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def compose_run(overrides: list[str] | None = None) -> DictConfig:
    """One run's validated config: the package's base config plus Hydra overrides."""
    return validate(_compose(GROUPS_DIR, "config", list(overrides or [])))


def compose_file(path: Path, overrides: list[str] | None = None) -> DictConfig:
    """Compose a user's config file (e.g. a sweep file) that extends the base run config.

    Keys beyond the run schema are allowed only under the file's own top-level blocks
    (e.g. `sweep`); they are returned untouched for the caller to validate.
    """
    path = Path(path)
    if not path.is_file():
        raise HptError(f"no such config file: {path}")
    if path.suffix not in (".yaml", ".yml"):
        raise HptError(f"config file must be .yaml: {path}")
    cfg = _compose(path.parent, path.stem, list(overrides or []))
    OmegaConf.set_struct(cfg, False)
    own = {k: cfg.pop(k) for k in list(cfg.keys()) if k not in RunConfig.__dataclass_fields__}
    run = validate(cfg, fill=False)  # a sweep's base: train.tokens_per_param is filled at each point's width
    OmegaConf.set_struct(run, False)
    for k, v in own.items():
        run[k] = v
    return run


def compose_user_file(path: Path, overrides: list[str] | None = None) -> DictConfig:
    """Compose a sweep file of the user's own code (config/user.py): their keys, `run`, `sweep`, `launcher`.

    Hydra composes the file without the package's groups (a key of theirs named `model` or `param` is
    theirs, not a group). The launcher is hpt's: the group file `launcher=NAME` picks (else the file's
    `launcher.name`, else local), under the file's `launcher:` block, under `launcher.KEY=VALUE` overrides.
    An override of a key the file lacks names the nearest of the user's keys.
    """
    path = Path(path)
    overrides = list(overrides or [])
    ours = [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".")[0] == "launcher"]
    raw = OmegaConf.load(path)

    def explain(err: Exception) -> str:
        missing = NO_SUCH_KEY.search(str(err))
        if missing and missing.group(1).split(".")[0] not in ("sweep", "run"):
            return str(user.unknown_key(missing.group(1), OmegaConf.to_container(raw)))
        return error_message(err)

    cfg = _compose(path.parent, path.stem, [o for o in overrides if o not in ours], explain, groups=False)
    OmegaConf.set_struct(cfg, False)
    block = cfg.pop("launcher", None) or OmegaConf.create({})
    picked = [o.split("=", 1)[1] for o in ours if o.lstrip("+").split("=", 1)[0] == "launcher"]
    name = picked[-1] if picked else block.get("name", "local")
    group = GROUPS_DIR / "launcher" / f"{name}.yaml"
    if not group.is_file():
        known = ", ".join(sorted(p.stem for p in group.parent.glob("*.yaml")))
        raise HptError(f"config key 'launcher': '{name}' is not one of {known}")
    if block.get("name", name) != name:  # the command line chose another launcher: the file's settings are not for it
        block = OmegaConf.create({})
    dotted = [o.lstrip("+").removeprefix("launcher.") for o in ours if "." in o.split("=", 1)[0]]
    try:
        cfg.launcher = OmegaConf.merge(OmegaConf.load(group), block, OmegaConf.from_dotlist(dotted))
    except Exception as err:  # OmegaConf's grammar errors in a launcher.KEY=VALUE override
        raise HptError(f"bad launcher override: {error_message(err)}") from None
    return cfg
