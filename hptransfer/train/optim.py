"""Optimizers and schedules, built from the per-tensor specs of the parameterization table.

Each distinct (class, lr, weight decay, eps) is one parameter group holding its own
`base_lr`; the schedule multiplies it, never overwrites it. Weight-decay modes map
onto decoupled AdamW decay `p -= lr_t * wd_group * p`:
  coupled / scaled: wd_group = the spec's decay (scaled already carries m^c);
  independent:      wd_group = lam / base_lr, so the decay is schedule(t) * lam, free of the LR.
"""

import math
from collections.abc import Iterable

import torch
from omegaconf import DictConfig
from torch import nn

from hptransfer.train.param import TensorSpec


class AdamAtan2(torch.optim.Optimizer):
    """Adam-atan2 (Everett et al. 2024): p -= lr * A * atan2(m_hat, B * sqrt(v_hat)); no epsilon.

    Moments are bias-corrected; decoupled weight decay p -= lr * wd * p comes first, as in AdamW.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 weight_decay: float = 0.0, a: float = 1.27, b: float = 1.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "a": a, "b": b})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.atan2(m_hat, group["b"] * v_hat.sqrt()), alpha=-group["lr"] * group["a"])


def param_groups(model: nn.Module, specs: dict[str, TensorSpec], wd_mode: str) -> list[dict]:
    """One group per distinct (class, lr, weight decay, eps), each with its own base_lr."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        s = specs[name]
        # Independent decay as lam / base_lr in AdamW's lr-scaled form; a frozen tensor (lr 0) does not decay.
        wd = (s.weight_decay / s.lr if s.lr else 0.0) if wd_mode == "independent" else s.weight_decay
        key = (s.cls, s.lr, wd, s.eps)
        g = groups.setdefault(key, {"params": [], "names": [], "cls": s.cls, "base_lr": s.lr, "lr": s.lr,
                                    "weight_decay": wd, "eps": s.eps})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, specs: dict[str, TensorSpec], cfg: DictConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, specs, o.wd_mode)
    betas = (o.beta1, o.beta2)
    if o.name == "adam_atan2":
        for g in groups:
            g.pop("eps")  # Adam-atan2 has no epsilon
        return AdamAtan2(groups, betas=betas, a=o.atan2_a, b=o.atan2_b)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, betas=betas, fused=on_cuda or None, foreach=None if on_cuda else True)


def lr_factor(step: int, total: int, cfg: DictConfig) -> float:
    """Schedule multiplier at `step` (0-based): linear warmup, then cosine / linear / WSD / constant."""
    o = cfg.optim
    warmup = round(o.warmup_frac * total)
    if step < warmup:
        return (step + 1) / warmup
    floor = o.min_lr_frac
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "wsd":
        decay_start = max(warmup, total - round(o.decay_frac * total))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / max(1, total - decay_start)
        return 1.0 - (1.0 - floor) * progress
    progress = (step - warmup + 1) / max(1, total - warmup)
    if o.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor
