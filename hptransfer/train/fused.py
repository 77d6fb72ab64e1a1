"""Fused runs: a group of runs of one shape trained as one batched model in one process
(docs/design.md#fused-and-packed-tasks).

Runs that share every shape and differ only in scalars (learning rate, decay, betas, epsilon, seed, init, LR and
forward constants, even the optimizer or the parameterization) are N copies of one GPT. The group's model holds
every weight stacked, (N, *shape), and model.py's layers batch the copies' matmuls; a forward multiplier, residual
multiplier or attention scale the copies do not share is kept per copy. Each copy keeps the module an unfused run builds
(`Setup.model`, seeded and initialised by `step.built`), whose parameters become views of its slice of the
stack, and its own optimizer, built on those views exactly as an unfused run's: so its init, optimizer,
schedule, clipping, decay and checkpoint are the unfused run's, and a step differs from it only in the order
of floating-point sums. The copies' losses are summed for one backward, so copy n's slice of each gradient is
exactly its own gradient; a copy that is not live (diverged, or behind the step it resumed from) is not
stepped and its gradient is dropped: it influences nothing.
"""

import copy
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from hptransfer.train.data import Batches
from hptransfer.train.model import GPT
from hptransfer.train.optim import build_optimizer
from hptransfer.train.step import Setup, autocast, built, loss_of, update

# The model's forward constants (model.py): a Linear's multiplier, the embeddings', a block's residual
# multiplier, an attention scale.
FORWARD_SCALARS = ("mult", "emb_mult", "pos_mult", "res_mult", "scale")


@dataclass
class Group:
    """N runs as one model: `model` holds the stacked weights (and is what a step calls), `setups[n]` is copy
    n as an unfused run has it (its module's parameters views of the stack, its optimizer, clip counter)."""

    model: GPT
    forward: nn.Module  # `model`, or torch.compile of it
    setups: list[Setup]
    slices: list[list[tuple[nn.Parameter, nn.Parameter]]]  # per copy: (its parameter, the stack it slices)


def fuse(cfgs: list[DictConfig], device: torch.device) -> Group:
    """The group of these effective configs (one fusion key: the same shapes): each copy built and
    initialised as its unfused run, its weights stacked into one model, its optimizer built on views."""
    copies = [built(c, device) for c in cfgs]
    amp = copies[0][2]
    # The stacked model: a copy of the first run's module (its structure, buffers) with (N, *shape) parameters.
    fused_model = copy.deepcopy(copies[0][0])
    stacked = {name: nn.Parameter(torch.stack([dict(m.named_parameters())[name].detach() for m, _, _ in copies]))
               for name, _ in fused_model.named_parameters()}
    _repoint(fused_model, stacked)
    _forward_scalars(fused_model, [m for m, _, _ in copies], device)
    views = [{name: nn.Parameter(p.detach()[n]) for name, p in stacked.items()} for n in range(len(copies))]
    setups = []
    for (m, specs, _), own, cfg in zip(copies, views, cfgs, strict=True):
        _repoint(m, own)
        setups.append(Setup(m, m, specs, build_optimizer(m, specs, cfg), device, amp, cfg.optim.grad_clip,
                            torch.zeros((), dtype=torch.int64, device=device), accum=cfg.train.grad_accum))
    forward = torch.compile(fused_model) if cfgs[0].train.compile else fused_model
    slices = [[(own[name], p) for name, p in stacked.items()] for own in views]
    return Group(fused_model, forward, setups, slices)


def _forward_scalars(fused: nn.Module, copies: list[nn.Module], device: torch.device) -> None:
    """Each forward constant the copies do not share becomes theirs per copy: (N,) on the device in the
    parameters' dtype (an attention scale: each scale's copies, as attention takes a float)."""
    dtype = next(fused.parameters()).dtype
    for name, module in fused.named_modules():
        for attr in FORWARD_SCALARS:
            if attr in vars(module):
                values = [vars(c.get_submodule(name))[attr] for c in copies]
                if len(set(values)) == 1:
                    continue
                setattr(module, attr, {v: torch.tensor([i for i, w in enumerate(values) if w == v], device=device)
                                       for v in sorted(set(values))} if attr == "scale" else
                        torch.tensor(values, dtype=dtype, device=device))


def _repoint(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    for name, p in params.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = p


def fused_step(g: Group, xs: torch.Tensor, ys: torch.Tensor, live: list[bool]) -> torch.Tensor:
    """One update of every live copy on its batch: xs, ys (N, B, T), copy n's rows in xs[n]; returns each
    copy's loss before it, (N,), on the device. A copy that is not live is not stepped."""
    accum = g.setups[0].accum
    total = None
    for xm, ym in zip(xs.chunk(accum, dim=1), ys.chunk(accum, dim=1), strict=True):
        with autocast(g.setups[0].device, g.setups[0].autocast):
            logits = g.forward(xm)  # (N, B, T, V)
        loss = loss_of(logits, ym) / accum  # (N,)
        loss.sum().backward()  # each copy's weights get its own loss's gradient, and no other's
        total = loss.detach() if total is None else total + loss.detach()
    for n, s in enumerate(g.setups):
        if live[n]:
            for own, p in g.slices[n]:
                own.grad = p.grad[n] if p.grad is not None else None
            update(s)
    g.model.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def fused_evaluate(g: Group, batches: Batches, n: int) -> list[float]:
    """Each copy's mean loss over the first `n` fixed validation batches (the same for every run)."""
    s, copies = g.setups[0], len(g.setups)
    total = torch.zeros(copies, device=s.device, dtype=torch.float64)
    for x, y in batches.val_batches(n, s.device):
        for xm, ym in zip(x.chunk(s.accum), y.chunk(s.accum), strict=True):
            with autocast(s.device, s.autocast):
                logits = g.model(xm.expand(copies, *xm.shape))
            total += loss_of(logits, ym.expand(copies, *ym.shape)).double() / s.accum
    return (total / n).tolist()
