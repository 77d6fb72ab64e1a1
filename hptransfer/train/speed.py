"""How fast this machine trains a run's shape: a few timed steps, for `hpt sweep --dry-run`'s wall-time estimate.

The steps are the training loop's own (`step.setup`, `step.train_step`, eager, the run's precision
rules), on random tokens: a step's time does not depend on the data. The figure is the training
FLOP/s achieved (FLOPS_FORMULA per step over the step's time); the dry run divides each run's FLOPs
by it. A step of a large shape is cut to a smaller batch (at most MAX_STEP_FLOPS, so timing takes
seconds, not minutes), which a CPU runs less efficiently: the estimate then errs long, and says so.
"""

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from hptransfer.config.derived import param_counts, train_flops
from hptransfer.train.rules import apply_rules
from hptransfer.train.step import pick_device, setup, train_step

MAX_STEP_FLOPS = 2e10  # one timed step costs at most this: ~0.2 s on a CPU core, nothing on a GPU
MAX_PARAMS = 20_000_000  # larger models are not built here (their optimizer state alone is GBs): the
# largest run under it is timed instead, and the others scaled by FLOPs


@dataclass(frozen=True)
class Throughput:
    """What was timed, where, and the rate it gave."""

    device: str
    threads: int
    width: int
    n_layers: int
    batch_size: int  # as timed (the run's own, or cut to MAX_STEP_FLOPS)
    run_batch_size: int
    seq_len: int
    steps: int
    seconds: float
    tokens_per_s: float
    flops_per_s: float

    def how(self) -> str:
        cut = ""
        if self.batch_size < self.run_batch_size:
            cut = f" (cut from {self.run_batch_size}: a larger batch runs faster, so this errs long)"
        return (f"measured here: {self.steps} eager training steps of width {self.width}, {self.n_layers} layers, "
                f"batch {self.batch_size}{cut} x {self.seq_len} on {self.device} ({self.threads} threads) took "
                f"{self.seconds:.2f} s: {self.tokens_per_s:,.0f} tokens/s, {self.flops_per_s:.3g} FLOP/s")


MAX_SHAPES = 8  # distinct shapes timed per dry run (largest steps first); the others take the nearest one's rate


def shape_key(cfg: dict[str, Any]) -> str:
    """What a step's time depends on: the model, the vocabulary, the batch and sequence, the device and precision."""
    t = cfg["train"]
    return json.dumps([cfg["model"], cfg["data"]["vocab_size"], t["batch_size"], t["seq_len"], t["device"],
                       t["dtype"]], sort_keys=True)


def step_flops(cfg: dict[str, Any]) -> float:
    """Training FLOPs of one step (FLOPS_FORMULA)."""
    m, t = cfg["model"], cfg["train"]
    _, non_embedding = param_counts(m, cfg["data"]["vocab_size"])
    return train_flops(non_embedding, m["n_layers"], m["width"], t["seq_len"], t["batch_size"] * t["seq_len"])


def run_seconds(configs: list[dict[str, Any]], *, threads: int | None = None) -> tuple[list[float], list[Throughput]]:
    """Each run's training time here (its steps, and its validation at a third of a step per batch), from
    its shape's measured rate; at most MAX_SHAPES shapes under MAX_PARAMS are timed, the largest first, and
    the others get the rate of the timed shape nearest in FLOPs per step. Returns (seconds, what was timed)."""
    shapes: dict[str, dict[str, Any]] = {}
    for cfg in configs:
        shapes.setdefault(shape_key(cfg), cfg)
    ranked = sorted(shapes.values(), key=step_flops, reverse=True)
    fits = [c for c in ranked if param_counts(c["model"], c["data"]["vocab_size"])[0] <= MAX_PARAMS]
    chosen = (fits or ranked[-1:])[:MAX_SHAPES]
    timed = {shape_key(c): measure(c, threads=threads) for c in chosen}
    rates = [(math.log(step_flops(c)), timed[shape_key(c)].flops_per_s) for c in chosen]
    out = []
    for cfg in configs:
        x = math.log(step_flops(cfg))
        key = shape_key(cfg)
        rate = timed[key].flops_per_s if key in timed else min(rates, key=lambda r: abs(r[0] - x))[1]  # noqa: B023
        t = cfg["train"]
        out.append((t["steps"] + t["val_batches"] / 3) * step_flops(cfg) / rate)
    return out, list(timed.values())


def summary(timed: list[Throughput]) -> str:
    """How the rates were measured, in one line."""
    if len(timed) == 1:
        return timed[0].how()
    flops = sorted(x.flops_per_s for x in timed)
    first = timed[0]
    cut = " (batches cut to fit a quick step: errs long)" if any(x.batch_size < x.run_batch_size for x in timed) \
        else ""
    return (f"measured here: {len(timed)} shapes, {first.steps} eager training steps each, on {first.device} "
            f"({first.threads} threads){cut}: {flops[0]:.3g} to {flops[-1]:.3g} FLOP/s")


def measure(config: dict[str, Any], *, threads: int | None = None, steps: int = 3) -> Throughput:
    """Time `steps` training steps (after one warm-up step) of a plain run config's shape."""
    eff, _ = apply_rules(config)
    eff.train.compile = False  # a compile takes longer than the whole measurement
    m, t = eff.model, eff.train
    _, non_embedding = param_counts(config["model"], config["data"]["vocab_size"])
    per_sequence = train_flops(non_embedding, m.n_layers, m.width, t.seq_len, t.seq_len)
    run_batch = t.batch_size
    t.batch_size = max(1, min(run_batch, int(MAX_STEP_FLOPS // per_sequence)))
    if per_sequence * t.batch_size > MAX_STEP_FLOPS:  # even one sequence is costly: one timed step
        steps = 1
    device = pick_device(eff)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        s = setup(eff, device)
        vocab = eff.data.vocab_size
        x = torch.randint(vocab, (t.batch_size, t.seq_len), device=device)
        y = torch.randint(vocab, (t.batch_size, t.seq_len), device=device)
        train_step(s, x, y).item()  # warm-up: allocations, kernels chosen
        start = time.perf_counter()
        for _ in range(steps):
            loss = train_step(s, x, y)
        loss.item()  # the host sync: the steps have run
        seconds = time.perf_counter() - start
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    tokens = steps * t.batch_size * t.seq_len
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Throughput(name, used, m.width, m.n_layers, t.batch_size, run_batch, t.seq_len, steps, seconds,
                      tokens / seconds, steps * per_sequence * t.batch_size / seconds)
