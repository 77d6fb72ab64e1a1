"""The muP coordinate check (docs/science.md#the-coordinate-check).

Train the same model at several widths for a few steps on one fixed batch at a fairly
large, constant learning rate, and record the mean absolute value of every module's
output at every step (step 1 is the forward pass before any update). Under a
parameterization that is right in width none of these sizes depends on width: the
log-log slope of size against width is about 0 for every module and step. SP at a large
LR fails (updates of hidden matrices grow their outputs with width); muP and CompleteP pass.

Measured outputs, in forward order (as the network uses them, multipliers included):
  embedding              the input of block 0 (token embedding x its multiplier, plus
                         learned positions if any)
  blocks.i.attn.logits   attention logits q.k x scale after RoPE, over the causal entries
  blocks.i.attn          attention output (the residual branch, before mL^-alpha)
  blocks.i.mlp           MLP output (likewise)
  norm_f                 final norm
  lm_head                the logits

Verdict: a cell (output, step) passes when |slope| < tol, with one allowance. The logits
and the attention logits carry an init part that shrinks with width by design (muP's
readout multiplier 1/m on a width-constant init: W_R (x0 + dx) / m decays as m^-1/2;
1/d_head attention with a growing head size). The rule allows that at step 1; at the
widths a CPU reaches it still dominates steps 2-4 (muP, widths 128-1024, lr 1e-3: logits
slopes -0.5, -0.37, -0.18, -0.11 while every hidden output stays within 0.09 of flat; with a
zero-initialised readout the logits are flat from step 2). So for these two outputs only
growth fails, at every step, unless the readout (resp. query) is zero-initialised: then
they are held to |slope| < tol like the rest. An output that is exactly zero at every width
(a zero-initialised one at step 1) has no slope and passes; a non-finite one fails.
"""

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
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
# - optim.lr: "fairly large": SP's hidden outputs grow as m^0.4 to m^1.5 by steps 2-4 (19 of 36
#   cells fail on the default model), while the narrowest widths stay orderly. From 2e-3 up, the
#   4-head base width leaves that regime by step 3-4 and even muP's last block drifts by 0.1-0.6
#   against the wider models, which agree among themselves: finite width, not the parameterization.
# - no gradient clipping or weight decay: both mix width effects across parameter classes.
# - a small fixed batch: each size is a mean over batch x seq_len x width numbers, so 8 x 32
#   tokens measure it well, and the widest model sets the check's time.
CHECK_DEFAULTS = {
    "optim.lr": "0.001",
    "optim.grad_clip": "0",
    "optim.weight_decay": "0",
    "train.batch_size": "8",
    "train.seq_len": "32",
}


@dataclass
class CoordResult:
    """Mean |output| per module, step and width (averaged over seeds), and the fitted slopes."""

    param: str
    widths: list[int]
    seeds: list[int]
    lr: float
    tol: float
    modules: list[str]
    values: dict[str, list[list[float]]]   # module -> [step][width]
    slopes: dict[str, list[float | None]]  # module -> [step]; None: no slope (zero or non-finite sizes)
    ok: dict[str, list[bool]]               # module -> [step]
    may_shrink: list[str]                   # modules for which only growth fails

    @property
    def steps(self) -> int:
        return len(self.slopes[self.modules[0]])

    @property
    def passed(self) -> bool:
        return all(all(row) for row in self.ok.values())

    def failures(self) -> list[tuple[str, int, float | None]]:
        """(module, 1-based step, slope) of every failing cell."""
        return [(mod, i + 1, self.slopes[mod][i]) for mod in self.modules
                for i, good in enumerate(self.ok[mod]) if not good]

    def to_json(self) -> dict:
        return {
            "passed": self.passed, "param": self.param, "widths": self.widths, "seeds": self.seeds,
            "lr": self.lr, "tol": self.tol, "steps": self.steps, "modules": self.modules,
            "may_shrink": self.may_shrink, "slopes": self.slopes, "ok": self.ok,
            # A diverged width's sizes become null, so the output stays strict JSON.
            "values": {mod: [[v if math.isfinite(v) else None for v in row] for row in rows]
                       for mod, rows in self.values.items()},
        }


def parse_widths(text: str) -> list[int]:
    """'128,256,512' -> [128, 256, 512] (checked by `coord_check`)."""
    try:
        return [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise HptError(f"--widths: '{text}' is not a comma-separated list of integers") from None


def coord_config(overrides: Sequence[str]) -> DictConfig:
    """The check's run config: CHECK_DEFAULTS first, so that any user override wins."""
    # Hydra applies value overrides after group choices and the last one wins, so a default
    # placed first survives `optim=adam_atan2` and yields to an explicit `optim.lr=...`.
    return compose_run([f"{k}={v}" for k, v in CHECK_DEFAULTS.items()] + list(overrides))


def default_widths(cfg: DictConfig) -> list[int]:
    """d_base * 2^k for k = 0..3: from the base width, where the parameterization is anchored, up."""
    return [cfg.param.base_width * 2**k for k in range(4)]


def may_shrink(module: str, cfg: DictConfig) -> bool:
    """Whether only growth fails `module` (see the module docstring): logits and attention logits
    whose init part is non-zero."""
    if module == "lm_head":
        return not cfg.param.zero_readout
    return module.endswith(".attn.logits") and not cfg.param.zero_query


def _mean_abs(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().double().mean()


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


def _hooks(model: GPT, record: dict[str, torch.Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks that store each measured output's mean |.| in `record`, in forward order."""

    def store(name: str):  # noqa: ANN202 - a hook factory
        def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            record[name] = _mean_abs(out)
        return hook

    def embedding(_mod: nn.Module, args: tuple) -> None:
        record["embedding"] = _mean_abs(args[0])  # block 0's input: the embedding as the network uses it

    def logit_hooks(i: int, attn: nn.Module):  # noqa: ANN202 - a hook factory
        q_out: dict[str, torch.Tensor] = {}

        def keep_q(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            q_out["q"] = out.detach()

        def on_k(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            # Attention.forward projects q before k, so q is there when k's hook runs.
            with torch.no_grad():
                logits = attention_logits(attn, q_out.pop("q"), out.detach(), model)
                causal = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
                record[f"blocks.{i}.attn.logits"] = _mean_abs(logits[..., causal])  # the entries softmax sees

        return attn.q.register_forward_hook(keep_q), attn.k.register_forward_hook(on_k)

    handles = [model.blocks[0].register_forward_pre_hook(embedding)]
    for i, block in enumerate(model.blocks):
        handles += [*logit_hooks(i, block.attn),
                    block.attn.register_forward_hook(store(f"blocks.{i}.attn")),
                    block.mlp.register_forward_hook(store(f"blocks.{i}.mlp"))]
    handles += [model.norm_f.register_forward_hook(store("norm_f")),
                model.lm_head.register_forward_hook(store("lm_head"))]
    return handles


def measure(cfg: DictConfig, steps: int) -> dict[str, list[float]]:
    """Train `cfg` for `steps - 1` updates on one fixed batch; module -> mean |output| per step.

    The LR stays at each group's base LR (a warmup would make the early updates, the ones the
    check looks at, tiny) and the forward runs in full precision (no autocast).
    """
    device = pick_device(cfg)
    x, y = make_batches(cfg).train_batch(0, device)
    s = setup(cfg, device, measure=True)  # every optimizer group starts at its base_lr
    record: dict[str, torch.Tensor] = {}
    handles = _hooks(s.model, record)
    sizes: dict[str, list[float]] = {}
    try:
        for step in range(steps):
            if step < steps - 1:
                train_step(s, x, y)  # its forward pass is the one measured
            else:
                with torch.no_grad():  # the last step is measured, not trained
                    s.model(x)
            for name, value in record.items():
                sizes.setdefault(name, []).append(float(value))
    finally:
        for h in handles:
            h.remove()
    return sizes


def fit_slope(widths: Sequence[int], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) on log(width); None unless every value is positive and finite."""
    v = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(v) & (v > 0)):
        return None
    return float(np.polyfit(np.log(widths), np.log(v), 1)[0])


def _cell_ok(slope: float | None, values: Sequence[float], tol: float, shrink_ok: bool) -> bool:
    if slope is None:
        return all(v == 0 for v in values)  # zero at every width is width-constant; NaN/inf is not
    return slope < tol if shrink_ok else abs(slope) < tol


def coord_check(overrides: Sequence[str] = (), widths: Sequence[int] | None = None, steps: int = 4,
                seeds: int = 2, tol: float = 0.1) -> CoordResult:
    """Run the check on the config of `overrides` (model.width is replaced by each of `widths`).

    Seeds are train.seed, train.seed + 1, ...: each seeds its own init and fixed batch, and the
    sizes are averaged over seeds before the fit.
    """
    if steps < 2:
        raise HptError(f"--steps: need at least 2 (step 1 is before any update), got {steps}")
    if seeds < 1:
        raise HptError(f"--seeds: need at least 1, got {seeds}")
    if not tol > 0:
        raise HptError(f"--tol: must be positive, got {tol}")
    cfg = coord_config(overrides)
    widths = default_widths(cfg) if widths is None else sorted(set(widths))
    if len(widths) < 2 or widths[0] <= 0:
        raise HptError(f"--widths: need at least two distinct positive widths, got {','.join(map(str, widths))}")
    for w in widths:
        heads_and_dim(cfg.model, w)  # a width the heads cannot split is bad input, found before any training
    seed_list = [cfg.train.seed + i for i in range(seeds)]
    sums: dict[str, np.ndarray] = {}  # module -> (step, width) sizes summed over seeds
    for j, w in enumerate(widths):
        for seed in seed_list:
            run = cfg.copy()
            run.model.width, run.train.seed = w, seed
            for mod, per_step in measure(run, steps).items():
                sums.setdefault(mod, np.zeros((steps, len(widths))))[:, j] += per_step
    modules = list(sums)
    shrinking = [mod for mod in modules if may_shrink(mod, cfg)]
    values = {mod: (sums[mod] / seeds).tolist() for mod in modules}
    slopes = {mod: [fit_slope(widths, row) for row in values[mod]] for mod in modules}
    ok = {mod: [_cell_ok(s, row, tol, mod in shrinking) for s, row in zip(slopes[mod], values[mod], strict=True)]
          for mod in modules}
    return CoordResult(param=cfg.param.name, widths=list(widths), seeds=seed_list, lr=cfg.optim.lr, tol=tol,
                       modules=modules, values=values, slopes=slopes, ok=ok, may_shrink=shrinking)


def render_table(result: CoordResult) -> Table:
    """Slopes per output (rows) and step (columns): failing cells red, allowed shrinking yellow."""
    table = Table(title=f"coordinate check: {result.param}, lr {result.lr:g}, widths "
                        f"{','.join(map(str, result.widths))}, {len(result.seeds)} seed(s)",
                  caption="log-log slope of mean |output| against width; step 1 is before any update; "
                          "yellow: shrinking logits, allowed (init part)")
    table.add_column("output")
    for step in range(1, result.steps + 1):
        table.add_column(f"step {step}", justify="right")
    for mod in result.modules:
        cells = []
        for slope, good in zip(result.slopes[mod], result.ok[mod], strict=True):
            if slope is None:
                cells.append("zero" if good else "[red]nan[/red]")
            elif not good:
                cells.append(f"[red]{slope:+.2f}[/red]")
            else:
                cells.append(f"[yellow]{slope:+.2f}[/yellow]" if abs(slope) >= result.tol else f"{slope:+.2f}")
        table.add_row(mod, *cells)
    return table


def verdict(result: CoordResult) -> str:
    """One line: PASS, or FAIL with the count and the worst cell."""
    if result.passed:
        shrinking = sum(s is not None and abs(s) >= result.tol for mod in result.may_shrink for s in result.slopes[mod])
        allowed = f" (bar {shrinking} cells of shrinking logits, allowed: their init part)" if shrinking else ""
        return f"PASS: every output's size is flat in width (|slope| < {result.tol:g}) at every step{allowed}"
    bad = result.failures()
    mod, step, slope = max(bad, key=lambda f: math.inf if f[2] is None else abs(f[2]))
    worst = "non-finite output" if slope is None else f"slope {slope:+.2f}"
    cells = len(result.modules) * result.steps
    return f"FAIL: {len(bad)} of {cells} cells over tol {result.tol:g} (worst: {mod} at step {step}, {worst})"


PLOT_FORMATS = ("png", "pdf", "svg")


def plot_format(path: str) -> str:
    """The image format named by `path`'s suffix; checked before the check runs, not after."""
    fmt = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if fmt not in PLOT_FORMATS:
        raise HptError(f"--plot: {path} is not a .png, .pdf or .svg file")
    return fmt


def plot(result: CoordResult, path: str) -> None:
    """Log-log plot of mean |output| against width: one panel per step, a line per output."""
    import matplotlib  # here: ~0.5 s to import, and only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    fmt = plot_format(path)
    fig, axes = plt.subplots(1, result.steps, figsize=(3.2 * result.steps + 2.5, 3.6), sharey=True,
                             squeeze=False)
    try:
        colors = plt.get_cmap("tab20")
        for i, ax in enumerate(axes[0]):
            for n, mod in enumerate(result.modules):
                ax.plot(result.widths, result.values[mod][i], marker="o", ms=3, color=colors(n % 20), label=mod)
            ax.set(xscale="log", yscale="log", title=f"step {i + 1}", xlabel="width")
            ax.set_xticks(result.widths, [str(w) for w in result.widths])
            ax.minorticks_off()
        axes[0][0].set_ylabel("mean |output|")
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize="small")
        fig.suptitle(f"coordinate check: {result.param}, lr {result.lr:g}: {'PASS' if result.passed else 'FAIL'}")
        fig.tight_layout(rect=(0, 0, 1 - 2.1 / fig.get_figwidth(), 1))  # leave the right edge to the legend
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=120)
    finally:
        plt.close(fig)
    write_atomic(path, buf.getvalue())
