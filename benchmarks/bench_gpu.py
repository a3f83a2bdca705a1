"""GPU training throughput: samples/s and model FLOP utilisation (MFU) of a model zoo entry in bf16.

    python benchmarks/bench_gpu.py --model configs/models/large.yaml --batches 16 32 64

Model FLOPs per sample are counted once by torch's FlopCounterMode over a forward + backward pass with
activation checkpointing off (recomputation is not model work), flash attention included. MFU = model
FLOPs x samples/s over the GPU's dense bf16 peak (datasheet, ``--peak-tflops``), and also over the bf16
matrix-product rate measured in the same run (8192^3, random data), the ceiling this card really gives.

Variants, each at every batch size until one runs out of memory:
  plain        a plain PyTorch loop: bf16 autocast over fp32 weights, fused AdamW, clipping
  plain+ckpt   the same with activation checkpointing (the zoo's setting for `large` and up)
  deepspeed    the training engine (train.engine.create_engine, bf16, ZeRO `--zero`), when deepspeed imports
  inference    forward only under torch.inference_mode, bf16 (what `c2seg infer` runs per window)
Without a GPU it prints why and exits 0 (run_all stays green on CPU machines).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from c2seg.spec import load_spec  # noqa: E402  (after the path insert)
from c2seg.train.cli import count_parameters  # noqa: E402
from c2seg.train.config import load_model_config  # noqa: E402
from c2seg.train.models import FusionSegmenter  # noqa: E402

DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # datasheet, SXM, no sparsity


def _batch(spec, b: int, size: int, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    inputs = {m.name: torch.randn(b, m.bands, size, size, generator=g, device=device) for m in spec.modalities}
    return inputs, torch.randint(1, spec.num_logits, (b, size, size), generator=g, device=device)


def _cuda_ms(fn, warmup: int, steps: int) -> float:
    """Median milliseconds of ``fn`` over ``steps`` calls after ``warmup``, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matrix-product rate on random data (rotating 3 operand sets, so no cache reuse)."""
    sets = itertools.cycle([(torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
                             torch.randn(n, n, device="cuda", dtype=torch.bfloat16)) for _ in range(3)])
    ms = _cuda_ms(lambda: torch.matmul(*next(sets)), 5, reps)
    return 2 * n ** 3 / (ms / 1000) / 1e12


def _model(spec, mcfg, checkpointing: bool = False) -> FusionSegmenter:
    """The model on the GPU (every step sees every modality: no modality is dropped outside fine-tuning)."""
    return FusionSegmenter(spec, dataclasses.replace(mcfg, activation_checkpointing=checkpointing)).cuda()


def model_flops_per_sample(spec, mcfg, size: int) -> float:
    """Forward + backward FLOPs of one training sample (no recomputation, no modality dropout)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(spec, mcfg)
    inputs, label = _batch(spec, 1, size, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(inputs).float(), label, ignore_index=0).backward()
    del model
    return float(counter.get_total_flops())


def _plain(model, inputs, label):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(inputs).float(), label, ignore_index=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def _deepspeed(model, inputs, label, batch: int, model_file: str, compile: bool, zero: int):
    from benchmarks.bench_train import train_config
    from c2seg.train.engine import create_engine, init_distributed

    init_distributed()
    engine = create_engine(model, train_config(model_file, zero, batch, 10 ** 6, "bf16", compile), 1)
    bf16_inputs = {m: t.to(torch.bfloat16) for m, t in inputs.items()}

    def step():
        loss = F.cross_entropy(engine(bf16_inputs).float(), label, ignore_index=0)
        engine.backward(loss)
        engine.step()

    return step


def _inference(model, inputs, label):
    model = model.to(torch.bfloat16).eval()
    bf16_inputs = {m: t.to(torch.bfloat16) for m, t in inputs.items()}

    def step():
        with torch.inference_mode():
            model(bf16_inputs).argmax(1)

    return step


def run_variant(name: str, spec, mcfg, args, batch: int) -> dict | None:
    """Median step time, samples/s and peak memory of one variant at one batch size; None when out of memory."""
    ckpt = name == "plain+ckpt" or (name == "deepspeed" and args.deepspeed_ckpt)
    torch.manual_seed(0)
    model = _model(spec, mcfg, ckpt)
    if args.compile and name != "deepspeed":  # the engine compiles it itself (TrainConfig.compile)
        model.compile()
    inputs, label = _batch(spec, batch, args.size, "cuda")
    make = {"plain": _plain, "plain+ckpt": _plain, "inference": _inference,
            "deepspeed": lambda m, i, lab: _deepspeed(m, i, lab, batch, args.model, args.compile, args.zero)}[name]
    torch.cuda.reset_peak_memory_stats()
    try:
        step = make(model, inputs, label)
        ms = _cuda_ms(step, args.warmup, args.steps)
    except torch.OutOfMemoryError:
        return None
    finally:
        del model
    return {"variant": name, "batch": batch, "step_ms": round(ms, 2), "samples_s": round(1000 * batch / ms, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1)}


def profile_step(spec, mcfg, args) -> None:
    """The 25 costliest CUDA kernels of three plain training steps."""
    from torch.profiler import ProfilerActivity, profile

    model = _model(spec, mcfg)
    if args.compile:
        model.compile()
    step = _plain(model, *_batch(spec, args.batches[0], args.size, "cuda"))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    del model, step
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="(run_all) the `small` model, two batch sizes")
    parser.add_argument("--spec", default=str(ROOT / "configs/datasets/c2seg_ab.yaml"))
    parser.add_argument("--model", default=str(ROOT / "configs/models/large.yaml"))
    parser.add_argument("--size", type=int, default=128, help="tile size (px)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--variants", nargs="+", default=["plain", "plain+ckpt", "deepspeed", "inference"],
                        choices=["plain", "plain+ckpt", "deepspeed", "inference"])
    parser.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3), help="the engine's ZeRO stage")
    parser.add_argument("--deepspeed-ckpt", action="store_true", help="activation checkpointing in the engine")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak (default: from the GPU's name; H100 / H200 989)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model in every variant (the engine: TrainConfig.compile)")
    parser.add_argument("--profile", action="store_true",
                        help="print the top CUDA kernels of one plain step at the first batch size")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU on this machine; skipped")
        return 0
    if args.quick:
        args.model, args.batches = str(ROOT / "configs/models/small.yaml"), [8, 16]
    from benchmarks.report import figure

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gpu = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next((v for k, v in DENSE_BF16_TFLOPS.items() if k in gpu), None)
    spec, mcfg = load_spec(args.spec), load_model_config(args.model)
    measured = matmul_tflops()
    flops = model_flops_per_sample(spec, mcfg, args.size)
    params = count_parameters(args.model, spec)["total"]
    result = {"gpu": gpu, "model": mcfg.name, "parameters": params, "spec": spec.name, "tile": args.size,
              "train_tflop_per_sample": round(flops / 1e12, 4), "matmul_tflops": round(measured, 1),
              "peak_tflops": peak, "torch": torch.__version__, "rows": []}
    print(f"{gpu}: bf16 matmul {measured:.0f} TFLOP/s measured, peak {peak}; {mcfg.name} {params / 1e6:.0f} M "
          f"params, {flops / 1e12:.3f} TFLOP per {args.size} px training sample", flush=True)
    if args.profile:
        profile_step(spec, mcfg, args)
    for name in args.variants:
        for batch in args.batches:
            row = run_variant(name, spec, mcfg, args, batch)
            if row is None:
                print(f"{name} batch {batch}: out of memory", flush=True)
                break
            work = flops / 3 if name == "inference" else flops  # forward only: a third of fwd + bwd
            row["tflops"] = round(work * row["samples_s"] / 1e12, 1)
            row["mfu_pct"] = round(100 * row["tflops"] / peak, 1) if peak else None
            row["of_matmul_pct"] = round(100 * row["tflops"] / measured, 1)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    note = f"{mcfg.name}, {args.size} px tiles, {gpu}"
    figure("gpu", "bf16 matmul rate (8192^3, measured)", measured, "TFLOP/s", gpu)
    for name in args.variants:
        rows = [r for r in result["rows"] if r["variant"] == name]
        if rows:
            best = max(rows, key=lambda r: r["samples_s"])
            figure("gpu", f"{name}: samples/s (best batch {best['batch']})", best["samples_s"], "samples/s",
                   f"{note}, {best['peak_gib']} GiB")
            if best["mfu_pct"] is not None:
                figure("gpu", f"{name}: MFU vs {peak:.0f} TFLOP/s peak", best["mfu_pct"], "%",
                       f"{best['tflops']} TFLOP/s, {best['of_matmul_pct']} % of measured matmul")
    return 0


if __name__ == "__main__":
    sys.exit(main())
