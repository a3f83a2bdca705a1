"""Exported models: a weights file of kind ``model`` (train/weights.py: consolidated weights, the model
config, the dataset spec and the normalisation, checksummed), loadable with ``weights_only=True`` and
without DeepSpeed. ``modalities`` lists what the model was trained with (it accepts any non-empty subset,
having been trained with modality dropout).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from c2seg.errors import C2SegError
from c2seg.spec import DatasetSpec, spec_from_dict
from c2seg.train.checkpoint import BEST_DIR, CheckpointError, load_weights
from c2seg.train.config import ModelConfig, model_config_from_dict
from c2seg.train.models import FusionSegmenter
from c2seg.train.weights import Weights, read_weights, save_weights

log = logging.getLogger("c2seg.train")


@dataclass
class ExportedModel:
    model: FusionSegmenter
    spec: DatasetSpec
    model_config: ModelConfig
    normalization: dict[str, dict[str, list[float]]]
    modalities: list[str]
    tile_size: int
    normalization_mode: str = "pooled"  # per_city: each city standardised with its own statistics
    city_normalization: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    # partial adaptation's classes of the target city (train/finetune.py); None: every scored class
    target_classes: list[int] | None = None

    def normalization_for(self, city: str) -> dict[str, dict[str, list[float]]]:
        """The ``{modality: {"mean", "std"}}`` statistics to normalise ``city``'s inputs with: the pooled ones,
        or for a ``per_city`` model the city's own (an error for a city the model has none for)."""
        if self.normalization_mode == "pooled":
            return self.normalization
        if city not in self.city_normalization:
            raise C2SegError(f"the model standardises each city with its own statistics and has none for city "
                             f"'{city}' (it has {sorted(self.city_normalization)}); prepare the city with "
                             "`c2seg data prep` alongside the training cities, or train with "
                             "data.normalization=pooled")
        return self.city_normalization[city]


def export_model(run_dir: str | Path, out: str | Path, weights: str = "auto") -> Path:
    """Write a finetune run's weights as an exported model file. ``weights``: ``student`` (the validated model
    of the newest checkpoint), ``ema`` (its mean teacher), ``best`` (the student of the best val mIoU, kept by
    ``finetune.keep_best``), or ``auto``: ``best`` when the run kept one, else ``student``."""
    best = Path(run_dir) / BEST_DIR / "weights.pt"
    if weights == "auto":
        weights = "best" if best.is_file() else "student"
    if weights == "best" and not best.is_file():
        raise CheckpointError(f"{run_dir}: the run kept no best weights (finetune.keep_best was off)")
    saved = load_weights(best if weights == "best" else run_dir)
    if saved.task != "finetune":
        raise CheckpointError(f"{run_dir}: a {saved.task} run has no segmentation head; export a "
                              "finetune run (pretrained encoders are used with init_from)")
    if weights == "ema" and "ema" not in saved.extra:
        raise CheckpointError(f"{run_dir}: the run has no EMA teacher (finetune.adapt was off)")
    state_dict = saved.extra["ema"] if weights == "ema" else saved.state_dict
    kept = {"target_classes": saved.extra["target_classes"]} if "target_classes" in saved.extra else {}
    save_weights(out, replace(saved, kind="model", state_dict=state_dict, extra=kept))
    log.info("exported %s weights of %s (step %d) to %s", weights, run_dir, saved.step, out)
    return Path(out)


def save_exported(out: str | Path, model_config: dict, spec: dict, state_dict: dict[str, torch.Tensor],
                  normalization: dict[str, dict[str, list[float]]], modalities: list[str] | tuple[str, ...],
                  tile_size: int, step: int = 0) -> Path:
    """Write weights that were not trained by a c2seg run (e.g. fresh ones) as an exported model file."""
    return save_weights(out, Weights(kind="model", task="finetune", step=step, state_dict=state_dict,
                                     model_config=model_config, spec=spec, normalization=normalization,
                                     modalities=list(modalities), tile_size=tile_size))


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> ExportedModel:
    """Load an exported model (eval mode) with its spec and normalisation; no DeepSpeed needed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    saved = read_weights(path, kind="model", map_location=map_location)
    spec = spec_from_dict(saved.spec, source=str(path))
    cfg = model_config_from_dict(saved.model_config, source=str(path))
    model = FusionSegmenter(spec, cfg)
    model.load_state_dict(saved.state_dict)
    model.to(map_location).eval()
    return ExportedModel(model, spec, cfg, saved.normalization, list(saved.modalities), int(saved.tile_size),
                         saved.normalization_mode, saved.city_normalization, saved.extra.get("target_classes"))
