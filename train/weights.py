"""The one weights format: a checkpoint's ``weights.pt`` and an exported model are the same kind of file,
written by :func:`save_weights` and read by :func:`read_weights`, with ``weights_only`` and a checksum.

One ``torch.save`` dict: ``{"format": "c2seg-weights", "version": 2, "kind", "task", "step", "state_dict",
"model_config", "spec", "normalization", "modalities", "tile_size", "normalization_mode",
"city_normalization", "extra", "tensor_sha256"}``.

- ``kind``: ``checkpoint`` (a training checkpoint's consolidated weights; ``extra`` holds the task's state
  such as the EMA teacher, the classes kept while adapting and the critic) or ``model`` (an exported model:
  what inference needs; ``extra`` holds ``target_classes``, partial adaptation's classes, when there are).
- ``task``: ``pretrain`` (an encoder, no segmentation head) or ``finetune`` (a whole segmenter).
- ``normalization``: the pooled statistics ``{modality: {"mean", "std"}}``; ``city_normalization`` each
  prepared city's (used when ``normalization_mode`` is ``per_city``).
- ``tensor_sha256``: sha256 over every tensor (nested ones too) with its name, dtype and shape; a file whose
  tensors differ from it, or hold NaN / inf, is refused naming the file.

Files of version 1 (``c2seg-weights/1`` checkpoints with ``model``, ``c2seg-model/1`` exports with
``state_dict``) are read and upgraded in memory.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from c2seg.errors import C2SegError
from c2seg.io import atomic_path

log = logging.getLogger("c2seg.train")
FORMAT = "c2seg-weights"
VERSION = 2
TENSOR_CHECKSUM = "tensor_sha256"
Kind = Literal["checkpoint", "model"]
Normalization = dict[str, dict[str, list[float]]]
REQUIRED = ("kind", "task", "step", "state_dict", "model_config", "spec", "normalization", "modalities", "tile_size")


class CheckpointError(C2SegError):
    """A checkpoint or weights / model file is missing, unreadable, damaged, or does not fit this run."""


@dataclass
class Weights:
    """The content of a weights file (see the module doc)."""

    kind: Kind
    task: str
    step: int
    state_dict: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    spec: dict[str, Any]
    normalization: Normalization
    modalities: list[str]
    tile_size: int
    normalization_mode: str = "pooled"
    city_normalization: dict[str, Normalization] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def first_line(exc: BaseException) -> str:
    """The informative line of an error: torch's weights-only errors open with a paragraph of advice."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(advice)]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _tensors(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a weights file's dict (nested dicts too) with its dotted name; the checksum itself is
    left out."""
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _tensors(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor) and f"{prefix}{key}" != TENSOR_CHECKSUM:
            yield f"{prefix}{key}", value


def tensors_sha256(data: dict[str, Any]) -> str:
    """sha256 over every tensor of ``data`` in sorted order of names, each with its name, dtype and shape."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_tensors(data), key=lambda item: item[0]):
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_weights(path: str | Path, weights: Weights) -> Path:
    """Write ``weights`` atomically (a reader never sees half a file), with the checksum of its tensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, **vars(weights)}  # not asdict: it would deep-copy every tensor
    with atomic_path(path) as tmp:
        torch.save({**data, TENSOR_CHECKSUM: tensors_sha256(data)}, tmp)
    return path


def _upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 file's dict in version 2's layout."""
    v1 = data.get("format")
    if v1 == "c2seg-model/1":
        return {**data, "kind": "model", "task": "finetune", "extra": {}}
    known = {"format", "model", "model_config", "spec", "task", "step", "normalization", "modalities", "tile_size",
             "normalization_mode", "city_normalization", TENSOR_CHECKSUM}
    return {**{k: v for k, v in data.items() if k in known}, "kind": "checkpoint", "state_dict": data["model"],
            "extra": {k: v for k, v in data.items() if k not in known}}


def _verify(data: dict[str, Any], path: Path) -> None:
    """Refuse tensors that are not the ones saved (their checksum differs) or hold NaN / inf, naming the file
    (and the tensor); a file without a checksum (older c2seg) gets a warning."""
    saved = data.get(TENSOR_CHECKSUM)
    if saved is None:
        log.warning("%s: no tensor checksum (written by an older c2seg version); loaded without verifying it", path)
    elif saved != tensors_sha256(data):
        raise CheckpointError(f"{path}: its tensors do not match the checksum stored when it was saved (the file "
                              "is damaged); use another checkpoint or export it again")
    bad = next((name for name, t in _tensors(data) if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad} holds NaN or inf values; these weights cannot be used")


def read_weights(path: str | Path, kind: Kind | None = None, map_location: str | torch.device = "cpu",
                 verify: bool = True) -> Weights:
    """Read a weights file (of ``kind`` when given), checked against its checksum unless ``verify`` is off
    (a quick look at its configs, e.g. before a resume; the full read checks it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True, mmap=not verify)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"{path}: not a readable c2seg weights file ({first_line(exc)})") from exc
    if not isinstance(data, dict) or data.get("format") not in (FORMAT, "c2seg-weights/1", "c2seg-model/1"):
        raise CheckpointError(f"{path}: not a c2seg weights file (no format {FORMAT})")
    if data["format"] == FORMAT and data.get("version") != VERSION:
        raise CheckpointError(f"{path}: weights format version {data.get('version')}, this c2seg reads up to "
                              f"{VERSION}; use a newer c2seg")
    if verify:  # before an upgrade: the checksum covers the names the file was written with
        _verify(data, path)
    if data["format"] != FORMAT:
        data = _upgraded(data)
    missing = [n for n in REQUIRED if n not in data]
    if missing:
        raise CheckpointError(f"{path}: not a complete c2seg weights file (no {', '.join(missing)})")
    if kind is not None and data["kind"] != kind:
        raise CheckpointError(f"{path}: a {data['kind']} file, a {kind} file is needed here"
                              + ("; export a finetune run with `c2seg train export`" if kind == "model" else ""))
    return Weights(**{n: data[n] for n in Weights.__dataclass_fields__ if n in data})
