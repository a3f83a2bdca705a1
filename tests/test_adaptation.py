"""Per-city standardisation (training re-map, export, inference) and confidence-weighted pseudo-labels."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import rasterio
import torch

from c2seg.data_prep.loaders import ZarrTileDataset, collate_views
from c2seg.data_prep.manifest import load_manifest
from c2seg.data_prep.readers import open_city
from tests.fixtures_train import refresh_saved_hash, run_train, tiny_args
from c2seg.train.config import FinetuneConfig
from c2seg.train.data import CityStandardizer, PreparedData


def test_city_remap_equals_direct_per_city_normalisation(tiny_spec, tiny_prepared):
    """Raw scene values normalised with the pooled statistics and re-mapped equal the same values
    normalised with their city's own statistics; nodata pixels stay exactly 0."""
    manifest = load_manifest(tiny_prepared)
    pooled, remap = manifest.normalizer(), CityStandardizer(manifest)
    for city_id, city in enumerate(manifest.spec.cities):
        scene = open_city(tiny_spec, city.name)[0]
        with scene:
            raw = {m: scene.read(m)[:, :24, :40].copy() for m in manifest.spec.modality_names}
        fill = np.asarray(pooled.fill["msi"], raw["msi"].dtype)
        raw["msi"][:, :3, :5] = fill  # a nodata patch
        batch = {m: torch.from_numpy(pooled(m, v))[None] for m, v in raw.items()}
        batch["city_id"] = torch.tensor([city_id])
        mapped = remap(batch)
        direct = manifest.city_normalizer(city.name)
        for m, v in raw.items():
            np.testing.assert_allclose(mapped[m][0].numpy(), direct(m, v), rtol=1e-4, atol=1e-4)
        assert (mapped["msi"][0, :, :3, :5] == 0).all()
        assert not np.allclose(mapped["msi"][0].numpy(), batch["msi"][0].numpy(), atol=1e-3)  # stats differ


def test_per_city_loader_standardises_each_city(tiny_prepared):
    """Batches of a per_city PreparedData are the pooled batches re-mapped with their own city's rows."""
    pooled, per_city = PreparedData(tiny_prepared), PreparedData(tiny_prepared, normalization="per_city")
    cities = list(pooled.manifest.cities)
    kw = dict(batch_size=4, batches_per_epoch=2, augment=False, seed=3)
    for a, b in zip(pooled.loader("train", cities, **kw), per_city.loader("train", cities, **kw), strict=True):
        assert torch.equal(a["city_id"], b["city_id"]) and torch.equal(a["label"], b["label"])
        expected = per_city.standardizer(a)
        for m in pooled.spec.modality_names:
            assert torch.equal(b[m], expected[m])
    with pytest.raises(ValueError, match="normalization"):
        PreparedData(tiny_prepared, normalization="city")


def test_validation_batches_hold_every_val_tile_once_over_the_ranks(tiny_prepared):
    """The shard loaders repeat tiles so that every rank gets as many batches; validation must not: over 3
    ranks, each_tile_once gives every val tile of the cities exactly once, standardised like training."""
    data = PreparedData(tiny_prepared, normalization="per_city")
    cities = list(data.manifest.cities)
    expected = ZarrTileDataset(tiny_prepared, "val", cities=cities)
    assert len(expected) % 3 and len(expected) > 3  # a remainder that the shard loaders would pad
    seen = [b for r in range(3) for b in data.each_tile_once("val", cities, batch_size=2, rank=r, world_size=3)]
    labels = torch.cat([b["label"] for b in seen])
    assert len(labels) == len(expected)
    reference = collate_views([expected[i] for i in range(len(expected))])
    key = lambda lab: lab.flatten().tolist()  # noqa: E731  (tiles as sortable label rasters)
    assert sorted(map(key, labels)) == sorted(map(key, reference["label"]))
    first = next(data.each_tile_once("val", cities, batch_size=2))
    torch.testing.assert_close(first["hsi"], data.standardizer(collate_views([expected[0], expected[1]]))["hsi"])
    assert len(list(data.each_tile_once("val", cities, batch_size=2, max_batches=1))) == 1


def test_per_city_model_exports_and_infers_with_city_statistics(tiny_spec, tiny_prepared, tmp_path):
    """A per_city fine-tune (with DAFormer-weighted pseudo-labels) exports its mode and every city's
    statistics; inference on a city uses that city's statistics, or computes them from the scenes of a
    city it has none for."""
    from c2seg.inference.config import InferConfig
    from c2seg.inference.runner import city_statistics, infer_city
    from c2seg.train.export import export_model, load_exported

    run = tmp_path / "run"
    run_train(tiny_args("finetune", tiny_prepared, run, "deepspeed.zero_stage=0", "steps=3", "checkpoint_every=3",
                        "finetune.eval_every=3", "data.normalization=per_city", "finetune.pseudo_weighting=fraction",
                        "finetune.adapt_warmup_steps=1"))
    model_path = export_model(run, tmp_path / "model.pt")
    exported = load_exported(model_path)
    manifest = load_manifest(tiny_prepared)
    assert exported.normalization_mode == "per_city"
    assert set(exported.city_normalization) == {c.name for c in tiny_spec.cities}
    target = "synth_target"
    assert exported.normalization_for(target) == manifest.city_normalizer(target).as_dict()
    assert exported.normalization_for(target) != exported.normalization

    cfg = InferConfig(window=32, overlap=0.5, block=32, quicklook=False, save_probs=True)
    per_city = infer_city(model_path, tiny_spec, target, tmp_path / "per_city", cfg)[0]
    # the same weights as a pooled model whose pooled statistics are the target city's: identical output
    payload = torch.load(model_path, weights_only=True)
    as_pooled = tmp_path / "as_pooled.pt"
    torch.save({**payload, "normalization_mode": "pooled", "normalization": payload["city_normalization"][target]},
               as_pooled)
    same = infer_city(as_pooled, tiny_spec, target, tmp_path / "as_pooled", cfg)[0]
    with rasterio.open(per_city.probabilities) as a, rasterio.open(same.probabilities) as b:
        np.testing.assert_array_equal(a.read(), b.read())

    # a city the model has no statistics for: computed from its scenes, they match what prep measured
    del payload["city_normalization"][target]
    unknown = tmp_path / "no_target_stats.pt"
    torch.save(payload, unknown)
    with pytest.raises(ValueError, match="has none for city 'synth_target'"):
        load_exported(unknown).normalization_for(target)
    computed = city_statistics(tiny_spec, target, tiny_spec.modalities)
    for m, stats in manifest.city_normalizer(target).as_dict().items():
        np.testing.assert_allclose(computed[m]["mean"], stats["mean"], rtol=1e-5)
        np.testing.assert_allclose(computed[m]["std"], stats["std"], rtol=1e-4)
    fresh = infer_city(unknown, tiny_spec, target, tmp_path / "unknown", cfg)[0]
    with rasterio.open(per_city.probabilities) as a, rasterio.open(fresh.probabilities) as b:
        np.testing.assert_allclose(a.read(), b.read(), atol=1e-4)


def test_class_balanced_pseudo_labels_keep_every_predicted_class():
    """With pseudo_class_keep, the most confident share of each predicted class counts as confident even
    when no pixel reaches the threshold; without it the threshold alone decides, and with no threshold the
    share alone does."""
    from c2seg.train.finetune import confident_pixels

    g = torch.Generator().manual_seed(0)
    pseudo = torch.randint(1, 4, (2, 16, 16), generator=g)
    conf = torch.rand(2, 16, 16, generator=g) * 0.5  # an uncalibrated teacher: nothing above 0.9
    assert not confident_pixels(pseudo, conf, 0.9).any()
    sure = confident_pixels(pseudo, conf, 0.9, class_keep=0.25)
    for c in (1, 2, 3):
        of_class = pseudo == c
        share = float(sure[of_class].float().mean())
        assert 0.2 < share < 0.3, (c, share)
        kept, dropped = conf[of_class & sure], conf[of_class & ~sure]
        assert kept.min() >= dropped.max(), "the kept pixels are the class's most confident"
    conf[0, 0, 0] = 0.95
    assert confident_pixels(pseudo, conf, 0.9, class_keep=0.25)[0, 0, 0]
    # an over-confident teacher: everything passes 0.9; with no threshold the per-class share alone decides
    conf = 0.95 + 0.05 * torch.rand(2, 16, 16, generator=g)
    assert confident_pixels(pseudo, conf, 0.9, class_keep=0.25).all()
    sure = confident_pixels(pseudo, conf, None, class_keep=0.25)
    assert all(0.2 < float(sure[pseudo == c].float().mean()) < 0.3 for c in (1, 2, 3))
    with pytest.raises(ValueError, match="set pseudo_threshold, pseudo_class_keep or both"):
        FinetuneConfig(pseudo_threshold=None)


def test_finetune_from_a_finetuned_model_starts_from_its_whole_segmenter(tiny_prepared, finetuned_tiny, tmp_path):
    """init_from a finetune run loads the decoder too (adapting a trained source model to a target city): with
    a zero learning rate the new run's weights and its EMA teacher are the old run's; a model of another
    config is refused with a clear message."""
    from tests.fixtures_train import checkpoint_tensors

    run = tmp_path / "adapt"
    run_train(tiny_args("finetune", tiny_prepared, run, "deepspeed.zero_stage=0", "steps=1", "checkpoint_every=1",
                        "finetune.eval_every=1", "finetune.adapt_warmup_steps=0", "optim.lr=0",
                        f"init_from={finetuned_tiny}"))
    _, before = checkpoint_tensors(finetuned_tiny)
    _, after = checkpoint_tensors(run)
    model = [k for k in before if k.startswith("state_dict.")]
    assert any(k.startswith("state_dict.head.") for k in model)
    for k in model:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(after["extra.ema." + k[len("state_dict."):]], before[k], rtol=0, atol=0, msg=k)

    proc = run_train(tiny_args("finetune", tiny_prepared, tmp_path / "other", "model=configs/models/demo.yaml",
                               f"init_from={finetuned_tiny}"), check=False)
    assert proc.returncode != 0 and "init_from: the segmenter's weights do not fit this model" in proc.stderr


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_class_balance_evens_out_the_classes_of_the_target_loss(power):
    """Every class's total weight scales as its pixel count ** (1 - power): at power 1 each class weighs the
    same; ignored pixels weigh 0 and the labelled ones average 1 (the loss keeps its scale)."""
    from c2seg.train.finetune import class_balance

    labels = torch.full((2, 8, 8), 3)
    labels[0, :2] = 1  # 16 pixels
    labels[1, :1, :4] = 2  # 4 pixels
    labels[1, 7] = 0  # 8 ignored
    w = class_balance(labels, 0, power)
    assert torch.all(w[labels == 0] == 0)
    assert float(w[labels != 0].mean()) == pytest.approx(1.0)
    totals = {c: float(w[labels == c].sum()) for c in (1, 2, 3)}
    counts = {c: int((labels == c).sum()) for c in (1, 2, 3)}
    for a, b in ((1, 2), (3, 1)):
        assert totals[a] / totals[b] == pytest.approx((counts[a] / counts[b]) ** (1 - power), rel=1e-5)
    assert torch.equal(class_balance(torch.zeros(1, 4, 4, dtype=torch.long), 0, power), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="pseudo_class_balance must be in"):
        FinetuneConfig(pseudo_class_balance=1.5)


def test_partial_adaptation_leaves_out_the_classes_the_source_model_hardly_predicts(tiny_spec, tiny_prepared,
                                                                                     finetuned_tiny, tmp_path, caplog):
    """finetune.target_class_min_share: the classes the source model (the run's init_from) predicts on less than
    that share of the target city's train pixels count as absent while adapting; the log names them, the
    checkpoint keeps the classes left in (so a resumed run does not re-estimate them from its teacher)."""
    from c2seg.inference.config import InferConfig
    from c2seg.inference.runner import infer_city
    from c2seg.train.export import export_model, load_exported
    from c2seg.train.finetune import predict_classes

    source = load_exported(export_model(finetuned_tiny, tmp_path / "source.pt"))
    spec = source.spec
    data = PreparedData(tiny_prepared)
    scored = torch.tensor(spec.scored_class_ids)
    counts = torch.zeros(spec.num_logits, dtype=torch.int64)
    with torch.no_grad():
        for batch in data.each_tile_once("train", ["synth_target"], 4):
            pred, _ = predict_classes(source.model({m: batch[m].float() for m in spec.modality_names}), scored)
            counts += torch.bincount(pred.flatten(), minlength=spec.num_logits)
    share = counts[scored].double() / counts.sum()
    least, next_least = share.unique()[:2].tolist()  # sorted
    cut = (least + next_least) / 2  # the least predicted class(es) out
    expected = scored[share >= cut].tolist()
    assert 0 < len(expected) < len(scored)

    run = tmp_path / "partial"
    proc = run_train(tiny_args("finetune", tiny_prepared, run, "deepspeed.zero_stage=0", "steps=2",
                               "checkpoint_every=2", "finetune.eval_every=2", f"init_from={finetuned_tiny}",
                               f"finetune.target_class_min_share={cut}"))
    absent = [spec.class_name(int(c)) for c in scored if int(c) not in expected]
    said = next(line for line in proc.stderr.splitlines() if "partial adaptation" in line)
    assert all(name in said for name in absent), said
    assert not any(spec.class_name(c) in said for c in expected), said
    weights = run / "checkpoints" / (run / "checkpoints" / "LATEST").read_text().strip() / "weights.pt"
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    assert saved["extra"]["target_classes"] == expected
    adapted = export_model(run, tmp_path / "adapted.pt")  # the exported model keeps them, and inference too
    assert load_exported(adapted).target_classes == expected
    with caplog.at_level(logging.INFO, logger="c2seg.infer"):
        maps = infer_city(adapted, tiny_spec, "synth_target", tmp_path / "pred", InferConfig(device="cpu"))
    said = next(r.getMessage() for r in caplog.records if "partial adaptation found" in r.getMessage())
    assert all(name in said for name in absent), said
    for scene in maps:
        with rasterio.open(scene.class_map) as f:
            assert set(np.unique(f.read(1)).tolist()) <= {*expected, spec.ignore_id}
    # a resumed run keeps the stored classes (here edited to tell them apart from a new estimate)
    saved["extra"]["target_classes"] = expected[:1]
    torch.save(saved, weights)
    refresh_saved_hash(weights.parent, "weights.pt")
    run_train([*tiny_args("finetune", tiny_prepared, run, "deepspeed.zero_stage=0", "steps=3", "checkpoint_every=1",
                          "finetune.eval_every=3", f"init_from={finetuned_tiny}",
                          f"finetune.target_class_min_share={cut}"), "--resume", "auto"])
    weights = run / "checkpoints" / (run / "checkpoints" / "LATEST").read_text().strip() / "weights.pt"
    assert torch.load(weights, map_location="cpu", weights_only=True)["extra"]["target_classes"] == expected[:1]
    with pytest.raises(ValueError, match="target_class_min_share must be in"):
        FinetuneConfig(target_class_min_share=1.0)


def test_partial_adaptation_estimates_the_classes_when_adaptation_starts(tiny_prepared, pretrained_tiny, tmp_path):
    """In a run that trains on source labels first (adapt_warmup_steps, from a pretrained encoder whose head is
    new), the classes are estimated by the teacher at the first adaptation step, not from the untrained head."""
    run = tmp_path / "run"
    sets = ["deepspeed.zero_stage=0", "checkpoint_every=2", "finetune.eval_every=100", "finetune.adapt_warmup_steps=2",
            "finetune.target_class_min_share=0.01", f"init_from={pretrained_tiny}"]
    proc = run_train(tiny_args("finetune", tiny_prepared, run, "steps=2", *sets))
    assert "partial adaptation" not in proc.stderr
    weights = run / "checkpoints" / "step_00000002" / "weights.pt"
    assert "target_classes" not in torch.load(weights, map_location="cpu", weights_only=True)["extra"]
    proc = run_train([*tiny_args("finetune", tiny_prepared, run, "steps=4", *sets), "--resume", "auto"])
    assert proc.stderr.count("partial adaptation: the teacher predicts") == 1
    weights = run / "checkpoints" / "step_00000004" / "weights.pt"
    assert torch.load(weights, map_location="cpu", weights_only=True)["extra"]["target_classes"]
