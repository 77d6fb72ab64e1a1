"""The run config's schema: typed dataclasses, the allowed value of every choice, and validation.

Every run config (composed by `config.compose`, or read back from a frozen config.yaml) is merged
onto `SCHEMA` (an unknown key or a wrong type fails) and its values and shapes are checked by
`check_values`; every problem is an `HptError` naming the key. The groups' YAML defaults live in
`config/groups/`; docs/design.md#configuration lists the keys.
"""

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from hptransfer.config.derived import fill_tokens, flatten, heads_and_dim
from hptransfer.errors import HptError


@dataclass
class ModelConfig:
    width: int = 128
    n_layers: int = 2
    head_dim: int | None = 32
    n_heads: int | None = None
    n_kv_heads: int | None = None  # a fixed count of kv heads at every width
    q_per_kv: int | None = None  # or: query heads per kv head, held as heads grow with width
    mlp: str = "gelu"
    mlp_ratio: float = 4.0
    pos: str = "rope"
    max_seq_len: int = 1024
    norm_gains: bool = True
    attn_scale: str = "auto"


@dataclass
class ClassExponents:
    """Width exponents of one class, each overriding the preset's when set (null: the preset's value)."""

    a: float | None = None  # forward multiplier m^-a
    b: float | None = None  # init std m^-b
    c: float | None = None  # learning rate m^-c (under either alignment)
    g: float | None = None  # Adam epsilon m^-g (with optim.eps_scaling=per_layer)


@dataclass
class DepthExponents:
    """Depth exponents, each overriding what param.depth_alpha implies when set (null: implied)."""

    residual: float | None = None  # residual branches x mL^-residual (implied: alpha)
    lr: float | None = None  # H and in-block V learning rates x mL^-lr (implied: 1 - alpha, 0 when alpha = 0)


@dataclass
class Exponents:
    """`param.exponents.<E|H|R>.<a|b|c|g>` and `param.exponents.depth.<residual|lr>`: define and check a
    parameterization of one's own."""

    E: ClassExponents = field(default_factory=ClassExponents)
    H: ClassExponents = field(default_factory=ClassExponents)
    R: ClassExponents = field(default_factory=ClassExponents)
    depth: DepthExponents = field(default_factory=DepthExponents)


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
    exponents: Exponents = field(default_factory=Exponents)


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
    momentum: float = 0.9  # sgd: heavy-ball momentum; muon: Muon's momentum (its H matrices)
    nesterov: bool = False  # sgd and muon: Nesterov momentum


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
    tokens_per_param: float | None = None  # tokens = this x non-embedding parameters (derived.fill_tokens)
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
    eval_every: int = 50  # steps between validation evaluations (0: only the final one)
    eval_batches: int = 4  # the fixed validation batches of those periodic evaluations
    parallel: str = "none"  # with several processes: ddp (replicas) | fsdp (FSDP2 shards); none: one process
    grad_accum: int = 1  # micro-batches per optimizer step (per process): a global batch no step could hold
    dist_timeout_s: float = 600.0  # collectives' timeout: a dead rank fails the run instead of hanging it


@dataclass
class BatchRule:
    base: int | None = None
    lr_rule: str = "none"
    adam_rule: str = "none"
    wd_rule: str = "none"


@dataclass
class DurationRule:
    base_tokens: int | None = None
    lr_rule: str = "none"
    lr_exponent: float = -0.3
    wd_rule: str = "none"


@dataclass
class TimescaleConfig:
    """AdamW's decay timescale, which the `timescale` and `power` weight-decay rules hold or set
    (docs/science.md#batch-size-and-duration-rules)."""

    unit: str = "fraction"  # what `timescale` holds fixed: fraction (of the run's tokens) | tokens | iterations
    c: float | None = None  # `power`: tau* = c * (tokens / non-embedding parameters)^p, a fraction of the run
    p: float | None = None


@dataclass
class ScalingConfig:
    batch: BatchRule = field(default_factory=BatchRule)
    duration: DurationRule = field(default_factory=DurationRule)
    timescale: TimescaleConfig = field(default_factory=TimescaleConfig)


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
    # The parameterization presets: train/param.py's table has one row for each (checked at its import).
    "param.name": ("sp", "sp_emb", "sp_perlayer", "ntk", "mfp", "mup_everett", "mup", "completep", "depth_mup"),
    "model.mlp": ("gelu", "swiglu"),
    "model.pos": ("rope", "learned", "none"),
    "model.attn_scale": ("auto", "inv_sqrt", "inv"),
    "param.alignment": ("full", "none"),
    "init.scheme": ("fan_in", "constant"),
    "optim.name": ("adamw", "adam_atan2", "sgd", "adafactor", "lion", "muon"),
    "optim.wd_mode": ("independent", "coupled", "scaled"),
    "optim.eps_scaling": ("none", "per_layer"),
    "optim.schedule": ("cosine", "linear", "wsd", "constant"),
    "data.name": ("shakespeare", "text", "tokens"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "float32", "bfloat16", "float64"),
    "train.parallel": ("none", "ddp", "fsdp"),
    "scaling.batch.lr_rule": ("none", "sqrt", "linear"),
    "scaling.batch.adam_rule": ("none", "sde"),
    "scaling.duration.lr_rule": ("none", "power"),
    "scaling.batch.wd_rule": ("none", "timescale", "power"),
    "scaling.duration.wd_rule": ("none", "timescale", "power"),
    "scaling.timescale.unit": ("fraction", "tokens", "iterations"),
}
# The muP family: the presets whose widths scale the init (b exponents) and the attention (1/d_head) together,
# so a width-independent init (init.scheme=constant) breaks them. train/param.py checks at its import that
# these are the presets whose `mup_attention` is set.
MUP_FAMILY: tuple[str, ...] = ("mup_everett", "mup", "completep", "depth_mup")
# The presets each optimizer has a published width rule for (train/param.py's OPTIMIZER_LR table, checked at its
# import): optim.name with another preset is an error before anything trains. Adam-like optimizers have them all.
OPTIMIZER_PRESETS: dict[str, tuple[str, ...]] = {
    "sgd": ("sp", "sp_perlayer", "ntk", "mfp", "mup_everett", "mup"),
    "adafactor": ("sp", "sp_perlayer", "ntk", "mfp", "mup_everett", "mup"),
    "muon": ("sp", "sp_emb", "sp_perlayer", "ntk", "mfp", "mup_everett", "mup"),
}

# Keys added to the run config after runs were first frozen, with their defaults. A run that leaves
# such a key at its default hashes as it did before the key existed (config.frozen.identity_json), so
# upgrading hpt never renames, and so never retrains, a finished run. Every new key is added here
# (tests/golden/run_ids.json holds the ids of the shipped sweep files).
LATER_KEYS: dict[str, Any] = {
    **{f"param.exponents.{cls}.{e}": None for cls in ("E", "H", "R") for e in ("a", "b", "c", "g")},
    "param.exponents.depth.residual": None,
    "param.exponents.depth.lr": None,
    "model.q_per_kv": None,
    "scaling.batch.wd_rule": "none",
    "scaling.timescale.unit": "fraction",
    "scaling.timescale.c": None,
    "scaling.timescale.p": None,
    "train.eval_every": 50,
    "train.eval_batches": 4,
    "train.tokens_per_param": None,
    "train.parallel": "none",
    "train.grad_accum": 1,
    "train.dist_timeout_s": 600.0,
    "optim.momentum": 0.9,
    "optim.nesterov": False,
}

SCHEMA = OmegaConf.structured(RunConfig)
RUN_KEYS = [k for k in RunConfig.__dataclass_fields__ if k != "launcher"]  # a run's identity: all but launcher


def error_message(err: Exception) -> str:
    """Hydra and OmegaConf errors span several lines; keep the lines that name the problem."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key", "object_type", "reference_type", "Traceback"))]
    return " ".join(keep).split(" Config search path:")[0][:400] or type(err).__name__


def validate(cfg: DictConfig | dict, *, fill: bool = True) -> DictConfig:
    """Merge onto the schema (unknown keys and wrong types fail), then check values and shapes.

    `fill`: set train.tokens from train.tokens_per_param (a run's config); False for a config whose tokens
    are settled (a frozen run) or not yet (a sweep's base, filled point by point at each width).
    """
    try:
        merged = OmegaConf.merge(SCHEMA, cfg)
        plain = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise HptError(_schema_message(err)) from None
    filled = fill_tokens(plain) if fill else plain  # train.tokens from train.tokens_per_param, frozen with the run
    if filled is not plain:
        merged.train.tokens = filled["train"]["tokens"]
    check_values(filled)
    return merged


def _schema_message(err: OmegaConfBaseException, prefix: str = "") -> str:
    key = getattr(err, "full_key", None)
    if not key:
        return error_message(err)
    key = key if not prefix or key.startswith(prefix) else f"{prefix}{key}"  # a section's node knows its path
    if isinstance(err, ConfigKeyError | ConfigAttributeError) and not is_key(key):
        return unknown_key_message(key)
    return f"config key '{key}': {error_message(err)}"


@cache
def dotted_keys() -> tuple[str, ...]:
    """Every key of the run config as the command line spells it (model.width, param.lr_mult.E, launcher)."""
    return tuple(flatten(OmegaConf.to_container(SCHEMA)))


def is_key(key: str, extra: Iterable[str] = ()) -> bool:
    """A key of the run config, or a section of keys (model, param.lr_mult)."""
    return any(k == key or k.startswith(f"{key}.") for k in (*dotted_keys(), *extra))


def nearest_key(key: str, extra: Iterable[str] = ()) -> str | None:
    """The key of the run config nearest to a mistyped one (difflib), or None when none is near."""
    keys = [*dotted_keys(), *extra]
    section, _, rest = key.partition(".")
    known = sorted({k.partition(".")[2] for k in keys if k.startswith(f"{section}.")})
    if known and rest:  # a known section: match the rest among its keys (a shared prefix says nothing)
        close = [f"{section}.{c}" for c in difflib.get_close_matches(rest, known, n=1, cutoff=0.6)]
    else:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_key_message(key: str, extra: Iterable[str] = ()) -> str:
    """'config key 'model.widht' does not exist: did you mean model.width?' (the nearest key of the schema)."""
    near = nearest_key(key, extra)
    if near:
        return f"config key '{key}' does not exist: did you mean {near}?"
    section = key.split(".")[0]
    known = sorted({k.split(".")[1] for k in [*dotted_keys(), *extra] if k.startswith(f"{section}.")})
    sections = ", ".join(RunConfig.__dataclass_fields__)
    where = f"{section} has: {', '.join(known)}" if known else f"the sections are: {sections}"
    return f"config key '{key}' does not exist ({where})"


def typed_value(key: str, value: Any) -> Any:
    """`value` as the schema types `key` (an int for a float field becomes a float, as a full merge
    would make it); an unknown key or a wrong type is an HptError naming the key."""
    section, *path = key.split(".")
    if section not in SCHEMA or not path:
        raise HptError(f"config key '{key}': not a key of the run config" if is_key(key) else unknown_key_message(key))
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
            "train.val_batches", "train.eval_batches", "train.grad_accum", "train.dist_timeout_s", "data.vocab_size",
            "optim.lr", "init.std", "model.mlp_ratio")


@cache
def _path(key: str) -> tuple[str, ...]:
    return tuple(key.split("."))


def check_values(c: dict[str, Any]) -> None:
    """Values and shapes of a schema-typed plain config: an HptError naming the first bad key."""
    def bad(key: str, why: str) -> HptError:
        return HptError(f"config key '{key}': {why}")

    def get(key: str) -> Any:
        node = c
        for part in _path(key):
            node = node[part]
        return node

    for key, allowed in CHOICES.items():
        if (v := get(key)) not in allowed:
            raise bad(key, f"'{v}' is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        if not ((v := get(key)) > 0 and math.isfinite(v)):
            raise bad(key, f"must be positive, got {v}")
    t, m = c["train"], SimpleNamespace(**c["model"])
    check_batch_split(t["batch_size"], 1, t["grad_accum"])  # the processes' share: checked where they are known
    if t["tokens"] is not None and t["tokens"] < t["batch_size"] * t["seq_len"]:
        raise bad("train.tokens", f"{t['tokens']} is less than one batch ({t['batch_size']} x {t['seq_len']})")
    for key in ("optim.weight_decay", "optim.eps", "optim.grad_clip", "train.checkpoint_every", "train.eval_every"):
        if get(key) < 0:
            raise bad(key, "must be >= 0")
    for key in ("optim.beta1", "optim.beta2", "optim.momentum"):
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
    if c["init"]["scheme"] == "constant" and (name := c["param"]["name"]) in MUP_FAMILY:
        raise bad("init.scheme", f"constant (one init std at every width) breaks the width scaling of '{name}'; "
                  "use init.scheme=fan_in, or param=sp for GPT-2's constant init")
    _check_wd_rules(c["scaling"], c["optim"], bad)
    _check_optimizer(c["optim"]["name"], c["param"]["name"], bad)
    if c["optim"]["name"] == "muon" and t["parallel"] == "fsdp":
        raise bad("train.parallel", "fsdp shards the matrices Muon orthogonalizes whole: use train.parallel=ddp, "
                  "or optim=adamw")


def _check_optimizer(optimizer: str, preset: str, bad: Callable[[str, str], HptError]) -> None:
    """An optimizer whose update is not Adam-like has its own width exponents, published for some presets only."""
    supported = OPTIMIZER_PRESETS.get(optimizer)
    if supported is not None and preset not in supported:
        raise bad("optim.name", f"{optimizer} has no published width rule for param={preset} "
                  f"(docs/science.md#other-optimizer-families): use param={' | '.join(supported)}, or optim=adamw")


def check_processes(train: Mapping[str, Any], processes: int) -> None:
    """A run of `processes` processes needs a way to share the model (train.parallel) and a global batch that
    splits into equal micro-batches: an HptError naming the key otherwise (a frozen config from before
    distributed runs has neither key: one process)."""
    parallel = train.get("parallel", "none")
    if processes > 1 and parallel == "none":
        raise HptError(f"config key 'train.parallel': none, but the run has {processes} processes (launcher.nodes x "
                       f"launcher.tasks_per_node, or --nproc): set train.parallel=ddp (replicas) or fsdp (sharded)")
    check_batch_split(train["batch_size"], processes, train.get("grad_accum", 1))


def check_batch_split(batch_size: int, processes: int, grad_accum: int) -> None:
    """A step's global batch splits into equal micro-batches: `processes` x train.grad_accum of them."""
    parts = processes * grad_accum
    if batch_size % parts:
        across = f"{processes} processes x " if processes > 1 else ""
        raise HptError(f"config key 'train.batch_size': {batch_size} rows do not split into {across}{grad_accum} "
                       f"micro-batches (train.grad_accum): make train.batch_size a multiple of {parts}")


def _check_wd_rules(s: dict[str, Any], o: dict[str, Any], bad: Callable[[str, str], HptError]) -> None:
    """The `power` weight-decay rule sets the decay outright: it needs its constants, and nothing else sets it."""
    rules = {"scaling.batch.wd_rule": s["batch"]["wd_rule"], "scaling.duration.wd_rule": s["duration"]["wd_rule"]}
    if "power" not in rules.values():
        return
    for key, rule in rules.items():
        if rule == "timescale":
            raise bad(key, "timescale cannot be combined with power on the other axis (power sets the decay outright)")
    ts = s["timescale"]
    for key in ("c", "p"):
        if ts[key] is None or not math.isfinite(ts[key]):
            raise bad(f"scaling.timescale.{key}", f"wd_rule=power needs scaling.timescale.c and .p (tau* = c (D/N)^p, "
                      f"no default), got {key}={ts[key]}")
    if ts["c"] <= 0:
        raise bad("scaling.timescale.c", f"must be positive, got {ts['c']}")
    if o["weight_decay"] != 0:
        raise bad("optim.weight_decay", "wd_rule=power sets the decay from scaling.timescale.c and .p: "
                  "leave optim.weight_decay at 0")


