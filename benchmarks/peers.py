"""Peer arms of the cross-city benchmark (benchmarks/bench_train.py crosscity --only unet unet_adv).

unet      the classic U-Net (Ronneberger et al. 2015: 4 down stages of double 3x3 conv + BN + ReLU,
          channels width x 1, 2, 4, 8 and a 16 x width bottleneck, bilinear up-sampling with concatenated
          skips) on every modality's bands stacked, trained from scratch with cross-entropy on source labels;
unet_adv  the same U-Net plus output-space adversarial adaptation (AdaptSegNet, Tsai et al. 2018; the
          output alignment of HighDAN): a fully convolutional discriminator tells the softmax maps of source
          tiles from target tiles, and the segmenter is trained with cross-entropy on source tiles plus
          ``lambda_adv`` x the adversarial loss that makes its target maps look like source ones.

Both draw their batches through the product's own loaders (train/data.py: the same tiles, normalisation,
augmentation, batch size and batch streams as the c2seg arms, read from the same training config), step
AdamW with the product's warmup + cosine schedule (the DeepSpeed scheduler the product's engine uses), and
predict the whole target city with the product's sliding-window inference (inference/runner.py), which
writes the GeoTIFF class map that ``c2seg infer evaluate`` scores. The coarser modalities reach the model on
the label grid: the readers replicate coarse pixels onto the grid and the prep stores every tile on it.

A run folder gets ``metrics.jsonl`` (per step: loss, seconds; the format bench_train.py's compute figure
reads), ``val_metrics.json`` (target val split, each tile once), ``whole_city/<city>/<scene>.tif`` and
``peer_run.json`` (settings, samples = steps x batch, seconds in training steps); a finished run is kept.

python benchmarks/peers.py --arm unet --prep runs/xc/prep --spec configs/datasets/demo_ab.yaml \\
    --data-root runs/xc/data --steps 1300 --seed 0 --out runs/xc/unet_seed0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from c2seg.spec import DatasetSpec  # noqa: E402  (after the path insert)
from c2seg.train.models.critic import SOURCE, TARGET, OutputCritic, domain_loss  # noqa: E402

ARMS = ("unet", "unet_adv")


class DoubleConv(nn.Sequential):
    """(3x3 conv, batch norm, ReLU) twice."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """The classic U-Net: ``depth`` down stages (max-pool, double conv), channels ``width * 2**i``, a bottleneck
    of ``width * 2**depth``, bilinear up-sampling concatenated with the skip, and a 1x1 classifier."""

    def __init__(self, in_channels: int, num_logits: int, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        channels = [width * 2 ** i for i in range(depth + 1)]
        self.stem = DoubleConv(in_channels, channels[0])
        self.down = nn.ModuleList(DoubleConv(channels[i], channels[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(DoubleConv(channels[i + 1] + channels[i], channels[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(channels[0], num_logits, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for stage in self.down:
            skips.append(stage(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for stage in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], 1))
        return self.head(x)


class StackedUNet(nn.Module):
    """A :class:`UNet` on every modality of ``spec`` stacked along the bands, in the spec's order; takes the
    product's input dict ``{modality: (B, C, H, W)}`` and gives logits over ``spec.num_logits`` (the ignore
    id's logit included, as the product's segmenter does). A modality missing from the input counts as
    nodata (0, as the loaders give nodata pixels)."""

    def __init__(self, spec: DatasetSpec, width: int = 32) -> None:
        super().__init__()
        self.bands = {m.name: m.bands for m in spec.modalities}
        self.unet = UNet(sum(self.bands.values()), spec.num_logits, width)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        first = next(iter(inputs.values()))
        b, _, h, w = first.shape
        stacked = [inputs[m] if m in inputs else first.new_zeros(b, c, h, w) for m, c in self.bands.items()]
        return self.unet(torch.cat(stacked, 1))


@dataclass
class Peer:
    """A peer model with its optimisers: the segmenter, and for unet_adv the discriminator (over the softmax
    of the scored classes ``scored``)."""

    model: StackedUNet
    optimizer: torch.optim.Optimizer
    scored: torch.Tensor
    ignore_id: int
    grad_clip: float
    discriminator: OutputCritic | None = None
    disc_optimizer: torch.optim.Optimizer | None = None
    lambda_adv: float = 0.0

    def step(self, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """One optimiser step of the segmenter (cross-entropy on ``source``, plus for unet_adv the adversarial
        loss on ``target``) and then of the discriminator; the losses."""
        from c2seg.train.finetune import segmentation_loss

        self.model.train()
        logits = self.model(_inputs(source, self.model))
        loss = segmentation_loss(logits, source["label"].long(), self.ignore_id)
        logs = {"loss_source": float(loss.detach())}
        if self.discriminator is not None:
            target_logits = self.model(_inputs(target, self.model))
            fooled = domain_loss(self.discriminator(self._softmax(target_logits)), SOURCE)
            loss = loss + self.lambda_adv * fooled
            logs["loss_adv"] = float(fooled.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the adversarial term reaches the discriminator too: its step zeroes that first
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.discriminator is not None:
            logs["loss_disc"] = self._discriminator_step(logits.detach(), target_logits.detach())
        logs["loss"] = float(loss.detach())
        return logs

    def _softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self.scored].float().softmax(1)

    def _discriminator_step(self, source_logits: torch.Tensor, target_logits: torch.Tensor) -> float:
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss = 0.5 * (domain_loss(self.discriminator(self._softmax(source_logits)), SOURCE)
                      + domain_loss(self.discriminator(self._softmax(target_logits)), TARGET))
        loss.backward()
        self.disc_optimizer.step()
        return float(loss.detach())


def _inputs(batch: dict[str, torch.Tensor], model: StackedUNet) -> dict[str, torch.Tensor]:
    from c2seg.train.data import model_inputs

    return model_inputs(batch, model.bands, torch.float32, torch.device("cpu"))


def build_peer(arm: str, spec: DatasetSpec, cfg, width: int = 32, lambda_adv: float = 0.001) -> Peer:
    """The peer of ``arm`` for training config ``cfg``: the segmenter's AdamW with the product's settings and
    weight-decay groups (train/engine.py); the discriminator's Adam as AdaptSegNet (lr 1e-4, betas 0.9, 0.99)."""
    from c2seg.train.engine import deepspeed_config, weight_decay_split

    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    model = StackedUNet(spec, width)
    params = deepspeed_config(cfg, 1)["optimizer"]["params"]
    decay, no_decay = weight_decay_split(model)
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=params["lr"],
                                  betas=tuple(params["betas"]), eps=params["eps"], weight_decay=params["weight_decay"])
    peer = Peer(model, optimizer, torch.tensor(spec.scored_class_ids), spec.ignore_id, cfg.optim.grad_clip)
    if arm == "unet_adv":
        peer.discriminator = OutputCritic(len(spec.scored_class_ids))
        peer.disc_optimizer = torch.optim.Adam(peer.discriminator.parameters(), lr=1e-4, betas=(0.9, 0.99))
        peer.lambda_adv = lambda_adv
    return peer


def warmup_cosine(optimizer: torch.optim.Optimizer, cfg):
    """The product engine's LR schedule for ``cfg`` (DeepSpeed's WarmupCosineLR with train/engine.py's
    parameters), stepped after every optimiser step as the engine does."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from c2seg.train.engine import deepspeed_config

    return WarmupCosineLR(optimizer, **deepspeed_config(cfg, 1)["scheduler"]["params"])


def batch_streams(data, cfg, spec: DatasetSpec, with_target: bool) -> tuple[Iterator, Iterator | None]:
    """The source (radiometric augmentation) and target (none) batch streams exactly as
    train/finetune.py's ``FinetuneTask.start`` makes them, for one rank."""
    from c2seg.train.data import batch_stream
    from c2seg.train.determinism import rng_isolated

    d = cfg.data
    sources = list(d.source_cities or [c.name for c in spec.cities_with_role("source")])
    targets = list(d.target_cities or [c.name for c in spec.cities_with_role("target")])

    def stream(cities, radiometric):
        def loader(epoch):
            return data.loader("train", cities, radiometric=radiometric, batch_size=d.batch_size,
                               num_workers=d.num_workers, rank=0, world_size=1,
                               city_weights={c: 1.0 / len(cities) for c in cities}, augment=d.augment,
                               batches_per_epoch=d.batches_per_epoch, seed=cfg.seed, epoch=epoch)
        return rng_isolated(batch_stream(loader, d.batches_per_epoch, 0))

    return stream(sources, d.radiometric), stream(targets, None) if with_target else None


def train_peer(peer: Peer, data, cfg, spec: DatasetSpec, metrics_file: Path) -> float:
    """``cfg.steps`` steps of ``peer`` on the product's batch streams (torch, numpy and random reseeded per
    step as the product's loop does); one ``metrics.jsonl`` line per step. Returns the seconds spent in
    training steps (batch reads included, as the product's step times include them)."""
    from c2seg.train.determinism import seed_micro_batch

    source, target = batch_streams(data, cfg, spec, peer.discriminator is not None)
    schedule = warmup_cosine(peer.optimizer, cfg)
    seconds = 0.0
    with metrics_file.open("w") as f:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            seed_micro_batch(cfg.seed, 0, step)
            logs = peer.step(next(source), next(target) if target is not None else None)
            schedule.step()
            took = time.perf_counter() - t0
            seconds += took
            f.write(json.dumps({"step": step + 1, **logs, "lr": schedule.get_last_lr()[0], "step_time_s": took})
                    + "\n")
            f.flush()  # progress can be followed while it trains
    return seconds


def validate(model: StackedUNet, data, spec: DatasetSpec, batch_size: int) -> dict[str, float]:
    """mIoU / OA / macro-F1 / kappa on the target cities' labelled val split, each tile once (as the product's
    validation scores it: argmax over the scored classes)."""
    from c2seg.metrics import confusion_matrix, scores_from_confusion
    from c2seg.train.finetune import predict_classes

    cities = [c.name for c in spec.cities_with_role("target") if c.labelled]
    ids = spec.scored_class_ids
    scored = torch.tensor(ids)
    cm = np.zeros((len(ids), len(ids) + 1), dtype=np.int64)
    model.eval()
    with torch.no_grad():
        for batch in data.each_tile_once("val", cities, batch_size):
            pred, _ = predict_classes(model(_inputs(batch, model)), scored)
            cm += confusion_matrix(batch["label"].numpy(), pred.numpy(), ids)
    s = scores_from_confusion(cm, ids)
    return {"miou": s.miou, "oa": s.oa, "macro_f1": s.macro_f1, "kappa": s.kappa}


def predict_city(model: StackedUNet, data, spec: DatasetSpec, city: str, out: Path, window: int,
                 overlap: float) -> list[Path]:
    """Class maps (GeoTIFF COG on the city's grid) of every scene of ``city`` by the product's sliding-window
    inference (inference/runner.py ``infer_scene``, gaussian blend, no TTA), normalised as in training."""
    from c2seg.data_prep.readers import open_city
    from c2seg.inference.config import InferConfig
    from c2seg.inference.predictor import Predictor
    from c2seg.inference.runner import infer_scene

    cfg = InferConfig(window=window, overlap=overlap, device="cpu")
    ids = spec.scored_class_ids
    normalize = data.manifest.normalizer() if data.normalization_mode == "pooled" else \
        data.manifest.city_normalizer(city)
    predictor = Predictor(model, ids, "cpu", cfg.tta)
    maps = []
    for scene in open_city(spec, city):
        with scene:
            outputs = infer_scene(scene, predictor, normalize, list(spec.modality_names), ids, cfg, out / city, spec,
                                  overwrite=True)
        maps.append(outputs.class_map)
    return maps


@dataclass
class PeerRun:
    """What a finished peer run records in ``peer_run.json``."""

    arm: str
    seed: int
    steps: int
    batch_size: int
    samples: int  # steps x batch (source tiles; unet_adv reads as many target tiles again)
    train_s: float  # seconds in training steps
    parameters: int
    width: int
    lambda_adv: float
    val: dict[str, float]
    class_maps: list[str]
    window: int = 128  # of the whole-city class maps (runs recorded before this field: 128)


def run(args: argparse.Namespace) -> PeerRun:
    """Train, validate and predict one peer arm (kept when ``OUT/peer_run.json`` records the same settings; a
    kept run asked for another ``--window`` predicts the city again with its saved weights)."""
    from c2seg.cli import spec_from_args
    from c2seg.train.config import load_train_config
    from c2seg.train.data import PreparedData

    out = Path(args.out)
    record = out / "peer_run.json"
    cfg = load_train_config(args.config, {"output_dir": str(out), "steps": args.steps, "seed": args.seed,
                                          "data.prep_dir": str(args.prep),
                                          "optim.warmup_steps": max(1, args.steps // 10), **dict(args.set)})
    wanted = {"arm": args.arm, "seed": args.seed, "steps": args.steps, "batch_size": cfg.data.batch_size,
              "width": args.width, "lambda_adv": args.lambda_adv if args.arm == "unet_adv" else 0.0}
    done = PeerRun(**json.loads(record.read_text())) if record.is_file() else None
    kept = done is not None and all(getattr(done, k) == v for k, v in wanted.items())
    if kept and done.window == args.window:
        print(f"{out}: finished run kept ({record})")
        return done
    data = PreparedData(cfg.data.prep_dir, cfg.data.spec, cfg.data.normalization)
    if kept:
        print(f"{out}: finished run kept, its city predicted again at window {args.window} px")
        model = StackedUNet(data.spec, args.width)
        model.load_state_dict(torch.load(out / "model_state.pt", weights_only=True))
        train_s, val = done.train_s, done.val
    else:
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed * 1000)  # as the product's loop seeds rank 0 before building the model
        peer = build_peer(args.arm, data.spec, cfg, args.width, wanted["lambda_adv"])
        train_s = train_peer(peer, data, cfg, data.spec, out / "metrics.jsonl")
        model = peer.model
        val = validate(model, data, data.spec, cfg.data.batch_size)
        (out / "val_metrics.json").write_text(json.dumps(val, indent=1))
        torch.save(model.state_dict(), out / "model_state.pt")
    maps = predict_city(model, data, spec_from_args(args), args.city, out / "whole_city", args.window, args.overlap)
    done = PeerRun(**wanted, samples=args.steps * cfg.data.batch_size, train_s=round(train_s, 1),
                   parameters=sum(p.numel() for p in model.parameters()), val=val,
                   class_maps=[str(p) for p in maps], window=args.window)
    record.write_text(json.dumps(asdict(done), indent=1))
    return done


def main() -> None:
    from c2seg.cli import add_spec_args
    from c2seg.config import parse_override

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=ARMS, required=True, help="unet: the U-Net on source labels; unet_adv: "
                        "plus output-space adversarial adaptation to the target city")
    parser.add_argument("--prep", required=True, type=Path, help="c2seg data prep folder (tiles, normalisation)")
    add_spec_args(parser)
    parser.add_argument("--city", default="synth_target", help="city to predict whole (default: %(default)s)")
    parser.add_argument("--config", default=str(ROOT / "configs/train/source_only_demo.yaml"),
                        help="training config whose data (batch size, augmentation, batches per epoch) and optim "
                        "settings the peer uses (default: the c2seg source-only arm's)")
    parser.add_argument("--set", action="append", default=[], type=parse_override, metavar="KEY=VALUE",
                        help="override in that config, as `c2seg train --set` (repeatable)")
    parser.add_argument("--steps", type=int, required=True, help="optimiser steps (a batch each, unet_adv: a "
                        "source and a target batch each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage (default: %(default)s)")
    parser.add_argument("--lambda-adv", type=float, default=0.001,
                        help="unet_adv: weight of the adversarial loss (AdaptSegNet: 0.001; default: %(default)s)")
    parser.add_argument("--window", type=int, default=128,
                        help="whole-city inference window, px (default: %(default)s)")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap fraction (default: %(default)s)")
    parser.add_argument("--out", required=True, type=Path, help="run folder")
    result = run(parser.parse_args())
    print(json.dumps(asdict(result), indent=1))


if __name__ == "__main__":
    main()
