"""``finetune.keep_best``: the weights of the best val mIoU, step 0 included, kept in OUTPUT/best/ and exported by
``train export`` (early stopping on val for small labelled sets)."""

from __future__ import annotations

import json

import torch

from c2seg.train.checkpoint import BestWeights
from c2seg.train.export import load_exported
from c2seg.train.models.segmenter import pixel_features
from c2seg.train.weights import read_weights
from tests.fixtures_train import ROOT, run_train, tiny_args


def test_a_run_that_never_beats_its_start_exports_the_fitted_per_pixel_classifier(tiny_prepared, tmp_path):
    """lr 0: every validation scores the same, so the kept model is the start, where the context's classifier
    is zero and the model is its fitted per-pixel head alone (bands and 3 x 3 means)."""
    from c2seg.train.data import PreparedData

    model = tmp_path / "tiny_pixel.yaml"
    model.write_text((ROOT / "configs/models/tiny.yaml").read_text() + "pixel_head: true\npixel_head_means: [3]\n")
    run = tmp_path / "run"
    run_train(tiny_args("finetune", tiny_prepared, run, f"model={model}", "finetune.adapt=false",
                        "finetune.pixel_head_init=fit", "finetune.keep_best=true", "finetune.eval_every=1",
                        "optim.lr=0", "steps=2", "checkpoint_every=2"))
    vals = [json.loads(line) for line in (run / "val_metrics.jsonl").read_text().splitlines()]
    assert [v["step"] for v in vals] == [0, 1, 2]
    assert json.loads((run / "best" / "score.json").read_text()) == {"step": 0, "val_miou": vals[0]["miou"]}

    best, student = tmp_path / "best.pt", tmp_path / "student.pt"
    run_train(["train", "export", "--run-dir", str(run), "--out", str(best)])  # auto: the kept best
    run_train(["train", "export", "--run-dir", str(run), "--out", str(student), "--weights", "student"])
    assert (read_weights(best).step, read_weights(student).step) == (0, 2)

    exported = load_exported(best)
    data = PreparedData(tiny_prepared)
    batch = next(iter(data.each_tile_once("val", [c.name for c in data.spec.cities], 2, rank=0, world_size=1)))
    inputs = {m: batch[m].float() for m in data.spec.modality_names}
    with torch.no_grad():
        pixel_only = sum(exported.model.pixel[m](pixel_features(inputs[m], (3,))) for m in inputs)
        torch.testing.assert_close(exported.model(inputs), pixel_only)


def test_the_kept_weights_are_those_of_the_best_validation(tiny_prepared, tmp_path):
    """A training run (lr > 0) validated at every step: the kept step is the first of the best val mIoU logged,
    and the exported model is the checkpoint of that step."""
    run = tmp_path / "run"
    run_train(tiny_args("finetune", tiny_prepared, run, "finetune.adapt=false", "finetune.keep_best=true",
                        "finetune.eval_every=1", "optim.lr=3e-3", "steps=4", "checkpoint_every=1",
                        "keep_checkpoints=5"))
    vals = [json.loads(line) for line in (run / "val_metrics.jsonl").read_text().splitlines()]
    best = max(vals, key=lambda v: v["miou"])  # the first of the best: a tie does not replace
    assert json.loads((run / "best" / "score.json").read_text()) == {"step": best["step"], "val_miou": best["miou"]}
    assert best["step"] > 0  # 4 steps improve on the random start here, so a later step replaced it
    kept = read_weights(run / "best" / "weights.pt")
    at_step = read_weights(run / "checkpoints" / f"step_{best['step']:08d}" / "weights.pt")
    assert kept.step == best["step"]
    assert all(torch.equal(kept.state_dict[k], at_step.state_dict[k]) for k in kept.state_dict)


def test_a_resumed_run_keeps_the_better_score_it_saved(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "score.json").write_text(json.dumps({"step": 40, "val_miou": 0.9}))
    best = BestWeights(tmp_path, enabled=True, weights_meta={}, fresh=False)
    best.offer(engine=None, step=60, values={"val_miou": 0.5})  # worse: nothing gathered, nothing written
    assert json.loads((tmp_path / "best" / "score.json").read_text())["step"] == 40
    assert not (tmp_path / "best" / "weights.pt").exists()


def test_a_fresh_run_drops_what_an_earlier_run_of_the_folder_kept(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "score.json").write_text(json.dumps({"step": 40, "val_miou": 0.9}))
    assert BestWeights(tmp_path, enabled=True, weights_meta={}, fresh=True).score == -float("inf")
    assert not (tmp_path / "best").exists()
