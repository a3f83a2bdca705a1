"""Masked multimodal reconstruction (MAE over the tokens of all modalities).

Most tokens are hidden (``mask_ratio``), and with probability ``full_modality_mask_prob`` every
token of one modality is hidden, so its pixels must be predicted from the other modalities. The
encoder sees only the visible tokens; a light transformer decoder fills in mask tokens and one
linear head per modality predicts each hidden token's normalised pixels (its spectral group's bands
x p x p). The loss is the MSE on hidden tokens (real bands only), averaged per modality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from c2seg.errors import C2SegError
from c2seg.spec import DatasetSpec
from c2seg.train.config import ModelConfig, PretrainConfig
from c2seg.train.models.backbone import FusionBackbone
from c2seg.train.models.embed import sincos_pos_embed
from c2seg.train.models.encoder import TransformerEncoder, init_weights


class MaskedPretrainer(nn.Module):
    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, pre: PretrainConfig) -> None:
        super().__init__()
        if cfg.fusion != "joint":
            raise C2SegError(f"masked pretraining is implemented for fusion: joint; model '{cfg.name}' has fusion: "
                             f"{cfg.fusion}, whose per-location fusion needs every token of a location: finetune it "
                             "from scratch, or use fusion: joint to pretrain")
        self.cfg, self.pre = cfg, pre
        self.backbone = FusionBackbone(spec, cfg)
        dd = pre.decoder_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(dd))
        groups = {m: e.groups for m, e in self.backbone.embeds.items()}
        self.slot_embed = nn.ParameterDict({m: nn.Parameter(torch.randn(g, dd) * 0.02) for m, g in groups.items()})
        self.decoder = TransformerEncoder(dd, pre.decoder_depth, pre.decoder_heads)
        p = cfg.patch_size
        self.heads = nn.ModuleDict({m: nn.Linear(dd, e.group_bands * p * p) for m, e in self.backbone.embeds.items()})
        init_weights(self)

    def _targets(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patchified pixels (B, G, N, S*p*p) and the matching real-band mask (G, 1, S*p*p)."""
        emb = self.backbone.embeds[name]
        p, g, s = self.cfg.patch_size, emb.groups, emb.group_bands
        b, _, h, w = x.shape
        t = emb.pad_bands(x).view(b, g, s, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        valid = emb.band_valid.view(g, 1, s, 1, 1).expand(g, 1, s, p, p).reshape(g, 1, s * p * p)
        return t.reshape(b, g, (h // p) * (w // p), s * p * p), valid

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and per-modality reconstruction losses for a batch of normalised tiles."""
        names = self.backbone.present(inputs)
        p = self.cfg.patch_size
        for m in names:
            if inputs[m].shape[-1] % p or inputs[m].shape[-2] % p:
                raise C2SegError(f"pretraining tiles must be multiples of the patch size {p}")
        tokens = self.backbone.embed(inputs, names)
        b, _, n, d = tokens[names[0]].shape
        counts = [tokens[m].shape[1] * n for m in names]
        seq = torch.cat([tokens[m].reshape(b, -1, d) for m in names], dim=1)
        total = seq.shape[1]
        keep = max(1, int(round(total * (1 - self.pre.mask_ratio))))
        noise = torch.rand(b, total, device=seq.device)
        if len(names) > 1:  # hide one whole modality in some samples
            hide = torch.rand(b, device=seq.device) < self.pre.full_modality_mask_prob
            which = torch.randint(len(names), (b,), device=seq.device)
            owner = torch.repeat_interleave(torch.arange(len(names), device=seq.device),
                                            torch.tensor(counts, device=seq.device))
            noise = noise + (hide[:, None] & (owner[None] == which[:, None])).float() * 2.0
            keep = min(keep, total - max(counts))
        order = noise.argsort(dim=1)
        visible = order[:, :keep]
        encoded = self.backbone.encoder(seq.gather(1, visible[..., None].expand(-1, -1, d)))
        dd = self.pre.decoder_dim
        full = self.mask_token.to(encoded.dtype).expand(b, total, dd).clone()
        full.scatter_(1, visible[..., None].expand(-1, -1, dd), self.decoder_embed(encoded))
        h, w = inputs[names[0]].shape[-2] // p, inputs[names[0]].shape[-1] // p
        pos = sincos_pos_embed(h, w, dd, seq.device).to(full.dtype)
        slots = torch.cat([(self.slot_embed[m][:, None, :] + pos[None]).reshape(-1, dd) for m in names])
        decoded = self.decoder(full + slots[None])
        masked = torch.ones(b, total, device=seq.device, dtype=torch.bool)
        masked.scatter_(1, visible, False)
        losses, start = {}, 0
        for m, count in zip(names, counts):
            pred = self.heads[m](decoded[:, start:start + count]).view(b, -1, n, self.heads[m].out_features)
            target, valid = self._targets(m, inputs[m])
            hidden = masked[:, start:start + count].view(b, -1, n, 1)
            weight = (hidden & valid[None]).to(pred.dtype)
            err = F.mse_loss(pred, target.to(pred.dtype), reduction="none")
            losses[m] = (err * weight).sum() / weight.sum().clamp(min=1)
            start += count
        loss = torch.stack(list(losses.values())).mean()
        return loss, {f"recon_{m}": float(v.detach()) for m, v in losses.items()}
