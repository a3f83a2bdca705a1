"""Inference benchmarks.

throughput  end-to-end pixels/s of `infer_city` (read, normalise, sliding windows, blend, Zarr blocks,
            COG, quicklook) on a generated AB-like GeoTIFF scene (242-band HSI, MSI, SAR) with an
            exported tiny fusion model, and its ratio to the pure model forward over the same windows:
            python benchmarks/bench_infer.py throughput --size 256x384 --model configs/models/tiny.yaml
memory      peak RSS of whole-scene inference on N x N GeoTIFF scenes (2-band SAR-like, per-pixel model,
            window 512, block 2048), each size in its own process:
            python benchmarks/bench_infer.py memory --sizes 4096 16384
Without arguments both run at their defaults; --quick uses small sizes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import figure  # noqa: E402
from c2seg.cli import parse_size  # noqa: E402



def _peak_rss_mib() -> float:
    """This process image's peak RSS (VmHWM; unlike getrusage's maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _export_random(spec, model_yaml: Path, path: Path) -> Path:
    """An exported model file (c2seg-model/1) with random weights and unit normalisation."""
    from c2seg.config import to_dict
    from c2seg.train.config import load_model_config
    from c2seg.train.export import save_exported
    from c2seg.train.models import FusionSegmenter

    cfg = load_model_config(model_yaml)
    model = FusionSegmenter(spec, cfg)
    norm = {m.name: {"mean": [0.0] * m.bands, "std": [1000.0] * m.bands} for m in spec.modalities}
    save_exported(path, to_dict(cfg), spec.to_dict(), model.state_dict(), norm, spec.modality_names, 128)
    return path


class TimedModel:
    """Wraps a model and sums the wall time of its forward calls (the pure model time of a run)."""

    def __init__(self, model) -> None:
        self.model, self.seconds = model, 0.0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def to(self, device):
        self.model.to(device)
        return self

    def eval(self):
        self.model.eval()
        return self

    def __call__(self, inputs):
        t0 = time.perf_counter()
        out = self.model(inputs)
        self.seconds += time.perf_counter() - t0
        return out


def throughput(args) -> dict:
    """Whole-scene inference through the run path, timing the model's forward calls inside it."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as work:
        return _throughput(args, Path(work))


def _throughput(args, work: Path) -> dict:
    from c2seg.spec import load_spec
    from c2seg.data_prep.manifest import Normalizer
    from c2seg.data_prep.readers import open_city
    from c2seg.data_prep.synth import generate_dataset
    from c2seg.inference.config import InferConfig
    from c2seg.inference.predictor import Predictor
    from c2seg.inference.runner import infer_scene
    from c2seg.inference.windows import window_grid
    from c2seg.train.export import load_exported

    h, w = parse_size(args.size)
    spec = generate_dataset(load_spec(ROOT / "configs/datasets/demo_ab.yaml", data_root=work / "data"), h, w,
                            seed=0, fmt="geotiff")
    model_path = _export_random(spec, Path(args.model), work / "model.pt")
    cfg = InferConfig(window=args.window, overlap=args.overlap, batch_size=args.batch, quicklook=True, device="cpu")
    runs = []
    for i in range(args.rounds + 1):  # round 0 warms up (imports, allocator)
        t0 = time.perf_counter()
        exported = load_exported(model_path)
        timed = TimedModel(exported.model)
        scene = open_city(spec, "synth_target")[0]
        ids = exported.spec.scored_class_ids
        res = infer_scene(scene, Predictor(timed, ids, "cpu", cfg.tta), Normalizer(spec, exported.normalization),
                          exported.modalities, ids, cfg, work / f"out{i}", spec)
        runs.append((time.perf_counter() - t0, timed.seconds))
    e2e, forward = (sum(r[i] for r in runs[1:]) / args.rounds for i in (0, 1))  # means over the rounds
    px = h * w
    windows = len(window_grid(h, w, cfg.window, cfg.overlap))
    out = {"size": f"{h}x{w}", "windows": windows, "windows_predicted": res.windows, "e2e_s": e2e,
           "forward_s": forward, "pixels_per_s": px / e2e, "ratio": e2e / forward,
           "rounds": [{"e2e_s": a, "forward_s": b} for a, b in runs[1:]]}
    note = f"{h}x{w} px, window {cfg.window}, overlap {cfg.overlap}, batch {cfg.batch_size}, {args.threads} threads"
    figure("infer", "end-to-end throughput (AB-like, tiny model)", px / e2e, "px/s", note)
    figure("infer", "end-to-end / model forward time (goal <= 1.2)", e2e / forward, "x",
           f"{windows} windows, mean of {args.rounds} rounds")
    return out


def memory_one(args) -> dict:
    """One scene size in this process: write the scene, run inference, report peak RSS."""
    import numpy as np
    import rasterio
    import torch
    from affine import Affine

    from c2seg.spec import read_spec_yaml, spec_from_dict
    from c2seg.data_prep.readers import open_city
    from c2seg.data_prep.manifest import Normalizer
    from c2seg.inference.config import InferConfig
    from c2seg.inference.predictor import Predictor
    from c2seg.inference.runner import infer_scene

    n = args.size
    work = Path(args.work)
    data = read_spec_yaml(ROOT / "configs/datasets/c2seg_ab.yaml")
    data.update(name="bench_big", modalities=[{"name": "sar", "bands": 2, "resolution_m": 10.0}],
                cities=[{"name": "big", "role": "source", "format": "geotiff", "files": {"sar": "sar.tif"},
                         "labelled": False}])
    spec = spec_from_dict(data, data_root=work)
    path = work / "sar.tif"
    if not path.is_file():
        with rasterio.open(path, "w", driver="GTiff", height=n, width=n, count=2, dtype="int16", crs="EPSG:32632",
                           transform=Affine(10, 0, 5e5, 0, -10, 5.4e6), tiled=True, blockxsize=512, blockysize=512,
                           compress="deflate") as ds:
            for r in range(0, n, 2048):
                rows = np.arange(r, min(r + 2048, n))[:, None]
                cols = np.arange(n)[None]
                a = (1000 * np.sin(rows / 97.0) * np.cos(cols / 131.0)).astype(np.int16)
                ds.write(np.stack([a, (a // 2 + 300).astype(np.int16)]), window=((r, r + len(rows)), (0, n)))
    base = _peak_rss_mib()

    class PixelModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(2, spec.num_logits, 1)

        def forward(self, inputs):
            return self.conv(inputs["sar"])

    torch.manual_seed(0)
    scene = open_city(spec, "big")[0]
    norm = Normalizer(spec, {"sar": {"mean": [0.0, 300.0], "std": [700.0, 400.0]}})
    ids = spec.scored_class_ids
    cfg = InferConfig(window=512, overlap=0.25, batch_size=4, block=2048, quicklook=True)
    t0 = time.perf_counter()
    out = infer_scene(scene, Predictor(PixelModel(), ids, "cpu"), norm, ["sar"], ids, cfg, work / "out", spec)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mib()
    return {"size": n, "seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": base, "windows": out.windows,
            "pixels_per_s": n * n / seconds, "cog_mib": out.class_map.stat().st_size / 2**20}


def memory(args) -> list[dict]:
    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench_infer_{n}_") as work:
            cmd = [sys.executable, __file__, "memory-one", "--size", str(n), "--work", work]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(f"memory benchmark at {n} px failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        figure("infer", f"peak RSS, {n} x {n} scene", r["peak_rss_mib"], "MiB",
               f"{r['seconds']:.0f} s, {r['pixels_per_s'] / 1e6:.2f} Mpx/s, {r['rss_before_mib']:.0f} MiB after writing the input scene in-process")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    sub = parser.add_subparsers(dest="what")
    t = sub.add_parser("throughput")
    t.add_argument("--size", default="256x384")
    t.add_argument("--model", default=str(ROOT / "configs/models/tiny.yaml"))
    t.add_argument("--window", type=int, default=128)
    t.add_argument("--overlap", type=float, default=0.5)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--rounds", type=int, default=3)
    m = sub.add_parser("memory")
    m.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    one = sub.add_parser("memory-one")
    one.add_argument("--size", type=int, required=True)
    one.add_argument("--work", required=True)
    args = parser.parse_args()
    if args.what == "memory-one":
        print(json.dumps(memory_one(args)))
        return
    if args.what is None:  # run_all: both, at default or quick sizes
        defaults = parser.parse_args(["throughput"])
        defaults.size = "128x192" if args.quick else defaults.size
        result = {"throughput": throughput(defaults)}
        mem = parser.parse_args(["memory"])
        mem.sizes = [1024, 2048] if args.quick else mem.sizes
        result["memory"] = memory(mem)
    else:
        result = {"throughput": throughput, "memory": memory}[args.what](args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
