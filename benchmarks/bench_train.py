"""Training benchmarks.

overhead  DeepSpeed engine step time vs a plain PyTorch loop (same model, batch, AdamW, clipping,
          LR schedule), 1 process:          python benchmarks/bench_train.py overhead --model configs/models/tiny.yaml
memory    per-rank bytes of parameters + optimizer state for ZeRO 0/1/2/3 (run under 2 ranks):
          torchrun --nproc_per_node 2 benchmarks/bench_train.py memory --model configs/models/small.yaml
crosscity target-city mIoU / OA / kappa (on the val split, and on the whole city by sliding-window
          inference) of the demo's recipe on generated AB-like cities, through the real CLIs, per seed:
          source-only (1000 steps), adapted from it (300 mean-teacher steps), the compute control (600 more
          source-only steps), and the same chain from a pretrained encoder (about 30 min a seed, 2 cores);
          peers (benchmarks/peers.py): a U-Net from scratch (unet) and with output-space adversarial
          adaptation (unet_adv), source + adaptation steps of the same batches; --pair NAME: cities
          generated with the shift profile NAME (docs/demo-data.md), in OUT/pair_NAME:
          python benchmarks/bench_train.py crosscity --out runs/bench_crosscity --seeds 0 1 2 \
              [--only source_only adapted unet] [--pair sar]
fusion    joint attention vs per-location fusion + cross-attention (model `fusion`) on the AB-like spec
          (G = 6 tokens per location): parameters, plain training step time and forward FLOPs per tile
          (cost), and target mIoU after source-only fine-tuning through the real CLI (accuracy):
          python benchmarks/bench_train.py fusion --prep runs/xc/prep --steps 300 [--parts cost]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, get_args

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from c2seg.config import load_yaml  # noqa: E402  (after the path insert)
from c2seg.data_prep.synth.domain import SHIFT_PROFILES  # noqa: E402
from c2seg.train.config import Fusion  # noqa: E402


def _batch(spec, b: int, size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {m.name: torch.randn(b, m.bands, size, size, generator=g) for m in spec.modalities}
    out["label"] = torch.randint(1, spec.num_logits, (b, size, size), generator=g)
    return out


def train_config(model: str, zero: int, batch: int, steps: int, precision: str = "fp32", compile: bool = False):
    """A TrainConfig for timing the engine on synthetic batches: no data folder, no tracking."""
    from c2seg.train.config import DataConfig, DeepSpeedConfig, TrackingConfig, TrainConfig

    return TrainConfig(model=model, data=DataConfig(prep_dir="-", batch_size=batch), output_dir="-", steps=steps,
                       compile=compile, deepspeed=DeepSpeedConfig(zero_stage=zero, precision=precision),
                       tracking=TrackingConfig(enabled=False))


def _timed(step_fn: Callable[[], None], warmup: int, steps: int) -> float:
    """Seconds per call of ``step_fn`` over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step_fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - t0) / steps


def _plain_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg) -> Callable[[], None]:
    """One plain PyTorch training step of ``model`` on ``batch``: cross-entropy, backward, gradient clipping,
    AdamW and the warmup LR schedule of TrainConfig ``cfg``."""
    import torch.nn.functional as F

    inputs = {m: t for m, t in batch.items() if m != "label"}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.optim.warmup_steps))

    def step() -> None:
        loss = F.cross_entropy(model(inputs), batch["label"], ignore_index=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()

    return step


def overhead(args) -> dict:
    import torch.nn.functional as F

    from c2seg.spec import load_spec
    from c2seg.train.config import load_model_config
    from c2seg.train.engine import create_engine, init_distributed
    from c2seg.train.models import FusionSegmenter

    spec = load_spec(args.spec)
    mcfg = load_model_config(args.model)
    batch = _batch(spec, args.batch, args.size)
    inputs = {m: batch[m] for m in spec.modality_names}
    cfg = train_config(args.model, 0, args.batch, args.warmup + args.steps)
    torch.manual_seed(0)
    plain = _plain_step(FusionSegmenter(spec, mcfg), batch, cfg)
    init_distributed()
    torch.manual_seed(0)
    engine = create_engine(FusionSegmenter(spec, mcfg), cfg, 1)

    def ds():
        loss = F.cross_entropy(engine(inputs), batch["label"], ignore_index=0)
        engine.backward(loss)
        engine.step()

    results = {}
    for _ in range(args.rounds):  # interleaved rounds: both loops see the same machine load
        results.setdefault("plain_ms", []).append(1000 * _timed(plain, args.warmup, args.steps))
        results.setdefault("deepspeed_ms", []).append(1000 * _timed(ds, args.warmup, args.steps))
    p, d = min(results["plain_ms"]), min(results["deepspeed_ms"])
    return {"model": mcfg.name, "batch": args.batch, "size": args.size, "plain_ms": round(p, 2),
            "deepspeed_ms": round(d, 2), "overhead_pct": round(100 * (d / p - 1), 1), "rounds": results,
            "threads": torch.get_num_threads()}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def memory(args) -> dict:
    import torch.nn.functional as F

    from c2seg.distributed import gather_objects, world_size
    from c2seg.spec import load_spec
    from c2seg.train.config import load_model_config
    from c2seg.train.engine import create_engine, init_distributed
    from c2seg.train.models import FusionSegmenter

    spec = load_spec(args.spec)
    mcfg = load_model_config(args.model)
    env = init_distributed()
    batch = _batch(spec, 1, args.size)
    rows = []
    for zero in (0, 1, 2, 3):
        torch.manual_seed(0)
        engine = create_engine(FusionSegmenter(spec, mcfg), train_config(args.model, zero, 1, 10),
                               world_size())
        loss = F.cross_entropy(engine({m: batch[m] for m in spec.modality_names}), batch["label"], ignore_index=0)
        engine.backward(loss)
        engine.step()
        params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
        opt = engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        state = [t for s in inner.state.values() for t in s.values()]
        masters = [t for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
                   for t in getattr(opt, name, [])]
        row = {"zero": zero, "rank": env.rank, "param_mb": _bytes(params) / 2**20,
               "optimizer_state_mb": _bytes(state) / 2**20, "fp32_master_mb": _bytes(masters) / 2**20}
        row["total_mb"] = row["param_mb"] + row["optimizer_state_mb"] + row["fp32_master_mb"]
        rows += gather_objects(row)
        del engine, opt, inner
    n = sum(p.numel() for p in FusionSegmenter(spec, mcfg).parameters())
    return {"model": mcfg.name, "parameters": n, "world_size": world_size(),
            "rows": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}


def _cli(*args: str, script: tuple[str, ...] = ("-m", "c2seg.cli")) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, *script, *args], cwd=ROOT, env=env, check=True)


DEMO_SPEC = ROOT / "configs/datasets/demo_ab.yaml"
WHOLE_CITY_OVERLAP = 0.5  # of the whole-city inference windows, every arm


def _spec_args(prep: Path) -> list[str]:
    """The spec and data root of the demo cities prepared at ``prep``."""
    return ["--spec", str(DEMO_SPEC), "--data-root", str(prep.parent / "data")]


def _demo_prep(prep: Path, size: str, tile: int, shift: str = "default") -> Path:
    """The prepared AB-like demo cities at ``prep``: generated (scenes ``size`` = HxW, shift profile ``shift``,
    into ``prep``'s sibling ``data``) and prepared (``tile`` px tiles, half-tile stride) unless already there."""
    data = prep.parent / "data"
    if not (prep / "manifest.json").is_file():
        _cli("data", "generate", "--spec", str(DEMO_SPEC), "--data-root", str(data), "--size", size, "--seed", "0",
             "--shift", shift)
        _cli("data", "prep", "--spec", str(DEMO_SPEC), "--data-root", str(data), "--out", str(prep),
             "--set", f"tile_size={tile}", "--set", f"stride={tile // 2}",
             "--set", f"val_block_size={2 * tile}", "--set", "val_fraction=0.25")
    return prep


def _train(cmd: str, config: str, run_dir: Path, steps: int, extra: list[str]) -> dict[str, float] | None:
    """A ``steps``-step training run through the real CLI (``--set`` overrides ``extra`` last), validated and
    checkpointed at its end; for a finetune run, its final target-city val mIoU / OA / macro-F1 / kappa."""
    _cli("train", cmd, "--config", config, "--set", f"output_dir={run_dir}", "--set", f"steps={steps}",
         "--set", f"finetune.eval_every={steps}", "--set", f"checkpoint_every={steps}",
         "--set", f"optim.warmup_steps={max(1, steps // 10)}", *extra)
    if cmd != "finetune":
        return None
    last = json.loads((run_dir / "val_metrics.jsonl").read_text().splitlines()[-1])
    return {k: round(last[k], 4) for k in ("miou", "oa", "macro_f1", "kappa")}


def _train_seconds(run_dir: Path) -> float:
    """Seconds a run spent in its training steps (the sum of its metrics' step times, each step once: the
    same figure whether the run was trained in one go or resumed)."""
    steps = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        steps[rec["step"]] = rec["step_time_s"]
    return round(sum(steps.values()), 1)


def _whole_city(run_dir: Path, prep: Path, window: int) -> dict[str, float]:
    """mIoU / OA / macro-F1 / kappa of a fine-tuning run on the whole target city (every pixel once, the
    unlabelled training area included): export, sliding-window inference (``window`` px, overlap 0.5) and
    scoring through the real CLIs, as ``c2seg demo`` does."""
    model, pred = run_dir / "model.pt", run_dir / "whole_city"
    _cli("train", "export", "--run-dir", str(run_dir), "--out", str(model))
    _cli("infer", "run", "--model", str(model), *_spec_args(prep), "--city", "synth_target", "--out", str(pred),
         "--window", str(window), "--overlap", str(WHOLE_CITY_OVERLAP), "--overwrite")
    return _score_city(pred, prep)


def _score_city(pred: Path, prep: Path) -> dict[str, float]:
    """mIoU / OA / macro-F1 / kappa of the class maps in ``pred/synth_target`` by ``c2seg infer evaluate``."""
    _cli("infer", "evaluate", "--pred", str(pred / "synth_target"), *_spec_args(prep), "--city", "synth_target",
         "--out", str(pred / "metrics.json"))
    scores = json.loads((pred / "metrics.json").read_text())
    return {k: round(scores[k], 4) for k in ("miou", "oa", "macro_f1", "kappa")}


def _peer(arm: str, run_dir: Path, prep: Path, seed: int, steps: int, args) -> dict[str, float]:
    """A peer arm of benchmarks/peers.py (its own process, the threads of a CLI run): trained on the prepared
    tiles with the source-only config's data and optim settings (``--batch``, ``--override``), the whole
    target city predicted by the product's sliding-window inference (same window and overlap as
    :func:`_whole_city`); its target val scores."""
    _cli("--arm", arm, "--prep", str(prep), *_spec_args(prep), "--city", "synth_target", "--steps", str(steps),
         "--seed", str(seed), "--out", str(run_dir), "--window", str(_window(args)),
         "--overlap", str(WHOLE_CITY_OVERLAP), "--width", str(args.peer_width), "--lambda-adv", str(args.lambda_adv),
         "--set", f"data.batch_size={args.batch}", *_overrides(args), script=(str(ROOT / "benchmarks/peers.py"),))
    val = json.loads((run_dir / "peer_run.json").read_text())["val"]
    return {k: round(val[k], 4) for k in ("miou", "oa", "macro_f1", "kappa")}


PEER_ARMS = ("unet", "unet_adv")  # benchmarks/peers.py
CROSSCITY_ARMS = ("source_only", "source_only_more", "adapted", "pretrain", "pretrained_source_only",
                  "pretrained_adapted", *PEER_ARMS)
CROSSCITY_SCORED = ("source_only", "source_only_more", "adapted", "pretrained_source_only", "pretrained_adapted",
                    *PEER_ARMS)
CROSSCITY_GAINS = (("unet", "pretrained_adapted"), ("unet_adv", "pretrained_adapted"), ("unet_adv", "unet"),
                   ("pretrained_adapted", "source_only_more"), ("pretrained_adapted", "source_only"),
                   ("pretrained_adapted", "pretrained_source_only"), ("adapted", "source_only"),
                   ("adapted", "source_only_more"), ("source_only_more", "source_only"),
                   ("pretrained_source_only", "source_only"))


def crosscity(args) -> dict:
    """Target-city scores of the demo's recipe through the real CLIs, per seed: source-only fine-tuning for
    ``--steps`` steps from scratch (the baseline users run today); that model adapted to the target city for
    ``--adapt-steps`` mean-teacher steps (configs/train/finetune_demo.yaml); the compute control, that model
    trained on source labels only for twice as many more steps (an adaptation step also runs the teacher and a
    second, mixed target batch: about 2.2 source steps); and the same chain from an encoder pretrained for
    ``--pretrain-steps`` (pretrained_source_only, pretrained_adapted). mIoU gains per seed for the pairs in
    CROSSCITY_GAINS; ``*_train_s``: the seconds each arm spent in training steps (its compute), ``*_samples``:
    its steps x batch. The peers (PEER_ARMS, benchmarks/peers.py) train for the chain's source + adaptation steps
    of the same batches. ``--pair NAME``: every arm on cities generated with shift profile NAME, in OUT/pair_NAME."""
    out = Path(args.out) if args.pair == "default" else Path(args.out) / f"pair_{args.pair}"
    prep = _demo_prep(out / "prep", args.size, args.tile, args.pair)
    common = ["--set", f"data.prep_dir={prep}", "--set", "tracking.enabled=false", "--set", f"model={args.model}",
              "--set", f"data.batch_size={args.batch}", "--resume", "auto"]
    source_only, adapt = "configs/train/source_only_demo.yaml", "configs/train/finetune_demo.yaml"
    result: dict = {"steps": args.steps, "adapt_steps": args.adapt_steps, "pretrain_steps": args.pretrain_steps,
                    "peer_steps": args.steps + args.adapt_steps, "seeds": args.seeds, "pair": args.pair}
    for seed in args.seeds:
        def run_dir(name: str, seed: int = seed) -> Path:
            return out / f"{name}_seed{seed}"

        runs = {  # name: (command, config, steps, init_from)
            "source_only": ("finetune", source_only, args.steps, None),
            "source_only_more": ("finetune", source_only, 2 * args.adapt_steps, run_dir("source_only")),
            "adapted": ("finetune", adapt, args.adapt_steps, run_dir("source_only")),
            "pretrain": ("pretrain", "configs/train/pretrain_demo.yaml", args.pretrain_steps, None),
            "pretrained_source_only": ("finetune", source_only, args.steps, run_dir("pretrain")),
            "pretrained_adapted": ("finetune", adapt, args.adapt_steps, run_dir("pretrained_source_only")),
        }
        for name, (cmd, config, steps, init_from) in runs.items():
            if args.only and name not in args.only:
                continue
            scores = _train(cmd, config, run_dir(name), steps, [*common, "--set", f"seed={seed}", "--set",
                                                               f"init_from={init_from or 'null'}", *_overrides(args)])
            result.setdefault(f"{name}_train_s", []).append(_train_seconds(run_dir(name)))
            result.setdefault(f"{name}_samples", []).append(steps * args.batch)
            if scores is not None:
                result.setdefault(name, []).append(scores)
                result.setdefault(f"{name}_city", []).append(_whole_city(run_dir(name), prep, _window(args)))
        for arm in PEER_ARMS:
            if args.only and arm not in args.only:
                continue
            result.setdefault(arm, []).append(_peer(arm, run_dir(arm), prep, seed, result["peer_steps"], args))
            result.setdefault(f"{arm}_train_s", []).append(_train_seconds(run_dir(arm)))
            result.setdefault(f"{arm}_samples", []).append(result["peer_steps"] * args.batch)
            result.setdefault(f"{arm}_city", []).append(_score_city(run_dir(arm) / "whole_city", prep))
    for name in CROSSCITY_SCORED:
        for part in (name, f"{name}_city"):
            if part in result:
                result[f"{part}_mean"] = {k: round(sum(r[k] for r in result[part]) / len(result[part]), 4)
                                          for k in ("miou", "oa", "macro_f1", "kappa")}
    for part in ("", "_city"):
        for name, base in CROSSCITY_GAINS:
            if f"{base}{part}" in result and f"{name}{part}" in result:
                gains = [round(r["miou"] - b["miou"], 4)
                         for r, b in zip(result[f"{name}{part}"], result[f"{base}{part}"])]
                result[f"{name}{part}_vs_{base}"] = {"per_seed": gains, "mean": round(sum(gains) / len(gains), 4),
                                                     "min": min(gains)}
    return result


ARM_NAMES = {"source_only": "c2seg source-only, from scratch", "adapted": "c2seg from scratch, adapted",
             "source_only_more": "c2seg source-only, more steps", "pretrained_source_only": "c2seg pretrained, "
             "source-only", "pretrained_adapted": "**c2seg chain**", "unet": "U-Net", "unet_adv": "adversarial U-Net"}


def table(args) -> dict:
    """The arms x pairs table of crosscity runs: whole-city mIoU (%) of every arm, pair and seed found under the
    ``--out`` folders (``ARM_seedS/whole_city/metrics.json`` in OUT for the default pair, in OUT/pair_NAME for
    the others; a later folder's run replaces an earlier one's), as the mean and the per-seed values, and the
    chain minus the best peer (the peer with the best mean over the seeds both have), paired by seed."""
    scores: dict[str, dict[str, dict[int, float]]] = {}  # arm -> pair -> seed -> mIoU
    for root in map(Path, args.out):
        for pair in SHIFT_PROFILES:
            folder = root if pair == "default" else root / f"pair_{pair}"
            for arm in ARM_NAMES:
                for run in sorted(folder.glob(f"{arm}_seed*")):
                    metrics = run / "whole_city" / "metrics.json"
                    if metrics.is_file():
                        seed = int(run.name.removeprefix(f"{arm}_seed"))
                        miou = 100 * json.loads(metrics.read_text())["miou"]
                        scores.setdefault(arm, {}).setdefault(pair, {})[seed] = miou
    pairs = [p for p in SHIFT_PROFILES if any(p in by_pair for by_pair in scores.values())]
    lead = {pair: _lead(scores, pair) for pair in pairs}
    print("| arm | " + " | ".join(f"`{p}`" for p in pairs) + " |\n|---|" + "---|" * len(pairs))
    for arm in (a for a in ARM_NAMES if a in scores):
        print(f"| {ARM_NAMES[arm]} | " + " | ".join(_cell(scores[arm].get(p, {})) for p in pairs) + " |")
    print("| chain minus the best peer | " + " | ".join(
        "not run" if lead[p] is None else f"{_cell(lead[p][1], signed=True)} vs {ARM_NAMES[lead[p][0]]}" for p in pairs) + " |")
    return {"scores": scores, "chain_minus_best_peer": lead}


def _lead(scores: dict[str, dict[str, dict[int, float]]], pair: str) -> tuple[str, dict[int, float]] | None:
    """(the best peer, the chain minus that peer per seed) on ``pair``, over the seeds both have."""
    chain = scores.get("pretrained_adapted", {}).get(pair, {})
    best = None
    for peer in PEER_ARMS:
        peer_scores = scores.get(peer, {}).get(pair, {})
        seeds = sorted(set(chain) & set(peer_scores))
        if seeds:
            diff = {s: chain[s] - peer_scores[s] for s in seeds}
            if best is None or sum(diff.values()) / len(diff) < sum(best[1].values()) / len(best[1]):
                best = (peer, diff)
    return best


def _cell(by_seed: dict[int, float], signed: bool = False) -> str:
    """'mean (s0 value, s1 value, ...)' of one arm on one pair."""
    if not by_seed:
        return "not run"
    fmt = "+.1f" if signed else ".1f"
    mean = sum(by_seed.values()) / len(by_seed)
    return f"{mean:{fmt}} (" + ", ".join(f"s{s} {v:{fmt}}" for s, v in sorted(by_seed.items())) + ")"


def _window(args) -> int:
    """The whole-city inference window of every arm: ``--infer-window``, else the training tile size."""
    return args.infer_window or args.tile


def _overrides(args) -> list[str]:
    return [a for o in args.override for a in ("--set", o)]


FUSIONS = get_args(Fusion)


def _fusion_cost(args, spec, mcfg) -> dict:
    """Parameters, forward FLOPs per tile and plain training step time (min over interleaved rounds) of
    each fusion mode, with modality dropout off so every step sees all G tokens per location."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from c2seg.train.models import FusionSegmenter

    cfg = train_config(args.model, 0, args.batch, 10 ** 6)
    batches = {tile: _batch(spec, args.batch, tile) for tile in args.tiles}
    models, steps = {}, {}
    for mode in FUSIONS:
        torch.manual_seed(0)
        models[mode] = FusionSegmenter(spec, dataclasses.replace(mcfg, fusion=mode))
        for tile in args.tiles:
            steps[mode, tile] = _plain_step(models[mode], batches[tile], cfg)
    result = {"tiles": args.tiles, **{mode: {"parameters": sum(p.numel() for p in m.parameters())}
                                      for mode, m in models.items()}}
    for mode, model in models.items():
        model.eval()
        for tile in args.tiles:
            tile_in = {m: t for m, t in _batch(spec, 1, tile).items() if m != "label"}
            # the math SDPA kernel is made of counted matmuls; the fused CPU kernel is not counted
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                model(tile_in)
            result[mode][f"gflops_{tile}"] = round(counter.get_total_flops() / 1e9, 3)
            encoder = counter.get_flop_counts()[f"{type(model).__name__}.backbone.encoder"]
            result[mode][f"encoder_gflops_{tile}"] = round(sum(encoder.values()) / 1e9, 3)
        model.train()
    for _ in range(args.rounds):  # interleaved: every mode and tile size sees the same machine load
        for tile in args.tiles:
            for mode in FUSIONS:
                ms = 1000 * _timed(steps[mode, tile], args.warmup, args.timed_steps)
                result[mode].setdefault(f"step_ms_{tile}_rounds", []).append(round(ms, 1))
    for mode in FUSIONS:
        for tile in args.tiles:
            result[mode][f"step_ms_{tile}"] = min(result[mode][f"step_ms_{tile}_rounds"])
    return result


def _fusion_accuracy(args, mcfg_data: dict) -> dict:
    """Target val scores of source-only fine-tuning (configs/train/source_only_demo.yaml) per fusion mode."""
    out = Path(args.out).resolve()
    prep = _demo_prep(Path(args.prep).resolve(), args.scene_size, args.tile)
    result = {}
    for mode in FUSIONS:
        model_file = out / f"model_{mode}.yaml"
        model_file.parent.mkdir(parents=True, exist_ok=True)
        model_file.write_text(yaml.safe_dump({**mcfg_data, "fusion": mode}, sort_keys=False))
        t0 = time.perf_counter()
        result[mode] = _train("finetune", "configs/train/source_only_demo.yaml", out / mode, args.steps,
                              ["--set", f"model={model_file}", "--set", f"data.prep_dir={prep}",
                               "--set", "tracking.enabled=false", "--set", f"data.batch_size={args.batch}",
                               "--set", "init_from=null", "--resume", "auto", *_overrides(args)])
        result[mode]["train_s"] = round(time.perf_counter() - t0, 1)
    return result


def fusion(args) -> dict:
    """Joint attention vs per-location fusion + cross-attention: cost and / or accuracy (``--parts``)."""
    from c2seg.spec import load_spec
    from c2seg.train.config import model_config_from_dict
    from c2seg.train.models import FusionBackbone

    spec = load_spec(args.spec)
    mcfg_data = load_yaml(args.model)
    mcfg = model_config_from_dict(mcfg_data, source=args.model)
    with torch.device("meta"):
        groups = sum(e.groups for e in FusionBackbone(spec, mcfg).embeds.values())
    result = {"model": mcfg.name, "spec": spec.name, "tokens_per_location": groups, "batch": args.batch,
              "threads": torch.get_num_threads()}
    if "cost" in args.parts:
        result["cost"] = _fusion_cost(args, spec, mcfg)
    if "accuracy" in args.parts:
        result["accuracy"] = {**_fusion_accuracy(args, mcfg_data), "steps": args.steps}
    return result


def report(what: str, r: dict) -> None:
    """The headline figures of a result, in run_all's table."""
    from benchmarks.report import figure

    if what == "overhead":
        figure("train", f"plain PyTorch step ({r['model']}, batch {r['batch']})", r["plain_ms"], "ms")
        figure("train", "DeepSpeed ZeRO-0 engine step, same model + batch", r["deepspeed_ms"], "ms")
        figure("train", "DeepSpeed overhead over the plain loop", r["overhead_pct"], "%", "goal <= 10 %")
    elif what == "memory":
        for row in r["rows"]:
            if row["rank"] == 0:
                figure("train", f"ZeRO-{row['zero']} params+optimizer per rank ({r['world_size']} ranks)",
                       row["total_mb"], "MB", f"{r['model']}, {r['parameters'] / 1e6:.1f} M params")
    elif what == "crosscity":
        for name in CROSSCITY_SCORED:
            for part, where in (("", "val split"), ("_city", "whole city")):
                if f"{name}{part}_mean" in r:
                    m = r[f"{name}{part}_mean"]
                    samples = f", steps x batch {sum(r[f'{name}_samples'])}" if f"{name}_samples" in r else ""
                    figure("train", f"target mIoU ({where}), {name}", 100 * m["miou"], "%",
                           f"OA {100 * m['oa']:.1f} %, seeds {r['seeds']}, "
                           f"{sum(r[f'{name}_train_s']):.0f} s in training steps{samples}")
        for part, where in (("", "val split"), ("_city", "whole city")):
            for name, base in CROSSCITY_GAINS:
                if f"{name}{part}_vs_{base}" in r:
                    g = r[f"{name}{part}_vs_{base}"]
                    figure("train", f"mIoU gain ({where}), {name} vs {base}", 100 * g["mean"], "points",
                           "per seed " + ", ".join(f"{100 * x:+.1f}" for x in g["per_seed"]))
    elif what == "fusion":
        note = f"{r['model']}, G = {r['tokens_per_location']}"
        cost = r.get("cost", {})
        for mode in FUSIONS:
            if mode in cost:
                figure("train", f"{mode} fusion parameters", cost[mode]["parameters"] / 1e6, "M", note)
                for tile in cost["tiles"]:
                    figure("train", f"{mode} fusion forward FLOPs per {tile} px tile", cost[mode][f"gflops_{tile}"],
                           "GFLOP", f"{note}, encoder {cost[mode][f'encoder_gflops_{tile}']:.3g} GFLOP")
                    figure("train", f"{mode} fusion train step, batch {r['batch']} x {tile} px",
                           cost[mode][f"step_ms_{tile}"], "ms", f"{note}, {r['threads']} threads")
            acc = r.get("accuracy", {}).get(mode)
            if acc:
                figure("train", f"{mode} fusion target mIoU, source-only", 100 * acc["miou"], "%",
                       f"{r['accuracy']['steps']} steps, OA {100 * acc['oa']:.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="with no sub-command (as run_all calls it): fewer steps, tiny model, no "
                        "fusion cost or crosscity")
    sub = parser.add_subparsers(dest="what")
    for name in ("overhead", "memory", "crosscity"):
        p = sub.add_parser(name)
        p.add_argument("--spec", default=str(ROOT / "configs/datasets/demo_tiny.yaml"))
        p.add_argument("--model", default=str(ROOT / "configs/models/tiny.yaml"))
        p.add_argument("--size", default="64")
        p.add_argument("--batch", type=int, default=8)
    sub.choices["overhead"].add_argument("--steps", type=int, default=20)
    sub.choices["overhead"].add_argument("--warmup", type=int, default=3)
    sub.choices["overhead"].add_argument("--rounds", type=int, default=3)
    sub.choices["crosscity"].set_defaults(size="256x384", model=str(ROOT / "configs/models/demo.yaml"))
    sub.choices["crosscity"].add_argument("--out", default="runs/bench_crosscity")
    sub.choices["crosscity"].add_argument("--steps", type=int, default=1000, help="source-only fine-tuning steps")
    sub.choices["crosscity"].add_argument("--adapt-steps", type=int, default=300,
                                          help="adaptation steps, continuing from the source-only model")
    sub.choices["crosscity"].add_argument("--pretrain-steps", type=int, default=150)
    sub.choices["crosscity"].add_argument("--seeds", type=int, nargs="+", default=[0],
                                          help="training seeds; scores are reported per seed and averaged")
    sub.choices["crosscity"].add_argument("--tile", type=int, default=64)
    sub.choices["crosscity"].add_argument("--infer-window", type=int, default=None,
                                          help="whole-city inference window (px) of every arm (default: --tile, "
                                          "as the product's inference defaults to the training tile size)")
    sub.choices["crosscity"].add_argument("--only", nargs="+", default=None, choices=CROSSCITY_ARMS,
                                          metavar="ARM", help="run only these arms: " + ", ".join(CROSSCITY_ARMS)
                                          + " (unet, unet_adv: the peers of benchmarks/peers.py, trained for "
                                          "--steps + --adapt-steps steps)")
    sub.choices["crosscity"].add_argument("--peer-width", type=int, default=32,
                                          help="unet, unet_adv: channels of the U-Net's first stage (default: "
                                          "%(default)s, the classic 32-64-128-256 + 512)")
    sub.choices["crosscity"].add_argument("--lambda-adv", type=float, default=0.001,
                                          help="unet_adv: weight of the adversarial loss (default: %(default)s, "
                                          "AdaptSegNet's)")
    sub.choices["crosscity"].add_argument("--pair", choices=SHIFT_PROFILES, default="default",
                                          help="generate the city pair with this domain-shift profile (c2seg data "
                                          "generate --shift; docs/demo-data.md) and run in OUT/pair_NAME; default: "
                                          "the demo's pair in OUT")
    tab = sub.add_parser("table", help="the arms x pairs table of earlier crosscity runs")
    tab.add_argument("--out", nargs="+", default=["runs/bench_crosscity"],
                     help="crosscity --out folders; a later folder's run of an arm, pair and seed replaces an "
                     "earlier one's")
    fus = sub.add_parser("fusion")
    for p in (sub.choices["crosscity"], fus):
        p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                       help="extra `--set KEY=VALUE` for every training run")
    fus.add_argument("--spec", default=str(ROOT / "configs/datasets/demo_ab.yaml"))
    fus.add_argument("--model", default=str(ROOT / "configs/models/demo.yaml"))
    fus.add_argument("--batch", type=int, default=8)
    fus.add_argument("--parts", nargs="+", choices=("cost", "accuracy"), default=["cost", "accuracy"])
    fus.add_argument("--tiles", nargs="+", type=int, default=[64, 128], help="cost: tile sizes (px)")
    fus.add_argument("--rounds", type=int, default=3, help="cost: interleaved timing rounds (min is reported)")
    fus.add_argument("--timed-steps", type=int, default=5, help="cost: timed steps per round")
    fus.add_argument("--warmup", type=int, default=2, help="cost: untimed steps per round")
    fus.add_argument("--steps", type=int, default=300, help="accuracy: fine-tuning steps per mode")
    fus.add_argument("--prep", default="runs/xc/prep",
                     help="accuracy: prepared AB-like demo cities (created if missing, as crosscity does)")
    fus.add_argument("--scene-size", default="256x384", help="accuracy: HxW of generated cities if --prep is missing")
    fus.add_argument("--tile", type=int, default=64, help="accuracy: tile size if --prep is missing")
    fus.add_argument("--out", default="runs/bench_fusion", help="accuracy: run folders and model files")
    args = parser.parse_args()
    if args.what is None:
        # run_all: overhead, ZeRO memory under 2 ranks; unless --quick, fusion cost and the cross-city effect
        steps = ["--steps", "8", "--rounds", "2"] if args.quick else []
        _run_self(["overhead", *steps])
        _run_self(["memory", "--model", str(ROOT / ("configs/models/tiny.yaml" if args.quick else
                                                     "configs/models/small.yaml")), "--size", "32"], ranks=2)
        if not args.quick:
            _run_self(["fusion", "--parts", "cost"], threads=2)
            _run_self(["crosscity", "--seeds", "0", "--only", "source_only", "adapted"], threads=2)
        return
    if args.what in ("overhead", "memory"):
        args.size = int(args.size)
    result = {"overhead": overhead, "memory": memory, "crosscity": crosscity, "fusion": fusion,
              "table": table}[args.what](args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=1))
        report(args.what, result)


def _run_self(args: list[str], ranks: int = 1, threads: int = 1) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)] if ranks > 1 \
        else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    subprocess.run([*launcher, __file__, *args], env=env, check=True)


if __name__ == "__main__":
    main()
