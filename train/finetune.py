"""``c2seg train finetune``: supervised segmentation on source labels plus mean-teacher adaptation
on the target city's unlabelled train tiles (DAFormer-style): an EMA teacher labels target tiles,
its confident pixels (above ``pseudo_threshold``, or with ``pseudo_class_keep`` the most confident share
of each predicted class, CBST) become pseudo-labels (``pseudo_weighting: mask``) or every pixel does, each
tile's loss weighted by its share of confident pixels (``fraction``), and ClassMix pastes half of each
source tile's classes onto a target tile (pasted pixels weigh 1); ``pseudo_class_balance`` evens out the
classes' weights in the target loss; ``target_class_min_share`` leaves out the classes the source model
hardly predicts on the target city (partial domain adaptation); ``masked_consistency`` (MIC) also trains the
student on target tiles with most of their blocks blanked, against the teacher's pseudo-labels of the whole
tiles, so that it learns to read a pixel from its context. Validation on the labelled val split of
``data.val_cities`` (default: the labelled target cities, else the source cities' val split): mIoU, OA,
macro-F1, kappa, per-class IoU (c2seg.metrics), logged with a confusion-matrix
plot and prediction previews."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from c2seg.errors import C2SegError
from c2seg.distributed import rank, reduce_tensor, world_size
from c2seg.metrics import confusion_matrix, scores_from_confusion
from c2seg.spec import DatasetSpec
from c2seg.train.config import FinetuneConfig, ModelConfig, TrainConfig
from c2seg.train.data import batch_stream, model_inputs, select_cities
from c2seg.train.determinism import rng_isolated
from c2seg.train.engine import engine_dtype, iter_full_state
from c2seg.train.loop import Task
from c2seg.train.models import FusionSegmenter
from c2seg.train.models.critic import SOURCE, TARGET, OutputCritic, domain_loss
from c2seg.train.pixel_fit import fit_pixel_head
from c2seg.train.pretrain import load_backbone
from c2seg.plots import confusion_figure, preview_figure
from c2seg.train.weights import Weights

log = logging.getLogger("c2seg.train")


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_id: int, dice_weight: float = 0.0,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy ignoring ``ignore_id`` (+ ``dice_weight`` x soft Dice over labelled pixels)."""
    logits = logits.float()
    if not (labels != ignore_id).any():
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits, labels, weight=class_weights, ignore_index=ignore_id)
    if dice_weight > 0:
        valid = (labels != ignore_id).unsqueeze(1).float()
        probs = logits.softmax(1) * valid
        onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float() * valid
        inter = (probs * onehot).sum((0, 2, 3))
        denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        present = onehot.sum((0, 2, 3)) > 0
        dice = 1 - (2 * inter + 1) / (denom + 1)
        loss = loss + dice_weight * dice[present].mean()
    return loss


def predict_classes(logits: torch.Tensor, scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids (argmax over the scored classes only) and their softmax confidence."""
    probs = logits[:, scored].float().softmax(1)
    conf, idx = probs.max(1)
    return scored[idx], conf


def confident_pixels(pseudo: torch.Tensor, conf: torch.Tensor, threshold: float | None,
                     class_keep: float | None = None) -> torch.Tensor:
    """Pixels whose pseudo-label counts as confident: confidence >= ``threshold`` (unless None) or, with
    ``class_keep``, among the ``class_keep`` most confident share of the pixels predicted as the same class
    (CBST)."""
    sure = conf >= threshold if threshold is not None else torch.zeros_like(conf, dtype=torch.bool)
    if class_keep is not None:
        for c in pseudo.unique():
            of_class = pseudo == c
            cut = torch.quantile(conf[of_class].float(), 1 - class_keep)
            sure |= of_class & (conf >= cut)
    return sure


def classmix(src: dict[str, torch.Tensor], src_label: torch.Tensor, tgt: dict[str, torch.Tensor],
             pseudo: torch.Tensor, ignore_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Paste the pixels of a random half of each source tile's classes onto the paired target tile;
    returns the mixed inputs, the mixed labels and the pasted-pixel mask (B, H, W)."""
    masks = []
    for lab in src_label:
        classes = lab.unique()
        classes = classes[classes != ignore_id]
        chosen = classes[torch.randperm(len(classes))[: (len(classes) + 1) // 2]]
        masks.append(torch.isin(lab, chosen))
    m = torch.stack(masks)
    mixed = {k: torch.where(m[:, None], src[k], tgt[k]) for k in tgt if k in src}
    return mixed, torch.where(m, src_label, pseudo), m


def masked_view(inputs: dict[str, torch.Tensor], block: int, ratio: float) -> dict[str, torch.Tensor]:
    """Masked image consistency (MIC): the tiles with a random ``ratio`` of their ``block`` x ``block`` px
    squares set to 0 (the standardised mean), the same squares of each tile in every modality (a modality
    on a coarser grid gets the mask resized, nearest)."""
    first = next(iter(inputs.values()))
    b, (h, w) = first.shape[0], first.shape[-2:]
    keep = (torch.rand(b, 1, -(-h // block), -(-w // block)) >= ratio).float()
    keep = keep.repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :h, :w]
    out = {}
    for name, x in inputs.items():
        mask = keep if x.shape[-2:] == (h, w) else F.interpolate(keep, size=x.shape[-2:], mode="nearest")
        out[name] = x * mask.to(x.device, x.dtype)
    return out


def modality_to_drop(names: list[str], chance: float) -> str | None:
    """Modality dropout, a training policy: with probability ``chance`` one of ``names`` (uniformly), so that
    the model learns to segment from any subset of its modalities; None for a single modality."""
    if chance > 0 and len(names) > 1 and torch.rand(()) < chance:
        return names[int(torch.randint(len(names), ()))]
    return None


def class_balance(labels: torch.Tensor, ignore_id: int, power: float) -> torch.Tensor:
    """Per-pixel weights (B, H, W): (share of the pixel's class among the labelled pixels) ** -``power``,
    with a mean of 1 over the labelled pixels (0 on ``ignore_id``)."""
    valid = labels != ignore_id
    if not valid.any():
        return valid.float()
    _, inverse, counts = labels[valid].unique(return_inverse=True, return_counts=True)
    w = (counts.float() / counts.sum()).pow(-power)[inverse]
    out = torch.zeros(labels.shape, device=labels.device)
    out[valid] = w / w.mean()
    return out


def weighted_pseudo_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, ignore_id: int,
                         class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel cross-entropy times ``weight`` (B, H, W), normalised like ``F.cross_entropy``'s mean (by
    the class weights of the pixels not ``ignore_id``): with ``weight`` 1 it equals that mean."""
    logits = logits.float()
    valid = labels != ignore_id
    if not valid.any():
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, labels, weight=class_weights, ignore_index=ignore_id, reduction="none")
    norm = valid.sum() if class_weights is None else class_weights[labels][valid].sum()
    return (ce * weight).sum() / norm


def ema_decay_at(step: int, decay: float) -> float:
    """The mean teacher's decay after optimizer step ``step`` (1, 2, ...): ``decay``, lower in the first steps
    (1 - 1 / (step + 1)) so that the teacher follows the student while it changes fastest."""
    return min(1 - 1 / (step + 1), decay)


@torch.no_grad()
def ema_update(teacher: dict[str, torch.Tensor], student: Iterable[tuple[str, torch.Tensor]], decay: float) -> None:
    """In place, for each ``(name, tensor)`` of ``student``: teacher = decay x teacher + (1 - decay) x student for
    floating-point tensors, a copy for the others (counters)."""
    for name, tensor in student:
        t = teacher[name]
        s = tensor.to(t.device, t.dtype)
        if t.is_floating_point():
            t.mul_(decay).add_(s, alpha=1 - decay)
        else:
            t.copy_(s)


@dataclass(frozen=True)
class PseudoLabeller:
    """Pseudo-labels for target tiles from a teacher's predictions over ``classes``: the confident pixels
    (confidence >= ``threshold`` and/or, CBST, the ``class_keep`` most confident share of each predicted
    class) and each pixel's weight (``mask``: confident pixels weigh 1, the others are ``ignore_id``;
    ``fraction``, DAFormer: every pixel, weighted by its tile's share of confident pixels)."""

    threshold: float | None
    class_keep: float | None
    weighting: str
    ignore_id: int

    @torch.no_grad()
    def __call__(self, teacher: torch.nn.Module, inputs: dict[str, torch.Tensor],
                 classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(labels, weights, confident mask), each (B, H, W); the teacher sees the inputs in float32."""
        pseudo, conf = predict_classes(teacher({k: v.float() for k, v in inputs.items()}), classes)
        sure = confident_pixels(pseudo, conf, self.threshold, self.class_keep)
        if self.weighting == "mask":
            return torch.where(sure, pseudo, torch.full_like(pseudo, self.ignore_id)), torch.ones_like(conf), sure
        return pseudo, sure.float().mean((1, 2), keepdim=True).expand_as(conf), sure


def adaptation_loss(logits: torch.Tensor, source_label: torch.Tensor, mixed_label: torch.Tensor,
                    mixed_weight: torch.Tensor, ft: FinetuneConfig, ignore_id: int,
                    class_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, source, target) losses of one adaptation micro-batch whose ``logits`` are the source tiles'
    followed by the mixed target tiles' (and possibly more, unused here): the supervised loss on the source
    labels plus ``adapt_weight`` x the weighted pseudo-label loss on the mixed tiles."""
    n = source_label.shape[0]
    sup = segmentation_loss(logits[:n], source_label, ignore_id, ft.dice_weight, class_weights)
    adapt = weighted_pseudo_loss(logits[n:2 * n], mixed_label, mixed_weight, ignore_id, class_weights)
    return sup + ft.adapt_weight * adapt, sup, adapt


class FinetuneTask(Task):
    name = "finetune"

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, spec: DatasetSpec, data) -> None:
        self.cfg, self.ft, self.spec, self.data = cfg, cfg.finetune, spec, data
        self.module = FusionSegmenter(spec, model_cfg)
        self.model_cfg = model_cfg
        if self.ft.pixel_head_init == "fit" and not model_cfg.pixel_head:
            raise C2SegError(f"finetune.pixel_head_init=fit needs a model with pixel_head: true ({cfg.model} has "
                             f"none)")
        cities = select_cities(spec, cfg.data, data.manifest)
        self.sources, self.targets, self.val_cities = list(cities.sources), list(cities.targets), list(cities.val)
        self.scored = torch.tensor(spec.scored_class_ids)
        weights = None
        if self.ft.class_weights:
            weights = torch.ones(spec.num_logits)
            for cid, w in self.ft.class_weights.items():
                weights[cid] = w
        self.class_weights = weights
        self.teacher: FusionSegmenter | None = None
        self.labeller = PseudoLabeller(self.ft.pseudo_threshold, self.ft.pseudo_class_keep, self.ft.pseudo_weighting,
                                       spec.ignore_id)
        self.target_classes: torch.Tensor | None = None  # the classes kept while adapting (None: all scored)
        self.critic: OutputCritic | None = None
        if self.ft.adapt and self.ft.adversarial_weight > 0:
            with torch.random.fork_rng(devices=[]):  # the same initial critic on every rank, no draw consumed
                torch.manual_seed(cfg.seed)
                self.critic = OutputCritic(len(spec.scored_class_ids))
        self.critic_opt: torch.optim.Optimizer | None = None
        self._critic_saved: dict[str, Any] | None = None  # from a resumed checkpoint, applied in start()
        self._critic_batches: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's (source, target) maps

    def init_from(self, weights: Weights) -> None:
        """The backbone of a pretrain run, or the whole segmenter (decoder too) of a finetune run or an
        exported model: e.g. adapting a source-only model to a target city."""
        if weights.task != "finetune":
            load_backbone(self.module, weights)
            return
        try:
            self.module.load_state_dict(weights.state_dict)
        except RuntimeError as exc:
            raise C2SegError(f"init_from: the segmenter's weights do not fit this model; was it trained with "
                             f"another model config? ({str(exc).splitlines()[0]})") from exc

    def prepare_fresh_run(self, rank: int) -> None:
        """``pixel_head_init: fit``: the per-pixel head fitted to the source cities' labelled train pixels
        (collective; train/pixel_fit.py)."""
        if self.ft.pixel_head_init != "fit":
            return
        batches = self.data.each_tile_once("train", self.sources, self.cfg.data.batch_size, rank, world_size())
        try:
            fit_pixel_head(self.module, batches, list(self.spec.modality_names), self.scored, self.spec.num_logits,
                           self.ft.pixel_fit_pixels, self.cfg.seed, rank, self.class_weights,
                           self.model_cfg.pixel_head_means)
        except ValueError as exc:
            raise C2SegError(f"finetune.pixel_head_init=fit: {exc} in the train split of {self.sources}") from exc
        with torch.no_grad():  # the context starts silent: at step 0 the model is the fitted per-pixel classifier
            self.module.head.classifier.weight.zero_()
            self.module.head.classifier.bias.zero_()

    def start(self, engine, first_batch: int) -> None:
        d = self.cfg.data
        self.dtype, self.device = engine_dtype(self.cfg), engine.device
        self.scored = self.scored.to(engine.device)

        def stream(cities, radiometric):
            def loader(epoch):
                return self.data.loader(
                    "train", cities, radiometric=radiometric, batch_size=d.batch_size, num_workers=d.num_workers,
                    rank=engine.global_rank, world_size=engine.world_size,
                    city_weights={c: 1.0 / len(cities) for c in cities}, augment=d.augment,
                    batches_per_epoch=d.batches_per_epoch, seed=self.cfg.seed, epoch=epoch)
            return rng_isolated(batch_stream(loader, d.batches_per_epoch, first_batch))

        # source tiles get the radiometric augmentation; target tiles stay as the teacher must see them
        self.source_stream = stream(self.sources, d.radiometric)
        self.target_stream = stream(self.targets, None) if self.ft.adapt and self.targets else None
        if self.ft.adapt and self.teacher is None:
            self.teacher = self._student_copy(engine)
        elif self.teacher is not None:
            self.teacher.to(self.device)
        if self.target_classes is not None:
            self.target_classes = self.target_classes.to(self.device)
        if self.critic is not None:
            self.critic.to(self.device)
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.ft.critic_lr, betas=(0.9, 0.99))
            if self._critic_saved is not None:
                self.critic.load_state_dict(self._critic_saved["model"])
                self.critic_opt.load_state_dict(self._critic_saved["optim"])

    def _classes_in_target(self, engine) -> torch.Tensor:
        """The scored classes the teacher predicts, as adaptation starts, on at least ``target_class_min_share``
        of the target cities' train pixels (every tile once, over all ranks; no random draw consumed)."""
        counts = torch.zeros(self.spec.num_logits, dtype=torch.int64, device=self.device)
        tiles = self.data.each_tile_once("train", self.targets, self.cfg.data.batch_size, engine.global_rank,
                                         engine.world_size)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for batch in tiles:
                inputs = model_inputs(batch, self.spec.modality_names, torch.float32, self.device)
                pred, _ = predict_classes(self.teacher(inputs), self.scored)
                counts += torch.bincount(pred.flatten(), minlength=self.spec.num_logits)
        counts = reduce_tensor(counts)
        share = counts[self.scored].double() / counts.sum().clamp(min=1)
        kept = share >= self.ft.target_class_min_share
        absent = ", ".join(f"{self.spec.class_name(int(c))} ({100 * float(f):.3f} %)"
                           for c, f in zip(self.scored[~kept], share[~kept]))
        log.info("partial adaptation: the teacher predicts on under %.3f %% of %s's train pixels: %s; these classes "
                 "count as absent from the target city while adapting", 100 * self.ft.target_class_min_share,
                 "/".join(self.targets), absent or "no class")
        return self.scored[kept]

    def _student_copy(self, engine) -> FusionSegmenter:
        """An fp32 copy of the student on this rank's device, filled module by module (no host copy)."""
        model = FusionSegmenter(self.spec, self.model_cfg).to(self.device).eval().requires_grad_(False)
        own = model.state_dict()
        with torch.no_grad():
            for name, tensor in iter_full_state(engine):
                own[name].copy_(tensor)
        return model

    def before_step(self, engine, step: int) -> None:
        """Partial adaptation's estimate of the classes present in the target city, once, as adaptation
        starts (collective)."""
        starts = self.target_stream is not None and step >= self.ft.adapt_warmup_steps
        if starts and self.ft.target_class_min_share is not None and self.target_classes is None:
            self.target_classes = self._classes_in_target(engine)

    def micro_loss(self, engine, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        src = next(self.source_stream)
        src_in = model_inputs(src, self.spec.modality_names, self.dtype, engine.device)
        src_label = src["label"].to(engine.device).long()
        # the target batch is drawn every step, so the data position does not depend on the warmup
        tgt = next(self.target_stream) if self.target_stream is not None else None
        if tgt is None or step < self.ft.adapt_warmup_steps:
            logits = engine(src_in, drop=self._drop(src_in))
            return segmentation_loss(logits, src_label, self.spec.ignore_id, self.ft.dice_weight, self._cw()), {}
        tgt_in = model_inputs(tgt, self.spec.modality_names, self.dtype, engine.device)
        kept = self.scored if self.target_classes is None else self.target_classes
        if self.target_classes is not None:  # partial adaptation: the absent classes' source pixels are ignored
            src_label = torch.where(torch.isin(src_label, kept), src_label, torch.full_like(src_label,
                                                                                          self.spec.ignore_id))
        pseudo, weight, sure = self.labeller(self.teacher, tgt_in, kept)
        mixed_in, mixed_label, mixed_weight = self._mixed_target(src_in, src_label, tgt_in, pseudo, weight)
        mic = self.ft.masked_consistency > 0
        views = [src_in, mixed_in] + ([masked_view(tgt_in, self.ft.mask_block, self.ft.mask_ratio)] if mic else [])
        views += [tgt_in] if self.critic is not None else []  # the critic: pure target
        batch = {k: torch.cat([v[k] for v in views]) for k in src_in if k in mixed_in}
        logits = engine(batch, drop=self._drop(batch))
        loss, sup, adapt = adaptation_loss(logits, src_label, mixed_label, mixed_weight, self.ft,
                                           self.spec.ignore_id, self._cw())
        logs = {"loss_source": float(sup.detach()), "loss_target": float(adapt.detach()),
                "pseudo_confident": float(sure.float().mean())}
        n = src_label.shape[0]
        if mic:  # the student, on masked target tiles, must predict what the teacher sees on whole ones
            masked = weighted_pseudo_loss(logits[2 * n:3 * n], pseudo, self._balanced(pseudo, weight),
                                          self.spec.ignore_id, self._cw())
            loss = loss + self.ft.masked_consistency * masked
            logs["loss_masked"] = float(masked.detach())
        if self.critic is not None:
            fool = self._fool_critic(logits[:n], logits[-n:])
            loss = loss + self.ft.adversarial_weight * fool
            logs["loss_adversarial"] = float(fool.detach())
        return loss, logs

    def _mixed_target(self, src_in: dict[str, torch.Tensor], src_label: torch.Tensor, tgt_in: dict[str, torch.Tensor],
                      pseudo: torch.Tensor, weight: torch.Tensor
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The target tiles the student learns from: with ClassMix, source classes pasted on them (pasted pixels
        weigh 1); the weights class-balanced with ``pseudo_class_balance``."""
        ignore = self.spec.ignore_id
        if self.ft.mix == "classmix":
            mixed_in, mixed_label, pasted = classmix(src_in, src_label, tgt_in, pseudo, ignore)
            weight = torch.where(pasted, torch.ones_like(weight), weight)
        else:
            mixed_in, mixed_label = tgt_in, pseudo
        return mixed_in, mixed_label, self._balanced(mixed_label, weight)

    def _balanced(self, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` times the class balance of ``labels`` (``pseudo_class_balance``; unchanged at 0)."""
        if self.ft.pseudo_class_balance > 0:
            return weight * class_balance(labels, self.spec.ignore_id, self.ft.pseudo_class_balance)
        return weight

    def _fool_critic(self, src_logits: torch.Tensor, tgt_logits: torch.Tensor) -> torch.Tensor:
        """The student's adversarial loss: the critic (frozen here) should take its target maps for source maps;
        both maps are kept, detached, for the critic's own update after the optimizer step."""
        src_map, tgt_map = (x[:, self.scored].float().softmax(1) for x in (src_logits, tgt_logits))
        self.critic.requires_grad_(False)
        fool = domain_loss(self.critic(tgt_map), SOURCE)
        self.critic.requires_grad_(True)
        self._critic_batches.append((src_map.detach(), tgt_map.detach()))
        return fool

    def _train_critic(self) -> None:
        """One Adam step of the critic on this step's maps (source -> SOURCE, target -> TARGET), its gradients
        averaged over the ranks so that every rank keeps the same critic."""
        self.critic_opt.zero_grad(set_to_none=False)
        for src_map, tgt_map in self._critic_batches:
            loss = domain_loss(self.critic(src_map), SOURCE) + domain_loss(self.critic(tgt_map), TARGET)
            (loss / (2 * len(self._critic_batches))).backward()
        self._critic_batches.clear()
        params = list(self.critic.parameters())
        flat = reduce_tensor(torch.cat([p.grad.flatten() for p in params])) / world_size()
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
        self.critic_opt.step()

    def _drop(self, inputs: dict[str, torch.Tensor]) -> str | None:
        return modality_to_drop([m for m in self.spec.modality_names if m in inputs], self.model_cfg.modality_dropout)

    def _cw(self) -> torch.Tensor | None:
        return None if self.class_weights is None else self.class_weights.to(self.device)

    def after_step(self, engine, step: int) -> None:
        if self._critic_batches:
            self._train_critic()
        if self.teacher is None:
            return
        # under ZeRO-3 one module's parameters gathered at a time, on the device
        ema_update(self.teacher.state_dict(), iter_full_state(engine), ema_decay_at(step, self.ft.ema_decay))

    def wants_validation(self, step: int) -> bool:
        return step % self.ft.eval_every == 0 and (step > 0 or self.ft.keep_best)

    def validate(self, engine, step: int, tracker) -> dict[str, float]:
        """Scores of the student on the val split of the validation cities (every rank a share; confusion
        summed)."""
        if not self.val_cities:
            return {}
        model = engine.module  # in place; under ZeRO-3 its forward gathers layer by layer
        model.eval()
        loader = self.data.each_tile_once("val", self.val_cities, self.cfg.data.batch_size, engine.global_rank,
                                          engine.world_size, self.ft.eval_batches,
                                          equal_batches=engine.zero_optimization_stage() == 3)
        ids = self.spec.scored_class_ids
        cm = np.zeros((len(ids), len(ids) + 1), dtype=np.int64)
        previews = []
        with torch.no_grad():
            for batch in loader:
                inputs = model_inputs(batch, self.spec.modality_names, self.dtype, self.device)
                pred, _ = predict_classes(model(inputs), self.scored)
                if batch.get("padding"):  # a repeat that keeps this rank in step with the others' forwards
                    continue
                label = batch["label"].numpy()
                cm += confusion_matrix(label, pred.cpu().numpy(), ids)
                if tracker.active and len(previews) < self.cfg.tracking.previews:
                    previews.append((batch, pred.cpu()))
        model.train()
        total = reduce_tensor(torch.from_numpy(cm))
        if engine.global_rank != 0:
            return {}
        if not total.any():
            log.warning("step %d: no labelled val tiles in %s: nothing to validate", step, self.val_cities)
            return {}
        scores = scores_from_confusion(total.numpy(), ids)
        names = {c.id: c.name for c in self.spec.classes}
        result = scores.as_dict(names)
        values = {f"val_{k}": result[k] for k in ("miou", "oa", "macro_f1", "kappa")}
        values.update({f"val_iou_{c['id']:02d}": c["iou"] for c in result["per_class"]})
        out = Path(self.cfg.output_dir)
        with (out / "val_metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **result, "confusion": total.tolist()}) + "\n")
        log.info("step %d val (%s): mIoU %.3f OA %.3f macro-F1 %.3f kappa %.3f", step, "/".join(self.val_cities),
                 scores.miou, scores.oa, scores.macro_f1, scores.kappa)
        tracker.metrics(values, step)
        tracker.figure(lambda: confusion_figure(total.numpy(), self.spec), f"confusion_step{step:06d}.png")
        for i, (batch, pred) in enumerate(previews):
            tracker.figure(lambda b=batch, p=pred: preview_figure(b, p, self.spec), f"preview_step{step:06d}_{i}.png")
        return values

    def extra_weights(self) -> dict[str, Any]:
        """The EMA teacher and the classes kept (when adapting), and the critic."""
        out: dict[str, Any] = {}
        if self.teacher is not None and rank() == 0:  # only rank 0 writes weights.pt: no host copy elsewhere
            out["ema"] = {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}
        if self.target_classes is not None:
            out["target_classes"] = self.target_classes.tolist()
        if self.critic is not None and rank() == 0:
            out["critic"] = {"model": {k: v.detach().cpu().clone() for k, v in self.critic.state_dict().items()},
                             "optim": self.critic_opt.state_dict()}
        return out

    def load_extra(self, weights: Weights) -> None:
        extra = weights.extra
        if self.ft.adapt and "ema" in extra:
            self.teacher = FusionSegmenter(self.spec, self.model_cfg)
            self.teacher.load_state_dict(extra["ema"])
            self.teacher.eval().requires_grad_(False)
        if self.ft.adapt and "target_classes" in extra:
            self.target_classes = torch.tensor(extra["target_classes"])
        if self.critic is not None and "critic" in extra:
            self._critic_saved = extra["critic"]
