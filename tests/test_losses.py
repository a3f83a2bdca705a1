"""The fine-tuning loss pieces (train/finetune.py) and the DeepSpeed JSON builder (train/engine.py), on inputs
small enough to work the expected values out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from c2seg.train.config import DataConfig, DeepSpeedConfig, OptimConfig, TrainConfig
from c2seg.train.engine import deepspeed_config
from c2seg.train.finetune import (classmix, ema_decay_at, ema_update, masked_view, segmentation_loss,
                                  weighted_pseudo_loss)

LN3 = math.log(3.0)


def _uniform(pixels: int, classes: int = 3) -> torch.Tensor:
    """Logits (1, classes, 1, pixels) whose softmax is 1 / classes everywhere."""
    return torch.zeros(1, classes, 1, pixels)


def test_segmentation_loss_is_cross_entropy_plus_weighted_dice_over_present_classes():
    """Uniform softmax over 3 classes, labels [1, 2, ignore 0]: cross-entropy ln 3. Dice of class 1 (and of 2):
    intersection 1/3, predicted mass 2/3 over the two labelled pixels, 1 labelled pixel ->
    1 - (2/3 + 1) / (2/3 + 1 + 1) = 3/8; class 0 has no labelled pixel and does not count."""
    labels = torch.tensor([[[1, 2, 0]]])
    assert segmentation_loss(_uniform(3), labels, ignore_id=0).item() == pytest.approx(LN3)
    with_dice = segmentation_loss(_uniform(3), labels, ignore_id=0, dice_weight=0.5)
    assert with_dice.item() == pytest.approx(LN3 + 0.5 * 3 / 8)


def test_segmentation_loss_of_a_batch_without_labels_is_zero_and_keeps_the_graph():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = segmentation_loss(logits, torch.zeros(1, 2, 2, dtype=torch.long), ignore_id=0, dice_weight=1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_weighted_pseudo_loss_is_normalised_like_cross_entropys_mean():
    labels = torch.tensor([[[1, 2, 0]]])
    logits = torch.tensor([[[[0.0, 1.0, 2.0]], [[0.5, 0.0, 0.0]], [[1.0, 2.0, 0.0]]]])
    ones = torch.ones(1, 1, 3)
    assert weighted_pseudo_loss(logits, labels, ones, 0).item() == pytest.approx(
        F.cross_entropy(logits, labels, ignore_index=0).item())
    class_w = torch.tensor([1.0, 2.0, 0.5])
    assert weighted_pseudo_loss(logits, labels, ones, 0, class_w).item() == pytest.approx(
        F.cross_entropy(logits, labels, weight=class_w, ignore_index=0).item())
    # uniform softmax: every labelled pixel costs ln 3; weights 2 and 1 over 2 labelled pixels -> 1.5 ln 3
    weight = torch.tensor([[[2.0, 1.0, 7.0]]])  # the ignored pixel's weight counts for nothing
    assert weighted_pseudo_loss(_uniform(3), labels, weight, 0).item() == pytest.approx(1.5 * LN3)


def test_classmix_pastes_half_of_each_source_tiles_classes_with_their_labels():
    src_label = torch.tensor([[[1, 1, 2, 3], [3, 0, 2, 1]]])  # classes 1, 2, 3 (0 ignored): 2 are pasted
    src = {"msi": torch.full((1, 2, 2, 4), 5.0)}
    tgt = {"msi": torch.full((1, 2, 2, 4), -5.0), "sar": torch.zeros(1, 1, 2, 4)}
    pseudo = torch.full((1, 2, 4), 9)
    torch.manual_seed(0)
    mixed, label, pasted = classmix(src, src_label, tgt, pseudo, ignore_id=0)
    chosen = src_label[pasted].unique()
    assert len(chosen) == 2 and 0 not in chosen.tolist()
    assert torch.equal(pasted, torch.isin(src_label, chosen))
    assert torch.equal(label, torch.where(pasted, src_label, pseudo))
    assert torch.equal(mixed["msi"], torch.where(pasted[:, None], 5.0, -5.0).expand(1, 2, 2, 4))
    assert set(mixed) == {"msi"}  # a modality the source batch lacks is not mixed


def _train_config(**deepspeed) -> TrainConfig:
    return TrainConfig(model="m.yaml", data=DataConfig(prep_dir="-", batch_size=4), output_dir="-", steps=100,
                       optim=OptimConfig(lr=1e-3, warmup_steps=10), deepspeed=DeepSpeedConfig(**deepspeed))


def test_masked_view_blanks_the_same_blocks_in_every_modality():
    """MIC's masked tiles: whole 2 x 2 px blocks set to 0 at the chosen ratio, the rest untouched; a modality on a
    grid of half the size gets the same blocks at its own resolution (1 x 1 px)."""
    msi, hsi = torch.arange(1.0, 1 + 2 * 8 * 8).view(1, 2, 8, 8), torch.full((1, 3, 4, 4), 7.0)
    torch.manual_seed(0)
    out = masked_view({"msi": msi, "hsi": hsi}, block=2, ratio=0.5)
    kept = (out["msi"][0, 0] != 0).float()
    blocks = kept.view(4, 2, 4, 2).mean((1, 3))
    assert set(blocks.unique().tolist()) == {0.0, 1.0}  # each block wholly kept or wholly blanked
    torch.manual_seed(0)
    assert torch.equal(blocks, (torch.rand(4, 4) >= 0.5).float())  # one draw per block: 5 of 16 kept here
    assert torch.equal(out["msi"], msi * kept)  # every band, the same pixels
    assert torch.equal(out["hsi"], hsi * blocks)


def test_deepspeed_config_batch_sizes_precision_and_zero3_gathering():
    conf = deepspeed_config(_train_config(zero_stage=3, precision="bf16", gradient_accumulation_steps=2), 4)
    assert (conf["train_micro_batch_size_per_gpu"], conf["gradient_accumulation_steps"],
            conf["train_batch_size"]) == (4, 2, 32)
    assert conf["bf16"] == {"enabled": True} and conf["fp16"] == {"enabled": False, "initial_scale_power": 12}
    assert conf["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}
    assert conf["scheduler"]["params"]["warmup_num_steps"] == 10
    assert conf["optimizer"]["params"]["torch_adam"] is True


def test_deepspeed_extra_is_merged_last_key_by_key():
    extra = {"zero_optimization": {"reduce_bucket_size": 5e7}, "fp16": {"enabled": True},
             "optimizer": {"params": {"eps": 1e-6}}, "flops_profiler": {"enabled": True}}
    conf = deepspeed_config(_train_config(zero_stage=2, extra=extra), 1)
    assert conf["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 5e7}  # nested keys kept
    assert conf["fp16"] == {"enabled": True, "initial_scale_power": 12}
    assert conf["optimizer"]["params"]["eps"] == 1e-6 and conf["optimizer"]["params"]["lr"] == 1e-3
    assert conf["flops_profiler"] == {"enabled": True}


def test_ema_update_moves_the_teacher_by_one_minus_decay_and_copies_counters():
    teacher = {"w": torch.tensor([1.0, 3.0]), "count": torch.tensor(4)}
    ema_update(teacher, [("w", torch.tensor([3.0, -1.0])), ("count", torch.tensor(9))], decay=0.75)
    assert teacher["w"].tolist() == [1.5, 2.0] and teacher["count"].item() == 9
    ema_update(teacher, [("w", torch.tensor([3.0, -1.0]))], decay=0.5)
    assert teacher["w"].tolist() == [2.25, 0.5]


def test_ema_decay_ramps_up_to_the_configured_value():
    assert [ema_decay_at(step, 0.9) for step in (1, 3, 9, 50)] == [0.5, 0.75, 0.9, 0.9]
