"""Per-location fusion + cross-attention (``fusion: cross``): (B, G, N, D) modality / spectral-group
tokens -> (B, N, D) fused tokens.

At each of the N locations the G tokens attend among themselves (one block over sequences of length G)
and are averaged into one fused token. ``depth`` blocks then run self-attention over the N fused tokens
and cross-attention from them to all G*N tokens (layer-normed once; each block's key / value projection
absorbs any per-block scale). Attention costs O(N^2 + G N^2) per block instead of O(G^2 N^2) for joint
attention, and the MLPs run on N tokens instead of G*N.
"""

from __future__ import annotations

import torch
from torch import nn

from c2seg.train.models.encoder import Block, TransformerEncoder, run_block


class CrossFusionEncoder(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 checkpointing: bool = False) -> None:
        super().__init__()
        self.local = Block(dim, heads, mlp_ratio, qkv_bias)
        self.context_norm = nn.LayerNorm(dim)
        self.fused = TransformerEncoder(dim, depth, heads, mlp_ratio, qkv_bias, checkpointing, cross=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, G, N, D) -> (B, N, D)."""
        b, g, n, d = tokens.shape
        local = run_block(self.local, self.fused.checkpointing, tokens.transpose(1, 2).reshape(b * n, g, d))
        fused = local.view(b, n, g, d).mean(dim=2)
        return self.fused(fused, self.context_norm(tokens.reshape(b, g * n, d)))
