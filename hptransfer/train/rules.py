"""Batch-size and duration rules: transform the base hyperparameters before training
(docs/science.md#batch-size-and-duration-rules).

The run config keeps the swept base values; `apply_rules` returns the config the run actually
trains with and a record of what changed, which goes into result.json's `effective` block.

Every rule is relative to a base point, where it is the identity: the base batch
`scaling.batch.base` (k = batch / base, at the run's token budget) and the base duration
`scaling.duration.base_tokens` (r = tokens / base_tokens, at the run's batch). The `power` decay
rule needs no base: it sets the decay from the run's own tokens per parameter.
"""

from typing import Any

from omegaconf import DictConfig, OmegaConf

from hptransfer.config.derived import param_counts, steps_of, tokens_of


def apply_rules(cfg: DictConfig | dict[str, Any]) -> tuple[DictConfig, dict[str, Any]]:
    """The config training uses (a copy; `cfg` keeps the base values) and the record of the rules applied."""
    eff = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg)
    o, b, d, ts = eff.optim, eff.scaling.batch, eff.scaling.duration, eff.scaling.timescale
    coupled = o.wd_mode != "independent"  # coupled and scaled: the per-step decay is lr * lam
    record: dict[str, Any] = {"batch_rule": None, "duration_rule": None, "wd_power": None}
    if b.base is not None and (b.lr_rule != "none" or b.adam_rule != "none" or b.wd_rule != "none"):
        k = eff.train.batch_size / b.base
        lr_f = batch_lr_factor(b.lr_rule, k)
        o.lr *= lr_f
        if b.adam_rule == "sde":
            o.beta1, o.beta2, o.eps = sde_beta(o.beta1, k), sde_beta(o.beta2, k), o.eps / k**0.5
        wd_f = None
        if b.wd_rule == "timescale":
            wd_f = timescale_factor(ts.unit, coupled=coupled, batch=k, lr=lr_f)
            o.weight_decay *= wd_f
        record["batch_rule"] = {"k": k, "lr_rule": b.lr_rule, "adam_rule": b.adam_rule, "wd_rule": b.wd_rule,
                                "lr_factor": lr_f, "wd_factor": wd_f}
    if d.base_tokens is not None and (d.lr_rule != "none" or d.wd_rule != "none"):
        r = tokens_of(eff.train) / d.base_tokens
        lr_f = r**d.lr_exponent if d.lr_rule == "power" else 1.0  # Bjorck et al. 2024, arXiv 2409.19913
        o.lr *= lr_f
        wd_f = None
        if d.wd_rule == "timescale":
            wd_f = timescale_factor(ts.unit, coupled=coupled, tokens=r, lr=lr_f)
            o.weight_decay *= wd_f
        record["duration_rule"] = {"r": r, "lr_rule": d.lr_rule, "lr_exponent": d.lr_exponent, "wd_rule": d.wd_rule,
                                   "lr_factor": lr_f, "wd_factor": wd_f}
    if "power" in (b.wd_rule, d.wd_rule):  # config validation: c and p are set, no timescale rule beside it
        tokens = tokens_of(eff.train)
        n = param_counts(OmegaConf.to_container(eff.model), eff.data.vocab_size)[1]
        tau = power_timescale(tokens, n, ts.c, ts.p)
        o.weight_decay = decay_for_timescale(tau * steps_of(eff.train), o.lr if coupled else None)
        record["wd_power"] = {"c": ts.c, "p": ts.p, "tokens_per_param": tokens / n, "tau": tau}
    record.update(lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
                  wd_timescale=timescales(eff))
    return eff, record


def batch_lr_factor(rule: str, k: float) -> float:
    """`scaling.batch.lr_rule`: sqrt, eta k^(1/2) (Malladi et al. 2022, arXiv 2205.10287, for Adam); linear,
    eta k (the classic SGD rule)."""
    return {"none": 1.0, "sqrt": k**0.5, "linear": k}[rule]


def sde_beta(beta: float, k: float) -> float:
    """`scaling.batch.adam_rule=sde`: beta -> beta^k. Malladi et al. (2022) give 1 - beta -> k (1 - beta),
    equal to first order in 1 - beta; beta^k stays in (0, 1) for every k (the linear form reaches 0 at
    k = 1 / (1 - beta)). It keeps the moment's averaging window the same number of samples."""
    return beta**k


def timescale_factor(unit: str, *, coupled: bool, batch: float = 1.0, tokens: float = 1.0, lr: float = 1.0) -> float:
    """The factor on lam that holds AdamW's decay timescale when the batch moves by `batch` (at the same
    tokens), the run's tokens by `tokens` (at the same batch) and the learning rate by `lr`.

    The timescale (Wang & Aitchison 2024, arXiv 2405.13698): decoupled decay makes the weights an
    exponential moving average of the updates over tau_iter = 1 / (per-step decay) steps, where the
    per-step decay is lam itself with independent decay and lr * lam with coupled (and scaled) decay.
    In the unit `scaling.timescale.unit`:
      fraction:   tau_iter / steps = B / (eta lam D) with B and D in tokens (Power Lines' tau, Bergsma et al.
                  2025, arXiv 2505.13738; Wang & Aitchison's tau_epoch in one pass over the data);
      tokens:     tau_iter x B, a fixed number of tokens (on a fixed data set, tau in epochs);
      iterations: tau_iter itself.
    Held fixed: lam x batch^(unit != iterations) / tokens^(unit == fraction), and with coupled decay
    also / lr, the LR factor the same axis's LR rule applied.
    """
    factor = (batch if unit != "iterations" else 1.0) / (tokens if unit == "fraction" else 1.0)
    return factor / lr if coupled else factor


def power_timescale(tokens: int, n_params: int, c: float, p: float) -> float:
    """Power Lines' law (Bergsma et al. 2025, arXiv 2505.13738): the best timescale, as a fraction of the
    run, is a power law in tokens per parameter, tau* = c (D / N)^p (N: non-embedding parameters here).
    c and p are fitted to one's own setting; hptransfer has no default for them."""
    return c * (tokens / n_params) ** p


def decay_for_timescale(tau_iter: float, lr: float | None) -> float:
    """The lam whose timescale is `tau_iter` steps: 1 / tau_iter (independent decay, lr None) or
    1 / (lr tau_iter) (coupled and scaled decay)."""
    return 1.0 / (tau_iter * (lr if lr is not None else 1.0))


def timescales(eff: DictConfig) -> dict[str, float] | None:
    """AdamW's decay timescale of the effective config in every unit (None without decay), for a tensor at
    the base learning rate (under `scaled` decay, every decayed tensor's: lr x decay is the base's)."""
    o, t = eff.optim, eff.train
    if o.weight_decay <= 0:
        return None
    per_step = o.weight_decay * (o.lr if o.wd_mode != "independent" else 1.0)
    tau_iter = 1.0 / per_step
    return {"iterations": tau_iter, "tokens": tau_iter * t.batch_size * t.seq_len, "fraction": tau_iter / steps_of(t)}
