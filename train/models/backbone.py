"""The fusion backbone: every present modality's tokens, with position, modality and spectral-group
embeddings, are fused by one shared transformer encoder into one token per location.

``fusion: joint``: all G*N tokens (G modality / group tokens at each of N locations) attend jointly
(:class:`TransformerEncoder`), so any token sees every modality at every location. ``fusion: cross``:
per-location fusion, then self-attention over N fused tokens + cross-attention to the G*N tokens
(:class:`CrossFusionEncoder`). Accuracy and cost of both: ``python benchmarks/bench_train.py fusion``.
Joint is the default. It is more accurate: after 300 source-only fine-tuning steps on the generated AB-like
cities (demo model, 64 px tiles), 25.1 % target mIoU against 18.9 % for cross (OA 78.1 vs 68.6 %). And masked
pretraining hides single tokens and whole modalities, which needs tokens that stand alone (cross fusion needs
every token of a location). Cross costs less: with the AB modalities (G = 6) and the demo model, 4.5 vs 9.3
forward GFLOP per 128 px tile (1.05 vs 1.53 at 64 px; 99 vs 132 s for those 300 steps on 2 cores) for 33 %
more parameters.
In both, a missing modality is simply absent from the token set, so the same weights serve any subset of
modalities.
"""

from __future__ import annotations

import torch
from torch import nn

from c2seg.errors import C2SegError
from c2seg.spec import DatasetSpec
from c2seg.train.config import ModelConfig
from c2seg.train.models.cross_fusion import CrossFusionEncoder
from c2seg.train.models.embed import SpectralPatchEmbed, sincos_pos_embed
from c2seg.train.models.encoder import TransformerEncoder


class FusionBackbone(nn.Module):
    def __init__(self, spec: DatasetSpec, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.modalities = spec.modality_names
        self.embeds = nn.ModuleDict({m.name: SpectralPatchEmbed(m, cfg) for m in spec.modalities})
        self.modality_embed = nn.Parameter(torch.randn(len(self.modalities), cfg.embed_dim) * 0.02)
        encoder = CrossFusionEncoder if cfg.fusion == "cross" else TransformerEncoder
        self.encoder = encoder(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias,
                               cfg.activation_checkpointing)

    def present(self, inputs: dict[str, torch.Tensor]) -> list[str]:
        """The model's modalities found in ``inputs``, in spec order."""
        names = [m for m in self.modalities if m in inputs]
        if not names:
            raise C2SegError(f"no input modality: the model expects some of {list(self.modalities)}, "
                             f"got {sorted(inputs)}")
        return names

    def embed(self, inputs: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """Tokens (B, G, N, D) per modality in ``names``, with every embedding added."""
        tokens = {}
        for name in names:
            x = inputs[name]
            tok = self.embeds[name](x)
            h, w = x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size
            pos = sincos_pos_embed(h, w, self.cfg.embed_dim, tok.device).to(tok.dtype)
            tokens[name] = tok + pos[None, None] + self.modality_embed[self.modalities.index(name)][None, None, None]
        return tokens

    def forward(self, inputs: dict[str, torch.Tensor], drop: str | None = None) -> torch.Tensor:
        """Fused features (B, D, H/p, W/p), one per location. ``drop`` (training): a modality left out of the
        tokens; it is still embedded (zero-weighted) so every rank runs the same modules in the same order with
        the same parameters used, which ZeRO-3 gathering and data-parallel reduction rely on."""
        names = self.present(inputs)
        tokens = self.embed(inputs, names)
        unused = tokens.pop(drop).sum() * 0.0 if drop is not None else None
        stacked = torch.cat(list(tokens.values()), dim=1)  # (B, G, N, D)
        b, g, n, d = stacked.shape
        if self.cfg.fusion == "cross":
            fused = self.encoder(stacked)
        else:  # joint attention over all G*N tokens, then the mean over the G tokens of each location
            fused = self.encoder(stacked.reshape(b, g * n, d)).view(b, g, n, d).mean(dim=1)
        if unused is not None:
            fused = fused + unused
        x = inputs[names[0]]
        h, w = x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size
        return fused.transpose(1, 2).reshape(b, d, h, w)
