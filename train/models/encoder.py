"""The shared transformer encoder: pre-norm blocks with torch's scaled_dot_product_attention and
optional activation checkpointing. A block may also cross-attend to a context sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    """Multi-head self-attention, or with ``cross`` attention from ``x`` (queries) to ``context``
    (keys / values)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, cross: bool = False) -> None:
        super().__init__()
        self.heads = heads
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor, parts: int) -> torch.Tensor:
        """(B, T, parts*D) -> (parts, B, heads, T, D/heads)."""
        b, n, d = t.shape
        return t.view(b, n, parts, self.heads, d // (parts * self.heads)).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        if context is None:
            q, k, v = self._heads(self.qkv(x), 3)
        else:
            (q,), (k, v) = self._heads(self.q(x), 1), self._heads(self.kv(context), 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm block: self-attention, with ``cross`` then cross-attention to a context, then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 cross: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        if cross:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, qkv_bias, cross=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


def run_block(block: nn.Module, checkpointing: bool, *args: torch.Tensor | None) -> torch.Tensor:
    """``block(*args)``, recomputed in the backward pass (activation checkpointing) when training with it."""
    if checkpointing and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class TransformerEncoder(nn.Module):
    """``depth`` blocks then a final LayerNorm; (B, T, D) -> (B, T, D). With ``cross`` every block also
    attends to ``context`` (B, S, D)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 checkpointing: bool = False, cross: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, qkv_bias, cross) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = run_block(block, self.checkpointing, x, context)
        return self.norm(x)


def init_weights(module: nn.Module) -> None:
    """ViT initialisation: truncated-normal linear weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
