"""Segmentation scores as the C2Seg baseline computes them.

A confusion matrix over pixels whose truth is a scored class; the prediction is the argmax over the
scored classes only (so a model can never "predict" the ignore class). From it: per-class IoU and
F1, mIoU (the ranking metric), overall accuracy, macro-F1 and Cohen's kappa.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, class_ids: tuple[int, ...] | list[int]) -> np.ndarray:
    """Counts over pixels whose truth is in ``class_ids``: a ``K x (K + 1)`` int64 matrix, rows truth,
    columns prediction; the last column counts predictions outside ``class_ids`` (e.g. nodata 0),
    which are misses that credit no class."""
    ids = np.asarray(class_ids, dtype=np.int64)
    k = len(ids)
    lut = np.full(256, k, dtype=np.int64)  # anything else -> the extra column
    lut[ids] = np.arange(k)
    truth = np.asarray(truth).ravel()
    pred = np.asarray(pred).ravel()
    if truth.shape != pred.shape:
        raise ValueError(f"truth has {truth.size} pixels, prediction {pred.size}")
    t = lut[truth.astype(np.int64) & 255]
    keep = t < k
    p = lut[pred.astype(np.int64)[keep] & 255]
    return np.bincount(t[keep] * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1).astype(np.int64)


@dataclass
class Scores:
    """Scores derived from a confusion matrix (values in 0..1)."""

    class_ids: list[int]
    iou: list[float]
    f1: list[float]
    support: list[int]
    miou: float
    oa: float
    macro_f1: float
    kappa: float

    def as_dict(self, class_names: dict[int, str] | None = None) -> dict[str, Any]:
        names = class_names or {}
        return {
            "miou": self.miou, "oa": self.oa, "macro_f1": self.macro_f1, "kappa": self.kappa,
            "per_class": [
                {"id": c, "name": names.get(c, str(c)), "iou": i, "f1": f, "support": s}
                for c, i, f, s in zip(self.class_ids, self.iou, self.f1, self.support)
            ],
        }


def scores_from_confusion(cm: np.ndarray, class_ids: list[int] | tuple[int, ...]) -> Scores:
    """IoU / F1 per class, mIoU and macro-F1 over classes present in truth or prediction, OA, kappa."""
    cm = np.asarray(cm, dtype=np.float64)
    k = len(class_ids)
    square = cm[:, :k]
    tp = np.diag(square)
    support = cm.sum(axis=1)  # truth pixels per class, misses included
    predicted = square.sum(axis=0)
    fp = predicted - tp
    fn = support - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    total = support.sum()
    oa = float(tp.sum() / total) if total else 0.0
    pe = float((support * predicted).sum() / total**2) if total else 0.0
    kappa = (oa - pe) / (1 - pe) if pe < 1 else 0.0
    present = ~np.isnan(iou)
    return Scores(
        class_ids=list(class_ids),
        iou=[float(x) if not np.isnan(x) else 0.0 for x in iou],
        f1=[float(x) if not np.isnan(x) else 0.0 for x in f1],
        support=[int(x) for x in support],
        miou=float(np.nanmean(iou)) if present.any() else 0.0,
        oa=oa,
        macro_f1=float(np.nanmean(f1)) if present.any() else 0.0,
        kappa=float(kappa),
    )
