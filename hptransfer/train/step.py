"""The reusable parts of training: set a run up, take one step, evaluate.

The training loop, the coordinate check and the throughput benchmarks all train through
`setup` and `train_step`, so what they measure is what a run does, on one process or several (dist.py).
"""

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from hptransfer.errors import HptError
from hptransfer.train.data import ALL_ROWS, Batches
from hptransfer.train.dist import SINGLE, World, full, global_mean, grad_sync, verify, wrap
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
    """A run ready to train: the model (and its wrapped and compiled forward), its tensor specs, the optimizer.

    `clipped` counts, on the device, the steps of `train_step` whose gradient norm exceeded `grad_clip`
    (clipping was active); `clipped_steps` reads it, a host sync the loop makes only at checkpoints and at the end.
    With several processes, a step trains this rank's `rows` of the global batch in `accum` micro-batches.
    """

    model: GPT  # the built-in names the specs have (FSDP2: sharded in place)
    forward: nn.Module  # what a step calls: `wrapper`, or torch.compile of it
    specs: dict[str, TensorSpec]
    opt: torch.optim.Optimizer
    device: torch.device
    autocast: torch.dtype | None
    grad_clip: float
    clipped: torch.Tensor | None = None  # int64 scalar on the device; set by `setup`
    world: World = SINGLE
    rows: slice = field(default_factory=lambda: ALL_ROWS)  # this rank's rows of every batch
    accum: int = 1  # micro-batches per step (train.grad_accum)
    wrapper: nn.Module | None = None  # DDP of the model, or the FSDP2 model, whose gradients sync across ranks


def built(cfg: DictConfig, device: torch.device) -> tuple[GPT, dict[str, TensorSpec], torch.dtype | None]:
    """`cfg`'s model seeded by train.seed and initialised, on `device` in its parameter dtype; its specs and
    autocast dtype. Every rank of a run, and every copy of a fused group, builds its model here."""
    param_dtype, amp = precision(cfg, device)
    torch.manual_seed(cfg.train.seed)  # every rank builds the same model
    model, specs = build(cfg)  # the parameterization: from the full model's names and shapes, before wrapping
    return model.to(device=device, dtype=param_dtype), specs, amp


def setup(cfg: DictConfig, device: torch.device, *, world: World = SINGLE, measure: bool = False) -> Setup:
    """Build `cfg`'s model (seeded by train.seed), move it to `device`, wrap it for `world`'s processes
    (train.parallel), build its optimizer, and verify the parameterization survived the wrapping.

    `cfg` is the config training uses (after the batch and duration rules). `measure`: the eager
    model without autocast, as the coordinate check needs it (its hooks see every module, and
    sizes are measured in the parameters' dtype).
    """
    model, specs, amp = built(cfg, device)
    wrapper, amp = wrap(model, cfg.train.parallel, device, amp) if world.distributed else (model, amp)
    opt = build_optimizer(model, specs, cfg)  # after wrapping: FSDP2's sharded parameters, by name
    verify(wrapper, specs, opt, cfg.optim.wd_mode)
    forward = torch.compile(wrapper) if cfg.train.compile and not measure else wrapper
    return Setup(model, forward, specs, opt, device, None if measure else amp, cfg.optim.grad_clip,
                 torch.zeros((), dtype=torch.int64, device=device), world, world.rows(cfg.train.batch_size),
                 cfg.train.grad_accum, wrapper)


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of logits (B, T, V) against targets (B, T), in fp32 at least; of a fused
    group's logits (N, B, T, V), each copy's mean, (N,)."""
    # bf16 logits are raised to fp32; float64 ones (exactness tests) stay float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logits.dim() == 3:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return F.cross_entropy(logits.flatten(0, 2), y.flatten(), reduction="none").view(len(y), -1).mean(1)


def train_step(s: Setup, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One update on the batch (x, y): this rank's rows of the step's global batch, in `s.accum` micro-batches;
    returns their mean loss before it, on the device (reading it syncs).

    With clipping on, a step whose global gradient norm exceeds grad_clip adds 1 to `s.clipped`, on the
    device (no sync).
    """
    micro = list(zip(x.chunk(s.accum), y.chunk(s.accum), strict=True))
    total = None
    for i, (xm, ym) in enumerate(micro):
        with grad_sync(s.wrapper, i == len(micro) - 1):  # the ranks average the gradients once, at the last
            with autocast(s.device, s.autocast):
                logits = s.forward(xm)
            loss = loss_of(logits, ym) / s.accum  # the gradient of the mean over the micro-batches
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    update(s)
    return total


def update(s: Setup) -> None:
    """The optimizer step on the gradients in place: clipped to grad_clip first (counted in `s.clipped`)."""
    if s.grad_clip > 0:
        norm = full(torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.grad_clip))
        if s.clipped is not None:
            s.clipped += norm > s.grad_clip
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)


def clipped_steps(s: Setup) -> int | None:
    """Steps so far whose gradient norm exceeded grad_clip (None with clipping off); reading it syncs."""
    return None if s.grad_clip <= 0 or s.clipped is None else int(s.clipped)


@torch.no_grad()
def evaluate(s: Setup, batches: Batches, n: int) -> float:
    """Mean loss over the first `n` fixed validation batches (the same for every run): each rank its rows of
    them, in micro-batches as in training, then the mean over the ranks (every rank calls it)."""
    s.model.eval()
    total = torch.zeros((), device=s.device, dtype=torch.float64)
    for x, y in batches.val_batches(n, s.device, s.rows):
        for xm, ym in zip(x.chunk(s.accum), y.chunk(s.accum), strict=True):
            with autocast(s.device, s.autocast):
                logits = s.model(xm)
            total += loss_of(logits, ym).double() / s.accum
    s.model.train()
    return float(global_mean(total, s.world) / n)
