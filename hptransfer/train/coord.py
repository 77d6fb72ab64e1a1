"""The coordinate check, a detector of parameterizations whose training dynamics change with scale
(docs/science.md#the-coordinate-check).

Train the same model at several widths (or depths) for a few steps on one fixed batch at a fairly
large, constant learning rate, and record for every module's output h, at every step t (step 1 is
the forward pass before any update):

  size     mean |h_t|         the output as the network uses it (multipliers included)
  change   mean |h_t - h_1|   what the updates so far did to it: muP's promise is that each
                              layer's update moves its output by Theta(1), whatever the width
  update   mean |(W_t - W_1) x_t| x mult, for the readout alone: the logits' change that the
                              readout's own update makes, apart from what reaches it through its
                              input, so a wrong readout LR or multiplier cannot hide behind the
                              hidden layers' contribution

Each row's log-log slope against the scale is fitted per step. Verdict: every change and update
cell flat (|slope| < tol, from step 2), and no size growing (slope < tol; sizes may shrink: the
logits' init part decays as m^-1/2 under muP's 1/m readout multiplier, and so may other init parts).
An output that is exactly zero at every scale has no slope and passes; a non-finite one fails.

What each class of error does to these rows (why the check catches it):
  a learning-rate exponent c off  -> that class's update, and so its change, grows or shrinks as m^(-dc)
                                     (the embedding's change, a hidden output's change, the readout update)
  a multiplier exponent a off     -> the class's output and its change scale as m^(-da): the change
                                     rows of its consumers move (the readout update row for R)
  an init exponent b off          -> the size at step 1 grows (a larger init), or the change of the
                                     layers downstream moves
  SP at a large LR                -> hidden changes grow as m^0.5 to m^1
  an abc-symmetric shift (a+t, b-t, c-t under Adam) leaves every row as it was, and passes.
Depth (`axis="depth"`): the same rows over model.n_layers at a fixed width, with the first and
last block standing for all; CompleteP keeps them flat, and without its residual multiplier (or a
depth-muP without its LR depth factor) they move.

Two entry points share one detector (`trace` records a run's rows, `fit_rows` fits and judges them, and
`render_table`, `verdict` and `plot` report them): `coord_check` trains the built-in GPT from a run
config (`hpt coord-check`); `check_model` trains any torch model under `parameterize`.

The built-in GPT's modules, in forward order:
  embedding              the input of block 0 (token embedding x its multiplier, plus learned positions)
  blocks.i.attn.logits   attention logits q.k x scale after RoPE, over the causal entries
  blocks.i.attn          attention output (the residual branch, before mL^-alpha)
  blocks.i.mlp           MLP output (likewise)
  residual               the residual stream after the last block (the final norm's input)
  norm_f                 final norm
  lm_head                the logits
With `axis="depth"`, blocks.first and blocks.last name blocks 0 and L-1.
"""

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from rich.table import Table
from torch import nn
from torch.overrides import TorchFunctionMode

from hptransfer.config.compose import compose_run
from hptransfer.config.derived import heads_and_dim
from hptransfer.errors import HptError
from hptransfer.files import write_atomic
from hptransfer.train.data import make_batches
from hptransfer.train.model import GPT, apply_rope
from hptransfer.train.parameterization import Parameterization, parameterize
from hptransfer.train.step import loss_of, pick_device, setup, train_step

# The check's own defaults; each applies only when the user's overrides leave that key alone.
# - optim.lr: "fairly large": updates dominate what the rows measure from step 2 on, while the
#   narrowest model stays orderly (no divergence over the check's steps).
# - no gradient clipping or weight decay: both mix width effects across parameter classes.
# - base width 32 with head size 8 (4 heads at the base): the default widths 32..512 span the 16x
#   the check needs on a CPU. Exponents are stated relative to the base, so a smaller base changes
#   what is measured only through finite-width effects.
# - a small fixed batch: each size is a mean over batch x seq_len x width numbers, so 8 x 32
#   tokens measure it well, and the widest model sets the check's time.
CHECK_DEFAULTS = {
    "optim.lr": "0.001",
    "optim.grad_clip": "0",
    "optim.weight_decay": "0",
    "train.batch_size": "8",
    "train.seq_len": "32",
    "param.base_width": "32",
    "model.head_dim": "8",
}
AXES = {"width": "model.width", "depth": "model.n_layers"}
SPAN = {"width": 16, "depth": 8}  # default scales: base x 1, 2, ..., SPAN
# Default tolerances: a wrong exponent moves a row by >= 0.4 per doubling, the right presets stay within
# 0.1 along width; along depth (a shorter span, from a 2-block base) completep's last block keeps a
# finite-depth drift of up to 0.18 at step 2, so the bar is 0.25 there.
TOL = {"width": 0.2, "depth": 0.25}
KINDS = ("size", "change", "update")


@dataclass
class Row:
    """One measured quantity of one module: its values per step and scale, slopes and verdict per step."""

    module: str
    kind: str                          # size | change | update
    values: list[list[float]]          # [step][scale], averaged over seeds
    rule: str = "flat"                 # see `rule_of`
    slopes: list[float | None] = field(default_factory=list)  # [step]; None: no slope (step 1 of a change, zeros)
    ok: list[bool] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.module if self.kind == "size" else f"{self.module} {self.kind}"

    @property
    def two_sided(self) -> bool:
        """Whether shrinking fails too (see `rule_of`)."""
        return self.rule == "flat"


def rule_of(kind: str, logits: bool) -> str:
    """"flat" (|slope| < tol) or "no growth" (slope < tol) for a row; `logits`: the row's module outputs the logits.

    Sizes must not grow; init parts may shrink. Changes must be flat, but for the logits: their change
    is the readout's own update (its row, held flat) plus the init readout applied to its input's
    change, W_R,1 (x_t - x_1) x mult, which under muP's 1/m multiplier decays as m^-1/2 by design,
    like the logits' init part. So the logits' change must not grow, and their own update is flat.
    `check_model` holds attention logits whose head size grows with width to the same rule: their early
    change is mostly terms that do not add up coherently over the head's dimensions (init weights acting on
    a changed input, updates not yet aligned), which decay as m^-1/2 under muP's 1/head_dim scale; a
    1/sqrt(head_dim) scale leaves those flat and makes the aligned part grow as m^1/2, so the change grows.
    """
    if kind == "size" or (kind == "change" and logits):
        return "no growth"
    return "flat"


@dataclass
class CoordResult:
    param: str
    axis: str
    scales: list[int]
    seeds: list[int]
    lr: float
    tol: float
    rows: list[Row]

    @property
    def steps(self) -> int:
        return len(self.rows[0].slopes)

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(r.module for r in self.rows))

    @property
    def passed(self) -> bool:
        return all(all(r.ok) for r in self.rows)

    def row(self, module: str, kind: str = "size") -> Row:
        return next(r for r in self.rows if r.module == module and r.kind == kind)

    def failures(self) -> list[tuple[str, int, float | None]]:
        """(row name, 1-based step, slope) of every failing cell."""
        return [(r.name, i + 1, r.slopes[i]) for r in self.rows for i, good in enumerate(r.ok) if not good]

    def to_json(self) -> dict:
        def finite(v: float) -> float | None:  # a diverged scale's values become null: strict JSON
            return v if math.isfinite(v) else None

        return {
            "passed": self.passed, "param": self.param, "axis": self.axis, "scales": self.scales,
            "seeds": self.seeds, "lr": self.lr, "tol": self.tol, "steps": self.steps, "modules": self.modules,
            "rows": [{"module": r.module, "kind": r.kind, "slopes": r.slopes, "ok": r.ok,
                      "values": [[finite(v) for v in step] for step in r.values]} for r in self.rows],
        }


def parse_scales(text: str, option: str = "--widths") -> list[int]:
    """'128,256,512' -> [128, 256, 512] (checked by `coord_check`)."""
    try:
        return [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise HptError(f"{option}: '{text}' is not a comma-separated list of integers") from None


# ---- The model-agnostic core: one run's rows, the fit over scales and seeds. Both checks below use it.

Rows = dict[tuple[str, str], list[float]]  # (module, kind) -> value per step, of one run
MODEL_OUTPUT = "(output)"  # the row of a model's own output (`check_model`): parenthesized, no module path takes it
Hooks = list[torch.utils.hooks.RemovableHandle]


@dataclass
class Readout:
    """The module whose own update gets a row: `name` (its row's module), the module (a `weight` (out, in),
    maybe a `bias`), and `mult`, the multiplier it applies to its output (1 when a pre-hook scales its input
    instead: the check sees the input scaled)."""

    name: str
    module: nn.Module
    mult: float = 1.0


def _store_output(out: dict[str, torch.Tensor], name: str) -> Callable:
    """A forward hook storing the module's output, detached, as `out[name]` (a non-tensor output: nothing)."""

    def hook(_mod: nn.Module, _args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            out[name] = output.detach()
    return hook


def _store_input(out: dict[str, torch.Tensor], name: str) -> Callable:
    """A forward pre-hook storing the module's first input, detached, as `out[name]`."""

    def hook(_mod: nn.Module, args: tuple) -> None:
        out[name] = args[0].detach()
    return hook


def _mean_abs(x: torch.Tensor) -> float:
    return float(x.abs().double().mean())


def qk_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention logits q.k x scale (..., H, T, S) from q (..., H, T, D) and k (..., K, S, D); kv head
    h // (H/K) serves query head h, as in F.scaled_dot_product_attention's enable_gqa."""
    k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    return (q @ k.transpose(-2, -1)) * scale


def causal_mask(logits: torch.Tensor) -> torch.Tensor:
    """The (T, S) entries of `logits` that a causal softmax weighs: key position <= query position."""
    return torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()


def trace(model: nn.Module, readout: Readout, hooks: Callable[[dict[str, torch.Tensor]], Hooks],
          train: Callable[[], object], forward: Callable[[], object], steps: int) -> Rows:
    """One run's rows: `steps - 1` calls of `train` (one update on the fixed batch, its forward measured),
    then a last `forward` (measured, not trained).

    `hooks(seen)` registers the forward hooks that store each measured output in `seen` under its row's
    module name, in forward order; the readout's input is stored here, by a pre-hook registered after any
    of the model's own (so it sees the input as they leave it). Per step: every stored output's size and
    change since step 1, and the readout's own update `(W_t - W_1) x_t (+ b_t - b_1) x mult`.
    """
    seen: dict[str, torch.Tensor] = {}
    key = f"{readout.name}.input"
    handles = [*hooks(seen), readout.module.register_forward_pre_hook(_store_input(seen, key))]
    params = [readout.module.weight, getattr(readout.module, "bias", None)]
    first_params = [None if w is None else w.detach().clone() for w in params]
    first: dict[str, torch.Tensor] = {}
    rows: Rows = {}
    try:
        for step in range(steps):
            now = [None if w is None else w.detach().clone() for w in params]  # what this step's forward uses
            if step < steps - 1:
                train()  # its forward pass is the one measured
            else:
                with torch.no_grad():  # the last step is measured, not trained
                    forward()
            dw, db = (None if w is None else w - w1 for w, w1 in zip(now, first_params, strict=True))
            update = F.linear(seen.pop(key), dw, db) * readout.mult  # the readout's own update's share
            for name, h in seen.items():
                first.setdefault(name, h)
                rows.setdefault((name, "size"), []).append(_mean_abs(h))
                rows.setdefault((name, "change"), []).append(_mean_abs(h - first[name]))
            rows.setdefault((readout.name, "update"), []).append(_mean_abs(update))
            seen.clear()
    finally:
        for h in handles:
            h.remove()
    return rows


def fit_slope(scales: Sequence[int], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) on log(scale); None unless every value is positive and finite."""
    v = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(v) & (v > 0)):
        return None
    return float(np.polyfit(np.log(scales), np.log(v), 1)[0])


def _cell_ok(row: Row, step: int, slope: float | None, values: Sequence[float], tol: float) -> bool:
    if row.kind != "size" and step == 0:
        return True  # nothing has changed before the first update
    if slope is None:
        return all(v == 0 for v in values)  # zero at every scale is scale-constant; NaN/inf is not
    return abs(slope) < tol if row.two_sided else slope < tol


def check_options(steps: int, seeds: int, tol: float, prefix: str) -> None:
    """The run options both checks take; `prefix` names them as the caller spells them ('--' on the CLI)."""
    if steps < 2:
        raise HptError(f"{prefix}steps: need at least 2 (step 1 is before any update), got {steps}")
    if seeds < 1:
        raise HptError(f"{prefix}seeds: need at least 1, got {seeds}")
    if not tol > 0:
        raise HptError(f"{prefix}tol: must be positive, got {tol}")


def check_scales(scales: Sequence[int], option: str) -> list[int]:
    """The distinct scales, ascending; at least two, all positive."""
    out = sorted(set(scales))
    if len(out) < 2 or out[0] <= 0:
        raise HptError(f"{option}: need at least two distinct positive values, got {','.join(map(str, out))}")
    return out


def fit_rows(run: Callable[[int, int], Rows], scales: Sequence[int], seeds: Sequence[int], steps: int, tol: float,
             logits: Callable[[str], bool], label: str, progress: Callable[[str], None] | None) -> list[Row]:
    """Run every (scale, seed), average each row over seeds, fit its slope per step, judge each cell.

    `run(scale, seed)` is one run's rows; `logits(module)`: whether the module outputs logits (`rule_of`),
    asked after every run. Rows come in forward order, each module's kinds in KINDS order.
    """
    sums: dict[tuple[str, str], np.ndarray] = {}  # (module, kind) -> (step, scale) summed over seeds
    for j, scale in enumerate(scales):
        for seed in seeds:
            if progress:
                progress(f"{label} {scale}, seed {seed}")
            for key, per_step in run(scale, seed).items():
                sums.setdefault(key, np.zeros((steps, len(scales))))[:, j] += per_step
    rows = []
    for (module, kind), total in sums.items():
        row = Row(module, kind, (total / len(seeds)).tolist(), rule_of(kind, logits(module)))
        row.slopes = [None if kind != "size" and i == 0 else fit_slope(scales, v) for i, v in enumerate(row.values)]
        row.ok = [_cell_ok(row, i, s, v, tol) for i, (s, v) in enumerate(zip(row.slopes, row.values, strict=True))]
        rows.append(row)
    order = {k: i for i, k in enumerate(KINDS)}
    modules = list(dict.fromkeys(m for m, _ in sums))
    rows.sort(key=lambda r: (modules.index(r.module), order[r.kind]))
    return rows


# ---- The built-in GPT, from a run config: `hpt coord-check`.

def coord_config(overrides: Sequence[str]) -> DictConfig:
    """The check's run config: CHECK_DEFAULTS first, so that any user override wins."""
    # Hydra applies value overrides after group choices and the last one wins, so a default
    # placed first survives `optim=adam_atan2` and yields to an explicit `optim.lr=...`.
    return compose_run([f"{k}={v}" for k, v in CHECK_DEFAULTS.items()] + list(overrides))


def default_scales(cfg: DictConfig, axis: str) -> list[int]:
    """From the base, where the parameterization is anchored, up by doublings over SPAN[axis]."""
    base = cfg.param.base_width if axis == "width" else cfg.param.base_depth
    return [base * 2**k for k in range(int(math.log2(SPAN[axis])) + 1)]


def attention_logits(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, model: GPT) -> torch.Tensor:
    """The logits q.k x scale (B, H, T, T) that `attn` feeds its softmax, from its q and k projections' outputs."""
    B, T, _ = q.shape
    q = q.view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
    k = k.view(B, T, attn.n_kv, attn.head_dim).transpose(1, 2)    # (B, K, T, D)
    if model.dims.pos == "rope":
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return qk_logits(q, k, attn.scale)


def _block_names(model: GPT, axis: str) -> list[tuple[int, str]]:
    """(index, name) of the blocks measured: all of them along width; the first and last along depth."""
    n = len(model.blocks)
    if axis == "width":
        return [(i, f"blocks.{i}") for i in range(n)]
    return [(0, "blocks.first"), (n - 1, "blocks.last")]


def _hooks(model: GPT, axis: str, out: dict[str, torch.Tensor]) -> Hooks:
    """Forward hooks that store each measured output (detached) in `out`."""

    def logit_hooks(name: str, attn: nn.Module) -> Hooks:
        q_out: dict[str, torch.Tensor] = {}

        def on_k(_mod: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            # Attention.forward projects q before k, so q is there when k's hook runs.
            with torch.no_grad():
                logits = attention_logits(attn, q_out.pop("q"), output.detach(), model)
                out[f"{name}.attn.logits"] = logits[..., causal_mask(logits)]  # the entries softmax sees

        return [attn.q.register_forward_hook(_store_output(q_out, "q")), attn.k.register_forward_hook(on_k)]

    handles = [model.blocks[0].register_forward_pre_hook(_store_input(out, "embedding"))]
    for i, name in _block_names(model, axis):
        block = model.blocks[i]
        handles += [*logit_hooks(name, block.attn),
                    block.attn.register_forward_hook(_store_output(out, f"{name}.attn")),
                    block.mlp.register_forward_hook(_store_output(out, f"{name}.mlp"))]
    handles += [model.norm_f.register_forward_pre_hook(_store_input(out, "residual")),
                model.norm_f.register_forward_hook(_store_output(out, "norm_f")),
                model.lm_head.register_forward_hook(_store_output(out, "lm_head"))]
    return handles


def measure(cfg: DictConfig, steps: int, axis: str = "width") -> Rows:
    """Train `cfg` for `steps - 1` updates on one fixed batch; (module, kind) -> value per step.

    The LR stays at each group's base LR (a warmup would make the early updates, the ones the
    check looks at, tiny) and the forward runs in the parameters' dtype (no autocast).
    """
    device = pick_device(cfg)
    x, y = make_batches(cfg).train_batch(0, device)
    s = setup(cfg, device, measure=True)  # every optimizer group starts at its base_lr
    head = s.model.lm_head
    return trace(s.model, Readout("lm_head", head, head.mult), lambda seen: _hooks(s.model, axis, seen),
                 lambda: train_step(s, x, y), lambda: s.model(x), steps)


def coord_check(overrides: Sequence[str] = (), scales: Sequence[int] | None = None, steps: int = 5,
                seeds: int = 2, tol: float | None = None, axis: str = "width",
                progress: Callable[[str], None] | None = None) -> CoordResult:
    """Run the check on the config of `overrides` (model.width, or model.n_layers, replaced by each scale).

    Seeds are train.seed, train.seed + 1, ...: each seeds its own init and fixed batch, and the
    values are averaged over seeds before the fit.
    """
    if axis not in AXES:
        raise HptError(f"--axis: '{axis}' is not one of {', '.join(AXES)}")
    tol = TOL.get(axis, 0.2) if tol is None else tol
    check_options(steps, seeds, tol, "--")
    cfg = coord_config(overrides)
    scales = check_scales(default_scales(cfg, axis) if scales is None else scales, f"--{axis}s")
    if axis == "width":
        for w in scales:
            heads_and_dim(cfg.model, w)  # a width the heads cannot split is bad input, found before any training
    seed_list = [cfg.train.seed + i for i in range(seeds)]

    def run(scale: int, seed: int) -> Rows:
        cfg_run = cfg.copy()
        cfg_run.train.seed = seed
        if axis == "width":
            cfg_run.model.width = scale
        else:
            cfg_run.model.n_layers = scale
        return measure(cfg_run, steps, axis)

    rows = fit_rows(run, scales, seed_list, steps, tol, {"lm_head"}.__contains__, axis, progress)
    return CoordResult(param=cfg.param.name, axis=axis, scales=scales, seeds=seed_list, lr=cfg.optim.lr,
                       tol=tol, rows=rows)


# ---- Any torch model, under `parameterize`.

# Set by check_model itself: the LR is its own argument, the init is what the check measures from, and
# weight decay mixes width effects across classes.
OWN_KWARGS = ("lr", "init", "weight_decay")
SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)
ATTENTION_LOGITS = ".logits"  # row "<module path>.logits": the attention logits of its forward (`AttentionLogits`)


def _sdpa_args(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool, float]:
    """F.scaled_dot_product_attention's arguments, bound as it binds them: q, k, mask, causal, scale."""
    return query, key, attn_mask, is_causal, 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale


def _softmax_input(input: torch.Tensor, *_args: object, **_kwargs: object) -> torch.Tensor:
    """A softmax's input, bound as torch binds it (`input` may come by keyword)."""
    return input


class AttentionLogits(TorchFunctionMode):
    """Inside a forward, stores the logits of every softmax, and of every F.scaled_dot_product_attention
    (q.k x scale), as out['<path of the module whose own forward calls it>.logits']: the entries the softmax
    weighs (masked ones, -inf or the dtype's lowest value, left out; a NaN kept, to fail)."""

    def __init__(self, out: dict[str, torch.Tensor], where: list[str]):
        super().__init__()
        self.out, self.where = out, where  # `where`: the paths of the modules whose forward is running

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in SOFTMAX or func is F.scaled_dot_product_attention:
            with torch.no_grad():
                if func is F.scaled_dot_product_attention:
                    q, k, mask, causal, scale = _sdpa_args(*args, **kwargs)
                    logits = qk_logits(q.detach(), k.detach(), scale)
                    keep = causal_mask(logits) if causal else mask if mask is not None and mask.dtype == torch.bool \
                        else None  # a float mask is added to the logits: all of them are measured
                else:
                    logits = _softmax_input(*args, **kwargs).detach()
                    keep = logits.isnan() | (logits > torch.finfo(logits.dtype).min)
                name = f"{self.where[-1]}{ATTENTION_LOGITS}".lstrip(".")  # the root module's path is ""
                self.out[name] = logits if keep is None else logits[keep.expand_as(logits)]
        return func(*args, **kwargs)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of the same numbers (a detached output and the module's output)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _model_hooks(model: nn.Module, p: Parameterization, out: dict[str, torch.Tensor]) -> Hooks:
    """Forward hooks storing, under its module path, the output of every module that holds an E, H or R
    parameter (a tied weight counts in each module holding it) or is the readout, and of every direct child
    of a ModuleList (a block: the residual stream after it); the model's output as MODEL_OUTPUT unless it is
    the readout's; and, while the model's forward runs, the attention logits (`AttentionLogits`)."""
    scaled = {id(t) for name, t in model.named_parameters() if p.specs[name].cls != "V"}
    measured = {}
    for name, mod in model.named_modules():
        if name and (name == p.readout or any(id(t) in scaled for t in mod.parameters(recurse=False))):
            measured[name] = mod
        if isinstance(mod, nn.ModuleList):
            measured.update((f"{name}.{i}", child) for i, child in enumerate(mod))
    where: list[str] = []
    logits = AttentionLogits(out, where)

    def enter(path: str) -> Callable:
        def hook(_mod: nn.Module, _args: tuple) -> None:
            if not where:
                logits.__enter__()  # the model's forward begins: record its softmaxes, not the loss's
            where.append(path)
        return hook

    def leave(_mod: nn.Module, _args: tuple, _output: object) -> None:
        where.pop()
        if not where:
            logits.__exit__(None, None, None)

    def on_output(_mod: nn.Module, _args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor) and not (p.readout in out and _same(out[p.readout], output)):
            out[MODEL_OUTPUT] = output.detach()

    handles = [*(mod.register_forward_hook(_store_output(out, name)) for name, mod in measured.items()),
               model.register_forward_hook(on_output)]
    for path, mod in model.named_modules():  # registered last: `leave` runs after each module's other hooks
        handles += [mod.register_forward_pre_hook(enter(path)), mod.register_forward_hook(leave, always_call=True)]
    return handles


def check_model(make_model: Callable[[int], nn.Module],
                batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor],
                widths: Sequence[int], *, base_width: int, preset: str = "mup", lr: float = 1e-3, steps: int = 5,
                seeds: int = 2, tol: float = TOL["width"],
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                parameterize_kwargs: Mapping[str, Any] | None = None,
                progress: Callable[[str], None] | None = None) -> CoordResult:
    """The coordinate check of any torch model under `parameterize`: PASS when its training moves every
    layer alike at every width (docs/science.md#the-coordinate-check).

    For each width and seed (0, 1, ...): seed torch, `model = make_model(width)`, the base
    `make_model(base_width)` on the meta device, `parameterize(model, base, preset, lr=lr,
    **parameterize_kwargs)` (init and forward multipliers), then AdamW on its param_groups at a constant
    LR, without weight decay or clipping, for `steps - 1` updates on that seed's fixed batch.

    make_model: width -> a fresh model on the default device, its widths all set from `width` (the
        check builds the base with it too, on the meta device). It sets what `parameterize` leaves to
        the model: the attention scale, `hptransfer.train.param.attention_scale(mup, head_dim,
        base_head_dim)` (`Parameterization.attn_scale` gives the same: 1/head_dim under the muP family,
        as sqrt(base_head_dim) / head_dim, which a fixed head count needs, head_dim growing with width),
        and a depth preset's residual multiplier. So a check of a wrong scale is a make_model away.
    batches: seed -> (inputs, targets), or one (inputs, targets) for every seed; moved to the
        model's device.
    lr: the base learning rate (the LR at base_width). The default 1e-3 is the built-in check's: Adam
        moves each weight by about lr per step whatever its gradient's scale, 5% of the 0.02 init
        std, so from step 2 updates dominate the changes measured while the base model stays orderly.
    loss_fn: (model output, targets) -> scalar loss; default next-token cross entropy of logits
        (B, T, V) against targets (B, T).
    parameterize_kwargs: passed on to parameterize (classes=, exponents=, alignment=, ...), but not
        lr, init or weight_decay, which the check sets.

    Rows, by module path, in forward order: the output of every module holding an E, H or R parameter,
    of the readout `p.readout` (with its own update's row), of every direct child of a ModuleList (a
    block: the residual stream after it) and of the model, as "(output)" (unless it is the readout's);
    and "<path>.logits", the attention logits of the module at <path>, found with no change to the
    model: the input of each softmax its own forward calls (entries masked with -inf left out), and
    the q.k x scale of each F.scaled_dot_product_attention (its causal or boolean mask applied). Their
    change, like the output logits', must not grow (`rule_of`): a 1/sqrt(head_dim) scale where muP
    needs 1/head_dim makes it grow once the aligned part of q.k shows, soonest with few tokens per
    batch and large heads (the tests: one head, batches of 2 x 16 tokens). Outputs that are not
    tensors are not measured. Biases keep the model's own init: torch's default for nn.Linear,
    U(+-1/sqrt(fan_in)), shrinks with width and moves the rows after it; zero them in make_model.
    """
    check_options(steps, seeds, tol, "")
    widths = check_scales(widths, "widths")
    kwargs = dict(parameterize_kwargs or {})
    if own := [k for k in OWN_KWARGS if k in kwargs]:
        raise HptError(f"parameterize_kwargs: {', '.join(own)} is set by check_model itself (lr= is its own "
                       "argument; the check initializes and trains without weight decay): remove it")
    loss_fn = loss_of if loss_fn is None else loss_fn
    readouts: set[str] = set()  # p.readout, found by parameterize in each run

    def run(width: int, seed: int) -> Rows:
        torch.manual_seed(seed)
        model = make_model(width)
        with torch.device("meta"):
            base = make_model(base_width)
        p = parameterize(model, base, preset, lr=lr, **kwargs)
        try:
            device = next(model.parameters()).device
            x, y = (t.to(device) for t in (batches(seed) if callable(batches) else batches))
            opt = torch.optim.AdamW(p.param_groups())

            def train() -> None:
                loss_fn(model(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            readouts.add(p.readout)
            head = model.get_submodule(p.readout)
            if not (isinstance(getattr(head, "weight", None), torch.Tensor) and head.weight.ndim == 2):
                raise HptError(f"the readout {p.readout!r} has no 2-D weight (out, in), which its own update's row "
                               "needs: make it an nn.Linear, or name another readout in classes")
            readout = Readout(p.readout, head)
            return trace(model, readout, lambda seen: _model_hooks(model, p, seen), train, lambda: model(x), steps)
        finally:
            p.remove()

    seed_list = list(range(seeds))
    rows = fit_rows(run, widths, seed_list, steps, tol,
                    lambda m: m in readouts or m == MODEL_OUTPUT or m.endswith(ATTENTION_LOGITS), "width", progress)
    return CoordResult(param=preset, axis="width", scales=widths, seeds=seed_list, lr=lr, tol=tol, rows=rows)


# ---- Reporting, for both checks.

def render_table(result: CoordResult) -> Table:
    """Slopes per row (module and kind) and step: failing cells red."""
    table = Table(title=f"coordinate check: {result.param}, lr {result.lr:g}, {result.axis} "
                        f"{','.join(map(str, result.scales))}, {len(result.seeds)} seed(s)",
                  caption=f"log-log slope against {result.axis}; step 1 is before any update. size: mean |h_t|, "
                          "must not grow; change: mean |h_t - h_1|, flat (the logits': must not grow); update: "
                          f"the readout's own update (W_t - W_1) x_t, flat. Flat: |slope| < {result.tol:g}")
    table.add_column("output")
    for step in range(1, result.steps + 1):
        table.add_column(f"step {step}", justify="right")
    for r in result.rows:
        cells = []
        for i, (slope, good) in enumerate(zip(r.slopes, r.ok, strict=True)):
            if slope is None:
                cells.append("" if r.kind != "size" and i == 0 else "zero" if good else "[red]nan[/red]")
            else:
                cells.append(f"{slope:+.2f}" if good else f"[red]{slope:+.2f}[/red]")
        table.add_row(r.name, *cells)
    return table


def verdict(result: CoordResult) -> str:
    """One line: PASS, or FAIL with the count and the worst cell."""
    cells = sum(len(r.ok) for r in result.rows)
    if result.passed:
        return (f"PASS: along {result.axis}, every change and the readout's own update are flat (|slope| < "
                f"{result.tol:g}) and no output grows, at every step ({cells} cells)")
    bad = result.failures()
    name, step, slope = max(bad, key=lambda f: math.inf if f[2] is None else abs(f[2]))
    worst = "non-finite output" if slope is None else f"slope {slope:+.2f}"
    return (f"FAIL: {len(bad)} of {cells} cells out of bounds along {result.axis} "
            f"(worst: {name} at step {step}, {worst})")


PLOT_FORMATS = ("png", "pdf", "svg")


def plot_format(path: str) -> str:
    """The image format named by `path`'s suffix; checked before the check runs, not after."""
    fmt = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if fmt not in PLOT_FORMATS:
        raise HptError(f"--plot: {path} is not a .png, .pdf or .svg file")
    return fmt


def plot(result: CoordResult, path: str) -> None:
    """Log-log plots against the scale: sizes on top, changes (and the readout's update) below; a panel per step."""
    import matplotlib  # here: ~0.5 s to import, and only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    fmt = plot_format(path)
    fig, axes = plt.subplots(2, result.steps, figsize=(3.2 * result.steps + 2.5, 6.6), sharey="row", squeeze=False)
    try:
        colors = plt.get_cmap("tab20")
        modules = result.modules
        for i in range(result.steps):
            for panel, kinds in ((axes[0][i], ("size",)), (axes[1][i], ("change", "update"))):
                for r in (r for r in result.rows if r.kind in kinds):
                    style = "--" if r.kind == "update" else "-"
                    shown = [v if v > 0 else math.nan for v in r.values[i]]  # a change is 0 at step 1
                    panel.plot(result.scales, shown, style, marker="o", ms=3,
                               color=colors(modules.index(r.module) % 20), label=r.name)
                panel.set(xscale="log", yscale="log", xlabel=result.axis)
                panel.set_xticks(result.scales, [str(s) for s in result.scales])
                panel.minorticks_off()
            axes[0][i].set_title(f"step {i + 1}")
        axes[0][0].set_ylabel("mean |h_t|")
        axes[1][0].set_ylabel("mean |h_t - h_1|")
        handles, labels = [], []
        for ax in (axes[0][-1], axes[1][-1]):
            h, lab = ax.get_legend_handles_labels()
            handles += h
            labels += lab
        fig.legend(handles, labels, loc="center right", fontsize="x-small")
        fig.suptitle(f"coordinate check: {result.param}, lr {result.lr:g}: {'PASS' if result.passed else 'FAIL'}")
        fig.tight_layout(rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 1))  # leave the right edge to the legend
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=120)
    finally:
        plt.close(fig)
    write_atomic(path, buf.getvalue())
