"""hptransfer's parameterizations on any torch.nn.Module: `parameterize` and `describe`.

Give the model and the same model at its base width (the base: a module, on the meta device if
you like, or a dict name -> shape). Each parameter tensor gets a class of the abc table, decided
from the model's structure so that a tensor has the same class at every width; then param.py's
one per-tensor rule (`tensor_spec`) gives its learning rate, init std, forward multiplier, epsilon
and weight decay. `parameterize` initialises the weights, hooks the forward multipliers onto the
modules that hold the tensors, and hands out torch optimizer groups; `describe` shows all of it and
changes nothing. docs/science.md#your-own-model states the rules.
"""

import io
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.hooks import RemovableHandle

from hptransfer.config.schema import CHOICES
from hptransfer.errors import HptError
from hptransfer.train import optim
from hptransfer.train.param import (
    CLASSES,
    PRESETS,
    SPEC_COLUMNS,
    Rules,
    TensorSpec,
    attention_scale,
    block0_name,
    depth_exponent,
    depth_lr_exponent,
    in_blocks,
    lr_exponent,
    residual_multiplier,
    resolve_preset,
    tensor_spec,
)

EXPONENT_KEYS = {"E": "abcg", "H": "abcg", "R": "abcg", "depth": ("residual", "lr")}
Holder = tuple[str, nn.Module, str]  # a module holding a tensor: its path, the module, the tensor's name there
Pattern = tuple[re.Pattern, str, str]  # a `classes` entry: compiled, class, as written
WRAPPER_PREFIXES = ("module", "_orig_mod")  # DDP's and torch.compile's prefix to the wrapped model's names


@dataclass(frozen=True)
class Row(TensorSpec):
    """One tensor as `describe` shows it: its spec, how its class was decided, its base shape."""

    how: str
    base_shape: tuple[int, ...]
    tied_to: str | None = None  # the readout module that also holds this embedding

    def cells(self, v_init: str = "as built") -> list[str]:
        cells = super().cells(v_init)  # V tensors keep what the model's constructor gave them
        if self.tied_to is not None:
            cells[2] = f"E (tied to readout {self.tied_to})"
        return [*cells, "x".join(map(str, self.base_shape)), self.how]


@dataclass(frozen=True)
class Description:
    """What `parameterize` does to a model, tensor by tensor; str() is a plain-text table like `hpt params`."""

    preset: str
    rows: tuple[Row, ...]
    readout: str                      # module path of the readout
    multipliers: Mapping[str, float]  # module path -> forward multiplier (nn.Linear: its input; nn.Embedding: output)
    unhooked: Mapping[str, float]     # parameter -> forward multiplier that no hook can apply (the model must)
    residual_mult: float
    wd_mode: str
    notes: tuple[str, ...]            # what the rules cannot do as the table says (a tied readout)

    def __str__(self) -> str:
        table = Table(*SPEC_COLUMNS, "base shape", "class from", box=None)
        for row in self.rows:
            table.add_row(*row.cells())
        buffer = io.StringIO()
        Console(file=buffer, width=400, color_system=None).print(table)  # plain text, never wrapped
        lines = [f"{self.preset}: one row per tensor (m: width multiplier against the base)",
                 *(ln.rstrip() for ln in buffer.getvalue().splitlines())]
        hooked = ", ".join(f"{path} x {mult:.4g}" for path, mult in self.multipliers.items())
        lines.append(f"forward multipliers (hooks; nn.Linear: input, nn.Embedding: output): {hooked or 'none'}")
        if self.unhooked:
            lines.append("multiply in your forward: " + ", ".join(f"{n} x {v:.4g}" for n, v in self.unhooked.items()))
        if self.residual_mult != 1.0:
            lines.append(f"residual branches: x {self.residual_mult:.4g} (Parameterization.residual_mult)")
        return "\n".join([*lines, *self.notes])


class Parameterization:
    """A model's parameterization in force: its per-tensor specs, forward-multiplier hooks and optimizer groups."""

    def __init__(self, model: nn.Module, description: Description):
        self.model = model
        self.description = description
        self.specs: dict[str, TensorSpec] = {row.name: row for row in description.rows}
        self.readout = description.readout
        self.residual_mult = description.residual_mult  # mL^-alpha: the model multiplies its residual branches
        self._handles = [_hook(model.get_submodule(path), mult) for path, mult in description.multipliers.items()]

    def attn_scale(self, head_dim: int, base_head_dim: int) -> float:
        """The attention logits' scale: sqrt(base_head_dim) / head_dim for the muP family, else 1/sqrt(head_dim)."""
        return attention_scale(PRESETS[self.description.preset].mup_attention, head_dim, base_head_dim)

    def param_groups(self, model: nn.Module | None = None) -> list[dict]:
        """torch optimizer groups, one per distinct (class, lr, weight decay, eps), each with params, lr,
        weight_decay, eps, names, cls and base_lr (the peak lr: a torch scheduler scales `lr`).

        `model`: the parameterized model (default), or it wrapped by DDP or torch.compile (names start with
        'module.' or '_orig_mod.') or sharded by FSDP2 (same names, new parameters: build the optimizer after
        `fully_shard`). `independent` decay is lam / lr per group, so AdamW's lr x decay is lam.
        """
        model = self.model if model is None else model
        specs = {name: self.specs[self._own_name(name)] for name, _ in model.named_parameters()}
        return optim.param_groups(model, specs, self.description.wd_mode)

    def __iter__(self) -> Iterator[dict]:
        """So that torch.optim.AdamW(parameterize(...)) takes the groups."""
        return iter(self.param_groups())

    def remove(self) -> None:
        """Remove the forward-multiplier hooks (the weights keep their init)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _own_name(self, name: str) -> str:
        """The parameterized model's name for a (possibly wrapped) model's tensor."""
        while name not in self.specs:
            head, _, rest = name.partition(".")
            if head not in WRAPPER_PREFIXES or not rest:
                raise HptError(f"the model has a tensor {name!r} that parameterize did not see: pass the model "
                               f"parameterize was given (or its DDP, FSDP2 or torch.compile form)")
            name = rest
        return name


def _scale_input(mult: float, module: nn.Module, args: tuple) -> tuple:
    return (args[0] * mult, *args[1:])


def _scale_output(mult: float, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * mult


def _hook(module: nn.Module, mult: float) -> RemovableHandle:
    """An nn.Embedding's output is scaled; an nn.Linear's input, so that its bias is not (as MuReadout does)."""
    if isinstance(module, nn.Embedding):
        return module.register_forward_hook(partial(_scale_output, mult))
    return module.register_forward_pre_hook(partial(_scale_input, mult))


def _choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise HptError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")


def _check_exponents(exponents: Mapping[str, Mapping[str, float]]) -> None:
    for key, given in exponents.items():
        allowed = EXPONENT_KEYS.get(key)
        bad = [k for k in given if k not in allowed] if allowed else [key]
        if bad:
            raise HptError(f"unknown exponent {bad[0]!r} in exponents[{key!r}]: use E, H or R with a, b, c, g, or "
                           f"depth with residual, lr, e.g. exponents={{'R': {{'c': 1.0}}}}")


def _patterns(classes: Mapping[str, str]) -> list[Pattern]:
    out = []
    for pattern, cls in classes.items():
        if cls not in CLASSES:
            raise HptError(f"unknown class {cls!r} for {pattern!r} in classes: use E (embedding), H (hidden), "
                           f"R (readout) or V (vector-like)")
        try:
            out.append((re.compile(pattern), cls, pattern))
        except re.error as e:
            raise HptError(f"{pattern!r} in classes is not a regular expression ({e}): fix it") from None
    return out


def _base_shape(base_shapes: Mapping[str, tuple[int, ...]], name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The base's shape of `name`, or of block 0's tensor when the model is deeper than the base."""
    base = base_shapes.get(name, base_shapes.get(block0_name(name)))
    if base is None:
        nor = f" (nor {block0_name(name)!r})" if block0_name(name) != name else ""
        raise HptError(f"base model has no tensor {name!r}{nor}: the base must be the same model at its base width")
    if len(base) != len(shape):
        raise HptError(f"shape of {name!r} ({'x'.join(map(str, shape))}) does not match the base's "
                       f"({'x'.join(map(str, base))}): the base must be the same model at its base width")
    return base


def _matches(rx: re.Pattern, held: Sequence[Holder], ndim: int) -> bool:
    """A pattern names a tensor by its name, or a matrix by the path of a module holding it."""
    return any(rx.fullmatch(alias) or (ndim >= 2 and rx.fullmatch(path)) for path, _, alias in held)


def _find_readout(model: nn.Module, holders: Mapping[int, list[Holder]], patterns: list[Pattern],
                  base_shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str]:
    """The readout's module path and how it was found: named in `classes` (R), else the nn.Linear whose rows
    are the vocabulary (num_embeddings of an nn.Embedding), rows that do not grow with width."""
    named = {holder[0] for p in model.parameters() for holder in holders[id(p)]
             for rx, cls, _ in patterns if cls == "R" and _matches(rx, [holder], p.ndim)}
    how = "readout: named in classes"
    if not named:
        vocab = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
        weights = {path: m.weight for path, m in model.named_modules()
                   if isinstance(m, nn.Linear) and m.weight.shape[0] in vocab}
        if len(weights) > 1:  # a hidden Linear as wide as the vocabulary at this width: it is not at the base's
            own_name = {id(p): n for n, p in model.named_parameters()}
            weights = {path: w for path, w in weights.items()
                       if _base_shape(base_shapes, own_name[id(w)], tuple(w.shape))[0] == w.shape[0]}
        named = set(weights)
        how = "readout: nn.Linear onto the vocabulary"
    if not named:
        raise HptError("no tensor is classified as the readout (R): name it, e.g. classes={'head': 'R'}")
    if len(named) > 1:
        first = sorted(named)[0]
        raise HptError(f"several tensors could be the readout (R), in {', '.join(sorted(named))}: name one, "
                       f"e.g. classes={{{first!r}: 'R'}}")
    return named.pop(), how


def describe(model: nn.Module, base: nn.Module | Mapping[str, Sequence[int]], preset: str = "mup", *, lr: float,
             weight_decay: float = 0.0, wd_mode: str = "independent", eps: float = 1e-8, init_std: float = 0.02,
             classes: Mapping[str, str] | None = None, exponents: Mapping[str, Mapping[str, float]] | None = None,
             alignment: str = "full", depth: int | None = None, base_depth: int | None = None) -> Description:
    """What `parameterize` with these arguments would do to every tensor of `model`; the model is not changed.

    Classes: a tensor the readout holds is R (E, tied, when an embedding holds it too); else a `classes`
    pattern (re.fullmatch on the tensor's name, or on its module's path for tensors of 2+ dims) decides;
    else 1-D tensors are V, nn.Embedding weights E, nn.Linear weights H, and any other tensor of 2+ dims
    (a raw nn.Parameter) E. Width multiplier: the fan-in (dim 1) ratio for H and R, the width (last dim;
    an nn.Linear's dim 0) ratio for E.
    """
    _choice(preset, CHOICES["param.name"], "preset")
    _choice(wd_mode, CHOICES["optim.wd_mode"], "wd_mode")
    _choice(alignment, CHOICES["param.alignment"], "alignment")
    _check_exponents(exponents or {})
    patterns = _patterns(classes or {})
    depth_given = {k: v for k, v in ((exponents or {}).get("depth") or {}).items() if v is not None}
    alpha = depth_exponent(preset)
    if (alpha > 0 or depth_given) and (depth is None or base_depth is None):
        what = f"preset {preset!r}" if alpha > 0 else "exponents['depth']"
        raise HptError(f"{what} scales with depth: give depth= and base_depth= (the model's and the base's number "
                       f"of blocks)")
    if (depth is None) != (base_depth is None):
        raise HptError("depth and base_depth go together: give both (the model's and the base's number of blocks)")
    m_depth = 1.0 if depth is None else depth / base_depth
    rules = Rules(preset=resolve_preset(preset, exponents), lr=lr, init_std=init_std, eps=eps,
                  weight_decay=weight_decay, wd_mode=wd_mode, alignment=alignment, alpha=alpha,
                  depth_lr=depth_lr_exponent(alpha, depth_given.get("lr")), m_depth=m_depth)
    if isinstance(base, nn.Module):
        base_shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    else:
        base_shapes = {n: tuple(s) for n, s in base.items()}

    holders: dict[int, list[Holder]] = defaultdict(list)  # every module holding a tensor: tied ones have two
    for path, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            holders[id(p)].append((path, module, f"{path}.{attr}" if path else attr))
    readout, readout_how = _find_readout(model, holders, patterns, base_shapes)

    rows, multipliers, unhooked, notes = [], {}, {}, []
    for name, p in model.named_parameters():
        shape, held = tuple(p.shape), holders[id(p)]
        base_shape = _base_shape(base_shapes, name, shape)
        at_readout = p.ndim >= 2 and any(path == readout for path, _, _ in held)
        tied_to = readout if at_readout and len(held) > 1 else None
        owner = next(m for path, m, _ in held if path != readout or len(held) == 1)  # a tied tensor's: the embedding
        hits = [pt for pt in patterns if _matches(pt[0], held, p.ndim)]
        cls, how = _classify(p, owner, readout_how if at_readout else None, tied_to, hits)
        if cls in "HR" and p.ndim < 2:
            raise HptError(f"{name!r} has {p.ndim} dims and class {cls} needs a matrix (out, in): classify it E or V")
        spec = tensor_spec(rules, name, cls, shape, base_shape, blocks=in_blocks(name),
                           width_dim=0 if isinstance(owner, nn.Linear) else -1)
        rows.append(Row(**vars(spec), how=how, base_shape=base_shape, tied_to=tied_to))
        readout_mult = spec.fwd_mult
        if tied_to:
            readout_mult = tensor_spec(rules, name, "R", shape, base_shape, blocks=in_blocks(name)).fwd_mult
            notes += _tied_note(name, readout, preset, rules)
        for path, module, alias in held:  # each holder multiplies by its own class's multiplier
            mult = readout_mult if at_readout and path == readout else spec.fwd_mult
            if mult == 1.0:
                continue
            if isinstance(module, nn.Linear | nn.Embedding):
                multipliers[path] = mult
            else:
                unhooked[alias] = mult
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return Description(preset, tuple(rows), readout, multipliers, unhooked,
                       residual_multiplier(m_depth, alpha, depth_given.get("residual")), wd_mode, tuple(notes))


def _classify(p: nn.Parameter, owner: nn.Module, readout_how: str | None, tied_to: str | None,
              hits: list[Pattern]) -> tuple[str, str]:
    """A tensor's class and how it was decided, from what holds it. `readout_how`: how the readout holding it
    was found (None: no readout holds it); `hits`: the `classes` entries naming it."""
    if tied_to:
        return "E", f"tied to readout {tied_to}"
    if readout_how:
        return "R", readout_how
    for _, cls, text in hits:
        if cls != "R":  # an R pattern names the readout module, handled above
            return cls, f"classes: {text!r}"
    if p.ndim < 2:
        return "V", f"{p.ndim}-D"
    if isinstance(owner, nn.Embedding | nn.Linear):
        return ("E" if isinstance(owner, nn.Embedding) else "H"), f"nn.{type(owner).__name__}"
    return "E", f"raw parameter of {type(owner).__name__}"


def _tied_note(name: str, readout: str, preset: str, rules: Rules) -> list[str]:
    """A tied tensor takes E's init and learning rate: say so where the table's R rule differs."""
    e, r = rules.preset.E, rules.preset.R
    ce, cr = lr_exponent(e, rules.alignment), lr_exponent(r, rules.alignment)
    if (e.b, ce) == (r.b, cr):
        return []
    return [f"{name!r} is tied to the readout {readout}: under {preset} it takes E's init and learning rate "
            f"(b = {e.b:g}, c = {ce:g}), not R's (b = {r.b:g}, c = {cr:g}); untie them for the readout's own rule"]


def parameterize(model: nn.Module, base: nn.Module | Mapping[str, Sequence[int]], preset: str = "mup", *, lr: float,
                 weight_decay: float = 0.0, wd_mode: str = "independent", eps: float = 1e-8, init_std: float = 0.02,
                 classes: Mapping[str, str] | None = None,
                 exponents: Mapping[str, Mapping[str, float]] | None = None, alignment: str = "full",
                 depth: int | None = None, base_depth: int | None = None, init: bool = True) -> Parameterization:
    """Apply a preset of the abc table to `model`, relative to `base` (the same model at its base width).

    Initialises E, H and R tensors ~ N(0, init std) in place (`init=True`; nn.Linear biases to zero, other V
    tensors, such as norm gains, stay as the model made them), hooks the forward multipliers onto the
    nn.Linear (input) and nn.Embedding (output) modules that hold them, and returns the Parameterization:
    its `param_groups` (or the object itself) feed a torch optimizer; the model applies `attn_scale` and
    `residual_mult` itself. Arguments as `describe`; `exponents` overrides the preset's, e.g.
    {"R": {"c": 1.0}} or {"depth": {"residual": 0.5}}.
    """
    description = describe(model, base, preset, lr=lr, weight_decay=weight_decay, wd_mode=wd_mode, eps=eps,
                           init_std=init_std, classes=classes, exponents=exponents, alignment=alignment,
                           depth=depth, base_depth=base_depth)
    if description.unhooked:
        name, mult = next(iter(description.unhooked.items()))
        raise HptError(f"{name!r} needs a forward multiplier of {mult:.4g} under {preset}, which no hook can apply "
                       f"(it is not in an nn.Linear or nn.Embedding): multiply it by that value in your forward "
                       f"(describe shows it), or hold it in an nn.Embedding")
    if init:
        specs = {row.name: row for row in description.rows}
        biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if specs[name].init_std is not None:
                    p.normal_(0.0, specs[name].init_std)
                elif id(p) in biases:  # torch's U(+-1/sqrt(fan_in)) shrinks with width: the check fails it
                    p.zero_()
    return Parameterization(model, description)
