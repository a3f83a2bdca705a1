"""Exported models: one torch.save file with consolidated weights, the model config, the dataset spec
and the normalisation, loadable with ``weights_only=True`` and without DeepSpeed.

``{"format": "c2seg-model/1", "model_config", "spec", "state_dict", "normalization", "modalities",
"tile_size", "normalization_mode", "city_normalization"}``; ``normalization`` holds the pooled statistics,
``city_normalization`` each prepared city's (used when ``normalization_mode`` is ``per_city``);
``modalities`` lists what the model was trained with (it accepts any non-empty subset, having been
trained with modality dropout). ``tensor_sha256`` (train.checkpoint.tensors_sha256) is checked on load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from c2seg.spec import DatasetSpec, spec_from_dict
from train.checkpoint import CheckpointError, _first_line, load_weights, save_weights_file, verify_tensors
from train.config import ModelConfig, model_config_from_dict
from train.models import FusionSegmenter

FORMAT = "c2seg-model/1"
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

    def normalization_for(self, city: str) -> dict[str, dict[str, list[float]]]:
        """The ``{modality: {"mean", "std"}}`` statistics to normalise ``city``'s inputs with: the pooled ones,
        or for a ``per_city`` model the city's own (an error for a city the model has none for)."""
        if self.normalization_mode == "pooled":
            return self.normalization
        if city not in self.city_normalization:
            raise ValueError(f"the model standardises each city with its own statistics and has none for city "
                             f"'{city}' (it has {sorted(self.city_normalization)}); prepare the city with "
                             "`c2seg data prep` alongside the training cities, or train with "
                             "data.normalization=pooled")
        return self.city_normalization[city]


def export_model(run_dir: str | Path, out: str | Path, weights: str = "student") -> Path:
    """Write the newest checkpoint of a finetune run as an exported model file. ``weights``: ``student``
    (the validated model) or ``ema`` (the mean teacher)."""
    data = load_weights(run_dir)
    if data.get("task") != "finetune":
        raise CheckpointError(f"{run_dir}: a {data.get('task')} run has no segmentation head; export a "
                              "finetune run (pretrained encoders are used with init_from)")
    if weights == "ema" and "ema" not in data:
        raise CheckpointError(f"{run_dir}: the run has no EMA teacher (finetune.adapt was off)")
    save_exported(out, data["model_config"], data["spec"], data["ema" if weights == "ema" else "model"],
                  data["normalization"], data["modalities"], data["tile_size"], data["step"],
                  data.get("normalization_mode", "pooled"), data.get("city_normalization", {}))
    log.info("exported %s weights of %s (step %d) to %s", weights, run_dir, data["step"], out)
    return Path(out)


def save_exported(out: str | Path, model_config: dict, spec: dict, state_dict: dict[str, torch.Tensor],
                  normalization: dict[str, dict[str, list[float]]], modalities: list[str], tile_size: int,
                  step: int = 0, normalization_mode: str = "pooled",
                  city_normalization: dict[str, dict[str, dict[str, list[float]]]] | None = None) -> None:
    """Write an exported model file (the layout in the module doc)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights_file(out, {"format": FORMAT, "model_config": model_config, "spec": spec, "state_dict": state_dict,
                            "normalization": normalization, "modalities": list(modalities), "tile_size": tile_size,
                            "step": step, "normalization_mode": normalization_mode,
                            "city_normalization": city_normalization or {}})


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> ExportedModel:
    """Load an exported model (eval mode) with its spec and normalisation; no DeepSpeed needed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable model file ({_first_line(exc)})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a c2seg exported model (format {FORMAT} expected)")
    missing = [k for k in ("model_config", "spec", "state_dict", "normalization", "modalities", "tile_size")
               if k not in data]
    if missing:
        raise CheckpointError(f"{path}: not a complete c2seg exported model (no {', '.join(missing)})")
    verify_tensors(data, path)
    spec = spec_from_dict(data["spec"], source=str(path))
    cfg = model_config_from_dict(data["model_config"], source=str(path))
    model = FusionSegmenter(spec, cfg)
    model.load_state_dict(data["state_dict"])
    model.to(map_location).eval()
    return ExportedModel(model, spec, cfg, data["normalization"], list(data["modalities"]), int(data["tile_size"]),
                         data.get("normalization_mode", "pooled"), data.get("city_normalization", {}))
