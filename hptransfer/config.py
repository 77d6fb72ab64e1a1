"""Compose run configs with Hydra and validate them against a typed schema.

`compose_run(overrides)` builds one run's config from the package's `conf/`;
`compose_file(path, overrides)` composes a user's file (a sweep file) whose
`defaults` name `config`, with the package configs on the search path. Both
return a validated `DictConfig`; every problem is an `HptError` naming the key.
"""

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hptransfer.errors import HptError

CONF_DIR = Path(__file__).parent / "conf"


@dataclass
class ModelConfig:
    width: int = 128
    n_layers: int = 2
    head_dim: int | None = 32
    n_heads: int | None = None
    n_kv_heads: int | None = None
    mlp: str = "gelu"
    mlp_ratio: float = 4.0
    pos: str = "rope"
    max_seq_len: int = 1024
    norm_gains: bool = True
    attn_scale: str = "auto"


@dataclass
class ParamConfig:
    name: str = "sp"
    base_width: int = 128
    base_depth: int = 2
    depth_alpha: float | None = None
    alignment: str = "full"
    zero_query: bool = False
    zero_readout: bool = False
    lr_mult: dict[str, float] = field(default_factory=lambda: {"E": 1.0, "H": 1.0, "R": 1.0, "V": 1.0})
    init_mult: dict[str, float] = field(default_factory=lambda: {"E": 1.0, "H": 1.0, "R": 1.0})
    out_mult: dict[str, float] = field(default_factory=lambda: {"E": 1.0, "R": 1.0})


@dataclass
class InitConfig:
    scheme: str = "fan_in"
    std: float = 0.02


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 0.004
    weight_decay: float = 0.0
    wd_mode: str = "independent"
    wd_on_embeddings: bool = False
    eps: float = 1e-8
    eps_scaling: str = "none"
    beta1: float = 0.9
    beta2: float = 0.95
    atan2_a: float = 1.27
    atan2_b: float = 1.0
    grad_clip: float = 1.0
    schedule: str = "cosine"
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    min_lr_frac: float = 0.1


@dataclass
class DataConfig:
    name: str = "shakespeare"
    path: str | None = None
    vocab_size: int = 256
    val_frac: float = 0.05


@dataclass
class TrainConfig:
    steps: int = 200
    tokens: int | None = None
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    log_every: int = 10
    final_window: int = 20
    val_batches: int = 16
    diverge_factor: float = 3.0
    checkpoint_every: int = 0


@dataclass
class BatchRule:
    base: int | None = None
    lr_rule: str = "none"
    adam_rule: str = "none"


@dataclass
class DurationRule:
    base_tokens: int | None = None
    lr_rule: str = "none"
    lr_exponent: float = -0.3
    wd_rule: str = "none"


@dataclass
class ScalingConfig:
    batch: BatchRule = field(default_factory=BatchRule)
    duration: DurationRule = field(default_factory=DurationRule)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    param: ParamConfig = field(default_factory=ParamConfig)
    init: InitConfig = field(default_factory=InitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    # Launcher settings travel with the composed config but are not part of the run's
    # identity; the sweep layer reads them and drops them from each run's config.yaml.
    launcher: dict[str, Any] = field(default_factory=lambda: {"name": "local"})


# The allowed values of every string-valued choice: one place, so errors can list them.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.mlp": ("gelu", "swiglu"),
    "model.pos": ("rope", "learned", "none"),
    "model.attn_scale": ("auto", "inv_sqrt", "inv"),
    "param.alignment": ("full", "none"),
    "init.scheme": ("fan_in", "constant"),
    "optim.name": ("adamw", "adam_atan2"),
    "optim.wd_mode": ("independent", "coupled", "scaled"),
    "optim.eps_scaling": ("none", "per_layer"),
    "optim.schedule": ("cosine", "linear", "wsd", "constant"),
    "data.name": ("shakespeare", "text", "tokens"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "float32", "bfloat16", "float64"),
    "scaling.batch.lr_rule": ("none", "sqrt", "linear"),
    "scaling.batch.adam_rule": ("none", "sde"),
    "scaling.duration.lr_rule": ("none", "power"),
    "scaling.duration.wd_rule": ("none", "timescale"),
}

SCHEMA = OmegaConf.structured(RunConfig)
RUN_KEYS = [k for k in RunConfig.__dataclass_fields__ if k != "launcher"]  # a run's identity: all but launcher


def _hydra_message(err: Exception) -> str:
    """Hydra and OmegaConf errors span several lines; keep the lines that name the problem."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key", "object_type", "reference_type", "Traceback"))]
    return " ".join(keep).split(" Config search path:")[0][:400] or type(err).__name__


def _compose(config_dir: Path, config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir  # here: status and collect need the schema, not Hydra
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
            cfg = compose(
                config_name=config_name,
                overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides],
            )
    except HptError:
        raise
    except Exception as err:  # Hydra raises many types; all mean "this config is wrong"
        raise HptError(_hydra_message(err)) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def compose_run(overrides: list[str] | None = None) -> DictConfig:
    """One run's validated config: the package's base config plus Hydra overrides."""
    return validate(_compose(CONF_DIR, "config", list(overrides or [])))


def compose_file(path: Path, overrides: list[str] | None = None, *, extra: type | None = None) -> DictConfig:
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


def validate(cfg: DictConfig | dict) -> DictConfig:
    """Merge onto the schema (unknown keys and wrong types fail), then check values and shapes."""
    try:
        merged = OmegaConf.merge(SCHEMA, cfg)
        plain = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise HptError(_schema_message(err)) from None
    check(plain)
    return merged


def _schema_message(err: OmegaConfBaseException, prefix: str = "") -> str:
    key = getattr(err, "full_key", None)
    msg = _hydra_message(err)
    return f"config key '{prefix}{key}': {msg}" if key else msg


def typed_value(key: str, value: Any) -> Any:
    """`value` as the schema types `key` (an int for a float field becomes a float, as a full merge
    would make it); an unknown key or a wrong type is an HptError naming the key."""
    section, *path = key.split(".")
    if section not in SCHEMA or not path:
        raise HptError(f"config key '{key}': not a key of the run config")
    nested: Any = value
    for part in reversed(path):
        nested = {part: nested}
    try:
        node = OmegaConf.merge(SCHEMA[section], nested)
        for part in path:
            node = node[part]
    except OmegaConfBaseException as err:
        raise HptError(_schema_message(err, f"{section}.")) from None
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


POSITIVE = ("model.width", "model.n_layers", "model.max_seq_len", "param.base_width", "param.base_depth",
            "train.steps", "train.batch_size", "train.seq_len", "train.log_every", "train.final_window",
            "train.val_batches", "data.vocab_size", "optim.lr", "init.std", "model.mlp_ratio")


@cache
def _path(key: str) -> tuple[str, ...]:
    return tuple(key.split("."))


def check(c: dict[str, Any]) -> None:
    """Values and shapes of a schema-typed plain config: an HptError naming the first bad key."""
    from hptransfer.train.param import PRESETS  # the table is the one list of preset names

    def bad(key: str, why: str) -> HptError:
        return HptError(f"config key '{key}': {why}")

    def get(key: str) -> Any:
        node = c
        for part in _path(key):
            node = node[part]
        return node

    if c["param"]["name"] not in PRESETS:
        raise bad("param.name", f"unknown preset '{c['param']['name']}' (choose from {', '.join(PRESETS)})")
    for key, allowed in CHOICES.items():
        if (v := get(key)) not in allowed:
            raise bad(key, f"'{v}' is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        if not ((v := get(key)) > 0 and math.isfinite(v)):
            raise bad(key, f"must be positive, got {v}")
    t, m = c["train"], SimpleNamespace(**c["model"])
    if t["tokens"] is not None and t["tokens"] < t["batch_size"] * t["seq_len"]:
        raise bad("train.tokens", f"{t['tokens']} is less than one batch ({t['batch_size']} x {t['seq_len']})")
    for key in ("optim.weight_decay", "optim.eps", "optim.grad_clip", "train.checkpoint_every"):
        if get(key) < 0:
            raise bad(key, "must be >= 0")
    for key in ("optim.beta1", "optim.beta2"):
        if not 0 <= get(key) < 1:
            raise bad(key, "must be in [0, 1)")
    for key in ("optim.warmup_frac", "optim.decay_frac", "optim.min_lr_frac", "data.val_frac"):
        if not 0 <= get(key) <= 1:
            raise bad(key, "must be a fraction in [0, 1]")
    if t["diverge_factor"] <= 1:
        raise bad("train.diverge_factor", "must be > 1")
    if c["data"]["name"] != "shakespeare" and not c["data"]["path"]:
        raise bad("data.path", f"data '{c['data']['name']}' needs a path")
    for width, prefix in ((m.width, "model"), (c["param"]["base_width"], "param.base_width with model")):
        heads_and_dim(m, width, where=prefix)
    if m.pos == "learned" and t["seq_len"] > m.max_seq_len:
        raise bad("train.seq_len", f"{t['seq_len']} exceeds model.max_seq_len={m.max_seq_len}")


def heads_and_dim(m: Any, width: int, where: str = "model") -> tuple[int, int, int]:
    """(n_heads, head_dim, n_kv_heads) at `width`: heads grow with width at fixed head_dim, or stay fixed."""
    if (m.head_dim is None) == (m.n_heads is None):
        raise HptError(f"config key 'model.head_dim': set exactly one of model.head_dim and model.n_heads ({where})")
    if m.head_dim is not None:
        if m.head_dim <= 0 or width % m.head_dim:
            raise HptError(f"config key 'model.head_dim': width {width} is not divisible by head_dim {m.head_dim}")
        n_heads, head_dim = width // m.head_dim, m.head_dim
    else:
        if m.n_heads <= 0 or width % m.n_heads:
            raise HptError(f"config key 'model.n_heads': width {width} is not divisible by n_heads {m.n_heads}")
        n_heads, head_dim = m.n_heads, width // m.n_heads
    n_kv = n_heads if m.n_kv_heads is None else m.n_kv_heads
    if n_kv <= 0 or n_heads % n_kv:
        raise HptError(f"config key 'model.n_kv_heads': {n_heads} heads are not divisible by {n_kv} kv heads")
    if m.pos == "rope" and head_dim % 2:
        raise HptError(f"config key 'model.head_dim': RoPE needs an even head size, got {head_dim}")
    return n_heads, head_dim, n_kv


def steps_of(cfg: DictConfig) -> int:
    """Training steps: from train.tokens when set, else train.steps."""
    t = cfg.train
    return t.steps if t.tokens is None else steps_for_tokens(t.tokens, t.batch_size, t.seq_len)


def steps_for_tokens(tokens: int, batch_size: int, seq_len: int) -> int:
    """The steps that train on `tokens` (at least one)."""
    return max(1, tokens // (batch_size * seq_len))


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
        raise HptError(f"cannot read {path}: {_hydra_message(err)}") from None
    return validate(raw)


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's identity as plain data: the resolved run-schema keys, without launcher settings or sweep blocks."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in RUN_KEYS}


def run_id(cfg: DictConfig | dict[str, Any]) -> str:
    """Stable short hash of the resolved run config (launcher excluded): same point, same id.

    Takes a DictConfig or the plain dict of `run_config`.
    """
    return id_of(canonical_json(run_config(cfg) if OmegaConf.is_config(cfg) else cfg))


def canonical_json(frozen: dict[str, Any]) -> str:
    """The frozen config as the one JSON text its id hashes (keys sorted, no spaces)."""
    return json.dumps(frozen, sort_keys=True, separators=(",", ":"))


def id_of(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
