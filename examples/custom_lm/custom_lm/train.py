"""Train CustomLM under a parameterization of hptransfer's, as a function hpt can sweep.

`main(cfg, run_dir)` is what `sweep.yaml` names (`run.target`): it trains one model on the config
it is given, appends its loss curve to `run_dir/metrics.jsonl` (so `hpt status` shows the latest
loss live), saves a checkpoint every `train.checkpoint_every` steps and resumes from it when the
run is started again (a SLURM requeue after a timeout or preemption), and returns its final losses.
`Config` is the schema of its keys: hpt checks every point of a sweep against it before launching.
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from custom_lm.model import CustomLM
from hptransfer import parameterize


@dataclass
class Model:
    width: int = 64
    n_layers: int = 2
    n_heads: int = 4
    base_width: int = 32   # the width at which every parameterization is the same model


@dataclass
class Optim:
    lr: float = 0.01
    weight_decay: float = 0.0
    warmup: int = 10


@dataclass
class Train:
    steps: int = 100
    batch_size: int = 16
    seq_len: int = 64
    seed: int = 0
    checkpoint_every: int = 50


@dataclass
class Config:
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)
    param: str = "mup"      # a preset of hptransfer's: sp, mup, ...
    data: str = ""          # a text file; empty: Shakespeare's plays, as hptransfer ships them


def load_text(path: str) -> torch.Tensor:
    if path:
        data = Path(path).read_bytes()
    else:
        from hptransfer.train.data import shakespeare_bytes

        data = shakespeare_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batch(data: torch.Tensor, cfg: Train, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of `step`: a function of (seed, step) only, so a resumed run sees what it would have seen."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    i = torch.randint(len(data) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen).tolist()
    x = torch.stack([data[j:j + cfg.seq_len] for j in i])
    y = torch.stack([data[j + 1:j + 1 + cfg.seq_len] for j in i])
    return x, y


def build(cfg: Config) -> tuple[CustomLM, object]:
    """The model with the parameterization applied: init, forward multipliers, attention scale, LR groups."""
    def make(width: int) -> CustomLM:
        return CustomLM(256, width, cfg.model.n_layers, cfg.model.n_heads, max_len=cfg.train.seq_len)

    torch.manual_seed(cfg.train.seed)
    model = make(cfg.model.width)
    with torch.device("meta"):  # only its shapes are read: no memory, no init
        base = make(cfg.model.base_width)
    p = parameterize(model, base, cfg.param, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scale = p.attn_scale(cfg.model.width // cfg.model.n_heads, cfg.model.base_width // cfg.model.n_heads)
    for block in model.blocks:  # the forward is ours: we apply the preset's attention scale
        block.attn_scale = scale
    return model, p


def main(cfg: Config, run_dir: Path) -> dict:
    torch.set_num_threads(max(1, int(os.environ.get("SLURM_CPUS_PER_TASK", torch.get_num_threads()))))
    text = load_text(cfg.data)
    split = int(0.95 * len(text))
    train, val = text[:split], text[split:]
    model, p = build(cfg)
    opt = torch.optim.AdamW(p, betas=(0.9, 0.95))
    warmup = max(1, cfg.optim.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))

    ckpt, metrics, start = Path(run_dir) / "checkpoint.pt", Path(run_dir) / "metrics.jsonl", 0
    if ckpt.exists():  # a requeued run: pick up where the last checkpoint left off
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] < start]
        metrics.write_text("".join(line + "\n" for line in kept))
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
    with metrics.open("a") as log:
        for step in range(start, cfg.train.steps):
            x, y = batch(train, cfg.train, step)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            log.write(json.dumps({"step": step, "loss": losses[-1]}) + "\n")
            log.flush()
            if not math.isfinite(losses[-1]):
                return {"status": "diverged", "final_train_loss": None, "diverged_at_step": step}
            if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
                tmp = ckpt.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "step": step + 1}, tmp)
                os.replace(tmp, ckpt)
    model.eval()
    with torch.no_grad():
        val_loss = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                       for x, y in (batch(val, cfg.train, 10**9 + i) for i in range(4))) / 4
    ckpt.unlink(missing_ok=True)
    window = losses[-10:]
    return {"final_train_loss": sum(window) / len(window), "final_val_loss": val_loss, "steps": cfg.train.steps,
            "tokens": cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len}
