"""Optimizers and schedules, built from the per-tensor specs of the parameterization table.

Each distinct (class, lr, weight decay, eps) is one parameter group holding its own
`base_lr`; the schedule multiplies it, never overwrites it. Weight-decay modes map
onto decoupled AdamW decay `p -= lr_t * wd_group * p`:
  coupled / scaled: wd_group = the spec's decay (scaled already carries m^c);
  independent:      wd_group = lam / base_lr, so the decay is schedule(t) * lam, free of the LR.
Every optimizer here decays that way (SGD's coupled L2 is replaced by it, `SGDW`). The per-class LRs of each
optimizer family come from the specs (train/param.py OPTIMIZER_LR), never from a branch here. A group has
an `eps` only where its tensors' optimizer has an Adam epsilon (spec eps not None).
"""

import math
from collections.abc import Iterable, Iterator

import torch
from omegaconf import DictConfig
from torch import nn

from hptransfer.train.param import TensorSpec


def with_grads(opt: torch.optim.Optimizer) -> Iterator[tuple[dict, torch.Tensor]]:
    """(group, parameter) for every parameter of the optimizer that has a gradient: what a step updates."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                yield group, p


class AdamAtan2(torch.optim.Optimizer):
    """Adam-atan2 (Everett et al. 2024): p -= lr * A * atan2(m_hat, B * sqrt(v_hat)); no epsilon.

    Moments are bias-corrected; decoupled weight decay p -= lr * wd * p comes first, as in AdamW.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 weight_decay: float = 0.0, a: float = 1.27, b: float = 1.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "a": a, "b": b})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for group, p in with_grads(self):
            beta1, beta2 = group["betas"]
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


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", algorithm 2):

        c = beta1 * m + (1 - beta1) * g;  p -= lr * (sign(c) + wd * p);  m = beta2 * m + (1 - beta2) * g

    A sign update: every coordinate moves by exactly lr (plus decay), so Adam's width exponents apply; no epsilon.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for group, p in with_grads(self):
            beta1, beta2 = group["betas"]
            m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
            update = torch.sign(m * beta1 + p.grad * (1 - beta1))
            p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, as the paper's
            p.add_(update, alpha=-group["lr"])
            m.lerp_(p.grad, 1 - beta2)


class SGDW(torch.optim.SGD):
    """torch's SGD (momentum, Nesterov) with AdamW's decoupled decay p -= lr * wd * p instead of L2 in the
    gradient, so that every wd_mode means for SGD what it means for AdamW (the momentum would amplify L2)."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        decays = [g["weight_decay"] for g in self.param_groups]
        for g, wd in zip(self.param_groups, decays, strict=True):
            if wd:
                for p in g["params"]:
                    if p.grad is not None:
                        p.mul_(1 - g["lr"] * wd)
            g["weight_decay"] = 0.0  # torch's own step: no L2 on top
        try:
            super().step()
        finally:
            for g, wd in zip(self.param_groups, decays, strict=True):
                g["weight_decay"] = wd


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked `muon` (the 2-D hidden matrices H), AdamW on the rest (E, R, V), as Muon is used.

    One optimizer: one list of groups (the schedule, `dist.verify` and checkpoints see every group) and one state.
    Each step hands the groups to a torch.optim.Muon and a torch.optim.AdamW that share that state, linked anew
    every step because load_state_dict replaces groups and state. Muon scales each H group's lr by torch's
    "original" (Jordan's) factor sqrt(max(1, fan_out / fan_in)); the spec's lr is Muon's lr argument.
    """

    def __init__(self, groups: list[dict], *, betas: tuple[float, float], momentum: float, nesterov: bool):
        muon = [g for g in groups if g["muon"]]
        adam = [g for g in groups if not g["muon"]]
        # The parts fill in their own defaults (Muon's Newton-Schulz eps, AdamW's betas) in the shared group dicts.
        self._muon = torch.optim.Muon(muon, momentum=momentum, nesterov=nesterov, adjust_lr_fn="original") \
            if muon else None
        self._adam = torch.optim.AdamW(adam, betas=betas, foreach=True) if adam else None
        super().__init__([*(self._muon.param_groups if self._muon else []),
                          *(self._adam.param_groups if self._adam else [])], {})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for part, muon in ((self._muon, True), (self._adam, False)):
            if part is not None:
                part.param_groups = [g for g in self.param_groups if g["muon"] is muon]
                part.state = self.state
                part.step()


def param_groups(model: nn.Module, specs: dict[str, TensorSpec], wd_mode: str) -> list[dict]:
    """One group per distinct (class, lr, weight decay, eps), each with its own base_lr; `eps` only where the
    tensors' optimizer has an Adam epsilon (spec eps not None)."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        s = specs[name]
        # Independent decay as lam / base_lr in AdamW's lr-scaled form; a frozen tensor (lr 0) does not decay.
        wd = (s.weight_decay / s.lr if s.lr else 0.0) if wd_mode == "independent" else s.weight_decay
        key = (s.cls, s.lr, wd, s.eps)
        g = groups.setdefault(key, {"params": [], "names": [], "cls": s.cls, "base_lr": s.lr, "lr": s.lr,
                                    "weight_decay": wd, **({} if s.eps is None else {"eps": s.eps})})
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
    if o.name == "sgd":
        return SGDW(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "lion":
        return Lion(groups, betas=betas)
    if o.name == "adafactor":
        # torch's defaults (beta2 decay -0.8, eps (None, 1e-3), clipping d = 1); its lr caps rho_t = min(lr, 1/sqrt(t))
        return torch.optim.Adafactor(groups, foreach=True)
    if o.name == "muon":
        for g in groups:
            g["muon"] = g["cls"] == "H"
        return MuonAdamW(groups, betas=betas, momentum=o.momentum, nesterov=o.nesterov)
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
