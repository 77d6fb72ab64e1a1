"""The parameterization table: the one place that knows what each preset does.

Every preset is, per parameter class X (E embedding, H hidden matrix, R readout,
V vector-like), the exponents of the abc table (docs/science.md#the-abc-table): forward
multiplier m^(-a), init std sigma * m^(-b), learning rate eta * gamma * m^(-c), Adam epsilon
eps * m^(-g); plus depth scaling (CompleteP / depth-muP, docs/science.md#depth) with exponent
alpha. `tensor_spec` is the one per-tensor rule (LR, init std, forward multiplier, epsilon, decay):
`tensor_specs` applies it to the built-in GPT from a config, `train.parameterization` to any
module. The model and the optimizer read the specs and nothing else. `class_lr` is the one
per-class learning-rate rule: training and `hpt predict` both ask it.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from omegaconf import DictConfig, OmegaConf

from hptransfer.config.schema import CHOICES, MUP_FAMILY, OPTIMIZER_PRESETS
from hptransfer.errors import HptError

CLASSES = ("E", "H", "R", "V")


@dataclass(frozen=True)
class ABC:
    """Width exponents of one class: multiplier m^-a, init m^-b, LR m^-c (c_none: no alignment), eps m^-g."""

    a: float
    b: float
    c: float
    g: float
    c_none: float | None = None  # LR exponent under param.alignment=none (None: same as c)

    def shifted(self, t: float) -> "ABC":
        """The abc symmetry for Adam: a+t, b-t, c-t (and eps scales with the gradient, g+t)."""
        c_none = None if self.c_none is None else self.c_none - t
        return ABC(self.a + t, self.b - t, self.c - t, self.g + t, c_none)


@dataclass(frozen=True)
class Preset:
    E: ABC
    H: ABC
    R: ABC
    depth_alpha: float = 0.0     # residual branches x mL^-alpha (0: no depth scaling)
    mup_attention: bool = False  # attention logits scale 1/d_head (as sqrt(d_head_base)/d_head)
    V: ABC = ABC(0, 0, 0, 0)  # vector-like: only an optimizer's own LR rule (SGD's) scales it, by its length


_SP = Preset(E=ABC(0, 0, 0, 0.5), H=ABC(0, 0.5, 0, 0.5), R=ABC(0, 0.5, 0, 0))
_MUP_EVERETT = Preset(
    E=ABC(-0.5, 0.5, 0.5, 0.5),
    H=ABC(0, 0.5, 1, 1, c_none=0.5),
    R=ABC(0.5, 0.5, 0.5, 0.5, c_none=0),
    mup_attention=True,
)
# microsoft/mup's form: mup_everett moved by the symmetry with t = 1/2 on E and R, 0 on H.
_MUP = replace(_MUP_EVERETT, E=_MUP_EVERETT.E.shifted(0.5), R=_MUP_EVERETT.R.shifted(0.5))

# The abc table of docs/science.md#the-abc-table, row for row.
PRESETS: dict[str, Preset] = {
    "sp": _SP,
    "sp_emb": replace(_SP, E=ABC(0, 0, -1, 0.5)),
    "sp_perlayer": replace(_SP, H=ABC(0, 0.5, 1, 0.5, c_none=0.5), R=ABC(0, 0.5, 1, 0, c_none=0.5)),
    "ntk": Preset(E=ABC(0, 0, 0, 0.5), H=ABC(0.5, 0, 0.5, 1, c_none=0), R=ABC(0.5, 0, 0.5, 0.5, c_none=0)),
    "mfp": Preset(E=ABC(0, 0, 0, 1), H=ABC(0.5, 0, 0.5, 1.5, c_none=0), R=ABC(1, 0, 0, 1, c_none=-0.5)),
    "mup_everett": _MUP_EVERETT,
    "mup": _MUP,
    "completep": replace(_MUP, depth_alpha=1.0),
    "depth_mup": replace(_MUP, depth_alpha=0.5),
}
if tuple(PRESETS) != CHOICES["param.name"]:  # the schema lists the names users may choose: the same ones
    raise ImportError(f"PRESETS {tuple(PRESETS)} and the schema's param.name choices differ")
# Optimizer families (docs/science.md#other-optimizer-families). The abc rows above are for Adam-like updates,
# normalized per coordinate (AdamW, Adam-atan2, and Lion, a sign update). Another update keeps the preset's a and b
# but has its own LR exponents: OPTIMIZER_LR[optimizer][preset][class] = (c, c under alignment=none), each
# replacing the Adam row's; a class it leaves out keeps the Adam row (Muon trains E, R and V with AdamW).
# Everett et al. 2024 (arXiv 2407.05872) give SGD and Adafactor for sp, ntk, mup, mfp; the rows here are derived
# as their Adam rows are (full alignment: a layer's output change is LR x per-entry gradient summed over its fan-in)
# and checked against their symmetries (SGD: c - 2t; Adafactor: c unchanged) and, for mup, MuSGD.
_SGD = {
    # "Standard practice": one global LR at every width, as sp does under Adam (no rule; the coord check fails it).
    "sp": {"E": (0, None), "H": (0, None), "R": (0, None), "V": (0, None)},
    # Everett et al.'s SGD rows (derived). Backward signal per hidden coordinate n^-(a_R + b_R): SP, NTK n^-1/2;
    # muP, MFP 1/n.
    # SP: E -1/2 (embedding gradient n^-1/2), H 1/2 (n^-1/2 gradient summed over n), R 1 (O(1) gradient over n).
    "sp_perlayer": {"E": (-0.5, None), "H": (0.5, 0), "R": (1, 0.5), "V": (-0.5, None)},
    # NTK = SP moved by the SGD symmetry (a + t, b - t, c - 2t) with t = (0, 1/2, 1/2): c = SP's - (0, 1, 1).
    "ntk": {"E": (-0.5, None), "H": (-0.5, -1), "R": (0, -0.5), "V": (-0.5, None)},
    # MFP = muP (Everett's) moved by t = 1/2 on every class: c = muP's - 1.
    "mfp": {"E": (-1, None), "H": (-1, -1.5), "R": (-1, -1.5), "V": (-1, None)},
    # muP for SGD (Tensor Programs IV/V): every c = 0 in Everett's a, b.
    "mup_everett": {"E": (0, None), "H": (0, -0.5), "R": (0, -0.5), "V": (-1, None)},
    # microsoft/mup's form (MuSGD): E and R moved by t = 1/2, so LR x m on them (vector-like: x fan-out), H flat.
    "mup": {"E": (-1, None), "H": (0, -0.5), "R": (-1, -1.5), "V": (-1, None)},
}
# V (gains, biases) under SGD: its gradient is the backward signal times O(1) inputs, as an embedding's with a = b = 0,
# so c_V is E's in the presets whose E has a = b = 0 (MuSGD's "vector-like x fan-out": -1 under muP). No alignment
# sum reaches E or V: their c is the same under alignment=none; H and R lose 1/2 (a sum over n becomes sqrt(n)).
_ADAFACTOR = {
    # Adafactor's step is lr x RMS(parameter) x a normalized update (torch.optim.Adafactor, no momentum): the RMS
    # supplies the init's m^-b, so c = Adam's c - b (Everett et al.'s Adafactor column), invariant under the
    # abc symmetry: mup and mup_everett agree. sp: one global LR, as under Adam.
    "sp": {"E": (0, None), "H": (0, None), "R": (0, None)},
    "sp_perlayer": {"E": (0, None), "H": (0.5, 0), "R": (0.5, 0)},
    "ntk": {"E": (0, None), "H": (0.5, 0), "R": (0.5, 0)},
    "mfp": {"E": (0, None), "H": (0.5, 0), "R": (0, -0.5)},
    "mup_everett": {"E": (0, None), "H": (0.5, 0), "R": (0, -0.5)},
    "mup": {"E": (0, None), "H": (0.5, 0), "R": (0, -0.5)},
}
# Muon on H, AdamW (the preset's Adam row) on E, R and V. Muon's orthogonalized update has spectral norm ~1 times
# torch's "original" (Jordan's) factor sqrt(max(1, fan_out / fan_in)), fixed at a fixed aspect ratio; the spectral
# condition (Yang, Simon & Bernstein 2023) wants ||dW_eff|| ~ sqrt(fan_out / fan_in), W_eff = m^-a_H W: c_H = -a_H,
# so width-independent for sp and muP (Muon's own practice: one lr, e.g. 0.02, at every width).
_MUON = {name: {"H": (-PRESETS[name].H.a, None)}
         for name in ("sp", "sp_emb", "sp_perlayer", "ntk", "mfp", "mup_everett", "mup")}
OPTIMIZER_LR: dict[str, dict[str, dict[str, tuple[float, float | None]]]] = {
    "sgd": _SGD, "adafactor": _ADAFACTOR, "muon": _MUON,
}
# The classes whose update has an Adam epsilon (eps m^-g); the others' specs carry none (eps None).
EPS_CLASSES: dict[str, str] = {"adamw": "EHRV", "adam_atan2": "EHRV", "sgd": "", "adafactor": "", "lion": "",
                               "muon": "ERV"}
if set(EPS_CLASSES) != set(CHOICES["optim.name"]):
    raise ImportError(f"EPS_CLASSES {tuple(EPS_CLASSES)} and the schema's optim.name choices differ")
if {k: tuple(v) for k, v in OPTIMIZER_LR.items()} != OPTIMIZER_PRESETS:  # the schema rejects the other pairs
    raise ImportError("OPTIMIZER_LR's presets per optimizer and the schema's OPTIMIZER_PRESETS differ")
if {n for n, p in PRESETS.items() if p.mup_attention} != set(MUP_FAMILY):  # the schema's init.scheme check uses it
    raise ImportError(f"the schema's MUP_FAMILY {MUP_FAMILY} is not the presets with mup_attention")


@dataclass(frozen=True)
class TensorSpec:
    """What the parameterization decides for one parameter tensor."""

    name: str
    cls: str            # E | H | R | V
    shape: tuple[int, ...]
    width_mult: float   # m: fan_in ratio (H, R) or width ratio (E); 1 for V
    init_std: float | None  # None: V (gains are ones, biases zeros)
    fwd_mult: float     # forward multiplier on this tensor's output
    lr: float           # base (peak) learning rate of this tensor
    weight_decay: float  # decay coefficient as the optimizer applies it (see wd_mode)
    eps: float | None   # Adam epsilon (None: the tensor's optimizer has none)

    def cells(self, v_init: str = "ones") -> list[str]:
        """The row `hpt params` prints (SPEC_COLUMNS); `v_init` says what a V tensor starts as."""
        std = v_init if self.init_std is None else f"{self.init_std:.4g}"
        return [self.name, "x".join(map(str, self.shape)), self.cls, f"{self.width_mult:g}", std,
                f"{self.fwd_mult:.4g}", f"{self.lr:.4g}", f"{self.weight_decay:.4g}",
                "-" if self.eps is None else f"{self.eps:.3g}"]


SPEC_COLUMNS = ("tensor", "shape", "class", "m", "init std", "fwd mult", "lr", "weight decay", "eps")


@dataclass(frozen=True)
class Rules:
    """Everything the per-tensor rule reads besides the tensor: the table row and the base hyperparameters.

    The built-in GPT fills it from a config (`rules_of`), `parameterize` from its arguments.
    """

    preset: Preset
    lr: float
    init_std: float
    eps: float
    weight_decay: float = 0.0
    wd_mode: str = "independent"
    alignment: str = "full"
    per_layer_eps: bool = False  # optim.eps_scaling=per_layer
    wd_on_embeddings: bool = False
    constant_init: bool = False  # init.scheme=constant: every b = 0
    lr_mult: Mapping[str, float] = field(default_factory=dict)    # gamma_X (absent: 1)
    init_mult: Mapping[str, float] = field(default_factory=dict)
    out_mult: Mapping[str, float] = field(default_factory=dict)
    alpha: float = 0.0     # depth exponent (0: no depth scaling)
    depth_lr: float = 0.0  # H and in-block V LRs x mL^-depth_lr
    m_depth: float = 1.0   # mL = L / L_base
    optimizer: str = "adamw"  # optim.name: which classes have an Adam epsilon (EPS_CLASSES); `preset` has its LRs


def classify(name: str, shape: tuple[int, ...]) -> str:
    """Parameter class from the model's naming: embeddings E, readout R, 1-D V, other matrices H."""
    if name.endswith("_emb.weight"):
        return "E"
    if name.startswith("lm_head."):
        return "R"
    return "V" if len(shape) == 1 else "H"


def block0_name(name: str) -> str:
    """Block i's tensor is compared with block 0's of the base model (depth changes the count): every
    numeric path component (a ModuleList index) becomes 0."""
    return ".".join("0" if part.isdigit() else part for part in name.split("."))


def in_blocks(name: str) -> bool:
    """A tensor inside a repeated block: its name has a numeric path component (depth scales it)."""
    return any(part.isdigit() for part in name.split("."))


def for_optimizer(name: str, optimizer: str = "adamw") -> Preset:
    """Preset `name`'s row for `optimizer`: the Adam row with the optimizer's own LR exponents (OPTIMIZER_LR)."""
    preset = PRESETS[name]
    if optimizer not in OPTIMIZER_LR:
        return preset
    if name not in OPTIMIZER_LR[optimizer]:
        raise HptError(f"config key 'optim.name': {optimizer} has no published width rule for param={name}: use "
                       f"param={' | '.join(OPTIMIZER_LR[optimizer])}, or optim=adamw")
    changes = {cls: replace(getattr(preset, cls), c=c, c_none=c_none)
               for cls, (c, c_none) in OPTIMIZER_LR[optimizer][name].items()}
    return replace(preset, **changes)


def resolve_preset(name: str, exponents: Mapping[str, Mapping[str, float | None]] | None = None,
                   optimizer: str = "adamw") -> Preset:
    """The preset's row for `optimizer` with `param.exponents` applied: a set exponent replaces the preset's (a set
    c serves both alignments), so a user can define a parameterization and check it (`hpt coord-check`)."""
    preset = for_optimizer(name, optimizer)
    changes = {}
    for cls in ("E", "H", "R"):
        given = {k: float(v) for k, v in ((exponents or {}).get(cls) or {}).items() if v is not None}
        if given:
            changes[cls] = replace(getattr(preset, cls), **given, **({"c_none": None} if "c" in given else {}))
    return replace(preset, **changes) if changes else preset


def preset_of(cfg: DictConfig) -> Preset:
    """The table row `cfg` trains with: its preset and any exponent overrides."""
    exponents = cfg.param.get("exponents")
    return resolve_preset(cfg.param.name, OmegaConf.to_container(exponents) if exponents is not None else None,
                          cfg.optim.name)


def depth_exponent(preset: str, override: float | None = None) -> float:
    """The depth exponent alpha: `param.depth_alpha` when set, else the preset's own."""
    return PRESETS[preset].depth_alpha if override is None else float(override)


def depth_alpha(cfg: DictConfig) -> float:
    return depth_exponent(cfg.param.name, cfg.param.depth_alpha)


def depth_lr_exponent(alpha: float, override: float | None = None) -> float:
    """The hidden LRs' depth exponent: H and the gains in blocks train at lr x mL^-(this).

    1 - alpha with depth scaling (alpha > 0); 0 when alpha = 0, which means no depth scaling at all,
    not the alpha -> 0 limit of the rule (that would give hidden LRs 1/mL: SP stays SP when deeper).
    `param.exponents.depth.lr` overrides it.
    """
    if override is not None:
        return float(override)
    return 1.0 - alpha if alpha > 0 else 0.0


def _depth_override(cfg: DictConfig, key: str) -> float | None:
    depth = (cfg.param.get("exponents") or {}).get("depth") or {}
    return depth.get(key)


def residual_multiplier(m_depth: float, alpha: float, override: float | None = None) -> float:
    """Every residual branch is added as x + mL^-alpha * branch(norm(x)) (`override` replaces the exponent)."""
    exponent = alpha if override is None else float(override)
    return m_depth ** -exponent


def residual_mult(cfg: DictConfig) -> float:
    """The built-in GPT's residual multiplier (param.exponents.depth.residual overrides the exponent)."""
    return residual_multiplier(cfg.model.n_layers / cfg.param.base_depth, depth_alpha(cfg),
                               _depth_override(cfg, "residual"))


def lr_exponent(abc: ABC, alignment: str) -> float:
    """c_X; param.alignment=none changes it (and only it) where the table says so."""
    return abc.c_none if (alignment == "none" and abc.c_none is not None) else abc.c


def class_lr(preset: Preset, cls: str, *, lr: float, gamma: float, m: float, alignment: str, depth_lr: float,
             m_depth: float, in_blocks: bool) -> float:
    """The learning rate of a tensor of class `cls` under `preset`: eta * gamma_X * m^(-c_X), and for
    H and the gains in blocks x mL^-depth_lr (`depth_lr_exponent`: mL^(alpha - 1) with depth scaling)."""
    out = lr * gamma * m ** (-lr_exponent(getattr(preset, cls), alignment))
    if cls == "H" or (cls == "V" and in_blocks):
        out *= m_depth ** (-depth_lr)
    return out


def uses_mup_attention(cfg: DictConfig) -> bool:
    scale = cfg.model.attn_scale
    return scale == "inv" or (scale == "auto" and PRESETS[cfg.param.name].mup_attention)


def attention_scale(mup: bool, head_dim: int, base_head_dim: int) -> float:
    """Attention logits' scale: muP's 1/d_head, written sqrt(d_head_base) / d_head so that it equals SP's
    1/sqrt(d_head) at the base model (docs/science.md#the-abc-table)."""
    return math.sqrt(base_head_dim) / head_dim if mup else 1.0 / math.sqrt(head_dim)


def rules_of(cfg: DictConfig) -> Rules:
    """The built-in GPT's rules, from its run config."""
    p, o = cfg.param, cfg.optim
    alpha = depth_alpha(cfg)
    return Rules(
        preset=preset_of(cfg), lr=o.lr, init_std=cfg.init.std, eps=o.eps, weight_decay=o.weight_decay,
        wd_mode=o.wd_mode, alignment=p.alignment, per_layer_eps=o.eps_scaling == "per_layer",
        wd_on_embeddings=o.wd_on_embeddings, constant_init=cfg.init.scheme == "constant", lr_mult=dict(p.lr_mult),
        init_mult=dict(p.init_mult), out_mult=dict(p.out_mult), alpha=alpha,
        depth_lr=depth_lr_exponent(alpha, _depth_override(cfg, "lr")), m_depth=cfg.model.n_layers / p.base_depth,
        optimizer=o.name,
    )


def tensor_spec(rules: Rules, name: str, cls: str, shape: tuple[int, ...], base: tuple[int, ...], *,
                blocks: bool, zero_init: bool = False, width_dim: int = -1) -> TensorSpec:
    """The rule for one tensor of class `cls`, shape `shape` (`base` at the base width): its learning rate,
    init std, forward multiplier, epsilon and decay. `blocks`: it sits in a repeated block (depth scales it);
    `width_dim`: the dimension along which an embedding (E) grows."""
    preset = rules.preset
    if cls == "V":
        abc, m = preset.V, 1.0
    else:
        abc = getattr(preset, cls)
        # Weights are (out, in): dim 1 is the fan-in of H and R, and an embedding's width is its last dim
        # (a Linear used as an embedding: dim 0), the dimension whose growth each rule is stated against.
        dim = width_dim if cls == "E" else 1
        m = shape[dim] / base[dim]
    b = 0.0 if rules.constant_init else abc.b
    m_lr = shape[0] / base[0] if cls == "V" else m  # a vector's LR rule (SGD's) is stated against its length
    lr = class_lr(preset, cls, lr=rules.lr, gamma=rules.lr_mult.get(cls, 1.0), m=m_lr, alignment=rules.alignment,
                  depth_lr=rules.depth_lr, m_depth=rules.m_depth, in_blocks=blocks)
    eps: float | None
    if cls not in EPS_CLASSES[rules.optimizer]:
        eps = None
    elif not rules.per_layer_eps:
        eps = rules.eps
    elif cls == "V":  # gains: H's width exponent on the width ratio (CompleteP's reference, docs/science.md#depth)
        eps = rules.eps * (shape[0] / base[0]) ** (-preset.H.g)
    else:
        eps = rules.eps * m ** (-abc.g)
    if eps is not None and rules.alpha > 0 and rules.per_layer_eps and (cls == "H" or (cls == "V" and blocks)):
        eps *= rules.m_depth ** (-rules.alpha)
    if cls == "V":
        init_std = None
    elif zero_init:
        init_std = 0.0
    else:
        init_std = rules.init_std * rules.init_mult.get(cls, 1.0) * m ** (-b)
    return TensorSpec(
        name=name,
        cls=cls,
        shape=tuple(shape),
        width_mult=m,
        init_std=init_std,
        fwd_mult=rules.out_mult.get(cls, 1.0) * m ** (-abc.a),
        lr=lr,
        weight_decay=_weight_decay(rules, cls, m, lr_exponent(abc, rules.alignment)),
        eps=eps,
    )


def tensor_specs(
    cfg: DictConfig, shapes: dict[str, tuple[int, ...]], base_shapes: dict[str, tuple[int, ...]]
) -> dict[str, TensorSpec]:
    """One TensorSpec per parameter of the built-in GPT, from the config and its shapes at target and base size."""
    rules, p = rules_of(cfg), cfg.param
    specs = {}
    for name, shape in shapes.items():
        cls = classify(name, shape)
        zero = (cls == "R" and p.zero_readout) or (p.zero_query and name.endswith("attn.q.weight"))
        specs[name] = tensor_spec(rules, name, cls, shape, base_shapes[block0_name(name)], blocks=in_blocks(name),
                                  zero_init=zero)
    return specs


def _weight_decay(rules: Rules, cls: str, m: float, c: float) -> float:
    """Decay on H and R (E only if asked, V never). `scaled`: lam times the inverse of the tensor's whole LR
    factor (`class_lr` without gamma_X): m^c_X, and for H the depth factor mL^-depth_lr inverted, so lr * decay
    stays constant across width and depth (docs/science.md#weight-decay)."""
    if cls == "V" or (cls == "E" and not rules.wd_on_embeddings):
        return 0.0
    if rules.wd_mode == "scaled":
        depth_lr = rules.depth_lr if cls == "H" else 0.0
        return rules.weight_decay * m**c * rules.m_depth ** depth_lr
    return rules.weight_decay
