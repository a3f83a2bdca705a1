"""Throughput through the product on one GPU: the `c2seg` commands as users run them, not synthetic loops.

train   AB-like cities (configs/datasets/demo_ab.yaml: HSI 242 + MSI 4 + SAR 2 bands) made with `c2seg data
        generate` and cut into 128 px tiles with `c2seg data prep`; then `c2seg train finetune` (mean-teacher
        adaptation from the first step) and `c2seg train pretrain` of --model on the GPU (bf16, ZeRO --zero),
        with the real WebDataset loader and --workers loader processes, each stopped (SIGKILL) once --warmup +
        --steps steps are logged. From the run's metrics.jsonl, over the steps after the warmup: samples/s,
        step time, peak allocated GPU memory (memory_mb), and the share of step time spent waiting for batches
        (data_wait_s, where train/loop.py records it). MFU: model FLOPs per loop sample x samples/s over the
        datasheet dense bf16 peak and over the bf16 matmul rate measured in this run. FLOPs per sample are
        bench_gpu.model_flops_per_sample (forward + backward of one tile, no recomputation); a finetune step
        with adaptation does that for the source and the mixed target tile and runs the teacher's forward (a
        third) on the target tile: 2 1/3 of it per loop sample. Pretraining is counted the same way on the
        masked pretrainer. Modality dropout is off in both runs (a copy of the model config), as it is in the
        counts. Baseline, same run: the engine on synthetic GPU-resident batches (bench_gpu's deepspeed
        variant, same model, batch, ZeRO stage and activation checkpointing); each command's ratio is its
        model TFLOP/s over the baseline's.
infer   a BW-sized scene: Wuhan of configs/datasets/c2seg_bw.yaml (HSI 116 bands at 30 m, MSI 4 and SAR 2 at
        10 m) at --size x --size px, MATLAB v7.3 as released, written by the project's synth writer (blocks
        computed by --gen-workers processes); a random-weight exported --model; then `c2seg infer run` on the
        GPU. Pixels/s, end-to-end time (the whole command) over the pure forward time of the same windows
        (bf16, full batches, inputs already on the GPU; goal <= 1.2), and the run's peak host RSS and
        device memory (sampled every 0.1 s; device memory as the driver reports it: context and cache).

    python benchmarks/bench_product_gpu.py train --model configs/models/large.yaml --batch 32 --steps 10
    python benchmarks/bench_product_gpu.py infer --size 8192 --model configs/models/large.yaml
    python benchmarks/bench_product_gpu.py                 # both, defaults
Without a GPU it prints why and exits 0 (run_all stays green on CPU machines).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_gpu import DENSE_BF16_TFLOPS, _batch, _cuda_ms, matmul_tflops, model_flops_per_sample, \
    run_variant  # noqa: E402  (after the path insert)
from benchmarks.report import figure  # noqa: E402

AB_SPEC = ROOT / "configs/datasets/demo_ab.yaml"
BW_SPEC = ROOT / "configs/datasets/c2seg_bw.yaml"
CONFIGS = {"finetune": ROOT / "configs/train/adapted_c2seg_ab.yaml",
           "pretrain": ROOT / "configs/train/pretrain_c2seg_ab.yaml"}
TEACHER_SHARE = 1 / 3  # the teacher's forward, in units of a training sample's forward + backward


def c2seg(*args: object) -> list[str]:
    return [sys.executable, "-m", "c2seg.cli", *map(str, args)]


def child_env() -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def run(*args: object, log: Path) -> None:
    """``c2seg ARGS`` to completion, its output in ``log``."""
    with log.open("w") as fh:
        code = subprocess.run(c2seg(*args), cwd=ROOT, env=child_env(), stdout=fh, stderr=fh).returncode
    if code:
        raise RuntimeError(f"c2seg {' '.join(map(str, args[:2]))} failed ({code}):\n{log.read_text()[-3000:]}")


class PeakMemory:
    """While active: the peak device memory in use (cudaMemGetInfo, whole device) over what was in use at the
    start, and the peak RSS of process ``pid`` and its descendants, sampled every 0.1 s."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        free, total = torch.cuda.mem_get_info()
        self.base = self.device = total - free
        self.host = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _rss(self) -> int:
        """RSS of the process and its descendants now (0 once it has ended)."""
        import psutil

        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # ended between the listing and the read
                pass
        return total

    def _poll(self) -> None:
        while not self.stop.wait(0.1):
            free, total = torch.cuda.mem_get_info()
            self.device = max(self.device, total - free)
            self.host = max(self.host, self._rss())

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def as_dict(self) -> dict[str, float]:
        return {"peak_device_gib": round((self.device - self.base) / 2**30, 2),
                "peak_host_gib": round(self.host / 2**30, 2)}


# ---- train --------------------------------------------------------------------------------------------------
def prepare_ab(work: Path, size: int, workers: int) -> Path:
    """Generated AB-like cities of ``size`` px, cut into 128 px tiles by the project's commands."""
    data, prep = work / "ab", work / "ab_prep"
    run("data", "generate", "--spec", AB_SPEC, "--data-root", data, "--size", f"{size}x{size}", log=work / "gen.log")
    run("data", "prep", "--spec", AB_SPEC, "--data-root", data, "--out", prep, "--workers", min(workers, 8),
        "--set", f"val_block_size={size // 2}", "--set", f"min_shards_per_split={max(8, workers)}",
        log=work / "prep.log")
    return prep


def model_without_dropout(model_yaml: str, work: Path) -> Path:
    """A copy of the model config with modality dropout off, so that every step does the counted work."""
    import yaml

    from c2seg.config import to_dict
    from c2seg.train.config import load_model_config

    path = work / f"{Path(model_yaml).stem}_nodropout.yaml"
    cfg = dataclasses.replace(load_model_config(model_yaml), modality_dropout=0.0)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def train_sets(command: str, args, model: Path, prep: Path, out: Path) -> list[str]:
    sets = [f"model={model}", f"data.prep_dir={prep}", f"output_dir={out}", "init_from=null", "steps=100000",
            "checkpoint_every=100000", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
            f"deepspeed.zero_stage={args.zero}", "deepspeed.precision=bf16", f"compile={str(args.compile).lower()}",
            "tracking.enabled=false"]
    if command == "finetune":
        sets += ["finetune.adapt=true", "finetune.adapt_warmup_steps=0", "finetune.eval_every=100000"]
    return [a for s in sets for a in ("--set", s)]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train_until(command: str, sets: list[str], out: Path, steps: int, timeout: float) -> tuple[list[dict], dict]:
    """Run ``c2seg train COMMAND`` until ``steps`` steps are logged, then SIGKILL it (and its loader workers);
    its step records and peak memory."""
    log = out.with_suffix(".log")
    with log.open("w") as fh:
        proc = subprocess.Popen(c2seg("train", command, "--config", CONFIGS[command], *sets), cwd=ROOT,
                                env=child_env(), stdout=fh, stderr=fh, start_new_session=True)
    end = time.monotonic() + timeout
    try:
        with PeakMemory(proc.pid) as peak:
            while len(_records(out / "metrics.jsonl")) < steps:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"train {command}: {len(_records(out / 'metrics.jsonl'))} of {steps} steps "
                                       f"after {timeout:.0f} s (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return _records(out / "metrics.jsonl")[:steps], peak.as_dict()


def pretrain_flops_per_sample(spec, mcfg, size: int, batch: int = 8) -> float:
    """Forward + backward FLOPs of one masked-pretraining sample, counted as bench_gpu counts the segmenter's
    (no recomputation, bf16 autocast); the mean over a seeded batch, since whole-modality masking is drawn per
    sample."""
    from torch.utils.flop_counter import FlopCounterMode

    from c2seg.train.config import load_train_config
    from c2seg.train.models import MaskedPretrainer

    torch.manual_seed(0)
    pcfg = load_train_config(CONFIGS["pretrain"]).pretrain
    model = MaskedPretrainer(spec, dataclasses.replace(mcfg, activation_checkpointing=False), pcfg).cuda()
    inputs, _ = _batch(spec, batch, size, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), FlopCounterMode(display=False) as counter:
        model(inputs)[0].backward()
    del model
    return counter.get_total_flops() / batch


def summarise(records: list[dict], warmup: int, batch: int, flops: float, rates: tuple[float, float]) -> dict:
    """Samples/s, step time, memory, data-wait share and MFU over the records after ``warmup``."""
    timed = records[warmup:]
    seconds = sum(r["step_time_s"] for r in timed)
    samples_s = batch * len(timed) / seconds
    waits = [r["data_wait_s"] for r in timed if "data_wait_s" in r]
    tflops = flops * samples_s / 1e12
    peak, measured = rates
    return {"steps": len(timed), "samples_s": round(samples_s, 2), "step_s": round(seconds / len(timed), 4),
            "peak_allocated_gib": round(max(r["memory_mb"] for r in timed) / 1024, 2),
            "data_wait_share": round(sum(waits) / seconds, 4) if len(waits) == len(timed) else None,
            "tflop_per_sample": round(flops / 1e12, 4), "tflops": round(tflops, 1),
            "mfu_pct": round(100 * tflops / peak, 1) if peak else None,
            "of_matmul_pct": round(100 * tflops / measured, 1)}


def baseline(spec, model_yaml: Path, args, flops: float) -> dict:
    """The engine on synthetic GPU-resident batches (bench_gpu's deepspeed variant), in this process: last,
    because it starts a process group here."""
    from c2seg.train.config import load_model_config

    mcfg = load_model_config(model_yaml)
    opts = argparse.Namespace(model=str(model_yaml), size=128, compile=args.compile, zero=args.zero,
                              deepspeed_ckpt=mcfg.activation_checkpointing, warmup=args.warmup, steps=args.steps)
    row = run_variant("deepspeed", spec, mcfg, opts, args.batch)
    if row is None:
        raise RuntimeError(f"baseline: batch {args.batch} does not fit in GPU memory")
    return {**row, "tflops": round(flops * row["samples_s"] / 1e12, 1)}


def bench_train(args, work: Path, rates: tuple[float, float]) -> dict:
    """The train part (module docstring); ``rates``: the datasheet peak and the measured matmul TFLOP/s."""
    from c2seg.spec import load_spec
    from c2seg.train.config import load_model_config

    work.mkdir(parents=True, exist_ok=True)
    prep = prepare_ab(work, args.city_size, args.prep_workers)
    model = model_without_dropout(args.model, work)
    spec, mcfg = load_spec(AB_SPEC), load_model_config(model)
    sample = model_flops_per_sample(spec, mcfg, 128)
    flops = {"finetune": (2 + TEACHER_SHARE) * sample, "pretrain": pretrain_flops_per_sample(spec, mcfg, 128)}
    torch.cuda.empty_cache()
    result = {}
    for command in args.commands:
        out = work / f"run_{command}"
        records, memory = train_until(command, train_sets(command, args, model, prep, out), out,
                                      args.warmup + args.steps, args.run_timeout)
        result[command] = {**summarise(records, args.warmup, args.batch, flops[command], rates), **memory}
        print(json.dumps({command: result[command]}), flush=True)
    result["baseline"] = baseline(spec, model, args, sample)
    for command in args.commands:
        result[command]["of_baseline"] = round(result[command]["tflops"] / result["baseline"]["tflops"], 3)
    report_train(result, args, mcfg.name)
    return result


def report_train(result: dict, args, model: str) -> None:
    note = f"{model}, batch {args.batch}, ZeRO-{args.zero}, bf16, {'compiled' if args.compile else 'eager'}, " \
           f"{args.workers} loader workers"
    base = result["baseline"]
    figure("product", "baseline: engine, synthetic batches", base["samples_s"], "samples/s",
           f"{note}; {base['tflops']} TFLOP/s, {base['peak_gib']} GiB")
    for command in args.commands:
        r = result[command]
        figure("product", f"train {command}: samples/s", r["samples_s"], "samples/s",
               f"{note}; {r['step_s']} s/step, {r['tflops']} TFLOP/s")
        figure("product", f"train {command}: model TFLOP/s / baseline's", r["of_baseline"], "x",
               f"MFU {r['mfu_pct']} % of peak, {r['of_matmul_pct']} % of measured matmul")
        figure("product", f"train {command}: peak memory (allocated)", r["peak_allocated_gib"], "GiB",
               f"device in use {r['peak_device_gib']} GiB, host {r['peak_host_gib']} GiB with workers")
        share = r["data_wait_share"]
        if share is None:
            print(f"  product    train {command}: data-wait share not recorded (metrics.jsonl has no data_wait_s)")
        else:
            figure("product", f"train {command}: share of step time waiting for data", 100 * share, "%", note)


# ---- infer --------------------------------------------------------------------------------------------------
_SYNTH = None


def _adopt(synth) -> None:
    global _SYNTH
    _SYNTH = synth


def _render(window):
    return _SYNTH.block(window)


class ParallelBlocks:
    """A CitySynth whose blocks are computed ahead by a process pool, in the order of ``synth.blocks()``,
    which is the order the synth writers ask for them (each once)."""

    def __init__(self, synth, pool: ProcessPoolExecutor) -> None:
        self.synth = synth
        blocks = synth.blocks()
        self.ahead = zip(blocks, pool.map(_render, blocks, chunksize=2))

    def block(self, window):
        expected, data = next(self.ahead)
        assert expected == window, f"the writer asked for block {window}, the pool computed {expected}"
        return data

    def __getattr__(self, name):
        return getattr(self.synth, name)


def bw_scene(work: Path, size: int, workers: int):
    """The BW target city (Wuhan) at ``size`` x ``size`` px, written as the release's MATLAB v7.3 files."""
    from c2seg.spec import load_spec
    from c2seg.data_prep.synth import CitySynth
    from c2seg.data_prep.synth.writers import write_mat_v73

    spec = load_spec(BW_SPEC, data_root=work / "bw")
    city = spec.cities_with_role("target")[0]
    synth = CitySynth(spec, city, size, size, seed=0)
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=fork, initializer=_adopt, initargs=(synth,)) as pool:
        write_mat_v73(ParallelBlocks(synth, pool), spec.resolve(city, "scene"),
                      spec.resolve(city, "label") if city.labelled else None)
    return spec, city.name


def scene_windows(size: int, window: int, overlap: float) -> int:
    """Windows `c2seg infer run` predicts on a square scene (each block predicts every window touching it)."""
    from c2seg.inference.config import InferConfig
    from c2seg.inference.windows import block_grid, window_grid, windows_touching

    grid = window_grid(size, size, window, overlap)
    return sum(len(windows_touching(grid, b)) for b in block_grid(size, size, InferConfig().block))


def forward_seconds(model_path: Path, windows: int, window: int, batch: int) -> float:
    """Pure model time of ``windows`` windows: bf16 forward of full batches already on the GPU."""
    from c2seg.train.export import load_exported

    exported = load_exported(model_path, map_location="cuda")
    model = exported.model.cuda().eval()
    inputs = {m.name: torch.randn(batch, m.bands, window, window, device="cuda") for m in exported.spec.modalities}

    def forward():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(inputs)

    seconds = _cuda_ms(forward, 3, 10) / 1000 * math.ceil(windows / batch)
    model = inputs = None  # the closure shares these cells: the tensors are freed here
    torch.cuda.empty_cache()
    return seconds


def bench_infer(args, work: Path) -> dict:
    """The infer part (module docstring)."""
    from benchmarks.bench_infer import _export_random

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    spec, city = bw_scene(work, args.size, args.gen_workers)
    generated = time.perf_counter() - t0
    model = _export_random(spec, Path(args.model), work / "model.pt")
    cmd = c2seg("infer", "run", "--model", model, "--spec", BW_SPEC, "--data-root", spec.data_root, "--city", city,
                "--out", work / "pred", "--window", args.window, "--overlap", args.overlap, "--batch-size",
                args.infer_batch, "--device", "cuda")
    log = work / "infer.log"
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=fh, stderr=fh)
        with PeakMemory(proc.pid) as peak:
            try:
                code = proc.wait(timeout=args.run_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"infer run did not finish in {args.run_timeout:.0f} s "
                                   f"({json.dumps(peak.as_dict())}):\n{log.read_text()[-2000:]}") from None
    e2e = time.perf_counter() - t0
    if code:
        raise RuntimeError(f"infer run failed ({code}):\n{log.read_text()[-3000:]}")
    windows = scene_windows(args.size, args.window, args.overlap)
    forward = forward_seconds(model, windows, args.window, args.infer_batch)
    result = {"size": args.size, "bands": [m.bands for m in spec.modalities], "generate_s": round(generated, 1),
              "windows": windows, "e2e_s": round(e2e, 2), "forward_s": round(forward, 2),
              "pixels_per_s": round(args.size ** 2 / e2e), "e2e_over_forward": round(e2e / forward, 2),
              **peak.as_dict()}
    note = f"{args.size}^2 px, {Path(args.model).stem}, window {args.window}, overlap {args.overlap}, " \
           f"batch {args.infer_batch}, {windows} windows"
    figure("product", "infer run: end-to-end throughput (BW-sized)", result["pixels_per_s"], "px/s", note)
    figure("product", "infer run: end-to-end / pure forward (goal <= 1.2)", result["e2e_over_forward"], "x",
           f"{result['e2e_s']} s vs {result['forward_s']} s")
    figure("product", "infer run: peak host RSS", result["peak_host_gib"], "GiB", note)
    figure("product", "infer run: peak device memory in use", result["peak_device_gib"], "GiB", note)
    return result


# ---- main ---------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=["train", "infer"], help="one part (default: both)")
    parser.add_argument("--quick", action="store_true", help="(run_all) `small`, 4 + 4 steps, a 2048 px scene")
    parser.add_argument("--model", default=str(ROOT / "configs/models/large.yaml"), help="model config YAML")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--run-timeout", type=float, default=240.0, help="seconds allowed to each product run")
    t = parser.add_argument_group("train")
    t.add_argument("--commands", nargs="+", default=["finetune", "pretrain"], choices=["finetune", "pretrain"])
    t.add_argument("--batch", type=int, default=32, help="tiles per step (data.batch_size)")
    t.add_argument("--workers", type=int, default=6, help="loader worker processes (data.num_workers)")
    t.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3), help="ZeRO stage")
    t.add_argument("--compile", action="store_true", help="compile: true (the first steps then compile)")
    t.add_argument("--warmup", type=int, default=4, help="steps left out of the figures")
    t.add_argument("--steps", type=int, default=10, help="steps measured after the warmup")
    t.add_argument("--city-size", type=int, default=512, help="side of each generated AB-like city (px)")
    t.add_argument("--prep-workers", type=int, default=8, help="c2seg data prep --workers")
    i = parser.add_argument_group("infer")
    i.add_argument("--size", type=int, default=8192, help="side of the BW-sized scene (px)")
    i.add_argument("--window", type=int, default=256, help="--window of c2seg infer run (BW tiles are 256 px)")
    i.add_argument("--overlap", type=float, default=0.25, help="--overlap of c2seg infer run")
    i.add_argument("--infer-batch", type=int, default=16, help="--batch-size of c2seg infer run")
    i.add_argument("--gen-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                   help="processes computing the scene's blocks")
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps, args.warmup, args.size = str(ROOT / "configs/models/small.yaml"), 4, 4, 2048
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a time limit's TERM still ends the runs (finally)
    if not torch.cuda.is_available():
        print("bench_product_gpu: no CUDA GPU on this machine; skipped")
        return 0
    gpu = torch.cuda.get_device_name(0)
    peak = next((v for k, v in DENSE_BF16_TFLOPS.items() if k in gpu), None)
    measured = matmul_tflops()
    print(f"{gpu}: bf16 matmul {measured:.0f} TFLOP/s measured, datasheet peak {peak}", flush=True)
    result = {"gpu": gpu, "torch": torch.__version__, "matmul_tflops": round(measured, 1), "peak_tflops": peak}
    with tempfile.TemporaryDirectory(prefix="bench_product_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.what in (None, "infer"):  # first: the train part's baseline starts a process group here
            result["infer"] = bench_infer(args, work / "infer")
        if args.what in (None, "train"):
            result["train"] = bench_train(args, work / "train", (peak, measured))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
