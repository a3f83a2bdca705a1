"""Time and peak memory to generate an AB-like city (242-band HSI, MSI 4, SAR 2) and to read it back by
windows. Each phase runs in its own process so its peak RSS is its own.

    .venv/bin/python benchmarks/bench_scenes.py --size 2000 --format mat_v73 --out /tmp/bench_scenes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.report import figure  # noqa: E402


def _spec(out: Path, fmt: str):
    from c2seg.spec import load_spec
    from c2seg.data_prep.synth import with_format

    spec = with_format(load_spec(Path(__file__).parent.parent / "configs/datasets/demo_ab.yaml", data_root=out), fmt)
    return replace(spec, cities=spec.cities[:1])


def phase(name: str, size: int, fmt: str, out: Path, block: int) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")
    spec = _spec(out, fmt)
    t0 = time.perf_counter()
    if name == "generate":
        from c2seg.data_prep.synth import generate_dataset

        generate_dataset(spec, size, size, seed=0, overwrite=True)
    else:
        from c2seg.data_prep.readers import iter_windows, open_city

        scene = open_city(spec, spec.cities[0].name)[0]
        for w in iter_windows(scene.height, scene.width, block):
            for m in spec.modality_names:
                scene.read(m, w)
            scene.read_label(w)
        scene.close()
    took = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**30
    return {"phase": name, "size": size, "format": fmt, "seconds": round(took, 1), "peak_rss_mib": round(peak_mib),
            "disk_gib": round(disk, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2000, help="city side in px (default: %(default)s)")
    parser.add_argument("--format", default="mat_v73", choices=["mat_v73", "geotiff", "mat_v5"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_scenes"))
    parser.add_argument("--block", type=int, default=512, help="read window in px (default: %(default)s)")
    parser.add_argument("--phase", choices=["generate", "read"], help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a 500 x 500 city")
    args = parser.parse_args()
    if args.quick:
        args.size = 500
    if args.phase:
        print(json.dumps(phase(args.phase, args.size, args.format, args.out, args.block)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("generate", "read"):
        result = subprocess.run([sys.executable, __file__, "--phase", name, "--size", str(args.size), "--format",
                                 args.format, "--out", str(args.out), "--block", str(args.block)],
                                check=True, capture_output=True, text=True)
        line = result.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        r = json.loads(line)
        what = f"{name} {r['size']}x{r['size']} AB-like city ({r['format']})"
        figure("scenes", f"{what}: time", r["seconds"], "s", f"{r['disk_gib']} GiB on disk")
        figure("scenes", f"{what}: peak RSS", r["peak_rss_mib"], "MiB")


if __name__ == "__main__":
    main()
