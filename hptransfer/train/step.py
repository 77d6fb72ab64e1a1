"""The reusable parts of training: set a run up, take one step, evaluate.

The training loop, the coordinate check and the throughput benchmark all train through
`setup` and `train_step`, so what they measure is what a run does.
"""

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from hptransfer.errors import HptError
from hptransfer.train.data import Batches
from hptransfer.train.model import GPT, build
from hptransfer.train.optim import build_optimizer
from hptransfer.train.param import TensorSpec


def pick_device(cfg: DictConfig) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise HptError("config key 'train.device': cuda requested but no GPU is visible")
    return torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")


def precision(cfg: DictConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype or None): auto = bf16 autocast on CUDA, fp32 on CPU."""
    d = cfg.train.dtype
    if d == "float64":
        return torch.float64, None
    if d == "bfloat16" or (d == "auto" and device.type == "cuda"):
        return torch.float32, torch.bfloat16
    return torch.float32, None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass
class Setup:
    """A run ready to train: the model (and its compiled forward), its tensor specs, the optimizer.

    `clipped` counts, on the device, the steps of `train_step` whose gradient norm exceeded `grad_clip`
    (clipping was active); `clipped_steps` reads it, a host sync the loop makes only at checkpoints and at the end.
    """

    model: GPT
    forward: nn.Module  # the model, or torch.compile of it
    specs: dict[str, TensorSpec]
    opt: torch.optim.Optimizer
    device: torch.device
    autocast: torch.dtype | None
    grad_clip: float
    clipped: torch.Tensor | None = None  # int64 scalar on the device; set by `setup`


def setup(cfg: DictConfig, device: torch.device, *, measure: bool = False) -> Setup:
    """Build `cfg`'s model (seeded by train.seed), move it to `device`, build its optimizer.

    `cfg` is the config training uses (after the batch and duration rules). `measure`: the eager
    model without autocast, as the coordinate check needs it (its hooks see every module, and
    sizes are measured in the parameters' dtype).
    """
    param_dtype, amp = precision(cfg, device)
    torch.manual_seed(cfg.train.seed)
    model, specs = build(cfg)
    model.to(device=device, dtype=param_dtype)
    opt = build_optimizer(model, specs, cfg)
    forward = torch.compile(model) if cfg.train.compile and not measure else model
    return Setup(model, forward, specs, opt, device, None if measure else amp, cfg.optim.grad_clip,
                 torch.zeros((), dtype=torch.int64, device=device))


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of logits (B, T, V) against targets (B, T), in fp32 at least."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def train_step(s: Setup, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One update on the batch (x, y); returns the loss before it, on the device (reading it syncs).

    With clipping on, a step whose global gradient norm exceeds grad_clip adds 1 to `s.clipped`, on the
    device (no sync).
    """
    with autocast(s.device, s.autocast):
        logits = s.forward(x)
    loss = loss_of(logits, y)
    loss.backward()
    if s.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.grad_clip)
        if s.clipped is not None:
            s.clipped += norm > s.grad_clip
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    return loss.detach()


def clipped_steps(s: Setup) -> int | None:
    """Steps so far whose gradient norm exceeded grad_clip (None with clipping off); reading it syncs."""
    return None if s.grad_clip <= 0 or s.clipped is None else int(s.clipped)


@torch.no_grad()
def evaluate(s: Setup, batches: Batches, n: int) -> float:
    """Mean loss over the first `n` fixed validation batches (the same for every run)."""
    s.model.eval()
    total = torch.zeros((), device=s.device, dtype=torch.float64)
    for x, y in batches.val_batches(n, s.device):
        with autocast(s.device, s.autocast):
            logits = s.model(x)
        total += loss_of(logits, y).double()
    s.model.train()
    return float(total / n)
