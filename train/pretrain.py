"""``c2seg train pretrain``: masked multimodal reconstruction on the train tiles of every city,
source and target alike (labels unused; test cities never), with city-balanced sampling."""

from __future__ import annotations

import torch

from c2seg.errors import C2SegError
from c2seg.spec import DatasetSpec
from c2seg.train.config import ModelConfig, TrainConfig
from c2seg.train.data import batch_stream, model_inputs, select_cities
from c2seg.train.determinism import rng_isolated
from c2seg.train.engine import engine_dtype
from c2seg.train.loop import Task
from c2seg.train.models import MaskedPretrainer
from c2seg.train.weights import Weights


class PretrainTask(Task):
    name = "pretrain"

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, spec: DatasetSpec, data) -> None:
        self.cfg, self.spec, self.data = cfg, spec, data
        self.module = MaskedPretrainer(spec, model_cfg, cfg.pretrain)
        cities = select_cities(spec, cfg.data, data.manifest)
        self.cities = list(dict.fromkeys(cities.sources + cities.targets))

    def start(self, engine, first_batch: int) -> None:
        d = self.cfg.data
        weights = {c: 1.0 / len(self.cities) for c in self.cities}  # every city drawn equally often

        def make(epoch: int):
            return self.data.loader("train", self.cities, radiometric=d.radiometric, batch_size=d.batch_size,
                                    num_workers=d.num_workers, rank=engine.global_rank, world_size=engine.world_size,
                                    city_weights=weights, augment=d.augment, batches_per_epoch=d.batches_per_epoch,
                                    seed=self.cfg.seed, epoch=epoch)

        self.stream = rng_isolated(batch_stream(make, d.batches_per_epoch, first_batch))
        self.dtype = engine_dtype(self.cfg)

    def micro_loss(self, engine, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = model_inputs(next(self.stream), self.spec.modality_names, self.dtype, engine.device)
        return engine(inputs)

    def init_from(self, weights: Weights) -> None:
        load_backbone(self.module, weights)


def load_backbone(module: torch.nn.Module, weights: Weights) -> None:
    """Copy the ``backbone.*`` weights of a checkpoint / exported model into ``module``; every backbone
    tensor must be present with the right shape."""
    state = weights.state_dict
    own = module.state_dict()
    picked = {k: v for k, v in state.items() if k.startswith("backbone.")}
    missing = [k for k in own if k.startswith("backbone.") and k not in picked]
    wrong = [k for k, v in picked.items() if k in own and own[k].shape != v.shape]
    if missing or wrong:
        raise C2SegError(f"init_from: the checkpoint's backbone does not fit this model (missing {missing[:3]}, "
                         f"other shapes {wrong[:3]}); was it trained with another model config?")
    module.load_state_dict(picked, strict=False)
