"""The per-pixel head fitted before training (train/pixel_fit.py): the sample of labelled pixels, the logistic
regression it fits (its optimum, at 1 and at 2 ranks), and the head it sets."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

from c2seg.train.models.segmenter import pixel_features
from c2seg.train.pixel_fit import fit_logistic, fit_pixel_head, sample_labelled_pixels
from c2seg.train.weights import read_weights
from tests.fixtures_train import ROOT, checkpoint_tensors, run_script_ranks, run_train, tiny_args

IGNORE = 255


def _batches(seed: int = 0, n: int = 3) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of 2 tiles of 6 x 6 px: 'a' 3 bands, 'b' 2 bands; labels 0-2, some ignored, class
    separable by band 0 plus noise."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = torch.randint(0, 3, (2, 6, 6), generator=gen)
        a = torch.randn(2, 3, 6, 6, generator=gen)
        a[:, 0] += 1.5 * label
        label[:, 0] = IGNORE  # an ignored row
        out.append({"a": a, "b": torch.randn(2, 2, 6, 6, generator=gen), "label": label.to(torch.uint8)})
    return out


KEEP = torch.tensor([0, 1, 2])


def test_every_labelled_pixel_is_sampled_below_the_cap_and_a_seeded_sample_above():
    x, y = sample_labelled_pixels(_batches(), ["a", "b"], KEEP, 10_000, seed=0)
    assert x.shape == (3 * 2 * 5 * 6, 5)  # 3 batches x 2 tiles x 5 labelled rows x 6 columns; 3 + 2 bands
    assert sorted(x[:, 0].tolist()) == sorted(torch.cat([b["a"][:, 0, 1:].reshape(-1) for b in _batches()]).tolist())
    assert set(y.tolist()) == {0, 1, 2}

    capped, labels = sample_labelled_pixels(_batches(), ["a", "b"], KEEP, 50, seed=0)
    again, _ = sample_labelled_pixels(_batches(), ["a", "b"], KEEP, 50, seed=0)
    other, _ = sample_labelled_pixels(_batches(), ["a", "b"], KEEP, 50, seed=1)
    assert capped.shape == (50, 5) and labels.shape == (50,)
    assert torch.equal(capped, again) and not torch.equal(capped, other)
    rows = {tuple(r) for r in x.tolist()}
    assert all(tuple(r) in rows for r in capped.tolist())  # a subset of the labelled pixels


def _objective_gradient(x, y, weight, bias) -> torch.Tensor:
    """The gradient of scikit-learn's objective at C = 1 (mean cross-entropy, L2 / N on the weights only) over
    the classes the pixels have."""
    present = torch.bincount(y, minlength=len(bias)) > 0
    w, b = weight[present].double().requires_grad_(), bias[present].double().requires_grad_()
    column = torch.cumsum(present, 0) - 1  # a present class's column among the present ones
    loss = F.cross_entropy(x.double() @ w.T + b, column[y]) + (w ** 2).sum() / (2 * len(y))
    loss.backward()
    return torch.cat([w.grad.reshape(-1), b.grad])


def test_the_fit_is_the_l2_logistic_regression_optimum():
    x, y = sample_labelled_pixels(_batches(n=6), ["a", "b"], KEEP, 10_000, seed=0)
    weight, bias = fit_logistic(x, y, num_logits=4)  # a 4th logit (unscored) that no pixel has
    assert weight.shape == (4, 5) and bias.shape == (4,)
    assert _objective_gradient(x, y, weight, bias).abs().max() < 1e-5  # stationary: the (convex) optimum
    assert not weight[3].any() and bias[3] == bias[:3].min() - 10  # the class no pixel has: never the likeliest
    assert weight[:, 0].argmax() == 2 and weight[:, 0].argmin() == 0  # band 0 grows with the class
    accuracy = float(((x @ weight.T + bias).argmax(1) == y).float().mean())
    assert round(accuracy * len(y)) == 264 and len(y) == 360


def test_no_labelled_pixel_is_one_clear_error():
    x, y = sample_labelled_pixels(_batches(), ["a", "b"], torch.tensor([7]), 100, seed=0)
    assert x.shape == (0, 5)
    with pytest.raises(ValueError, match="no labelled pixels"):
        fit_logistic(x, y, 3)


def test_pixel_features_are_the_bands_then_their_window_means_inside_the_tile():
    bands = torch.arange(16.0).reshape(1, 1, 4, 4)
    features = pixel_features(bands, (3,))
    assert features.shape == (1, 2, 4, 4)
    assert torch.equal(features[0, 0], bands[0, 0])
    assert features[0, 1].tolist() == [[2.5, 3.0, 4.0, 4.5], [4.5, 5.0, 6.0, 6.5], [8.5, 9.0, 10.0, 10.5],
                                       [10.5, 11.0, 12.0, 12.5]]  # a corner: the mean of its 4 pixels in the tile
    assert torch.equal(pixel_features(bands, ()), bands)


def test_sampled_pixels_carry_the_window_means_after_the_bands():
    plain, _ = sample_labelled_pixels(_batches(), ["a", "b"], KEEP, 10_000, seed=0)
    x, _ = sample_labelled_pixels(_batches(), ["a", "b"], KEEP, 10_000, seed=0, means=(3, 5))
    assert x.shape == (plain.shape[0], 3 * 3 + 2 * 3)  # per modality: bands, 3 x 3 means, 5 x 5 means
    assert torch.equal(x[:, :3], plain[:, :3]) and torch.equal(x[:, 9:11], plain[:, 3:])


@pytest.mark.parametrize("means", [(), (3,)])
def test_the_head_gives_the_fitted_logits(means):
    from torch import nn

    width = 1 + len(means)
    module = nn.Module()
    module.pixel = nn.ModuleDict({"a": nn.Conv2d(3 * width, 4, 1), "b": nn.Conv2d(2 * width, 4, 1)})
    fit_pixel_head(module, _batches(), ["a", "b"], KEEP, 4, max_pixels=10_000, seed=0, rank=0, means=means)
    x, y = sample_labelled_pixels(_batches(), ["a", "b"], KEEP, 10_000, seed=0, means=means)
    weight, bias = fit_logistic(x, y, 4)
    batch = _batches(seed=5, n=1)[0]
    features = {m: pixel_features(batch[m], means) for m in ("a", "b")}
    with torch.no_grad():
        logits = module.pixel["a"](features["a"]) + module.pixel["b"](features["b"])
    bands = torch.cat([features["a"], features["b"]], 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(logits.permute(0, 2, 3, 1), bands @ weight.T + bias, atol=1e-5, rtol=1e-5)


RANK_FIT = textwrap.dedent("""
    import json, os
    import torch
    from c2seg.distributed import DistEnv, init_process_group
    from c2seg.train.pixel_fit import fit_logistic, sample_labelled_pixels
    from tests.test_pixel_fit import KEEP, _batches
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_process_group(DistEnv(rank, world, rank, "torchrun"), "gloo", timeout_s=60)
    batches = _batches(n=6)[rank::world]  # each rank its share of the tiles
    x, y = sample_labelled_pixels(batches, ["a", "b"], KEEP, 10_000, seed=rank)
    weight, bias = fit_logistic(x, y, 4)
    print("RESULT " + json.dumps({"weight": weight.tolist(), "bias": bias.tolist()}), flush=True)
""")


def test_two_ranks_fit_one_head_the_same_as_one_rank_on_all_pixels():
    ranks = run_script_ranks(RANK_FIT, 2)
    assert ranks[0] == ranks[1]  # every rank took the same steps
    x, y = sample_labelled_pixels(_batches(n=6), ["a", "b"], KEEP, 10_000, seed=0)
    weight, bias = fit_logistic(x, y, 4)
    torch.testing.assert_close(torch.tensor(ranks[0]["weight"]), weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(ranks[0]["bias"]), bias, atol=1e-4, rtol=1e-4)


def test_a_two_rank_finetune_starts_from_the_fit_of_its_source_train_pixels(tiny_prepared, tmp_path):
    """Through the CLI, 2 ranks, ZeRO-2: the fit runs before the engine, so the optimizer's own copies start from
    it (lr 0 keeps it through the step), and it is the fit of the source cities' labelled train pixels; with
    keep_best, the start is validated and kept by both ranks together (rank 0 writes it)."""
    from c2seg.train.data import PreparedData

    model = tmp_path / "tiny_pixel.yaml"
    model.write_text((ROOT / "configs/models/tiny.yaml").read_text() + "pixel_head: true\n")
    run = tmp_path / "run"
    proc = run_train(tiny_args("finetune", tiny_prepared, run, f"model={model}", "finetune.adapt=false",
                               "finetune.pixel_head_init=fit", "optim.lr=0", "steps=1", "checkpoint_every=1",
                               "finetune.keep_best=true", "finetune.eval_every=1"),
                     nproc=2)
    assert proc.stderr.count("per-pixel head fitted to") == 2  # each rank its share
    _, tensors = checkpoint_tensors(run)
    data = PreparedData(tiny_prepared)
    sources = [c.name for c in data.spec.cities if c.role == "source"]
    batches = [b for r in (0, 1) for b in data.each_tile_once("train", sources, 4, rank=r, world_size=2)]
    names = list(data.spec.modality_names)
    x, y = sample_labelled_pixels(batches, names, torch.tensor(data.spec.scored_class_ids), 10**9, seed=0)
    weight = torch.cat([tensors[f"state_dict.pixel.{m}.weight"][..., 0, 0] for m in names], 1)
    bias = tensors[f"state_dict.pixel.{names[0]}.bias"]
    assert not tensors[f"state_dict.pixel.{names[1]}.bias"].any()  # the bias is the first modality's
    # the optimum of those pixels' objective (where L-BFGS stops in its flat valley depends on the ranks' sums)
    assert _objective_gradient(x, y, weight, bias).abs().max() < 1e-4
    assert json.loads((run / "best" / "score.json").read_text())["step"] == 0
    assert torch.equal(read_weights(run / "best" / "weights.pt").state_dict[f"pixel.{names[0]}.bias"],
                       tensors[f"state_dict.pixel.{names[0]}.bias"])  # lr 0: the start is the step-1 model


def test_the_fit_needs_a_model_with_a_pixel_head(tiny_prepared, tmp_path):
    proc = run_train(tiny_args("finetune", tiny_prepared, tmp_path / "run", "finetune.pixel_head_init=fit"),
                     check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "c2seg train: error: finetune.pixel_head_init=fit needs a model with pixel_head: true "
        "(configs/models/tiny.yaml has none)")
