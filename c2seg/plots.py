"""Figures more than one stage draws: the confusion matrix (training's validation, inference's evaluation)
and prediction previews beside their inputs (training's validation)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from c2seg.spec import DatasetSpec  # noqa: E402


def confusion_figure(cm: np.ndarray, spec: DatasetSpec, title: str = "") -> Figure:
    """Row-normalised confusion matrix: truth rows x predicted columns of the scored classes, the last
    column the truth pixels without a prediction (``c2seg.metrics``' K x (K+1) layout)."""
    k = cm.shape[0]
    rows = cm.astype(np.float64) / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    names = [spec.class_name(c) for c in spec.scored_class_ids]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 1.0 + 0.5 * k))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(cm.shape[1]), (names + ["no prediction"])[:cm.shape[1]], rotation=60, ha="right",
                  fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    plt.close(fig)
    return fig


def preview_figure(batch: dict[str, torch.Tensor], pred: torch.Tensor, spec: DatasetSpec) -> Figure:
    """First tile of a batch: a red/green/blue composite (:meth:`DatasetSpec.rgb_bands`), the truth and the
    prediction."""
    name, bands = spec.rgb_bands()
    rgb = batch[name][0, bands].float().numpy().transpose(1, 2, 0)
    rgb = np.clip((rgb + 2) / 4, 0, 1)
    lut = spec.class_lut()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    for ax, (title, im) in zip(axes, ((name, rgb), ("truth", lut[batch["label"][0].numpy().astype(np.uint8)]),
                                      ("prediction", lut[pred[0].numpy().astype(np.uint8)]))):
        ax.imshow(im)
        ax.set_title(title)
        ax.axis("off")
    plt.close(fig)
    return fig
