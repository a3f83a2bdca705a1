"""Run every benchmark under benchmarks/ and print all their figures in one table, with the machine.

Usage: ``.venv/bin/python benchmarks/run_all.py [--only NAME ...] [--quick]`` (``make bench``).
Each ``bench_*.py`` runs in its own process (so peak-memory figures are its own) and reports through
:func:`benchmarks.report.figure`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> str:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="benchmark names (e.g. prep loaders) to run")
    parser.add_argument("--quick", action="store_true", help="pass --quick to each benchmark (smaller sizes)")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as tmp:
        out = Path(tmp.name)
    env = {**os.environ, "C2SEG_BENCH_OUT": str(out), "PYTHONPATH": str(HERE.parent)}
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        if subprocess.run(cmd, env=env, cwd=HERE.parent).returncode != 0:
            failed.append(script.name)
        print(f"== {script.name} took {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    out.unlink()
    print(f"\nAll figures — {machine()}")
    print(f"{'benchmark':<10} {'figure':<52} {'value':>12} {'unit':<10} note")
    for r in rows:
        print(f"{r['benchmark']:<10} {r['name']:<52} {r['value']:>12.4g} {r['unit']:<10} {r['note']}")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
