"""The real CLI chain on one GPU, as users run it there: bf16, ``compile: true``, NCCL (world size 1).

generate -> ``data prep`` -> ``train pretrain`` -> ``train finetune`` (mean-teacher adaptation, partial
adaptation on) -> ``train export`` -> ``infer run`` -> ``infer evaluate`` at ZeRO-1 and ZeRO-3, and a finetune
killed with SIGKILL mid-run then continued with ``--resume auto``, compared with an uninterrupted run.
Tiny model and cities (a few dozen steps): a few minutes on one H200. Marked ``gpu``; skipped where
``torch.cuda.is_available()`` is false. A GPU session runs it through ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import rasterio
import torch

from tests.fixtures_data import TINY_SIZE
from tests.fixtures_train import ROOT, checkpoint_tensors, losses, run_train, tiny_args, train_cmd, train_env
from tests.test_train_distributed import _wait_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is false); scripts/gpu_check.sh runs "
                              "it on a GPU machine"),
]

SPEC = str(ROOT / "configs" / "datasets" / "demo_tiny.yaml")
PREP = str(ROOT / "tests" / "configs" / "prep_tiny.yaml")
STEPS, EVERY = 24, 8
GPU_SETS = ("deepspeed.precision=bf16", "compile=true", f"steps={STEPS}", f"checkpoint_every={EVERY}",
            f"finetune.eval_every={EVERY}", "finetune.target_class_min_share=0.05")
TIMEOUT = 420  # s per CLI call: the first compiled step of a process compiles (the inductor cache helps later ones)
STEP_KEYS = {"loss", "lr", "step_time_s", "samples_per_s", "memory_mb"}
FINETUNE_KEYS = STEP_KEYS | {"loss_source", "loss_target", "pseudo_confident", "grad_norm"}
SCORE_KEYS = {"miou", "oa", "macro_f1", "kappa", "per_class"}
# Resume on GPU cannot be compared bit for bit as on CPU (tests/test_train_distributed.py): the product
# does not switch torch to deterministic algorithms (it could not: the backward of the decoder's bilinear
# upsampling has no deterministic CUDA kernel), and that backward, flash attention's and inductor's
# index_put all accumulate with atomics, so two uninterrupted runs already differ in the last bits and the
# difference grows over the steps. What a broken resume does (moments, LR schedule, data position, EMA
# teacher or class estimate lost) moves the weights by about as much as the steps after the checkpoint
# moved them; run-to-run noise moves them by a small fraction of that. So the gap between the resumed
# and the uninterrupted final weights (model and EMA teacher) is measured against the movement of the
# uninterrupted run since the resume point, and must stay under this fraction.
RESUME_GAP = 0.1


def c2seg(*args: object, timeout: int = TIMEOUT) -> str:
    """Run ``python -m c2seg.cli ARGS``; its log (stderr)."""
    return run_train([str(a) for a in args], timeout=timeout).stderr


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> tuple[Path, Path]:
    """Generated tiny cities (``c2seg data generate``) and their prep folder (``c2seg data prep``)."""
    root = tmp_path_factory.mktemp("gpu_city")
    data, prep = root / "data", root / "prep"
    h, w = TINY_SIZE
    c2seg("data", "generate", "--spec", SPEC, "--data-root", data, "--size", f"{h}x{w}")
    c2seg("data", "prep", "--spec", SPEC, "--data-root", data, "--config", PREP, "--out", prep, "--workers", "2")
    return data, prep


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_trained(run: Path, keys: set[str]) -> None:
    """Every step logged with ``keys`` and a finite loss, the run marked finished."""
    records = _records(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    missing = [(r["step"], sorted(keys - set(r))) for r in records if not keys <= set(r)]
    assert not missing, missing[:3]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (run / "COMPLETED").is_file()


@pytest.mark.parametrize("zero", [1, 3])
def test_cli_chain_bf16_compiled(city, tmp_path, zero):
    data, prep = city
    sets = (*GPU_SETS, f"deepspeed.zero_stage={zero}")
    pre, fine, model, pred = tmp_path / "pretrain", tmp_path / "finetune", tmp_path / "model.pt", tmp_path / "pred"
    log = c2seg(*tiny_args("pretrain", prep, pre, *sets))
    assert f"ZeRO-{zero}, bf16" in log and "compiled" in log
    _assert_trained(pre, STEP_KEYS)
    log = c2seg(*tiny_args("finetune", prep, fine, *sets, f"init_from={pre}"))
    assert f"initialised from {pre}" in log and "partial adaptation" in log
    _assert_trained(fine, FINETUNE_KEYS)
    val = _records(fine / "val_metrics.jsonl")
    assert [r["step"] for r in val] == list(range(EVERY, STEPS + 1, EVERY))
    assert all(math.isfinite(r["miou"]) and len(r["per_class"]) == 13 for r in val)
    c2seg("train", "export", "--run-dir", fine, "--out", model)
    log = c2seg("infer", "run", "--model", model, "--spec", SPEC, "--data-root", data, "--city", "synth_target",
                "--out", pred, "--window", "32")
    assert "on cuda" in log
    with rasterio.open(pred / "synth_target" / "synth_target.tif") as cog:
        assert (cog.height, cog.width) == TINY_SIZE and cog.dtypes[0] == "uint8"
    scores = tmp_path / "scores.json"
    c2seg("infer", "evaluate", "--pred", pred / "synth_target", "--spec", SPEC, "--data-root", data, "--city",
          "synth_target", "--out", scores)
    result = json.loads(scores.read_text())
    assert SCORE_KEYS <= set(result) and math.isfinite(result["miou"]) and len(result["per_class"]) == 13


def _relative_gap(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                  start: dict[str, torch.Tensor]) -> float:
    """||got - want|| / ||want - start|| over the floating-point tensors of ``want``."""
    floats = [k for k, v in want.items() if v.is_floating_point()]
    gap = sum(float((got[k].double() - want[k].double()).square().sum()) for k in floats)
    moved = sum(float((want[k].double() - start[k].double()).square().sum()) for k in floats)
    return math.sqrt(gap / moved)


def test_kill_9_mid_finetune_then_resume_auto_matches_uninterrupted(city, tmp_path, record_property):
    """ZeRO-1 (the recommended GPU setting, docs/gpu.md). The killed run and the uninterrupted one start
    together; the kill lands right after the first checkpoint (step 8 of 24), then ``--resume auto`` finishes."""
    _, prep = city
    sets = (*GPU_SETS, "deepspeed.zero_stage=1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = tiny_args("finetune", prep, killed, *sets)
    proc = subprocess.Popen(train_cmd(args), cwd=ROOT, env=train_env(), stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    with (tmp_path / "straight.log").open("w") as log:
        other = subprocess.Popen(train_cmd(tiny_args("finetune", prep, straight, *sets)), cwd=ROOT, env=train_env(),
                                 stdout=log, stderr=log)
        try:
            _wait_for(killed / "checkpoints" / "LATEST", proc, timeout=TIMEOUT)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            assert other.wait(timeout=TIMEOUT) == 0, (tmp_path / "straight.log").read_text()[-3000:]
        finally:
            other.kill()  # no-op once it has ended
    assert not (killed / "COMPLETED").exists() and max(losses(killed)) < STEPS, "the kill came too late"
    tag, start = checkpoint_tensors(killed)
    log = c2seg(*args, "--resume", "auto")
    assert f"resumed from {killed / 'checkpoints' / tag}" in log
    assert sorted(losses(killed)) == list(range(1, STEPS + 1))
    tag_a, want = checkpoint_tensors(straight)
    tag_b, got = checkpoint_tensors(killed)
    assert tag_a == tag_b and want.keys() == got.keys()
    assert all(torch.equal(got[k], v) for k, v in want.items() if not v.is_floating_point())
    gap = _relative_gap(got, want, start)
    record_property("resume_gap", gap)
    assert gap < RESUME_GAP, f"resumed weights are {gap:.3g} of the training movement since {tag} away"
