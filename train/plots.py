"""Figures logged during training: the validation confusion matrix and target prediction previews."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from c2seg.spec import DatasetSpec  # noqa: E402


def confusion_figure(cm: np.ndarray, spec: DatasetSpec):
    """Row-normalised confusion matrix (truth x prediction) of the scored classes."""
    k = cm.shape[0]
    square = cm[:, :k].astype(float)
    norm = square / np.maximum(square.sum(1, keepdims=True), 1)
    names = [spec.class_name(c) for c in spec.scored_class_ids]
    fig, ax = plt.subplots(figsize=(1 + 0.5 * k, 1 + 0.5 * k))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    plt.close(fig)
    return fig


def _colour(ids: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    lut = np.zeros((256, 3), dtype=np.uint8)
    for c in spec.classes:
        lut[c.id] = c.rgb
    return lut[ids.astype(np.uint8)]


def preview_figure(batch: dict[str, torch.Tensor], pred: torch.Tensor, spec: DatasetSpec):
    """First tile of a batch: an image band composite, the truth and the prediction."""
    name = next(m for m in spec.modality_names if m in batch)
    img = batch[name][0].float().numpy()
    rgb = img[[min(2, len(img) - 1), min(1, len(img) - 1), 0]].transpose(1, 2, 0)
    rgb = np.clip((rgb + 2) / 4, 0, 1)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    for ax, (title, im) in zip(axes, ((name, rgb), ("truth", _colour(batch["label"][0].numpy(), spec)),
                                      ("prediction", _colour(pred[0].numpy(), spec)))):
        ax.imshow(im)
        ax.set_title(title)
        ax.axis("off")
    plt.close(fig)
    return fig
