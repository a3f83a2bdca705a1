"""Small labelled data as users bring it: c2seg against the classical per-pixel baselines (issue 21).

Generates stand-ins in two public layouts, matching the shipped example specs, from one of two generators
(--generator): the demo's (data_prep.synth: one generated city cut into chips), or benchmarks/synth_fields.py's
landscape of mixed-material fields, built apart from it (clouds on the floods chips' S2, speckled SAR):

enmap   configs/datasets/example_enmap.yaml: an EnMAP L2A-like tile set, images/<chip>.tif (224 bands, float32,
        ENVI band tags wavelength / fwhm / wavelength_units) and labels/<chip>.tif (uint8, 0 unlabelled), with
        train_files.csv / validation_files.csv / test_files.csv (header `image,mask`). Labels are sparse, as in
        real HSI sets: --squares labelled squares of --square-px px per chip (the defaults give about 640
        labelled test pixels; the issue's real set had 660).
floods  configs/datasets/example_floods.yaml: Sen1Floods11-like chips, S1Hand/<Region>_<id>_S1Hand.tif,
        S2Hand/..._S2Hand.tif, LabelHand/..._LabelHand.tif (int16: -1 nodata, 0 dry, 1 water), split csv
        files splits/flood_{train,valid,test}_data.csv without header. Labels dense (-1 where the generator
        leaves parcels unlabelled).

Then, through the real CLIs: `c2seg data prep` with the example spec; per seed `c2seg train finetune`
(from scratch, --config: by default configs/train/small_labelled.yaml, the guide's recipe for small labelled
sets, whose spatial-spectral per-pixel head is fitted first as a logistic regression of the labelled train pixels;
--steps steps, validated every --eval-every), `train export` (the weights of the best val mIoU, which the recipe
keeps), `infer run` / `infer evaluate --split test` on the test chips, and the same on the model's own train chips
(does it fit its training pixels?). On exactly the train split's labelled pixels, read from the files by the
product's readers and normalised with the prep's statistics (what the model is fed), scikit-learn's
LogisticRegression and RandomForestClassifier (random_state = the seed), and a LogisticRegression of each pixel's
bands with their 3 x 3 and 7 x 7 means (the classical spatial-spectral arm), predict the test chips' labelled
pixels, scored by c2seg.metrics like `infer evaluate`. Prints one table per dataset (arm, mIoU, OA, train seconds)
and c2seg's difference from the best classical arm; writes OUT/<dataset>/result.json.

    python benchmarks/bench_smalldata.py --out runs/bench_smalldata --datasets enmap floods --seeds 0 --steps 120
    python benchmarks/bench_smalldata.py --datasets enmap --override data.radiometric.prob=0 --tag _norad  # a probe

A stand-in and its prep are kept in OUT/<dataset>/ and reused: give another --out for other stand-in options
(--generator, --grid, --chip, --squares, --square-px, --mixing, --data-seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import _cli, _train, _train_seconds  # noqa: E402  (after the path insert)

SMALL_LABELLED = "configs/train/small_labelled.yaml"  # the guide's recipe for small labelled sets
REGIONS = ("Bolivia", "Ghana", "India", "Mekong", "Paraguay", "Somalia", "Spain", "USA")
SPLIT_SHARES = (("train", 0.6), ("val", 0.15), ("test", 0.25))


@dataclass(frozen=True)
class Layout:
    """A stand-in layout: its example spec, the city trained on and the one tested, how chips are named,
    which file keys a chip has, and how its split lists are written."""

    spec: str
    train_city: str
    test_city: str
    chip_name: Callable[[int, np.random.Generator], str]
    write_lists: Callable[[Path, dict[str, list[str]]], None]
    sparse: bool
    clouds: float  # FieldSynth's cloud share (EnMAP L2A masks its clouds; Sen1Floods11's S2 chips keep theirs)


def _enmap_lists(root: Path, splits: dict[str, list[str]]) -> None:
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        rows = "".join(f"images/{c}.tif,labels/{c}.tif\n" for c in splits[split])
        (root / f"{name}_files.csv").write_text("image,mask\n" + rows)


def _floods_lists(root: Path, splits: dict[str, list[str]]) -> None:
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        rows = "".join(f"{c}_S1Hand.tif,{c}_LabelHand.tif\n" for c in splits[split])
        (root / "splits" / f"flood_{name}_data.csv").write_text(rows)


LAYOUTS = {
    "enmap": Layout("configs/datasets/example_enmap.yaml", "tiles", "tiles_test",
                    lambda i, rng: f"ENMAP01_L2A_{i:04d}", _enmap_lists, sparse=True,
                    clouds=0.0),
    "floods": Layout("configs/datasets/example_floods.yaml", "chips", "chips",
                     lambda i, rng: f"{REGIONS[i % len(REGIONS)]}_{rng.integers(10**5, 10**6)}", _floods_lists,
                     sparse=False, clouds=0.08),
}


# ---- stand-in data ----------------------------------------------------------------------------------------------
def _sparse(label: np.ndarray, ignore_id: int, squares: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """``label`` kept only in ``squares`` random squares of ``side`` px (labelled polygons), ignore elsewhere."""
    keep = np.zeros(label.shape, bool)
    for r, c in zip(rng.integers(0, label.shape[0] - side + 1, squares), rng.integers(0, label.shape[1] - side + 1,
                                                                                      squares)):
        keep[r:r + side, c:c + side] = True
    return np.where(keep, label, np.uint8(ignore_id))


def _mixed(data: dict[str, np.ndarray], names: list[str], mixing: float, rng: np.random.Generator) -> None:
    """Mixed pixels, in place: each pixel's values of every modality in ``names`` become ``(1 - w) x + w x'``,
    ``x'`` those of a random pixel of the same chip and ``w`` uniform in [0, ``mixing``) (the same partner and
    weight in every modality). At 30 m a pixel holds several materials and takes light from its neighbours, so
    the classes' spectra overlap pixel by pixel while the parcels still differ; the label stays the pixel's own."""
    h, w = data["label"].shape
    weight = rng.uniform(0, mixing, (h, w)).astype(np.float32)
    partner = rng.integers(0, h * w, h * w)
    for name in names:
        values = data[name].reshape(data[name].shape[0], -1)
        data[name] = ((1 - weight.ravel()) * values + weight.ravel() * values[:, partner]).reshape(data[name].shape)


def _band_tags(m) -> list[dict[str, str]]:
    """ENVI-convention band metadata (as GDAL writes EnMAP L2A's) of an optical modality with given centres."""
    if m.wavelengths_nm is None:
        return [{} for _ in range(m.bands)]
    widths = m.bandwidths_nm or tuple(6.5 if w < 1000 else 10.0 for w in m.wavelengths_nm)
    return [{"wavelength": f"{w:g}", "fwhm": f"{f:g}", "wavelength_units": "Nanometers"}
            for w, f in zip(m.wavelengths_nm, widths)]


def _write_chip(path: Path, arr: np.ndarray, dtype: str, transform, crs: str, nodata=None,
                tags: list[dict[str, str]] | None = None) -> None:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=arr.shape[1], width=arr.shape[2], count=arr.shape[0],
                       dtype=dtype, crs=crs, transform=transform, nodata=nodata) as ds:
        ds.write(arr.astype(dtype, copy=False))
        for band, band_tags in enumerate(tags or [], start=1):
            ds.update_tags(band, **band_tags)


def _chip_splits(names: list[str], rng: np.random.Generator) -> dict[str, list[str]]:
    order = [names[i] for i in rng.permutation(len(names))]
    counts = [round(share * len(names)) for _, share in SPLIT_SHARES[:-1]]
    bounds = np.cumsum([0, *counts, len(names) - sum(counts)])
    return {split: order[a:b] for (split, _), a, b in zip(SPLIT_SHARES, bounds[:-1], bounds[1:])}


def _landscape(name: str, spec, args):
    """The generated scene the chips are cut from, its grid transform and CRS: one city of the demo generator
    (``--generator citysynth``) or a FieldSynth landscape (``fields``), ``args.grid * args.chip`` px a side."""
    from affine import Affine

    from benchmarks.synth_fields import FieldSynth
    from c2seg.data_prep.synth import with_format
    from c2seg.data_prep.synth.city import CitySynth
    from c2seg.data_prep.synth.writers import DEFAULT_CRS, city_transform

    size = args.grid * args.chip
    if args.generator == "fields":
        origin = Affine(spec.grid_resolution_m, 0.0, 600000.0, 0.0, -spec.grid_resolution_m, 5300000.0)
        return FieldSynth(spec, size, args.data_seed, cloud_share=LAYOUTS[name].clouds), origin, DEFAULT_CRS
    city_spec = with_format(spec, "geotiff")
    synth = CitySynth(city_spec, city_spec.cities[0], size, size, args.data_seed)
    return (synth, *city_transform(city_spec, synth))


def generate(name: str, root: Path, args) -> Path:
    """Write the ``name`` stand-in under ``root`` (kept when its split lists exist): one generated scene of
    ``args.grid`` x ``args.grid`` chips of ``args.chip`` px, cut into chips in the layout's files."""
    from affine import Affine

    from c2seg.data_prep.synth.writers import label_codes
    from c2seg.raster import Window
    from c2seg.spec import load_spec

    layout = LAYOUTS[name]
    spec = load_spec(ROOT / layout.spec, data_root=root)
    if (root / ".complete").is_file():
        return root
    synth, transform, crs = _landscape(name, spec, args)
    rng = np.random.default_rng(args.data_seed)
    names = []
    files = spec.city(layout.train_city).files
    for i in range(args.grid * args.grid):
        chip = layout.chip_name(i, rng)
        window = Window(i // args.grid * args.chip, i % args.grid * args.chip, args.chip, args.chip)
        data = synth.render(window)
        at = transform @ Affine.translation(window.col, window.row)
        if args.mixing > 0:
            _mixed(data, list(spec.modality_names), args.mixing, rng)
        label = data["label"]
        if layout.sparse:
            label = _sparse(label, spec.ignore_id, args.squares, args.square_px, rng)
        for m in spec.modalities:
            _write_chip(root / files[m.name].replace("{chip}", chip), data[m.name], m.dtype, at, crs, m.nodata,
                        _band_tags(m))
        _write_chip(root / files["label"].replace("{chip}", chip), label_codes(spec, label)[None],
                    "int16" if spec.label_remap else "uint8", at, crs)
        names.append(chip)
    layout.write_lists(root, _chip_splits(names, rng))
    (root / ".complete").write_text("")
    return root


# ---- c2seg through its CLIs -------------------------------------------------------------------------------------
def _prep(name: str, data: Path, prep: Path) -> Path:
    if not (prep / "manifest.json").is_file():
        _cli("data", "prep", "--spec", str(ROOT / LAYOUTS[name].spec), "--data-root", str(data), "--out", str(prep))
    return prep


def _scores(metrics: Path) -> dict[str, float]:
    scores = json.loads(metrics.read_text())
    return {"miou": round(scores["miou"], 4), "oa": round(scores["oa"], 4)}


def _predict_and_score(model: Path, spec_args: list[str], city: str, split: str, out: Path,
                       window: int) -> dict[str, float]:
    """``c2seg infer run`` on ``city``'s chips of ``split`` (``window`` px windows: one a chip) and ``infer
    evaluate`` of them."""
    _cli("infer", "run", "--model", str(model), *spec_args, "--city", city, "--split", split, "--out", str(out),
         "--window", str(window), "--overlap", "0", "--no-quicklook", "--overwrite")
    _cli("infer", "evaluate", "--pred", str(out / city), *spec_args, "--city", city, "--split", split,
         "--out", str(out / "metrics.json"))
    return _scores(out / "metrics.json")


def c2seg_arm(name: str, data: Path, prep: Path, run_dir: Path, seed: int, args) -> dict:
    """Source-only fine-tuning from scratch, export, and scores on the test chips and on its own train chips."""
    layout = LAYOUTS[name]
    spec_args = ["--spec", str(ROOT / layout.spec), "--data-root", str(data)]
    model_set = ["--set", f"model={ROOT / args.model}"] if args.model else []
    extra = ["--set", f"data.prep_dir={prep}", "--set", "init_from=null", "--set", "tracking.enabled=false", *model_set,
             "--set", f"seed={seed}", "--set", f"data.batch_size={args.batch}",
             "--set", f"finetune.eval_every={args.eval_every}",
             "--resume", "auto", *[a for o in args.override for a in ("--set", o)]]
    t0 = time.perf_counter()
    val = _train("finetune", args.config, run_dir, args.steps, extra)
    wall = time.perf_counter() - t0
    model = run_dir / "model.pt"
    _cli("train", "export", "--run-dir", str(run_dir), "--out", str(model))
    return {"test": _predict_and_score(model, spec_args, layout.test_city, "test", run_dir / "pred_test", args.chip),
            "own_train": _predict_and_score(model, spec_args, layout.train_city, "train", run_dir / "pred_train",
                                            args.chip),
            "val": val, "train_s": _train_seconds(run_dir), "wall_s": round(wall, 1)}


# ---- the classical arms on the same pixels ----------------------------------------------------------------------
SPATIAL_MEANS = (3, 7)  # the spatial-spectral arm's windows: each pixel's bands and their 3 x 3 and 7 x 7 means


def labelled_pixels(spec, normalizer, city: str, split: str, means: tuple[int, ...] = ()) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """``(X, y)`` of every labelled pixel of ``city``'s chips of ``split``: the modalities' bands, read by the
    product's readers and normalised with the prep's pooled statistics, and their chip's window ``means`` (as
    c2seg's per-pixel head reads them), side by side; y the class ids."""
    import torch

    from c2seg.data_prep.readers import open_city
    from c2seg.train.models.segmenter import pixel_features

    xs, ys = [], []
    for scene in open_city(spec, city, split):
        with scene:
            label = scene.read_label()
            keep = label != spec.ignore_id
            bands = np.concatenate([pixel_features(torch.from_numpy(normalizer(m, scene.read(m)))[None].float(),
                                                   means)[0].numpy() for m in spec.modality_names])
            xs.append(bands[:, keep].T)
            ys.append(label[keep])
    return np.concatenate(xs), np.concatenate(ys)


def classical_arms(seed: int) -> dict[str, tuple[object, bool]]:
    """Per arm: the classifier, and whether it reads the spatial-spectral features (SPATIAL_MEANS)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    return {"logistic_regression": (LogisticRegression(max_iter=2000, random_state=seed), False),
            "random_forest": (RandomForestClassifier(n_estimators=200, n_jobs=1, random_state=seed), False),
            "logistic_regression_3x3_7x7": (LogisticRegression(max_iter=2000, random_state=seed), True)}


@dataclass(frozen=True)
class Pixels:
    """The labelled pixels the classical arms learn from (train split) and are scored on (test split): their
    bands, then those with their window means; and the scored class ids."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_means: np.ndarray
    x_test_means: np.ndarray
    class_ids: list[int]


def read_pixels(name: str, data: Path, prep: Path) -> Pixels:
    """The stand-in's labelled train and test pixels, read once (with their window means) for every seed."""
    from c2seg.data_prep.manifest import load_manifest
    from c2seg.spec import load_spec

    layout = LAYOUTS[name]
    spec = load_spec(ROOT / layout.spec, data_root=data)
    normalizer = load_manifest(prep).normalizer()
    x_means, y = labelled_pixels(spec, normalizer, layout.train_city, "train", SPATIAL_MEANS)
    x_test_means, y_test = labelled_pixels(spec, normalizer, layout.test_city, "test", SPATIAL_MEANS)
    bands = _band_columns(spec, SPATIAL_MEANS)
    return Pixels(x_means[:, bands], y, x_test_means[:, bands], y_test, x_means, x_test_means, spec.scored_class_ids)


def _band_columns(spec, means: tuple[int, ...]) -> np.ndarray:
    """The columns of the pixels' own bands among the features with window ``means`` (per modality: its bands,
    then their means, as :func:`labelled_pixels` lays them out)."""
    width, columns, start = 1 + len(means), [], 0
    for m in spec.modalities:
        columns.extend(range(start, start + m.channels))
        start += m.channels * width
    return np.array(columns)


def classical(pixels: Pixels, seed: int) -> dict[str, dict]:
    from c2seg.metrics import confusion_matrix, scores_from_confusion

    y, y_test = pixels.y, pixels.y_test
    out = {}
    for arm, (clf, spatial) in classical_arms(seed).items():
        x, x_test = (pixels.x_means, pixels.x_test_means) if spatial else (pixels.x, pixels.x_test)
        t0 = time.perf_counter()
        clf.fit(x, y)
        seconds = time.perf_counter() - t0
        scores = scores_from_confusion(confusion_matrix(y_test, clf.predict(x_test), pixels.class_ids),
                                       pixels.class_ids)
        out[arm] = {"test": {"miou": round(scores.miou, 4), "oa": round(scores.oa, 4)}, "train_s": round(seconds, 1),
                    "train_pixels": int(len(y)), "test_pixels": int(len(y_test))}
    return out


# ---- one dataset, the table -------------------------------------------------------------------------------------
def run_dataset(name: str, args) -> dict:
    out = Path(args.out).resolve() / name
    data = generate(name, out / "data", args)
    prep = _prep(name, data, out / "prep")
    result: dict = {"dataset": name, "seeds": args.seeds, "steps": args.steps, "config": args.config,
                    "model": args.model, "overrides": args.override, "runs": {}}
    pixels = read_pixels(name, data, prep)
    for seed in args.seeds:
        run = classical(pixels, seed)
        run["c2seg"] = c2seg_arm(name, data, prep, out / f"c2seg_seed{seed}{args.tag}", seed, args)
        result["runs"][seed] = run
    (out / f"result{args.tag}.json").write_text(json.dumps(result, indent=1))
    return result


def _mean(runs: dict, arm: str, *keys: str) -> float:
    values = []
    for run in runs.values():
        v = run[arm]
        for k in keys:
            v = v[k]
        values.append(v)
    return float(np.mean(values))


def table(result: dict) -> str:
    """Arm, mIoU, OA, train seconds (means over seeds); c2seg against the best classical arm (by mIoU); c2seg's
    scores on its own train chips."""
    runs = result["runs"]
    arms = list(next(iter(runs.values())))
    lines = [f"{result['dataset']}: seeds {result['seeds']}, c2seg {result['steps']} steps of {result['config']}"
             + (f" with {result['model']}" if result["model"] else "")
             + (f", --set {' '.join(result['overrides'])}" if result["overrides"] else ""),
             f"  {'arm':<30}{'mIoU':>8}{'OA':>8}{'train s':>10}"]
    for arm in arms:
        miou, oa = 100 * _mean(runs, arm, "test", "miou"), 100 * _mean(runs, arm, "test", "oa")
        lines.append(f"  {arm:<30}{miou:>7.1f}%{oa:>7.1f}%{_mean(runs, arm, 'train_s'):>10.1f}")
    best = max((a for a in arms if a != "c2seg"), key=lambda a: _mean(runs, a, "test", "miou"))
    d_miou = 100 * (_mean(runs, "c2seg", "test", "miou") - _mean(runs, best, "test", "miou"))
    d_oa = 100 * (_mean(runs, "c2seg", "test", "oa") - _mean(runs, best, "test", "oa"))
    ratio = _mean(runs, "c2seg", "test", "miou") / max(_mean(runs, best, "test", "miou"), 1e-9)
    lines.append(f"  c2seg vs {best}: mIoU {d_miou:+.1f} points (ratio {ratio:.2f}), OA {d_oa:+.1f} points")
    lines.append(f"  c2seg on its own train chips: mIoU {100 * _mean(runs, 'c2seg', 'own_train', 'miou'):.1f}%, "
                 f"OA {100 * _mean(runs, 'c2seg', 'own_train', 'oa'):.1f}%")
    first = next(iter(runs.values()))["logistic_regression"]
    lines.append(f"  labelled pixels: train {first['train_pixels']}, test {first['test_pixels']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_smalldata", help="stand-ins, preps, runs, result.json (a stand-in there is reused)")
    parser.add_argument("--datasets", nargs="+", choices=sorted(LAYOUTS), default=["enmap"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds (c2seg's seed, the classifiers' random_state); reported per seed")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the generated city, chip splits and labels")
    parser.add_argument("--generator", choices=["citysynth", "fields"], default="citysynth",
                        help="stand-in generator: the demo's city (default) or benchmarks/synth_fields.py's "
                             "landscape of mixed-material fields, clouds on the floods chips and SAR speckle")
    parser.add_argument("--grid", type=int, default=6, help="chips per side of the generated city (default 6: 36)")
    parser.add_argument("--chip", type=int, default=64, help="chip side in px (the example specs' tile size)")
    parser.add_argument("--squares", type=int, default=4, help="enmap: labelled squares per chip")
    parser.add_argument("--square-px", type=int, default=4, help="enmap: side of a labelled square in px")
    parser.add_argument("--mixing", type=float, default=0.0,
                        help="mixed pixels: each pixel's values mixed with those of a random pixel of its chip, at a "
                             "weight uniform in [0, MIXING) (default 0: pure pixels, which the classifiers get all "
                             "right); 0.6 makes per-pixel spectra overlap between classes")
    parser.add_argument("--steps", type=int, default=120,
                        help="c2seg fine-tuning steps (default 120: a few minutes on 2 cores)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=20,
                        help="c2seg's validation interval in steps (the recipe keeps the weights of the best val "
                             "mIoU, the fitted start included, and those are exported)")
    parser.add_argument("--config", default=SMALL_LABELLED,
                        help="c2seg's training config (default: the guide's recipe for small labelled sets: the demo "
                             "model with a per-pixel head fitted first, no radiometric augmentation)")
    parser.add_argument("--model", default=None, help="c2seg model config instead of the training config's")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `--set KEY=VALUE` for c2seg's training run (probes)")
    parser.add_argument("--tag", default="", help="suffix of the run folders and result file (probes)")
    args = parser.parse_args()
    for name in args.datasets:
        print(table(run_dataset(name, args)), flush=True)


if __name__ == "__main__":
    main()
