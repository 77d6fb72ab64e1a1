"""One run across several processes, with PyTorch's own distributed training (docs/design.md#distributed-runs).

A process's place (`World`) comes from the variables torchrun sets, and a SLURM task of a multi-task job
too: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Without them a run is one process, trained
exactly as before. With them, every step's global batch is still the one a single process would train on:
each rank takes its contiguous rows of it (`World.rows`), in train.grad_accum micro-batches; DDP's
all-reduce or FSDP2's reduce-scatter averages the gradients, and the losses reported are global means.
The parameterization is decided from the model's names and shapes before wrapping, the optimizer is built
after it, and `verify` checks the result. A distributed run's checkpoints are sharded
(torch.distributed.checkpoint) and resume on any number of processes.
"""

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hptransfer.errors import HptError
from hptransfer.files import write_json_atomic
from hptransfer.train.optim import param_groups
from hptransfer.train.param import TensorSpec

LOOP_STATE = "loop.json"  # a sharded checkpoint's loop state (step, losses, ...), beside the shards


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's index on its machine: its GPU

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "World":
        """The place torchrun (or a SLURM task) gave this process; rank 0 of 1 without those variables."""
        try:
            size, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise HptError(f"environment: RANK={env.get('RANK')}, WORLD_SIZE={env.get('WORLD_SIZE')} and LOCAL_RANK="
                           f"{env.get('LOCAL_RANK')} must be integers: start the processes with torchrun") from None
        if not 0 <= rank < size:
            raise HptError(f"environment: RANK={rank} is not a rank of WORLD_SIZE={size}: start the processes with "
                           f"torchrun (hpt train --nproc N)")
        if size > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            raise HptError(f"environment: WORLD_SIZE={size} without MASTER_ADDR and MASTER_PORT: start the processes "
                           f"with torchrun (hpt train --nproc N) or a launcher that sets them")
        return cls(rank, size, local)

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous rows of a global batch (check_batch_split has made them equal)."""
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)


SINGLE = World()


def check_nproc(nproc: int, device: torch.device) -> None:
    """`hpt train --nproc N`: at least one process, and on CUDA no more than the GPUs visible (one each)."""
    if nproc < 1:
        raise HptError(f"--nproc {nproc}: give 1 or more processes")
    if device.type == "cuda" and nproc > (gpus := torch.cuda.device_count()):
        raise HptError(f"--nproc {nproc}: one process per GPU, and {gpus} are visible: give --nproc {gpus} or less")


@contextmanager
def process_group(world: World, device: torch.device, timeout_s: float) -> Iterator[torch.device]:
    """This process's device, inside the run's process group while the block runs (gloo on CPU, NCCL on CUDA,
    collectives that wait at most timeout_s for a peer); one process: `device` as it is, and no group."""
    if not world.distributed:
        yield device
        return
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=world.rank, world_size=world.world_size,
                            timeout=timedelta(seconds=timeout_s), device_id=device if cuda else None)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, parallel: str, device: torch.device, amp: torch.dtype | None
         ) -> tuple[nn.Module, torch.dtype | None]:
    """The module a step calls on this rank's rows, and the autocast dtype it still needs.

    ddp: a replica whose gradients are all-reduced. fsdp: FSDP2, each block sharded, then the root; on CUDA
    with bf16 training, FSDP2's MixedPrecisionPolicy computes in bf16 and reduces in fp32 instead of autocast.
    Parameters keep their names (FSDP2 turns them into DTensors in place; DDP shares them), so the
    optimizer is built by name after this.
    """
    if parallel == "ddp":
        # The rope tables are constants: no buffer sync each forward.
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False), amp
    # here: FSDP2 loads in ~1 s, and only a sharded run needs it
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = device.type == "cuda" and amp is not None
    policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model, None if bf16 else amp


def grad_sync(wrapper: nn.Module, sync: bool) -> AbstractContextManager:
    """Around one micro-batch's forward and backward: `sync` False defers the gradients' averaging across ranks
    to the step's last micro-batch (DDP's no_sync, FSDP2's requires_gradient_sync)."""
    if isinstance(wrapper, DistributedDataParallel):
        return nullcontext() if sync else wrapper.no_sync()
    set_sync = getattr(wrapper, "set_requires_gradient_sync", None)  # an FSDP2 module's, found without importing it
    if set_sync is not None:
        set_sync(sync)
    return nullcontext()


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a DTensor's global value (FSDP2's gradient norm); any other tensor as it is."""
    to_full = getattr(t, "full_tensor", None)  # a DTensor's, found without importing DTensor (~1 s)
    return t if to_full is None else to_full()


def global_mean(t: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of `t` over the ranks (each rank's mean over equal shares: the global batch's mean)."""
    if not world.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t)  # a sum: gloo has no average
    return t / world.world_size


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _inner(model: nn.Module) -> nn.Module:
    """The model a wrapper holds (DDP's `module`, torch.compile's `_orig_mod`): the names the specs have."""
    while isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


def verify(model: nn.Module, specs: Mapping[str, TensorSpec], opt: torch.optim.Optimizer, wd_mode: str) -> None:
    """After wrapping: every parameter of `model` (DDP, FSDP2, torch.compile or none) is the tensor its spec names,
    at its shape (a DTensor: its global shape), and the optimizer trains exactly those tensors, each in a group
    with its spec's lr, weight decay and eps (before any schedule). An HptError naming the first mismatch."""
    inner = _inner(model)
    names = {id(p): n for n, p in inner.named_parameters()}
    for name, p in inner.named_parameters():
        spec = specs.get(name)
        if spec is None:
            raise HptError(f"parameter {name!r} has no spec: decide the parameterization on the model being wrapped")
        if tuple(p.shape) != spec.shape:
            raise HptError(f"parameter {name!r} has shape {tuple(p.shape)}, its spec {spec.shape}: decide the "
                           f"parameterization on the full model, before sharding")
    if missing := sorted(specs.keys() - set(names.values())):
        raise HptError(f"the model has no parameter {missing[0]!r} its specs name: wrap the model the specs were "
                       f"made for")
    want = {n: g for g in param_groups(inner, dict(specs), wd_mode) for n in g["names"]}
    trained: set[int] = set()
    for i, group in enumerate(opt.param_groups):
        for p in group["params"]:
            if id(p) not in names:
                raise HptError(f"optimizer group {i} holds a tensor that is no parameter of the model: build the "
                               f"optimizer after wrapping")
            name = names[id(p)]
            trained.add(id(p))
            for key in ("lr", "base_lr", "weight_decay", "eps"):
                if key in group and key in want[name] and group[key] != want[name][key]:
                    raise HptError(f"optimizer group {i} trains {name!r} with {key} {group[key]:.6g}, its spec "
                                   f"{want[name][key]:.6g}: build the groups from the specs (optim.param_groups)")
    if untrained := [n for i, n in names.items() if i not in trained]:
        raise HptError(f"the optimizer does not train {untrained[0]!r}: build the optimizer after wrapping")


def save_sharded(folder: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                 world: World) -> None:
    """Every rank's part of the model and optimizer, and rank 0's loop `state`, into folder/step-<step>.

    Written to folder/.tmp-step-<step> first and renamed by rank 0 once every rank has written its part, so a
    step-* folder is always whole; then the older ones go.
    """
    # here: torch.distributed.checkpoint loads in ~1 s, and only a distributed run checkpoints with it
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp, done = folder / f".tmp-step-{step}", folder / f"step-{step}"
    model_state, opt_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "opt": opt_state}, checkpoint_id=tmp)
    if world.is_main:
        write_json_atomic(tmp / LOOP_STATE, state)
    dist.barrier()  # every rank's shards are on disk
    if world.is_main:
        os.replace(tmp, done)
        for old in folder.glob("step-*"):
            if old != done:
                shutil.rmtree(old)


def load_sharded(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, world: World) -> dict[str, Any] | None:
    """Load the newest whole checkpoint under `folder` into the model and optimizer (resharded to this run's
    processes) and return its loop state; None when there is none. Rank 0 first removes the parts a killed
    attempt left half-written (no rank writes again before a collective that waits for rank 0)."""
    # here: torch.distributed.checkpoint loads in ~1 s, and only a sharded checkpoint needs it
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if world.is_main:
        for tmp in folder.glob(".tmp-step-*"):
            shutil.rmtree(tmp)
    steps = sorted(folder.glob("step-*"), key=lambda p: int(p.name.removeprefix("step-")))
    if not steps:
        return None
    model_state, opt_state = get_state_dict(model, opt)
    state = {"model": model_state, "opt": opt_state}
    with warnings.catch_warnings():  # one process resumes it too, on purpose: not worth dcp's warning
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=steps[-1], no_dist=not world.distributed)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["opt"])
    return json.loads((steps[-1] / LOOP_STATE).read_text())


def die_with_launcher() -> None:
    """Have the kernel SIGKILL this process when the process that started it dies (Linux; elsewhere nothing).
    torchrun starts each process in a session of its own, so without this, killing `hpt train --nproc N` and
    torchrun (SIGKILL to their process group) would leave the training processes running."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def launch(nproc: int, entry: list[str]) -> int:
    """Run `python *entry` as `nproc` processes on this machine (torchrun), each with its share of the CPU cores
    as torch threads; their exit code."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    # Checked each second (not 0.1 s), torchrun leaves rank 0 the time to record a peer's failure before it
    # stops the other processes.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=1", *entry]
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C: let it stop its processes before this one ends
        proc.wait()
        raise
