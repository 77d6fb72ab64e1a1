"""Facts about a run config, without torch or Hydra: dotted keys, heads, steps, tokens, parameter
counts, training FLOPs.

The sweep planner (`hpt sweep --dry-run`), training, status and the analysis all use these, so a
run's planned and reported figures come from one formula each.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

from hptransfer.errors import HptError

SEED_KEY = "train.seed"  # the key a sweep's seeds set
FLOPS_FORMULA = "6 * N * tokens + 12 * n_layers * width * seq_len * tokens (N: parameters except embeddings)"


def flatten(tree: Mapping[str, Any], prefix: str = "", *, keep: Callable[[dict], bool] | None = None
            ) -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys: {"a": {"b": 1}} -> {"a.b": 1}.

    A mapping for which `keep` is true stays one value (a sweep grid's `{log2: [lo, hi]}` range).
    """
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and not (keep and keep(v)):
            out.update(flatten(v, f"{prefix}{k}.", keep=keep))
        else:
            out[f"{prefix}{k}"] = v
    return out


def heads_and_dim(m: Any, width: int, where: str = "model") -> tuple[int, int, int]:
    """(n_heads, head_dim, n_kv_heads) at `width`: heads grow with width at fixed head_dim, or stay fixed.

    Kv heads: all of them (null), a fixed count (`n_kv_heads`: with heads growing with width the query
    heads per kv head grow too), or a fixed ratio (`q_per_kv` query heads per kv head, at every width).
    `m` is the model section (attributes width-independent: head_dim, n_heads, n_kv_heads, q_per_kv, pos).
    """
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
    q_per_kv = getattr(m, "q_per_kv", None)  # absent from a section written before the key existed
    if q_per_kv is not None:
        if m.n_kv_heads is not None:
            raise HptError("config key 'model.q_per_kv': set at most one of model.n_kv_heads and model.q_per_kv")
        if q_per_kv <= 0 or n_heads % q_per_kv:
            raise HptError(f"config key 'model.q_per_kv': {n_heads} heads (width {width}) are not divisible by "
                           f"q_per_kv {q_per_kv}")
        n_kv = n_heads // q_per_kv
    else:
        n_kv = n_heads if m.n_kv_heads is None else m.n_kv_heads
    if n_kv <= 0 or n_heads % n_kv:
        raise HptError(f"config key 'model.n_kv_heads': {n_heads} heads are not divisible by {n_kv} kv heads")
    if m.pos == "rope" and head_dim % 2:
        raise HptError(f"config key 'model.head_dim': RoPE needs an even head size, got {head_dim}")
    return n_heads, head_dim, n_kv


def steps_for_tokens(tokens: int, batch_size: int, seq_len: int) -> int:
    """The steps that train on `tokens` (at least one)."""
    return max(1, tokens // (batch_size * seq_len))


def steps_of(t: Mapping[str, Any]) -> int:
    """Training steps of a `train` section (a dict or a DictConfig): from tokens when set, else steps."""
    return t["steps"] if t["tokens"] is None else steps_for_tokens(t["tokens"], t["batch_size"], t["seq_len"])


def tokens_of(t: Mapping[str, Any]) -> int:
    """Tokens a `train` section trains on: steps x batch x sequence length."""
    return steps_of(t) * t["batch_size"] * t["seq_len"]


def param_counts(model: dict[str, Any], vocab_size: int) -> tuple[int, int]:
    """(all parameters, parameters outside the embeddings) of the built-in GPT of a model section.

    Per block: two norms (gains), q and o (width x width), k and v (width x kv heads x head size),
    the MLP (up, gate with SwiGLU, down: width x d_ff each); then the final norm, the readout, and the
    embeddings (tokens, and positions when learned). A test checks it against the built model.
    """
    w = model["width"]
    _, head_dim, n_kv = heads_and_dim(_Section(model), w)
    d_ff = round(model["mlp_ratio"] * w)
    gains = w if model["norm_gains"] else 0
    block = 2 * gains + 2 * w * w + 2 * w * n_kv * head_dim + (3 if model["mlp"] == "swiglu" else 2) * w * d_ff
    embeddings = vocab_size * w + (model["max_seq_len"] * w if model["pos"] == "learned" else 0)
    non_embedding = model["n_layers"] * block + gains + vocab_size * w
    return non_embedding + embeddings, non_embedding


def fill_tokens(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config with train.tokens = train.tokens_per_param x its non-embedding parameters (`param_counts`:
    every parameter but the token and position embeddings; the readout counts), when the ratio is set; else
    `cfg` itself. A width sweep at a fixed ratio trains each width on its own number of tokens (Kalra &
    Barkeshli's fixed tokens-per-parameter setting). A train.tokens that says otherwise is an error."""
    t = cfg["train"]
    ratio = t.get("tokens_per_param")  # absent from a config frozen before the key existed
    if ratio is None:
        return cfg
    if not (isinstance(ratio, int | float) and math.isfinite(ratio) and ratio > 0):
        raise HptError(f"config key 'train.tokens_per_param': must be positive, got {ratio}")
    _, n = param_counts(cfg["model"], cfg["data"]["vocab_size"])
    tokens = max(1, round(ratio * n))
    if t["tokens"] is not None and t["tokens"] != tokens:
        raise HptError(f"config key 'train.tokens': {t['tokens']} disagrees with train.tokens_per_param={ratio:g} "
                       f"({tokens} tokens for {n} non-embedding parameters): set only one of them")
    return {**cfg, "train": {**t, "tokens": tokens}}


def train_flops(n_params_non_embedding: int, n_layers: int, width: int, seq_len: int, tokens: int) -> int:
    """Training compute by FLOPS_FORMULA: what a run reports and what a dry run estimates."""
    return 6 * n_params_non_embedding * tokens + 12 * n_layers * width * seq_len * tokens


def run_flops(cfg: dict[str, Any]) -> int:
    """Training FLOPs of a plain run config by FLOPS_FORMULA (its steps already derived from train.tokens)."""
    m = cfg["model"]
    _, non_embedding = param_counts(m, cfg["data"]["vocab_size"])
    return train_flops(non_embedding, m["n_layers"], m["width"], cfg["train"]["seq_len"], tokens_of(cfg["train"]))


class _Section:
    """A plain dict read through attributes, as `heads_and_dim` reads a config section."""

    def __init__(self, d: dict[str, Any]):
        self.__dict__.update(d)


# What runs of one fused group may differ in (docs/design.md#fused-and-packed-tasks): scalars that reach only a
# copy's own init, optimizer, forward constants and stopping; every other key (shapes, data, steps, logging) is
# shared.
PER_COPY_KEYS = {
    "optim": None,  # every optimizer setting, the optimizer itself
    "init": None,
    "scaling": None,  # the batch and duration rules change optimizer settings only
    "train": ("seed", "diverge_factor"),
    "param": None,  # the parameterization: init, LR and forward constants, each copy its own (train/fused.py)
}


def fusion_key(cfg: Mapping[str, Any]) -> str | None:
    """Runs with the same key can train as copies of one batched model; None: never fused (the user's own
    code, or a run of several processes)."""
    if "run" in cfg or cfg["train"].get("parallel", "none") != "none":
        return None
    shared: dict[str, Any] = {}
    for section, value in cfg.items():
        per_copy = PER_COPY_KEYS.get(section, ())
        if per_copy is None:
            continue
        shared[section] = {k: v for k, v in value.items() if k not in per_copy} if isinstance(value, Mapping) \
            else value
    return repr(sorted(flatten(shared).items()))


def fused_bytes(cfg: Mapping[str, Any]) -> int:
    """An estimate of the memory one copy of a fused group takes: weights, gradients and two optimizer moments
    (4 x parameters) and the activations a step keeps for its backward (per token and layer ~20 x width plus
    4 x d_ff; the logits 4 x vocab), in the parameters' width (8 bytes for float64, else 4)."""
    m, t = cfg["model"], cfg["train"]
    total, _ = param_counts(m, cfg["data"]["vocab_size"])
    tokens = t["batch_size"] * t["seq_len"] // max(1, t.get("grad_accum", 1))
    d_ff = round(m["mlp_ratio"] * m["width"])
    per_token = m["n_layers"] * (20 * m["width"] + 4 * d_ff) + 4 * cfg["data"]["vocab_size"]
    return (8 if t.get("dtype") == "float64" else 4) * (4 * total + tokens * per_token)
