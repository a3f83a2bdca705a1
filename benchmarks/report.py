"""How benchmarks report figures: one line per figure on stdout, and a JSON line per figure appended
to ``$C2SEG_BENCH_OUT`` when set, so ``benchmarks/run_all.py`` can print every figure in one table."""

from __future__ import annotations

import json
import os


def figure(benchmark: str, name: str, value: float, unit: str, note: str = "") -> None:
    """Print one measured figure (and record it for run_all)."""
    print(f"  {benchmark:<10} {name:<52} {value:>12.4g} {unit:<10} {note}", flush=True)
    out = os.environ.get("C2SEG_BENCH_OUT")
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps({"benchmark": benchmark, "name": name, "value": value, "unit": unit,
                                 "note": note}) + "\n")
