"""Fit the segmenter's per-pixel head to the labelled pixels before training (``finetune.pixel_head_init: fit``).

The per-pixel head (``pixel_head: true``) is a linear classifier of the bands, added to the logits. Trained by
the network's optimiser from zero it learns only what the rest of the model leaves: on a small EnMAP-like set
it reached 65 % mIoU alone, where a logistic regression of the same pixels reaches 100 %, and the model as a
whole lost rare classes to context it had memorised. So a fresh run first fits the head as that logistic
regression (multinomial, L-BFGS, L2 of weight 1 / pixels on the weights and none on the bias, as scikit-learn's
default C = 1: with the bias penalised too, the fit of a small EnMAP-like set of the second generator scored
58.6 % test mIoU against scikit-learn's 67.5 %), and training then learns the spatial context as a correction of
it (linear probing before fine-tuning, as in LP-FT).

The pixels are every labelled pixel of the source cities' train tiles, read once, normalised as in training
but not augmented; at most ``max_pixels`` over all ranks, a uniform sample (bottom-k of random keys, so memory
stays bounded whatever the split's size). Every rank keeps its own share; each evaluation of the loss sums the
ranks' losses and gradients (``reduce_tensor``), so every rank takes the same L-BFGS steps and ends with the
same head."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from c2seg.distributed import reduce_tensor, world_size
from c2seg.train.models.segmenter import pixel_features

log = logging.getLogger("c2seg.train")


def sample_labelled_pixels(batches: Iterable[dict[str, torch.Tensor]], modalities: list[str], keep_ids: torch.Tensor,
                           max_pixels: int, seed: int, means: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x (N, features), y (N,))``: the pixels of ``batches`` whose label is in ``keep_ids``, what the
    per-pixel head reads of ``modalities`` (their bands and window ``means``, :func:`pixel_features`) side by
    side; at most ``max_pixels``, a uniform sample of them (the smallest random keys)."""
    gen = torch.Generator().manual_seed(seed)
    xs: torch.Tensor | None = None
    ys, keys = torch.empty(0, dtype=torch.long), torch.empty(0)
    for batch in batches:
        if batch.get("padding"):
            continue
        label = batch["label"].long()
        keep = torch.isin(label, keep_ids)
        bands = torch.cat([pixel_features(batch[m].float(), means) for m in modalities], dim=1)  # (B, C, H, W)
        x = bands.permute(0, 2, 3, 1)[keep]
        xs, ys = (x if xs is None else torch.cat([xs, x])), torch.cat([ys, label[keep]])
        keys = torch.cat([keys, torch.rand(len(x), generator=gen)])
        if len(keys) > max_pixels:
            kept = keys.topk(max_pixels, largest=False).indices
            xs, ys, keys = xs[kept], ys[kept], keys[kept]
    return (xs if xs is not None else torch.empty(0, 0)), ys


ABSENT_MARGIN = 10.0  # a class without labelled pixels starts this far (in logits) below the least likely one


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_logits: int, max_iter: int = 1000,
                 class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression of ``y`` on ``x`` over the pixels of every rank (collective):
    ``(weight (num_logits, bands), bias (num_logits,))`` minimising the mean cross-entropy plus
    ``|weight|^2 / (2 N)`` (N: the pixels of all ranks), the bias not penalised, as scikit-learn's
    LogisticRegression at C = 1; by L-BFGS with a strong-Wolfe line search. The classes no pixel has are left
    out of the fit (their optimum is at minus infinity) and get weight 0 and a bias ABSENT_MARGIN below the
    others' smallest."""
    bands = x.shape[1]
    counts = reduce_tensor(torch.bincount(y, minlength=num_logits)[:num_logits])
    total = float(counts.sum())
    if total == 0:
        raise ValueError("no labelled pixels to fit")
    present = counts > 0
    weight = torch.zeros(num_logits, bands, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_logits, dtype=torch.float64, requires_grad=True)
    x64 = x.double()
    absent = torch.where(present, 0.0, -torch.inf).double()
    cw = class_weights.double() if class_weights is not None else None
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        local = F.cross_entropy(x64 @ weight.T + bias + absent, y, weight=cw, reduction="sum") if len(y) else \
            (weight.sum() + bias.sum()) * 0
        local.backward()
        flat = torch.cat([local.detach().reshape(1), weight.grad.reshape(-1), bias.grad])
        summed = reduce_tensor(flat) / total
        with torch.no_grad():
            weight.grad.copy_(summed[1:1 + weight.numel()].reshape_as(weight) + weight / total)
            bias.grad.copy_(summed[1 + weight.numel():])
            return summed[0] + (weight ** 2).sum() / (2 * total)

    opt.step(closure)
    with torch.no_grad():
        bias[~present] = bias[present].min() - ABSENT_MARGIN
    return weight.detach().float(), bias.detach().float()


def fit_pixel_head(module, batches: Iterable[dict[str, torch.Tensor]], modalities: list[str],
                   keep_ids: torch.Tensor, num_logits: int, max_pixels: int, seed: int, rank: int,
                   class_weights: torch.Tensor | None = None, means: tuple[int, ...] = ()) -> None:
    """Set ``module.pixel`` (one 1x1 convolution per modality, their outputs summed) to the logistic regression
    of the labelled pixels of ``batches`` (collective), read with the head's window ``means``: each modality gets
    its features' columns, the first one the bias."""
    t0 = time.perf_counter()
    x, y = sample_labelled_pixels(batches, modalities, keep_ids, max(1, max_pixels // world_size()), seed * 1000 + rank,
                                  means)
    weight, bias = fit_logistic(x, y, num_logits, class_weights=class_weights)
    with torch.no_grad():
        start = 0
        for i, m in enumerate(modalities):
            conv = module.pixel[m]
            channels = conv.weight.shape[1]
            conv.weight.copy_(weight[:, start:start + channels, None, None])
            conv.bias.copy_(bias if i == 0 else torch.zeros_like(bias))
            start += channels
    with torch.no_grad():
        accuracy = float(((x @ weight.T + bias).argmax(1) == y).float().mean()) if len(y) else 0.0
    log.info("per-pixel head fitted to %d labelled pixels on rank %d in %.1f s (train accuracy %.3f)",
             len(y), rank, time.perf_counter() - t0, accuracy)
