"""A run's frozen config: its YAML text in the run folder, reading it back, and its id (a hash).

`run_id` hashes the canonical JSON of the resolved run keys (launcher settings excluded), so the same
point of the same sweep always has the same id and a finished run is never trained twice.
"""

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hptransfer.config import user
from hptransfer.config.schema import LATER_KEYS, RUN_KEYS, error_message, validate
from hptransfer.errors import HptError


def to_yaml(cfg: DictConfig | dict[str, Any]) -> str:
    """The config as YAML, resolved: OmegaConf.to_yaml's text (but for strings it would fold over
    lines: one JSON-quoted line), ~100x faster on plain data (a sweep writes thousands)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    out: list[str] = []
    _yaml_lines(plain, "", out)
    return "".join(out)


def _yaml_lines(d: dict[str, Any], indent: str, out: list[str]) -> None:
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.append(f"{indent}{_yaml_scalar(k)}:\n")
            _yaml_lines(v, indent + "  ", out)
        elif isinstance(v, dict | list):  # no lists in a run config; the launcher's are short
            out.append(f"{indent}{_yaml_scalar(k)}: {json.dumps(v)}\n")
        else:
            out.append(_yaml_line(indent, k, v))


@lru_cache(maxsize=65536, typed=True)  # most lines recur across a sweep's configs
def _yaml_line(indent: str, k: str, v: Any) -> str:
    return f"{indent}{_yaml_scalar(k)}: {_yaml_scalar(v)}\n"


@lru_cache(maxsize=65536, typed=True)  # typed: 1, 1.0 and True are different scalars
def _yaml_scalar(v: Any) -> str:
    """One scalar as OmegaConf writes it (it quotes what its loader would read back as another type)."""
    text = OmegaConf.to_yaml({"k": v}).removeprefix("k:").strip()
    return json.dumps(v) if "\n" in text else text  # a folded string: one line, JSON-escaped (valid YAML)


def load_yaml(path: Path) -> DictConfig:
    """Load and validate a frozen run config (a run folder's config.yaml)."""
    try:
        raw = OmegaConf.load(path)
    except FileNotFoundError:
        raise HptError(f"no such file: {path}") from None
    except Exception as err:
        raise HptError(f"cannot read {path}: {error_message(err)}") from None
    return validate(raw, fill=False)  # its tokens were settled when it was frozen


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's identity as plain data: the resolved run-schema keys, without launcher settings or sweep blocks."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in RUN_KEYS}


def run_id(cfg: DictConfig | dict[str, Any]) -> str:
    """Stable short hash of the resolved run config (launcher excluded): same point, same id.

    Takes a DictConfig or the plain dict of `run_config`.
    """
    return id_of(identity_json(run_config(cfg) if OmegaConf.is_config(cfg) else cfg))


def canonical_json(frozen: dict[str, Any]) -> str:
    """The frozen config as one JSON text (keys sorted, no spaces): what the manifest stores."""
    return json.dumps(frozen, sort_keys=True, separators=(",", ":"))


def identity_json(frozen: dict[str, Any]) -> str:
    """The JSON text a run's id hashes: the canonical JSON without the later keys left at their defaults
    (schema.LATER_KEYS), so a run frozen before a key existed keeps its id; for a run of the user's code,
    their keys and what runs (config/user.py's `identity`)."""
    if user.is_user_config(frozen):
        return canonical_json(user.identity(frozen))
    return canonical_json(without_later_defaults(frozen))


def without_later_defaults(frozen: dict[str, Any]) -> dict[str, Any]:
    """A copy of a plain config without the LATER_KEYS at their defaults (and the sections that leaves empty)."""
    out = dict(frozen)
    for key, default in LATER_KEYS.items():
        *path, leaf = key.split(".")
        nodes = [out]
        for part in path:
            child = nodes[-1].get(part)
            if not isinstance(child, dict):
                break
            nodes[-1][part] = dict(child)  # copy on the way down: `frozen` is never changed
            nodes.append(nodes[-1][part])
        else:
            if nodes[-1].get(leaf, default) == default:
                nodes[-1].pop(leaf, None)
                for parent, part in zip(reversed(nodes[:-1]), reversed(path), strict=True):  # prune emptied sections
                    if parent[part]:
                        break
                    del parent[part]
    return out


def id_of(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
