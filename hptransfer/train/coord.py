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

Modules, in forward order:
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from rich.table import Table
from torch import nn

from hptransfer.config.compose import compose_run
from hptransfer.config.derived import heads_and_dim
from hptransfer.errors import HptError
from hptransfer.files import write_atomic
from hptransfer.train.data import make_batches
from hptransfer.train.model import GPT, apply_rope
from hptransfer.train.step import pick_device, setup, train_step

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
    slopes: list[float | None] = field(default_factory=list)  # [step]; None: no slope (step 1 of a change, zeros)
    ok: list[bool] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.module if self.kind == "size" else f"{self.module} {self.kind}"

    @property
    def two_sided(self) -> bool:
        """Whether shrinking fails too (see `rule_of`)."""
        return rule_of(self.module, self.kind) == "flat"


def rule_of(module: str, kind: str) -> str:
    """"flat" (|slope| < tol) or "no growth" (slope < tol) for a row.

    Sizes must not grow; init parts may shrink. Changes must be flat, but for the logits: their change
    is the readout's own update (its row, held flat) plus the init readout applied to its input's
    change, W_R,1 (x_t - x_1) x mult, which under muP's 1/m multiplier decays as m^-1/2 by design,
    like the logits' init part. So the logits' change must not grow, and their own update is flat.
    """
    if kind == "size" or (kind == "change" and module == "lm_head"):
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
    k = k.repeat_interleave(attn.n_head // attn.n_kv, dim=1)      # kv head h // (H/K) serves query head h, as SDPA
    return (q @ k.transpose(-2, -1)) * attn.scale


def _block_names(model: GPT, axis: str) -> list[tuple[int, str]]:
    """(index, name) of the blocks measured: all of them along width; the first and last along depth."""
    n = len(model.blocks)
    if axis == "width":
        return [(i, f"blocks.{i}") for i in range(n)]
    return [(0, "blocks.first"), (n - 1, "blocks.last")]


def _hooks(model: GPT, axis: str, out: dict[str, torch.Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks that store each measured output (detached) in `out`, and the readout's input."""

    def store(name: str) -> Callable:
        def hook(_mod: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            out[name] = output.detach()
        return hook

    def store_input(name: str) -> Callable:
        def hook(_mod: nn.Module, args: tuple) -> None:
            out[name] = args[0].detach()
        return hook

    def logit_hooks(name: str, attn: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        q_out: dict[str, torch.Tensor] = {}

        def keep_q(_mod: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            q_out["q"] = output.detach()

        def on_k(_mod: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            # Attention.forward projects q before k, so q is there when k's hook runs.
            with torch.no_grad():
                logits = attention_logits(attn, q_out.pop("q"), output.detach(), model)
                causal = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
                out[f"{name}.attn.logits"] = logits[..., causal]  # the entries softmax sees

        return [attn.q.register_forward_hook(keep_q), attn.k.register_forward_hook(on_k)]

    handles = [model.blocks[0].register_forward_pre_hook(store_input("embedding"))]
    for i, name in _block_names(model, axis):
        block = model.blocks[i]
        handles += [*logit_hooks(name, block.attn), block.attn.register_forward_hook(store(f"{name}.attn")),
                    block.mlp.register_forward_hook(store(f"{name}.mlp"))]
    handles += [model.norm_f.register_forward_pre_hook(store_input("residual")),
                model.norm_f.register_forward_hook(store("norm_f")),
                model.lm_head.register_forward_pre_hook(store_input("lm_head.input")),
                model.lm_head.register_forward_hook(store("lm_head"))]
    return handles


def _mean_abs(x: torch.Tensor) -> float:
    return float(x.abs().double().mean())


def measure(cfg: DictConfig, steps: int, axis: str = "width") -> dict[tuple[str, str], list[float]]:
    """Train `cfg` for `steps - 1` updates on one fixed batch; (module, kind) -> value per step.

    The LR stays at each group's base LR (a warmup would make the early updates, the ones the
    check looks at, tiny) and the forward runs in the parameters' dtype (no autocast).
    """
    device = pick_device(cfg)
    x, y = make_batches(cfg).train_batch(0, device)
    s = setup(cfg, device, measure=True)  # every optimizer group starts at its base_lr
    seen: dict[str, torch.Tensor] = {}
    handles = _hooks(s.model, axis, seen)
    head = s.model.lm_head
    w1 = head.weight.detach().clone()
    first: dict[str, torch.Tensor] = {}
    rows: dict[tuple[str, str], list[float]] = {}
    try:
        for step in range(steps):
            w_t = head.weight.detach().clone()  # the readout this step's forward uses (train_step then updates it)
            if step < steps - 1:
                train_step(s, x, y)  # its forward pass is the one measured
            else:
                with torch.no_grad():  # the last step is measured, not trained
                    s.model(x)
            update = F.linear(seen.pop("lm_head.input"), w_t - w1) * head.mult  # the readout's own update's share
            for name, h in seen.items():
                first.setdefault(name, h)
                rows.setdefault((name, "size"), []).append(_mean_abs(h))
                rows.setdefault((name, "change"), []).append(_mean_abs(h - first[name]))
            rows.setdefault(("lm_head", "update"), []).append(_mean_abs(update))
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


def coord_check(overrides: Sequence[str] = (), scales: Sequence[int] | None = None, steps: int = 5,
                seeds: int = 2, tol: float | None = None, axis: str = "width",
                progress: Callable[[str], None] | None = None) -> CoordResult:
    """Run the check on the config of `overrides` (model.width, or model.n_layers, replaced by each scale).

    Seeds are train.seed, train.seed + 1, ...: each seeds its own init and fixed batch, and the
    values are averaged over seeds before the fit.
    """
    if axis not in AXES:
        raise HptError(f"--axis: '{axis}' is not one of {', '.join(AXES)}")
    if steps < 2:
        raise HptError(f"--steps: need at least 2 (step 1 is before any update), got {steps}")
    if seeds < 1:
        raise HptError(f"--seeds: need at least 1, got {seeds}")
    tol = TOL.get(axis, 0.2) if tol is None else tol
    if not tol > 0:
        raise HptError(f"--tol: must be positive, got {tol}")
    cfg = coord_config(overrides)
    scales = default_scales(cfg, axis) if scales is None else sorted(set(scales))
    if len(scales) < 2 or scales[0] <= 0:
        raise HptError(f"--{axis}s: need at least two distinct positive values, got {','.join(map(str, scales))}")
    if axis == "width":
        for w in scales:
            heads_and_dim(cfg.model, w)  # a width the heads cannot split is bad input, found before any training
    seed_list = [cfg.train.seed + i for i in range(seeds)]
    sums: dict[tuple[str, str], np.ndarray] = {}  # (module, kind) -> (step, scale) summed over seeds
    for j, scale in enumerate(scales):
        for seed in seed_list:
            if progress:
                progress(f"{axis} {scale}, seed {seed}")
            run = cfg.copy()
            run.train.seed = seed
            if axis == "width":
                run.model.width = scale
            else:
                run.model.n_layers = scale
            for key, per_step in measure(run, steps, axis).items():
                sums.setdefault(key, np.zeros((steps, len(scales))))[:, j] += per_step
    rows = []
    for (module, kind), total in sums.items():
        row = Row(module, kind, (total / seeds).tolist())
        row.slopes = [None if kind != "size" and i == 0 else fit_slope(scales, v) for i, v in enumerate(row.values)]
        row.ok = [_cell_ok(row, i, s, v, tol) for i, (s, v) in enumerate(zip(row.slopes, row.values, strict=True))]
        rows.append(row)
    order = {k: i for i, k in enumerate(KINDS)}
    modules = list(dict.fromkeys(m for m, _ in sums))
    rows.sort(key=lambda r: (modules.index(r.module), order[r.kind]))
    return CoordResult(param=cfg.param.name, axis=axis, scales=list(scales), seeds=seed_list, lr=cfg.optim.lr,
                       tol=tol, rows=rows)


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
