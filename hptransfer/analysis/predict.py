"""`hpt predict`: a target run's learning rate from the transfer law, with its interval and launch line.

The law `log lr* = log a + b log s` of each matching group is evaluated at the target
scale; its 95% interval combines the optima's own uncertainties, the law's extra scatter
and the extrapolation distance, and widens to also hold the curved law's when the law
bends (docs/science.md#transfer-laws). For a width target the parameterization's per-class
learning rates come from the table's one rule, `train.param.class_lr`
(docs/science.md#the-abc-table).
"""

import shlex
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from rich.console import Console
from rich.markup import escape

from hptransfer.analysis.analyze import GroupResult, analyze
from hptransfer.analysis.load import AXES, BOOKKEEPING
from hptransfer.analysis.summary import fmt_scale, jsonable
from hptransfer.config.compose import compose_run
from hptransfer.config.derived import flatten
from hptransfer.config.schema import CHOICES
from hptransfer.errors import HptError
from hptransfer.formats import fmt_lr
from hptransfer.train.param import class_lr, depth_exponent, depth_lr_exponent, resolve_preset

BLIND_LOG2 = 4.0  # a missable shift beyond this (16x) says only that the bend test cannot see the bends that matter
# `--at` key -> scaling axis
AT_KEYS = {
    "width": "width", "model.width": "width",
    "depth": "depth", "n_layers": "depth", "model.n_layers": "depth",
    "batch": "batch_size", "batch_size": "batch_size", "train.batch_size": "batch_size",
    "tokens": "tokens", "train.tokens": "tokens",
}
# scaling axis -> the override that sets it for `hpt train`
AXIS_OVERRIDE = {"width": "model.width", "depth": "model.n_layers", "batch_size": "train.batch_size",
                 "tokens": "train.tokens"}


@dataclass
class Prediction:
    label: str
    parameterization: str
    axis: str
    target: float
    lr: float
    interval: tuple[float, float] | None      # 95%, widened when the law bends; None without any error estimate
    interval_straight: tuple[float, float] | None  # the straight law's own 95% interval
    interval_basis: str                        # where the interval's width comes from, in words
    bend: dict[str, Any] | None                # the bend test: detected, z, missable_shift_log2; None with 2 points
    doublings_beyond: float                    # log2(target / largest swept scale); > 0 extrapolates
    per_class: dict[str, float] | None         # width targets: the learning rate of each parameter class
    overrides: list[str]
    compute: dict[str, float] | None
    notes: list[str] = field(default_factory=list)
    command: str = ""                          # the launch line: hpt train, or the user's own code at the target
    sweeps: list[str] = field(default_factory=list)  # the sweeps whose runs made the law
    seed: int = 0                              # the group's first seed: a target run's


def parse_at(text: str) -> tuple[str, float]:
    """`width=4096` -> ("width", 4096.0); keys as in AT_KEYS."""
    key, sep, value = text.partition("=")
    if not sep or key.strip() not in AT_KEYS:
        raise HptError(f"--at takes AXIS=VALUE with AXIS one of {', '.join(sorted(set(AT_KEYS)))}; got {text!r}")
    try:
        scale = float(value)
    except ValueError:
        raise HptError(f"--at {text}: {value!r} is not a number") from None
    if not np.isfinite(scale) or scale <= 0:
        raise HptError(f"--at {text}: the target scale must be positive")
    return AT_KEYS[key.strip()], scale


def predict(
    df: pd.DataFrame, at: str, metric: str = "final_val_loss", params: list[str] | None = None
) -> list[Prediction]:
    """One prediction per group on the target's axis (and parameterization, if given) that has a law."""
    axis, target = parse_at(at)
    results = analyze(df, metric, params=params, axes=[axis], n_boot=0).results
    with_law = [r for r in results if r.law is not None]
    if not with_law:
        raise HptError(f"no transfer law on {axis} for {', '.join(r.group.label for r in results)}: "
                       "fewer than 2 interior optima (run `hpt analyze` for the edge flags)")
    return [_predict_group(r, target) for r in with_law]


def _predict_group(r: GroupResult, target: float) -> Prediction:
    g, law = r.group, r.law
    log2_lr = float(law.predict(target))
    interval, straight = law.prediction_interval(target), law.interval(target)
    own = user_run(g.fixed)
    per_class, notes = (per_class_lrs(g.parameterization, g.fixed, target, 2**log2_lr)
                        if g.axis == "width" and not own else (None, []))
    if interval is None:
        notes.append("no interval: the law has only 2 points and no noise estimate")
    missable = law.missable_shift(target)
    if law.bends:
        curved = float(law.curved.value(np.log2(target)))
        notes.append(f"the law bends (curvature z = {law.bend_z:+.1f}): a curved law says {fmt_lr(2**curved)}; the "
                     "interval is widened to hold both laws' intervals; sweep closer to the target to pin it down")
    elif missable is None:
        notes.append("no bend test with 2 points: the interval assumes the law stays straight out to the target")
    elif missable > BLIND_LOG2:  # the test cannot see a bend that matters: say that, not a meaningless figure
        notes.append(f"no bend found (z = {law.bend_z:+.1f}), but with these optima the bend test is blind here: a "
                     f"bend it would catch 4 times in 5 would move the optimum by more than {BLIND_LOG2:g} octaves; "
                     "the interval holds only if the law stays straight out to the target (more scales, more seeds "
                     "or a finer LR grid sharpen the test)")
    else:
        notes.append(f"no bend found (z = {law.bend_z:+.1f}), but a bend just large enough to be caught 4 times in 5 "
                     f"would move the optimum here by {missable:.2f} log2 (x{2**missable:.2g}): the interval assumes "
                     "the law stays straight out to the target" + (" (3 points: the bend test has one degree of "
                                                                     "freedom)" if len(law.scales) == 3 else ""))
    return Prediction(
        label=g.label,
        parameterization=g.parameterization,
        axis=g.axis,
        target=target,
        lr=2**log2_lr,
        interval=_lr_pair(interval),
        interval_straight=_lr_pair(straight),
        interval_basis=law.interval_basis,
        bend=None if law.bend_z is None else {"detected": law.bends, "z": law.bend_z, "missable_shift_log2": missable},
        doublings_beyond=float(np.log2(target / max(g.scales))),
        per_class=per_class,
        overrides=(overrides := (user_overrides if own else launch_overrides)(r, target, 2**log2_lr, notes)),
        compute=_compute(r, target),
        notes=notes,
        command=launch_line(own, overrides),
        sweeps=sorted(map(str, g.runs["sweep"].dropna().unique())) if "sweep" in g.runs.columns else [],
        seed=int(g.runs["seed"].min()) if "seed" in g.runs.columns and g.runs["seed"].notna().any() else 0,
    )


def user_run(fixed: dict[str, Any]) -> dict[str, str] | None:
    """{target or command: ...} when the group's runs are the user's own code (their cfg.run.* columns)."""
    found = {k: fixed.get(f"run.{k}") for k in ("target", "command")}
    return {k: v for k, v in found.items() if v} or None


def user_overrides(r: GroupResult, target: float, lr: float, notes: list[str]) -> list[str]:
    """The user's keys at the target: the key behind the axis column at the target, the one behind the lr
    column at the predicted lr, and every key the group holds fixed (what was swept alongside is pinned)."""
    g, runs = r.group, r.group.runs
    scale = int(target) if float(target).is_integer() else target

    def key_of(column: str) -> str | None:
        for c in runs.columns:
            if c.startswith("cfg.") and not c.startswith("cfg.run.") and _equal(runs[c], runs[column]):
                return c.removeprefix("cfg.")
        return None

    axis_key, lr_key = key_of(g.axis), key_of("lr")
    if axis_key is None or lr_key is None:
        missing = "axis" if axis_key is None else "lr"
        notes.append(f"launch line incomplete: no key of the config holds the {missing} column's values")
    if g.varies_with_scale:
        notes.append(f"set for the target by hand: {', '.join(g.varies_with_scale)} changed with the {g.axis} "
                     "in the sweep")
    head = [f"{axis_key}={scale}"] * bool(axis_key) + [f"{lr_key}={lr:.4g}"] * bool(lr_key)
    return head + [f"{k}={_hydra_value(v)}" for k, v in sorted(g.fixed.items())
                   if not k.startswith("run.") and v is not None]


def _equal(a: Any, b: Any) -> bool:
    return bool((a.astype(str) == b.astype(str)).all())


def launch_line(own: dict[str, str] | None, overrides: list[str]) -> str:
    """How to run the target: `hpt train` for the built-in GPT; the user's command with the target's keys, or
    their sweep file narrowed to the target point for a callable."""
    quoted = " ".join(shlex.quote(o) for o in overrides)
    if own is None:
        return "hpt train " + " ".join(overrides)
    if "command" in own:
        return own["command"].replace("{overrides}", quoted)
    return f"hpt sweep <your sweep file> {quoted} --name <target name>   # runs {own['target']}"


def _lr_pair(log2_pair: tuple[float, float] | None) -> tuple[float, float] | None:
    return None if log2_pair is None else (2 ** log2_pair[0], 2 ** log2_pair[1])


def per_class_lrs(
    param: str, fixed: dict[str, Any], width: float, lr: float
) -> tuple[dict[str, float] | None, list[str]]:
    """Each class's learning rate at `width`, by the table's rule `class_lr` (eta * gamma_X * m^(-c_X);
    a depth-scaled preset off its base depth also scales H and the gains in blocks by mL^(alpha - 1))."""
    base = fixed.get("param.base_width")
    if param not in CHOICES["param.name"]:
        return None, [f"no per-class learning rates: {param} is not one of hptransfer's presets"]
    if base is None:
        return None, ["no per-class learning rates: the table has no param.base_width"]
    m = width / float(base)
    preset = resolve_preset(param, {c: {e: fixed.get(f"param.exponents.{c}.{e}") for e in "abcg"} for c in "EHR"},
                            fixed.get("optim.name") or "adamw")  # the optimizer's own LR exponents (SGD, ...)
    alpha = depth_exponent(param, fixed.get("param.depth_alpha"))
    depth_lr = depth_lr_exponent(alpha, fixed.get("param.exponents.depth.lr"))
    layers, base_depth = fixed.get("model.n_layers"), fixed.get("param.base_depth")
    m_depth = layers / base_depth if layers and base_depth else 1.0

    def rate(cls: str, in_blocks: bool = False) -> float:
        gamma = fixed.get(f"param.lr_mult.{cls}")
        return class_lr(preset, cls, lr=lr, gamma=1.0 if gamma is None else float(gamma), m=m,
                        alignment=fixed.get("param.alignment") or "full", depth_lr=depth_lr, m_depth=m_depth,
                        in_blocks=in_blocks)

    out = {cls: rate(cls) for cls in ("E", "H", "R", "V")}
    notes = [f"per class: eta * gamma_X * m^(-c_X) with m = {fmt_scale(width)} / {fmt_scale(float(base))} = {m:g}"]
    if depth_lr != 0 and m_depth != 1:
        out["V in blocks"] = rate("V", in_blocks=True)
        notes.append(f"depth: H and the gains in blocks x mL^-{depth_lr:g} = {m_depth ** -depth_lr:g}")
    return out, notes


def launch_overrides(r: GroupResult, target: float, lr: float, notes: list[str]) -> list[str]:
    """`hpt train` overrides for the target run: preset, scale, lr, and the group's non-default settings."""
    g = r.group
    scale = int(target) if float(target).is_integer() else target
    head = [f"param={g.parameterization}", f"{AXIS_OVERRIDE[g.axis]}={scale}", f"optim.lr={lr:.4g}"]
    try:
        defaults = _defaults(g.parameterization)
    except HptError as err:
        notes.append(f"launch line without the group's other settings: {err}")
        return head
    skip = {c.removeprefix("cfg.") for c in AXES[g.axis]} | set(g.varies_with_scale) | {"param.name"}
    extra = [
        f"{key}={_hydra_value(value)}"
        for key, value in sorted(g.fixed.items())
        if key not in skip and not f"cfg.{key}".startswith(BOOKKEEPING) and key in defaults
        and not _same(value, defaults[key])
    ]
    return head + extra


@cache  # composing a config takes a tenth of a second; one per preset and process is enough
def _defaults(param: str) -> dict[str, Any]:
    """The flattened run config `hpt train param=<param>` starts from (read-only: it is shared)."""
    return flatten(OmegaConf.to_container(compose_run([f"param={param}"]), resolve=True))


def _same(value: Any, default: Any) -> bool:
    if value is None or default is None:
        return value is None and default is None
    return value == default


def _hydra_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back (2.0 as 2: the schema may want an int)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and any(ch in value for ch in " ,=[]{}()'\""):
        return repr(value)
    return str(value)


def _compute(r: GroupResult, target: float) -> dict[str, float] | None:
    """The group's FLOPs against one target run, extrapolated as flops ~ scale^p from the sweep's runs."""
    runs = r.group.runs
    if "flops" not in runs.columns:
        return None
    per_scale = pd.to_numeric(runs["flops"], errors="coerce").groupby(runs[r.group.axis]).median().dropna()
    per_scale = per_scale[per_scale > 0]
    if len(per_scale) < 2:
        return None
    p, c = np.polyfit(np.log2(per_scale.index.to_numpy(float)), np.log2(per_scale.to_numpy(float)), 1)
    target_flops = float(2 ** (c + p * np.log2(target)))
    sweep = float(pd.to_numeric(runs["flops"], errors="coerce").sum())
    return {"sweep_flops": sweep, "target_run_flops": target_flops, "exponent": float(p),
            "sweep_over_target": sweep / target_flops}


def as_dict(p: Prediction) -> dict[str, Any]:
    """The prediction as plain JSON values (what `hpt predict --json` prints)."""
    return jsonable({
        "label": p.label, "parameterization": p.parameterization, "axis": p.axis, "target": p.target,
        "lr": p.lr, "lr_interval": None if p.interval is None else list(p.interval),
        "lr_interval_straight": None if p.interval_straight is None else list(p.interval_straight),
        "interval_basis": p.interval_basis, "bend": p.bend,
        "doublings_beyond": p.doublings_beyond, "per_class_lr": p.per_class,
        "command": p.command, "compute": p.compute, "notes": p.notes,
    })


def render(predictions: list[Prediction], console: Console) -> None:
    """The predictions as short blocks of text: the lr, its interval, per class, compute, the launch line."""
    for p in predictions:
        where = f"{p.axis}={fmt_scale(p.target)}"
        reach = (f"{p.doublings_beyond:.1f} doublings beyond the largest swept {p.axis}" if p.doublings_beyond > 0
                 else f"within the swept {p.axis} range")
        console.print(f"[bold]{escape(p.label)}[/bold] at {where} ({reach})", highlight=False)
        interval = "-" if p.interval is None else f"{fmt_lr(p.interval[0])} - {fmt_lr(p.interval[1])}"
        console.print(f"  learning rate   {fmt_lr(p.lr)}   (95% interval {interval})", highlight=False)
        console.print(f"  interval from   {p.interval_basis}, and the extrapolation distance", highlight=False,
                      markup=False)
        if p.bend and p.bend["detected"]:
            console.print(f"  [bold yellow]warning[/bold yellow]         the law bends (z = {p.bend['z']:+.1f}): "
                          f"the straight law's own interval is {fmt_lr(p.interval_straight[0])} - "
                          f"{fmt_lr(p.interval_straight[1])}", highlight=False)
        if p.per_class:
            classes = "  ".join(f"{k} {fmt_lr(v)}" for k, v in p.per_class.items())
            console.print(f"  per class       {classes}", highlight=False)
        if p.compute:
            c = p.compute
            console.print(f"  compute         this sweep {c['sweep_flops']:.3g} FLOPs = {c['sweep_over_target']:.2g}x "
                          f"one target run (~{c['target_run_flops']:.3g} FLOPs, flops ~ scale^{c['exponent']:.2f} "
                          "fitted over the sweep)", highlight=False)
        for note in p.notes:
            console.print(f"  note            {note}", highlight=False, markup=False)
        console.print(f"  launch          {p.command}", highlight=False, markup=False)


def bracket(p: Prediction, k: int) -> list[float]:
    """The learning rates of a target run and its K-1 neighbours: K odd, spaced evenly in log2 so that the
    outermost sit at the prediction's interval ends (at x0.5 and x2 without an interval, or when it is
    narrower than that: a bracket must be able to see the optimum move)."""
    if k < 1 or k % 2 == 0:
        raise HptError(f"--bracket: {k} learning rates do not centre on the prediction: use an odd number (3, 5)")
    if k == 1:
        return [p.lr]
    half = 1.0 if p.interval is None else max(1.0, np.log2(p.interval[1] / p.interval[0]) / 2)
    steps = np.linspace(-half, half, k)
    return [float(p.lr * 2.0**d) for d in steps]


def target_sweep(p: Prediction, name: str, lrs: list[float]) -> dict[str, Any]:
    """The sweep file of the target run(s): the target scale on the axis, the bracket's learning rates as the
    grid, and the prediction it tests (collect puts it in every target run's row)."""
    if not p.command.startswith("hpt train"):
        raise HptError(f"--launch runs hpt's own trainer; {p.label} is a sweep of your code: run its launch line "
                       f"({p.command})")
    scale = int(p.target) if float(p.target).is_integer() else p.target
    return {
        "defaults": ["config", "_self_"],
        "sweep": {
            "name": name,
            "axis": {"key": AXIS_OVERRIDE[p.axis], "values": [scale]},
            "grid": {"optim.lr": lrs},
            "seeds": [p.seed],
            "prediction": {"lr": p.lr, "lr_low": p.interval[0] if p.interval else None,
                           "lr_high": p.interval[1] if p.interval else None, "group": p.label, "axis": p.axis,
                           "at": float(p.target), "from": ", ".join(p.sweeps)},
        },
    }


def target_overrides(p: Prediction) -> list[str]:
    """The launch line's settings but the axis and the learning rate (the target sweep's dimensions)."""
    return [o for o in p.overrides if not o.startswith((f"{AXIS_OVERRIDE[p.axis]}=", "optim.lr="))]
