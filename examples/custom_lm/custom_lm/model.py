"""A small GPT written the usual PyTorch way, knowing nothing of hptransfer.

It differs from hptransfer's built-in GPT where user models often do: a fixed number of heads (so
the head size grows with width), one fused q/k/v projection, biases, LayerNorm, learned positions
held as a raw nn.Parameter, and a readout tied to the token embedding. The attention scale and the
residual multiplier are constructor arguments: a parameterization supplies them
(`Parameterization.attn_scale`, `.residual_mult`).
Shapes: B batch, T time, C width, H heads, D head size (C / H), V vocab.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, n_heads: int, attn_scale: float, residual_mult: float):
        super().__init__()
        self.n_heads, self.attn_scale, self.residual_mult = n_heads, attn_scale, residual_mult
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)   # q, k and v in one matrix: (3C, C)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)                                   # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        logits = (q @ k.transpose(-2, -1)) * self.attn_scale                    # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        weights = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (weights @ v).transpose(1, 2).reshape(B, T, C)                      # (B, T, C)
        return self.proj(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.residual_mult * self.attention(self.ln1(x))
        return x + self.residual_mult * self.down(F.gelu(self.up(self.ln2(x))))


class CustomLM(nn.Module):
    def __init__(self, vocab: int, width: int, n_layers: int, n_heads: int = 4, max_len: int = 64, *,
                 attn_scale: float | None = None, residual_mult: float = 1.0, tie: bool = True):
        super().__init__()
        scale = 1.0 / math.sqrt(width // n_heads) if attn_scale is None else attn_scale
        self.wte = nn.Embedding(vocab, width)                                   # (V, C)
        self.pos = nn.Parameter(torch.zeros(1, max_len, width))                 # (1, T_max, C), learned
        self.blocks = nn.ModuleList(Block(width, n_heads, scale, residual_mult) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)                      # (V, C)
        if tie:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, V)."""
        x = self.wte(idx) + self.pos[:, : idx.shape[1]]                         # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))                                       # (B, T, V)
