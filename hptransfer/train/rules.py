"""Batch-size and duration rules: transform the base hyperparameters before training
(docs/science.md#batch-size-and-duration-rules).

The run config keeps the swept base values; `apply_rules` returns the config the run actually
trains with and a record of what changed, which goes into result.json.
"""

from typing import Any

from omegaconf import DictConfig, OmegaConf

from hptransfer.config.derived import tokens_of


def apply_rules(cfg: DictConfig | dict[str, Any]) -> tuple[DictConfig, dict[str, Any]]:
    """The config training uses (a copy; `cfg` keeps the base values) and the record of the rules applied."""
    eff = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg)
    o, b, d = eff.optim, eff.scaling.batch, eff.scaling.duration
    record: dict[str, Any] = {"batch_rule": None, "duration_rule": None}
    if b.base is not None and (b.lr_rule != "none" or b.adam_rule != "none"):
        k = eff.train.batch_size / b.base
        if b.lr_rule == "sqrt":
            o.lr *= k**0.5
        elif b.lr_rule == "linear":
            o.lr *= k
        if b.adam_rule == "sde":  # 1 - beta -> k (1 - beta), eps -> eps / sqrt(k)
            o.beta1 = max(0.0, 1 - k * (1 - o.beta1))
            o.beta2 = max(0.0, 1 - k * (1 - o.beta2))
            o.eps /= k**0.5
        record["batch_rule"] = {"k": k, "lr_rule": b.lr_rule, "adam_rule": b.adam_rule}
    if d.base_tokens is not None and (d.lr_rule != "none" or d.wd_rule != "none"):
        tokens = tokens_of(eff.train)
        r = tokens / d.base_tokens
        if d.lr_rule == "power":
            o.lr *= r**d.lr_exponent
        if d.wd_rule == "timescale":  # keep the decay timescale a fixed fraction of the run
            o.weight_decay /= r
        record["duration_rule"] = {"r": r, "lr_rule": d.lr_rule, "lr_exponent": d.lr_exponent,
                                   "wd_rule": d.wd_rule}
    record.update(lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay)
    return eff, record
