"""``c2seg demo``: the whole pipeline on generated cities, on this machine, through the stage CLIs.

generate -> inspect -> then the stages of :mod:`c2seg.pipeline`: prep -> pretrain -> source_only (fine-tuned on
the source labels, from the pretrained encoder) -> adapted (that model adapted to the target city, mean teacher)
-> export -> infer on the target city -> evaluate, the last three for source_only too; then a table of
target-city metrics, source-only against adapted.
Generation, prep, training and export are skipped when their done markers exist and training resumes, so an
interrupted demo continues where it stopped; inference and scoring run again. The same command lines
(:func:`c2seg.pipeline.command_line`) are what the SLURM job scripts call.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from c2seg.config import load_config
from c2seg.pipeline import (PREP, SCORED_RUN, STAGE_NAMES, TRAINING_STAGES, RunLayout, StageInputs, StageName,
                            command_line, scoring_stages)

log = logging.getLogger("c2seg.demo")
COMPARED_RUNS: tuple[StageName, ...] = ("source_only", SCORED_RUN)  # the models the demo scores, for its table


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs; every stage config it names is an ordinary stage config."""

    spec: str
    out: str
    prep_config: str
    pretrain_config: str
    finetune_config: str
    source_only_config: str
    data_root: str | None = None  # where the generated cities go (default: the spec's data_root)
    size: tuple[int, int] = (256, 384)
    seed: int = 0
    infer_window: int | None = None  # px; None: the models' training tile size
    infer_overlap: float = 0.5


def register(stages: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = stages.add_parser(
        "demo", help="run the whole pipeline locally on generated demo cities (the README's main command)",
        description="generate -> inspect -> prep -> pretrain -> finetune on the source city (source_only) -> "
        "adapt it to the target city (adapted) -> export -> infer -> evaluate on generated AB-like cities, "
        "tracked in the local MLflow store. Steps whose "
        "outputs exist are skipped; training resumes.",
    )
    parser.add_argument("--config", type=Path, default=Path("configs/demo/demo_ab.yaml"),
                        help="demo config (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (overrides the config's out)")
    parser.set_defaults(func=run_demo)


class _Runner:
    """Runs the stage CLIs one after another, logging each step and its duration."""

    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []

    def step(self, name: str, args: list[str], done: Path | None = None) -> None:
        if done is not None and done.exists():
            log.info("[%s] skipped: %s exists", name, done)
            return
        cmd = [sys.executable, "-m", "c2seg.cli", *args]
        log.info("[%s] %s", name, shlex.join(["c2seg", *args]))
        t0 = time.perf_counter()
        result = subprocess.run(cmd, env=os.environ.copy())
        took = time.perf_counter() - t0
        self.timings.append((name, took))
        if result.returncode != 0:
            raise SystemExit(f"demo: step '{name}' failed (exit {result.returncode}); rerun `c2seg demo` to "
                             "continue from there")
        log.info("[%s] done in %.1f s", name, took)


def run_demo(args: argparse.Namespace) -> int:
    cfg = load_config(DemoConfig, args.config)
    out = Path(args.out or cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    from c2seg.spec import load_spec

    spec = load_spec(cfg.spec, data_root=cfg.data_root)
    target = spec.scored_city().name
    layout = RunLayout(out)
    spec_args = ("--spec", cfg.spec, *(("--data-root", cfg.data_root) if cfg.data_root else ()))
    configs = {"prep": cfg.prep_config, "pretrain": cfg.pretrain_config, "source_only": cfg.source_only_config,
               "adapted": cfg.finetune_config}
    inputs = StageInputs(layout, spec_args, target, layout.model(SCORED_RUN), configs, frozenset(STAGE_NAMES))
    run = _Runner()
    t0 = time.perf_counter()
    h, w = cfg.size
    run.step("generate", ["data", "generate", *spec_args, "--size", f"{h}x{w}", "--seed", str(cfg.seed)],
             done=spec.resolve(spec.city(target), next(iter(spec.city(target).files))))
    run.step("inspect", ["data", "inspect", *spec_args, "--out", str(out / "inspect")],
             done=out / "inspect")
    run.step(PREP.name, [*command_line(PREP, inputs), "--workers", "2"], done=layout.done(PREP))
    run.step("verify", ["data", "verify", "--out", str(layout.prep)])
    for stage in TRAINING_STAGES:
        run.step(stage.name, command_line(stage, inputs), done=layout.done(stage))
    metrics = {name: _score(run, inputs, name, cfg) for name in COMPARED_RUNS}
    _report(out, target, metrics, layout, time.perf_counter() - t0, run.timings)
    return 0


def _score(run: _Runner, inputs: StageInputs, name: StageName, cfg: DemoConfig) -> dict[str, Any]:
    """Export training run ``name``, predict the target city with its model and score it; the metrics."""
    inputs = replace(inputs, model=inputs.layout.model(name))
    export, infer, evaluate = scoring_stages(name)
    run.step(f"export {name}", command_line(export, inputs), done=inputs.layout.done(export))
    window = ["--window", str(cfg.infer_window)] if cfg.infer_window is not None else []
    run.step(f"infer {name}", [*command_line(infer, inputs), *window, "--overlap", str(cfg.infer_overlap)])
    run.step(f"evaluate {name}", command_line(evaluate, inputs))
    metrics: dict[str, Any] = json.loads((inputs.layout.predictions(inputs.model, inputs.city) / "metrics.json")
                                         .read_text())
    return metrics


def _report(out: Path, target: str, metrics: dict[StageName, dict[str, Any]], layout: RunLayout, total: float,
            timings: list[tuple[str, float]]) -> None:
    print(f"\nDemo finished in {total / 60:.1f} min. Step times: "
          + ", ".join(f"{n} {t:.0f}s" for n, t in timings))
    print(f"\nTarget city '{target}' (never seen with labels in training):")
    width = max(len("model"), *map(len, metrics)) + 2
    print(f"  {'model':<{width}}{'mIoU':>8}{'OA':>8}{'macro-F1':>10}{'kappa':>8}")
    for name, m in metrics.items():
        print(f"  {name:<{width}}{100 * m['miou']:>7.1f}%{100 * m['oa']:>7.1f}%{100 * m['macro_f1']:>9.1f}%"
              f"{m['kappa']:>8.3f}")
    adapted = layout.predictions(layout.model(SCORED_RUN), target)
    print("\nOutputs:")
    for path in sorted(adapted.glob("*.tif")):
        print(f"  {'class map (COG)':<18}{path}")
    for path in sorted(adapted.glob("*.png")):
        label = "confusion matrix" if path.stem.endswith("confusion") else "quicklook"
        print(f"  {label:<18}{path}")
    print(f"  {'metrics':<18}{adapted / 'metrics.json'}")
    print(f"  {'everything':<18}{out}")
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    print(f"\nMLflow runs are in {tracking}; open the UI with:\n  .venv/bin/mlflow ui --backend-store-uri "
          f"{tracking}\n")
