"""Training benchmarks.

overhead  DeepSpeed engine step time vs a plain PyTorch loop (same model, batch, AdamW, clipping,
          LR schedule), 1 process:          python benchmarks/bench_train.py overhead --model configs/models/tiny.yaml
memory    per-rank bytes of parameters + optimizer state for ZeRO 0/1/2/3 (run under 2 ranks):
          torchrun --nproc_per_node 2 benchmarks/bench_train.py memory --model configs/models/small.yaml
crosscity target-city mIoU / OA / kappa at the same step budget on generated AB-like cities, through the
          real CLIs: source-only (pooled normalisation), source-only + per-city standardisation, and
          pretrain + per-city standardisation + mean-teacher adaptation:
          python benchmarks/bench_train.py crosscity --out runs/bench_crosscity --size 256x384 --steps 150 \
              --model configs/models/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _batch(spec, b: int, size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {m.name: torch.randn(b, m.bands, size, size, generator=g) for m in spec.modalities}
    out["label"] = torch.randint(1, spec.num_logits, (b, size, size), generator=g)
    return out


def _train_cfg(model: str, zero: int, batch: int, steps: int):
    from train.config import DataConfig, DeepSpeedConfig, TrackingConfig, TrainConfig

    return TrainConfig(model=model, data=DataConfig(prep_dir="-", batch_size=batch), output_dir="-", steps=steps,
                       deepspeed=DeepSpeedConfig(zero_stage=zero), tracking=TrackingConfig(enabled=False))


def overhead(args) -> dict:
    import torch.nn.functional as F

    from c2seg.spec import load_spec
    from train.config import load_model_config
    from train.engine import create_engine, init_distributed
    from train.models import FusionSegmenter

    spec = load_spec(args.spec)
    mcfg = load_model_config(args.model)
    batch = _batch(spec, args.batch, args.size)
    inputs = {m: batch[m] for m in spec.modality_names}
    total = args.warmup + args.steps
    cfg = _train_cfg(args.model, 0, args.batch, total)

    def timed(step_fn) -> float:
        for _ in range(args.warmup):
            step_fn()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step_fn()
        return (time.perf_counter() - t0) / args.steps

    torch.manual_seed(0)
    model = FusionSegmenter(spec, mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.optim.warmup_steps))

    def plain():
        loss = F.cross_entropy(model(inputs), batch["label"], ignore_index=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()

    init_distributed()
    torch.manual_seed(0)
    engine = create_engine(FusionSegmenter(spec, mcfg), cfg, 1)

    def ds():
        loss = F.cross_entropy(engine(inputs), batch["label"], ignore_index=0)
        engine.backward(loss)
        engine.step()

    results = {}
    for rnd in range(args.rounds):  # interleaved rounds: both loops see the same machine load
        results.setdefault("plain_ms", []).append(1000 * timed(plain))
        results.setdefault("deepspeed_ms", []).append(1000 * timed(ds))
    p, d = min(results["plain_ms"]), min(results["deepspeed_ms"])
    return {"model": mcfg.name, "batch": args.batch, "size": args.size, "plain_ms": round(p, 2),
            "deepspeed_ms": round(d, 2), "overhead_pct": round(100 * (d / p - 1), 1), "rounds": results,
            "threads": torch.get_num_threads()}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def memory(args) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F

    from c2seg.spec import load_spec
    from train.config import load_model_config
    from train.engine import create_engine, init_distributed
    from train.models import FusionSegmenter

    spec = load_spec(args.spec)
    mcfg = load_model_config(args.model)
    env = init_distributed()
    batch = _batch(spec, 1, args.size)
    rows = []
    for zero in (0, 1, 2, 3):
        torch.manual_seed(0)
        engine = create_engine(FusionSegmenter(spec, mcfg), _train_cfg(args.model, zero, 1, 10), dist.get_world_size())
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
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, row)
        rows += gathered
        del engine, opt, inner
    n = sum(p.numel() for p in FusionSegmenter(spec, mcfg).parameters())
    return {"model": mcfg.name, "parameters": n, "world_size": dist.get_world_size(),
            "rows": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}


def _cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, "-m", "c2seg.cli", *args], cwd=ROOT, env=env, check=True)


def crosscity(args) -> dict:
    """Target-city scores of three systems at the same step budget (``2 x steps``), in one go:
    source-only with pooled normalisation (the baseline), source-only with per-city standardisation,
    and the full system (per-city standardisation, pretrain ``steps`` + adapted finetune ``steps``)."""
    out = Path(args.out)
    spec_file = ROOT / "configs/datasets/demo_ab.yaml"
    data, prep = out / "data", out / "prep"
    h, w = args.size.split("x")
    if not (prep / "manifest.json").is_file():
        _cli("data", "generate", "--spec", str(spec_file), "--data-root", str(data), "--size", f"{h}x{w}",
             "--seed", "0")
        _cli("data", "prep", "--spec", str(spec_file), "--data-root", str(data), "--out", str(prep),
             "--set", f"tile_size={args.tile}", "--set", f"stride={args.tile // 2}",
             "--set", f"val_block_size={2 * args.tile}", "--set", "val_fraction=0.25")
    common = ["--set", f"data.prep_dir={prep}", "--set", "tracking.enabled=false", "--set", f"model={args.model}",
              "--set", f"data.batch_size={args.batch}", "--resume", "auto"]
    per_city = ["--set", "data.normalization=per_city"]
    runs = {  # name: (command, config, steps, overrides)
        "source_only_pooled": ("finetune", "configs/train/source_only_demo.yaml", 2 * args.steps,
                               ["--set", "data.normalization=pooled"]),
        "source_only_per_city": ("finetune", "configs/train/source_only_demo.yaml", 2 * args.steps, per_city),
        "pretrain": ("pretrain", "configs/train/pretrain_demo.yaml", args.steps, per_city),
        "adapted": ("finetune", "configs/train/finetune_demo.yaml", args.steps,
                    [*per_city, "--set", f"init_from={out / 'pretrain'}"]),
    }
    result = {}
    for name, (cmd, config, steps, extra) in runs.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        _cli("train", cmd, "--config", config, *common, "--set", f"output_dir={out / name}", "--set", f"steps={steps}",
             "--set", f"finetune.eval_every={steps}", "--set", f"checkpoint_every={steps}",
             "--set", f"optim.warmup_steps={max(1, steps // 10)}", *extra,
             *[a for o in args.override for a in ("--set", o)])
        result[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        if cmd == "finetune":
            last = json.loads((out / name / "val_metrics.jsonl").read_text().splitlines()[-1])
            result[name] = {k: round(last[k], 4) for k in ("miou", "oa", "macro_f1", "kappa")}
    base = result.get("source_only_pooled", {}).get("miou")
    for name in ("source_only_per_city", "adapted"):
        if base is not None and name in result:
            result[f"{name}_miou_gain"] = round(result[name]["miou"] - base, 4)
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
        for name in ("source_only_pooled", "source_only_per_city", "adapted"):
            if name in r:
                figure("train", f"target mIoU, {name}", 100 * r[name]["miou"], "%", f"OA {100 * r[name]['oa']:.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="with no sub-command (as run_all calls it): fewer steps, tiny model")
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
    sub.choices["crosscity"].add_argument("--out", default="runs/bench_crosscity")
    sub.choices["crosscity"].add_argument("--steps", type=int, default=200)
    sub.choices["crosscity"].add_argument("--tile", type=int, default=64)
    sub.choices["crosscity"].add_argument("--only", nargs="+", default=None,
                                          help="run only these of source_only_pooled, source_only_per_city, "
                                          "pretrain, adapted")
    sub.choices["crosscity"].add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                                          help="extra `--set KEY=VALUE` for every training run")
    args = parser.parse_args()
    if args.what is None:  # run_all: overhead in this process, ZeRO memory under 2 ranks
        steps = ["--steps", "8", "--rounds", "2"] if args.quick else []
        _run_self(["overhead", *steps])
        _run_self(["memory", "--model", str(ROOT / ("configs/models/tiny.yaml" if args.quick else
                                                     "configs/models/small.yaml")), "--size", "32"], ranks=2)
        return
    if args.what != "crosscity":
        args.size = int(args.size)
    result = {"overhead": overhead, "memory": memory, "crosscity": crosscity}[args.what](args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=1))
        report(args.what, result)


def _run_self(args: list[str], ranks: int = 1) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)] if ranks > 1 \
        else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([*launcher, __file__, *args], env=env, check=True)


if __name__ == "__main__":
    main()
