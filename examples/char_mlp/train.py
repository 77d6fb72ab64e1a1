"""A character-level MLP language model, trained by a plain script.

    python train.py width=128 lr=0.003 steps=300

This is what hpt sweeps in `sweep.yaml`: a script of one's own, nothing of hpt's inside. It reads
`key=value` arguments (hpt passes the run's config that way), trains, and prints its result as the
last line of its output, one JSON object with the final losses and the loss curve.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

config = {
    "width": 64,        # hidden units per layer
    "depth": 2,         # hidden layers
    "context": 8,       # characters the model sees
    "lr": 1e-3,
    "steps": 200,
    "batch_size": 32,
    "seed": 0,
    "data": "",         # a text file; empty: Shakespeare's plays, as hptransfer ships them
}
for arg in sys.argv[1:]:  # key=value, the value read as JSON when it parses (numbers, true, null)
    key, value = arg.split("=", 1)
    if key not in config:
        sys.exit(f"unknown option {key} (options: {', '.join(config)})")
    try:
        config[key] = json.loads(value)
    except ValueError:
        config[key] = value


class CharMLP(nn.Module):
    def __init__(self, width: int, depth: int, context: int, vocab: int = 256):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.inp = nn.Linear(16 * context, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, context) -> logits (B, vocab)
        h = F.gelu(self.inp(self.emb(x).flatten(1)))
        for layer in self.hidden:
            h = F.gelu(layer(h))
        return self.out(h)


def load_text(path: str) -> torch.Tensor:
    if path:
        data = Path(path).read_bytes()
    else:
        from hptransfer.train.data import shakespeare_bytes

        data = shakespeare_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batch(data: torch.Tensor, n: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.randint(len(data) - context - 1, (n,), generator=gen)
    x = torch.stack([data[j:j + context] for j in i.tolist()])
    return x, data[i + context]


torch.manual_seed(config["seed"])
text = load_text(config["data"])
split = int(0.95 * len(text))
train, val = text[:split], text[split:]
model = CharMLP(config["width"], config["depth"], config["context"])
opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.0)
gen = torch.Generator().manual_seed(config["seed"])
steps, losses, t0 = [], [], time.time()
for step in range(config["steps"]):
    x, y = batch(train, config["batch_size"], config["context"], gen)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    steps.append(step)
    losses.append(loss.item())
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}", flush=True)

with torch.no_grad():
    x, y = batch(val, 1024, config["context"], torch.Generator().manual_seed(1234))
    val_loss = F.cross_entropy(model(x), y).item()
window = losses[-20:]
print(json.dumps({"final_train_loss": sum(window) / len(window), "final_val_loss": val_loss,
                  "tokens": config["steps"] * config["batch_size"], "curve": {"steps": steps, "losses": losses}}))
