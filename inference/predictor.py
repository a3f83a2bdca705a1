"""Batched model application on normalised windows: softmax over the scored classes, test-time
augmentation by flips or the eight dihedral (D4) transforms with averaged probabilities, bf16
autocast on GPU."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

Tta = Literal["none", "flips", "d4"]
log = logging.getLogger("c2seg.infer")

Transform = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def _flip(dims: tuple[int, ...]) -> Transform:
    return (lambda x: torch.flip(x, dims)), (lambda x: torch.flip(x, dims))


def _rot(k: int, flip: bool) -> Transform:
    if flip:
        return (lambda x: torch.rot90(torch.flip(x, (-1,)), k, (-2, -1))), \
               (lambda x: torch.flip(torch.rot90(x, -k, (-2, -1)), (-1,)))
    return (lambda x: torch.rot90(x, k, (-2, -1))), (lambda x: torch.rot90(x, -k, (-2, -1)))


def tta_transforms(tta: Tta) -> list[Transform]:
    """(forward, inverse) pairs on (B, C, H, W) tensors: the identity first, then the augmentations."""
    identity = (lambda x: x), (lambda x: x)
    if tta == "none":
        return [identity]
    if tta == "flips":
        return [identity, _flip((-1,)), _flip((-2,))]
    if tta == "d4":
        return [identity] + [_rot(k, False) for k in (1, 2, 3)] + [_rot(k, True) for k in (0, 1, 2, 3)]
    raise ValueError(f"tta must be one of none, flips, d4; got {tta!r}")


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """``model(dict of (B, C, H, W) tensors) -> logits (B, L, H, W)`` turned into probabilities
    ``(B, K, H, W)`` float32 over ``class_ids`` (softmax over those logits only, so the ignore class is
    never predicted), averaged over the TTA transforms; the classes ``absent`` get probability 0."""

    def __init__(self, model: nn.Module, class_ids: tuple[int, ...], device: torch.device | str = "cpu",
                 tta: Tta = "none", absent: tuple[int, ...] = ()) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.class_index = torch.as_tensor(class_ids, dtype=torch.long, device=self.device)
        self.logit_shift = torch.tensor([-torch.inf if c in absent else 0.0 for c in class_ids],
                                        device=self.device)[None, :, None, None]
        self.transforms = tta_transforms(tta)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Probabilities for a batch of normalised windows (numpy in, numpy out)."""
        batch = {m: torch.from_numpy(np.ascontiguousarray(v)).to(self.device, non_blocking=True)
                 for m, v in inputs.items()}
        total = None
        for forward, inverse in self.transforms:
            with self._autocast():
                logits = self.model({m: forward(x) for m, x in batch.items()})
            probs = torch.softmax(logits.float().index_select(1, self.class_index) + self.logit_shift, dim=1)
            probs = inverse(probs)
            total = probs if total is None else total + probs
        if len(self.transforms) > 1:
            total = total / len(self.transforms)
        return total.cpu().numpy()
