"""Hydra composition: one run's config from the package's groups, or a user's file built on them.

`compose_run(overrides)` builds one run's config from `config/groups/`; `compose_file(path,
overrides)` composes a user's file (a sweep file) whose `defaults` name `config`, with the
package's groups on the search path. Both return a validated `DictConfig`.
"""

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from hptransfer.config.schema import RunConfig, error_message, validate
from hptransfer.errors import HptError

GROUPS_DIR = Path(__file__).parent / "groups"


def _compose(config_dir: Path, config_name: str, overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
            cfg = compose(
                config_name=config_name,
                overrides=[f"hydra.searchpath=[file://{GROUPS_DIR}]", *overrides],
            )
    except HptError:
        raise
    except Exception as err:  # Hydra raises many types; all mean "this config is wrong"
        raise HptError(error_message(err)) from None
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
    run = validate(cfg)
    OmegaConf.set_struct(run, False)
    for k, v in own.items():
        run[k] = v
    return run


