"""The fusion segmenter and its pretrainer: shapes, missing modalities, any band count, the zoo."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from c2seg.config import ConfigError
from c2seg.errors import C2SegError
from c2seg.spec import load_spec
from c2seg.train.cli import count_parameters
from c2seg.train.config import ModelConfig, PretrainConfig, load_model_config
from c2seg.train.models import FusionSegmenter, MaskedPretrainer

ROOT = Path(__file__).resolve().parent.parent
TINY = load_model_config(ROOT / "configs/models/tiny.yaml")
FUSIONS = pytest.mark.parametrize("fusion", ["joint", "cross"])
DECODERS = pytest.mark.parametrize("decoder", ["light", "skip"])


def _cfg(fusion: str, **changes) -> ModelConfig:
    return dataclasses.replace(TINY, fusion=fusion, **changes)


@pytest.fixture(scope="module")
def spec():
    return load_spec(ROOT / "configs/datasets/demo_tiny.yaml")


def _inputs(spec, b=2, h=32, w=40):
    g = torch.Generator().manual_seed(0)
    return {m.name: torch.randn(b, m.bands, h, w, generator=g) for m in spec.modalities}


@FUSIONS
@DECODERS
def test_logits_at_input_resolution_for_any_size_and_subset(spec, fusion, decoder):
    torch.manual_seed(0)
    model = FusionSegmenter(spec, _cfg(fusion, decoder=decoder, stem_dim=8)).eval()
    x = _inputs(spec, h=30, w=45)  # not multiples of the patch size
    assert model(x).shape == (2, spec.num_logits, 30, 45)
    for subset in (["msi"], ["hsi", "sar"], ["sar"]):
        out = model({k: x[k] for k in subset})
        assert out.shape == (2, spec.num_logits, 30, 45) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="no input modality"):
        model({"rgb": x["msi"]})


def test_hsi_is_cut_into_spectral_groups_with_one_token_each(spec):
    model = FusionSegmenter(spec, TINY)
    emb = model.backbone.embeds["hsi"]
    assert (emb.groups, emb.group_bands) == (2, 16)  # 32 bands, at most 16 per token
    tokens = model.backbone.embed(_inputs(spec), ["hsi", "msi"])
    assert tokens["hsi"].shape == (2, 2, 4 * 5, TINY.embed_dim) and tokens["msi"].shape[1] == 1


def test_wavelength_embedding_transfers_between_band_sets():
    """The same weights embed AB's 242-band and BW's 116-band HSI (weights come from wavelengths)."""
    ab, bw = load_spec(ROOT / "configs/datasets/c2seg_ab.yaml"), load_spec(ROOT / "configs/datasets/c2seg_bw.yaml")
    cfg = ModelConfig(name="t", embed_dim=32, depth=1, num_heads=2, max_bands_per_token=128, wavelength_hidden=16,
                      decoder_dim=16)
    model_ab, model_bw = FusionSegmenter(ab, cfg), FusionSegmenter(bw, cfg)
    hsi_ab = {k: v for k, v in model_ab.state_dict().items() if k.startswith("backbone.embeds.hsi.weight_generator")}
    assert hsi_ab and model_bw.load_state_dict(hsi_ab, strict=False).unexpected_keys == []
    out = model_bw.eval()({"hsi": torch.randn(1, bw.modality("hsi").bands, 16, 16)})
    assert out.shape[-2:] == (16, 16)


@FUSIONS
@DECODERS
def test_a_dropped_modality_changes_nothing_and_keeps_every_parameter_in_the_graph(spec, fusion, decoder):
    torch.manual_seed(0)
    model = FusionSegmenter(spec, _cfg(fusion, decoder=decoder, stem_dim=8)).train()
    inputs = _inputs(spec)
    logits = model(inputs, drop="msi")
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    other_msi = {**inputs, "msi": inputs["msi"] + 1.0}
    with torch.no_grad():
        assert torch.equal(model(other_msi, drop="msi"), logits.detach())
        assert not torch.equal(model(other_msi), model(inputs))


@DECODERS
def test_the_pixel_head_starts_at_zero_and_learns_from_the_present_modalities(spec, decoder):
    torch.manual_seed(0)
    plain = FusionSegmenter(spec, _cfg("joint", decoder=decoder, stem_dim=8))
    torch.manual_seed(0)
    model = FusionSegmenter(spec, _cfg("joint", decoder=decoder, stem_dim=8, pixel_head=True))
    inputs = _inputs(spec)
    with torch.no_grad():
        assert torch.equal(model(inputs), plain(inputs))  # the same model until the head learns
    model(inputs, drop="msi").sum().backward()
    assert model.pixel["hsi"].weight.grad.abs().sum() > 0
    assert model.pixel["msi"].weight.grad.abs().sum() == 0


def test_modality_dropout_draws_one_modality_with_its_chance():
    from c2seg.train.finetune import modality_to_drop

    names = ["hsi", "msi", "sar"]
    torch.manual_seed(1)  # torch.rand() < 0.5 in draws 2, 4, 5, 7, 10, each followed by torch.randint(3)
    assert [modality_to_drop(names, 0.5) for _ in range(10)] == [None, "hsi", None, "msi", "sar", None, "sar", None,
                                                                  None, "msi"]
    state = torch.random.get_rng_state()
    assert modality_to_drop(names, 0.0) is None and modality_to_drop(["msi"], 0.9) is None
    assert torch.equal(torch.random.get_rng_state(), state)  # no draw: runs without dropout stay as they were


@FUSIONS
def test_gradient_reaches_every_parameter_and_checkpointing_does_not_change_it(spec, fusion):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = FusionSegmenter(spec, _cfg(fusion, modality_dropout=0.0, activation_checkpointing=checkpointing))
        model.train()(_inputs(spec)).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert [n for n, g in grads[0].items() if g is None or not g.abs().sum() > 0] == []
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


@FUSIONS
def test_fused_features_depend_on_every_modality_there_and_elsewhere(spec, fusion):
    """Changing one modality at one location changes the fused features there and, through attention,
    elsewhere."""
    torch.manual_seed(0)
    model = FusionSegmenter(spec, _cfg(fusion)).eval()
    x = _inputs(spec)
    base = model.backbone(x)
    for name in x:
        changed = {**x, name: x[name].clone()}
        changed[name][..., :8, :8] += 1.0  # the top-left patch only
        diff = (model.backbone(changed) - base).abs().sum(dim=(0, 1))
        assert diff[0, 0] > 0 and diff[1:, 1:].sum() > 0


@pytest.mark.parametrize("task", ["segmenter", "pretrainer"])
def test_weight_decay_spares_biases_norms_and_embedding_tables(spec, task):
    """Every parameter is in exactly one group; embedding tables (modality and spectral-group embeddings),
    biases and norms get no weight decay, projection matrices and kernels do."""
    from c2seg.train.engine import weight_decay_split

    model = FusionSegmenter(spec, TINY) if task == "segmenter" else MaskedPretrainer(spec, TINY, PretrainConfig())
    decay, no_decay = weight_decay_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(map(id, decay + no_decay)) == sorted(names)
    spared = {names[id(p)] for p in no_decay}
    decayed = {names[id(p)] for p in decay}
    assert "backbone.modality_embed" in spared and any(n.endswith("group_embed") for n in spared)
    assert all(p.ndim > 1 for p in decay) and any(n.endswith("proj.weight") for n in decayed)
    if task == "pretrainer":
        assert "decoder_embed.weight" in decayed


def test_masked_pretraining_refuses_cross_fusion(spec):
    with pytest.raises(ValueError, match="implemented for fusion: joint"):
        MaskedPretrainer(spec, _cfg("cross"), PretrainConfig())


def test_pretraining_reconstructs_a_fully_hidden_modality(spec):
    torch.manual_seed(0)
    pre = MaskedPretrainer(spec, TINY, PretrainConfig(mask_ratio=0.75, full_modality_mask_prob=1.0, decoder_dim=32,
                                                      decoder_depth=1))
    g = torch.Generator().manual_seed(1)
    scene = torch.nn.functional.interpolate(torch.randn(2, 1, 4, 4, generator=g), size=(32, 32), mode="bilinear")
    x = {m.name: scene * torch.randn(1, m.bands, 1, 1, generator=g) for m in spec.modalities}  # shared structure
    loss, parts = pre(x)
    assert set(parts) == {"recon_hsi", "recon_msi", "recon_sar"} and all(v > 0 for v in parts.values())
    loss.backward()
    assert pre.heads["sar"].weight.grad.abs().sum() > 0
    opt = torch.optim.AdamW(pre.parameters(), lr=3e-3)
    first = float(loss.detach())
    for _ in range(60):
        opt.zero_grad()
        loss, _ = pre(x)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first  # it learns


@pytest.mark.parametrize("name,low,high", [("tiny", 1e5, 1e6), ("base", 90e6, 110e6), ("large", 280e6, 340e6),
                                           ("huge", 570e6, 690e6), ("giant", 1.0e9, 1.4e9)])
def test_zoo_parameter_counts_on_the_meta_device(name, low, high):
    total = count_parameters(ROOT / f"configs/models/{name}.yaml",
                             load_spec(ROOT / "configs/datasets/c2seg_ab.yaml"))["total"]
    assert low <= total <= high


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_cross_fusion_adds_a_local_block_and_one_cross_attention_per_block(name, tmp_path):
    path = tmp_path / f"{name}.yaml"
    path.write_text((ROOT / f"configs/models/{name}.yaml").read_text() + "\nfusion: cross\n")
    spec = load_spec(ROOT / "configs/datasets/c2seg_ab.yaml")
    joint, cross = count_parameters(ROOT / f"configs/models/{name}.yaml", spec), count_parameters(path, spec)
    cfg = load_model_config(path)
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    block = 4 * d * d + 4 * d + 2 * d * hidden + hidden + d + 4 * d  # attention, MLP, two LayerNorms
    extra = block + 2 * d + cfg.depth * (4 * d * d + 4 * d + 2 * d)  # + context norm, per block q/kv/proj + norm
    assert cross["total"] - joint["total"] == cross["encoder"] - joint["encoder"] == extra


def test_model_config_rejects_unknown_keys_and_bad_values(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("name: x\nembed_dim: 64\ndepth: 2\nnum_heads: 4\nlayers: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'layers'"):
        load_model_config(bad)
    bad.write_text("name: x\nembed_dim: 64\ndepth: 2\nnum_heads: 5\n")
    with pytest.raises(ConfigError, match="not divisible"):
        load_model_config(bad)
    bad.write_text("name: x\nembed_dim: 64\ndepth: 2\nnum_heads: 4\npixel_head: true\npixel_head_means: [3, 4]\n")
    with pytest.raises(C2SegError, match=r"pixel_head_means must be odd window sides >= 3, got \[3, 4\]"):
        load_model_config(bad)
    bad.write_text("name: x\nembed_dim: 64\ndepth: 2\nnum_heads: 4\npixel_head_means: [3]\n")
    with pytest.raises(C2SegError, match="pixel_head_means needs pixel_head: true"):
        load_model_config(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "configs/train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_load(path):
    from c2seg.train.config import load_train_config

    cfg = load_train_config(path)
    assert load_model_config(cfg.model).name


def test_every_tensor_follows_the_model_to_its_device(spec):
    """A forward on another device (here ``meta``, standing in for a GPU) mixes no tensor left on the CPU."""
    model = FusionSegmenter(spec, TINY).eval().to("meta")
    x = {m.name: torch.empty(1, m.bands, 16, 24, device="meta") for m in spec.modalities}
    out = model(x)
    assert out.device.type == "meta" and out.shape == (1, spec.num_logits, 16, 24)



def test_skip_stem_gives_skips_at_every_halving_down_to_half_a_patch(spec):
    model = FusionSegmenter(spec, _cfg("joint", decoder="skip", stem_dim=8))
    x = _inputs(spec, b=1, h=32, w=40)
    skips = model.stem(x, ["hsi", "msi", "sar"])
    assert [tuple(t.shape) for t in skips] == [(1, 8, 32, 40), (1, 16, 16, 20), (1, 32, 8, 10)]
    assert len(model.head.fuse) == 3
