"""A GPT-style decoder in one file: embeddings, pre-norm blocks, final norm, untied readout.

The model knows nothing about parameterizations. It takes plain-float forward
multipliers per tensor, a residual-branch multiplier and an attention scale;
`build` asks the table in param.py for those and for each tensor's init.
Shapes: B batch, T time, C width, H heads, K kv heads, D head size, V vocab.

A fused group of runs (train/fused.py) is the same model with every weight stacked: N copies along a
leading dimension, (N, *shape), and tokens (N, B, T): each copy sees its own rows, so the layers
below take any leading dimensions `*` before (T, C) and batch the N copies' matmuls as one.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from hptransfer.config.derived import heads_and_dim
from hptransfer.train.param import TensorSpec, attention_scale, residual_mult, tensor_specs, uses_mup_attention


@dataclass(frozen=True)
class Dims:
    vocab: int
    width: int
    n_layers: int
    n_heads: int
    head_dim: int
    n_kv_heads: int
    d_ff: int
    mlp: str
    pos: str
    max_seq_len: int
    norm_gains: bool


def dims_of(cfg: DictConfig, width: int | None = None, n_layers: int | None = None) -> Dims:
    m = cfg.model
    width = m.width if width is None else width
    n_heads, head_dim, n_kv = heads_and_dim(m, width)
    return Dims(
        vocab=cfg.data.vocab_size, width=width, n_layers=m.n_layers if n_layers is None else n_layers,
        n_heads=n_heads, head_dim=head_dim, n_kv_heads=n_kv, d_ff=round(m.mlp_ratio * width),
        mlp=m.mlp, pos=m.pos, max_seq_len=m.max_seq_len, norm_gains=m.norm_gains,
    )


def per_copy(w: torch.Tensor, x: torch.Tensor, dims: int) -> torch.Tensor:
    """A weight of `dims` dims as it broadcasts against x: as it is, or stacked (N, *shape) as (N, 1.., *shape)."""
    return w if w.dim() == dims else w.view(w.shape[0], *[1] * (x.dim() - dims - 1), *w.shape[1:])


Mult = float | torch.Tensor  # a forward multiplier: a constant, or in a fused group one per copy, (N,)


def scaled(y: torch.Tensor, mult: Mult) -> torch.Tensor:
    """y times a forward multiplier; per copy (in the parameters' dtype, fp32 or fp64) along y's leading copy
    dimension, computed as a constant is (bf16 y in fp32, rounded back), so each copy's product is its unfused
    run's."""
    if isinstance(mult, torch.Tensor):
        return (y * mult.view(-1, *[1] * (y.dim() - 1))).to(y.dtype)
    return y if mult == 1.0 else y * mult


class Linear(nn.Module):
    """Bias-free linear map y = mult * x W^T; `mult` is a constant, so torch.compile folds it."""

    def __init__(self, fan_in: int, fan_out: int, mult: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in))
        self.mult: Mult = float(mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dim() == 2:
            y = F.linear(x, w)
        else:  # stacked (N, out, in), x (N, *, in): one batched matmul over the copies
            y = torch.bmm(x.flatten(1, -2), w.mT).view(*x.shape[:-1], w.shape[1])
        return scaled(y, self.mult)


class Embedding(nn.Embedding):
    """A table's rows (V, C) for idx (B, T); stacked, (N, V, C) for idx (N, B, T): copy n's rows of its own table."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dim() == 2:
            return F.embedding(idx, w)
        offsets = torch.arange(w.shape[0], device=idx.device).view(-1, *[1] * (idx.dim() - 1)) * w.shape[1]
        return F.embedding(idx + offsets, w.flatten(0, 1))  # one lookup in the N tables laid end to end


class RMSNorm(nn.Module):
    def __init__(self, dim: int, gains: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if gains else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x if self.weight is None else x * per_copy(self.weight, x, 1)


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (T, D/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); rotate the two halves of D by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, d: Dims, mults: dict[str, float], scale: float):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = d.n_heads, d.n_kv_heads, d.head_dim
        # in a fused group of several scales: each scale -> its copies' indices, (n,)
        self.scale: float | dict[float, torch.Tensor] = scale
        self.q = Linear(d.width, d.n_heads * d.head_dim, mults.get("q", 1.0))
        self.k = Linear(d.width, d.n_kv_heads * d.head_dim, mults.get("k", 1.0))
        self.v = Linear(d.width, d.n_kv_heads * d.head_dim, mults.get("v", 1.0))
        self.o = Linear(d.n_heads * d.head_dim, d.width, mults.get("o", 1.0))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        *lead, T, _ = x.shape  # lead: (B,), or (N, B) in a fused group: attention sees B x N sequences
        q = self.q(x).reshape(-1, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).reshape(-1, T, self.n_kv, self.head_dim).transpose(1, 2)    # (B, K, T, D)
        v = self.v(x).reshape(-1, T, self.n_kv, self.head_dim).transpose(1, 2)    # (B, K, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = self.attend(q, k, v)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(*lead, T, self.n_head * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention at `scale`; copies of different scales (N x B sequences, copy n's B together)
        attend apart, each scale's copies in one call, so each copy's result is its unfused run's."""
        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=self.n_kv != self.n_head)

        if not isinstance(self.scale, dict):
            return sdpa(q, k, v, self.scale)
        n = sum(len(idx) for idx in self.scale.values())
        qs, ks, vs = (t.view(n, -1, *t.shape[1:]) for t in (q, k, v))  # (N, B, H, T, D)
        y = torch.empty_like(qs)
        for scale, idx in self.scale.items():
            y[idx] = sdpa(*(t[idx].flatten(0, 1) for t in (qs, ks, vs)), scale).view(len(idx), *qs.shape[1:])
        return y.flatten(0, 1)


class MLP(nn.Module):
    def __init__(self, d: Dims, mults: dict[str, float]):
        super().__init__()
        self.swiglu = d.mlp == "swiglu"
        self.up = Linear(d.width, d.d_ff, mults.get("up", 1.0))
        self.gate = Linear(d.width, d.d_ff, mults.get("gate", 1.0)) if self.swiglu else None
        self.down = Linear(d.d_ff, d.width, mults.get("down", 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x))  # (B, T, d_ff)
        return self.down(h)


class Block(nn.Module):
    def __init__(self, d: Dims, mults: dict[str, float], attn_scale: float, res_mult: float):
        super().__init__()
        self.res_mult: Mult = res_mult
        self.norm1 = RMSNorm(d.width, d.norm_gains)
        self.attn = Attention(d, {k[5:]: v for k, v in mults.items() if k.startswith("attn.")}, attn_scale)
        self.norm2 = RMSNorm(d.width, d.norm_gains)
        self.mlp = MLP(d, {k[4:]: v for k, v in mults.items() if k.startswith("mlp.")})

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + scaled(self.attn(self.norm1(x), rope), self.res_mult)
        return x + scaled(self.mlp(self.norm2(x)), self.res_mult)


class GPT(nn.Module):
    """`mults` maps a module path ('lm_head', 'blocks.3.attn.q', 'tok_emb') to its forward multiplier."""

    def __init__(self, d: Dims, mults: dict[str, float] | None = None, attn_scale: float | None = None,
                 res_mult: float = 1.0):
        super().__init__()
        mults = mults or {}
        self.dims = d
        self.tok_emb = Embedding(d.vocab, d.width)
        self.pos_emb = Embedding(d.max_seq_len, d.width) if d.pos == "learned" else None
        self.emb_mult: Mult = mults.get("tok_emb", 1.0)
        self.pos_mult: Mult = mults.get("pos_emb", 1.0)
        scale = 1.0 / math.sqrt(d.head_dim) if attn_scale is None else attn_scale
        self.blocks = nn.ModuleList(
            Block(d, {k[len(f"blocks.{i}."):]: v for k, v in mults.items() if k.startswith(f"blocks.{i}.")},
                  scale, res_mult)
            for i in range(d.n_layers)
        )
        self.norm_f = RMSNorm(d.width, d.norm_gains)
        self.lm_head = Linear(d.width, d.vocab, mults.get("lm_head", 1.0))
        if d.pos == "rope":
            cos, sin = rope_tables(d.head_dim, d.max_seq_len)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, V); fused, (N, B, T) -> (N, B, T, V)."""
        T = idx.shape[-1]
        x = scaled(self.tok_emb(idx), self.emb_mult)                      # (B, T, C)
        if self.pos_emb is not None:
            x = x + scaled(per_copy(self.pos_emb.weight[..., :T, :], x, 2), self.pos_mult)
        rope = (self.rope_cos[:T], self.rope_sin[:T]) if self.dims.pos == "rope" else None
        for block in self.blocks:
            x = block(x, rope)
        return self.lm_head(self.norm_f(x))                               # (B, T, V)


def param_shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, computed without allocating (meta device)."""
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in GPT(d).named_parameters()}


def param_specs(cfg: DictConfig) -> dict[str, TensorSpec]:
    """What the parameterization table says for every tensor of this config's model."""
    base = dims_of(cfg, width=cfg.param.base_width, n_layers=cfg.param.base_depth)
    return tensor_specs(cfg, param_shapes(dims_of(cfg)), param_shapes(base))


def build(cfg: DictConfig) -> tuple[GPT, dict[str, TensorSpec]]:
    """The model for `cfg`, initialised as its parameterization says (seed first for reproducibility)."""
    d = dims_of(cfg)
    base = dims_of(cfg, width=cfg.param.base_width, n_layers=cfg.param.base_depth)
    specs = param_specs(cfg)
    mults = {name.rsplit(".", 1)[0]: s.fwd_mult for name, s in specs.items() if s.cls != "V"}
    attn_scale = attention_scale(uses_mup_attention(cfg), d.head_dim, base.head_dim)
    model = GPT(d, mults, attn_scale, residual_mult(cfg))
    init_weights(model, specs)
    return model, specs


@torch.no_grad()
def init_weights(model: nn.Module, specs: dict[str, TensorSpec]) -> None:
    for name, p in model.named_parameters():
        std = specs[name].init_std
        if std is None:
            p.fill_(1.0)  # V: RMSNorm gains
        else:
            p.normal_(0.0, std)
