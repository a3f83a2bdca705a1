"""Real 2-process CPU runs (torchrun, gloo) of pretrain and finetune under ZeRO-2 / ZeRO-3, export,
bit-exact resume after kill -9, checkpoint on SIGUSR1."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zarr

from tests.fixtures_data import hand_scores
from tests.fixtures_train import (ROOT, assert_same_weights, checkpoint_tensors, losses, run_train, tiny_args,
                                 train_cmd, train_env)

pytestmark = pytest.mark.slow


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.005)


def test_pretrain_two_ranks_zero2_checkpoints_every_rank(pretrained_tiny):
    steps = losses(pretrained_tiny)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in steps.values())
    ckpt = pretrained_tiny / "checkpoints" / "step_00000006"
    assert (pretrained_tiny / "checkpoints" / "LATEST").read_text() == ckpt.name
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # ZeRO-2: one optimizer partition per rank
    assert json.loads((ckpt / "train_state.json").read_text())["world_size"] == 2
    assert (pretrained_tiny / "COMPLETED").is_file()


def test_finetune_two_ranks_zero3_from_pretrained_validates_on_target(finetuned_tiny, pretrained_tiny,
                                                                    tiny_prepared):
    records = [json.loads(x) for x in (finetuned_tiny / "val_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    # every labelled pixel of the target val tiles counted once (the ranks' padding forwards are not counted)
    group = zarr.open_group(tiny_prepared / "dataset.zarr/synth_target/val", mode="r")
    labels = group["label"][:][group["kept"][:]]
    for r in records:
        expected = hand_scores(r["confusion"])
        assert [r[k] for k in ("miou", "oa", "kappa")] == pytest.approx([expected[k] for k in ("miou", "oa", "kappa")])
        assert len(r["per_class"]) == 13 and sum(map(sum, r["confusion"])) == int((labels > 0).sum())
    last = json.loads((finetuned_tiny / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss_source", "loss_target", "pseudo_confident", "lr", "grad_norm", "samples_per_s",
            "data_wait_s"} <= set(last)
    assert 0 <= last["data_wait_s"] < last["step_time_s"]
    # the backbone started from the pretrained weights
    pre = torch.load(pretrained_tiny / "checkpoints/step_00000006/weights.pt", weights_only=True)["state_dict"]
    first = torch.load(sorted((finetuned_tiny / "checkpoints").glob("step_*"))[0] / "weights.pt", weights_only=True)
    key = "backbone.embeds.msi.weight_generator.0.weight"
    # 3 AdamW steps at lr 1e-3 move a weight by at most ~3e-3; a fresh initialisation (std 0.02) lies far away
    assert (first["state_dict"][key] - pre[key]).abs().max() < 1e-2 < pre[key].abs().max()
    assert "ema" in first["extra"] and first["modalities"] == ["hsi", "msi", "sar"]


def test_export_then_load_without_deepspeed_gives_identical_logits(finetuned_tiny, tmp_path):
    """The exported file gives exactly the logits of the weights DeepSpeed's own tool consolidates from
    the ZeRO-3 partitions, and loads in a process that never imports deepspeed."""
    model_file = tmp_path / "model.pt"
    run_train(["train", "export", "--run-dir", str(finetuned_tiny), "--out", str(model_file)])
    script = (
        "import sys, torch\n"
        "from train.export import load_exported\n"
        f"m = load_exported({str(model_file)!r})\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = {n: torch.randn(1, m.spec.modality(n).bands, 32, 48, generator=g) for n in m.modalities}\n"
        "with torch.no_grad():\n"
        f"    torch.save(m.model(x), {str(tmp_path / 'logits.pt')!r})\n"
        f"print(m.tile_size, m.modalities, sorted(m.normalization))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=train_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[0] == "32"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from c2seg.train.config import load_model_config
    from c2seg.train.models import FusionSegmenter
    from c2seg.train.export import load_exported

    exported = load_exported(model_file)
    state = get_fp32_state_dict_from_zero_checkpoint(str(finetuned_tiny / "checkpoints"),
                                                     tag=(finetuned_tiny / "checkpoints/LATEST").read_text())
    reference = FusionSegmenter(exported.spec, load_model_config(ROOT / "configs/models/tiny.yaml"))
    reference.load_state_dict(state)
    reference.eval()
    g = torch.Generator().manual_seed(0)
    x = {n: torch.randn(1, exported.spec.modality(n).bands, 32, 48, generator=g) for n in exported.modalities}
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(exported.model(x), expected)
    # the DeepSpeed-free process (1 thread) differs only by float summation order
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("command,zero", [("finetune", 2), ("pretrain", 3)])
def test_kill_9_then_resume_auto_is_bit_exact(tiny_prepared, tmp_path, command, zero):
    """Same world size and thread count: the resumed run's losses and final weights (EMA teacher included)
    equal the uninterrupted run's exactly. The checkpoint at step 3 lies mid-epoch (4 batches per epoch),
    and finetune validates right after it, so neither a loader re-created mid-epoch nor validation may
    shift a random draw. Partial adaptation is on, so its class estimate runs on both ranks, and so are the
    adversarial critic (its weights and Adam state are checkpointed, its gradients averaged over the ranks) and
    masked image consistency (its masks drawn in the step)."""
    sets = [f"deepspeed.zero_stage={zero}", "steps=8", "checkpoint_every=3", "finetune.eval_every=3",
            "finetune.target_class_min_share=0.05", "finetune.adversarial_weight=0.01",
            "finetune.masked_consistency=0.5"]
    straight = tmp_path / "straight"
    run_train(tiny_args(command, tiny_prepared, straight, *sets), nproc=2)
    killed = tmp_path / "killed"
    args = tiny_args(command, tiny_prepared, killed, *sets)
    proc = subprocess.Popen(train_cmd(args, 2), cwd=ROOT, env=train_env(), stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for(killed / "checkpoints" / "LATEST", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "COMPLETED").exists()
    before = losses(killed)
    assert max(before) < 8
    run_train([*args, "--resume", "auto"], nproc=2)
    expected, resumed = losses(straight), losses(killed)
    assert sorted(resumed) == list(range(1, 9))
    assert resumed == expected
    assert_same_weights(straight, killed)
    if command == "finetune":
        last = json.loads((killed / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["loss_adversarial"] > 0 and last["loss_masked"] > 0
        _, tensors = checkpoint_tensors(killed)
        assert {k.split(".")[2] for k in tensors if k.startswith("extra.critic.")} == {"model", "optim"}


def test_sigusr1_checkpoints_at_the_step_boundary_and_exits_75(tiny_prepared, tmp_path):
    out = tmp_path / "run"
    args = tiny_args("pretrain", tiny_prepared, out, "steps=100000", "checkpoint_every=100000")
    proc = subprocess.Popen(train_cmd(args), cwd=ROOT, env=train_env(), stderr=subprocess.PIPE, text=True)
    _wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75
    state = json.loads((out / "checkpoints" / (out / "checkpoints/LATEST").read_text() /
                        "train_state.json").read_text())
    assert state["step"] == max(losses(out)) and state["step"] < 100000


def test_sigusr1_during_startup_is_honoured_at_the_first_step(tiny_prepared, tmp_path):
    """A USR1 that arrives while DeepSpeed is still starting (a preemption right after the job began) does not
    kill the run: it checkpoints after its first step, exits 75, and --resume auto finishes it."""
    out = tmp_path / "run"
    args = [*tiny_args("pretrain", tiny_prepared, out, "steps=4", "checkpoint_every=100"), "--resume", "auto"]
    proc = subprocess.Popen(train_cmd(args), cwd=ROOT, env=train_env(), stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the first log line of run_training: the distributed start has not begun
        seen.append(line)
        if "--resume auto: no checkpoint" in line:
            proc.send_signal(signal.SIGUSR1)
            break
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 75, "".join(seen) + rest[-3000:]
    assert "received SIGUSR1" in rest and sorted(losses(out)) == [1]
    assert (out / "checkpoints" / "LATEST").read_text() == "step_00000001"
    run_train(args)
    assert sorted(losses(out)) == [1, 2, 3, 4] and (out / "COMPLETED").is_file()


def test_compiled_engine_keeps_weight_names_and_eager_logits(tmp_path):
    """``compile: true`` (the GPU throughput setting) compiles the model inside the DeepSpeed engine without
    renaming its weights (checkpoints and exports stay loadable) or changing what it computes."""
    script = (
        "import copy, torch, torch.nn.functional as F\n"
        "from c2seg.spec import load_spec\n"
        "from train.config import DataConfig, TrackingConfig, TrainConfig, load_model_config\n"
        "from train.engine import create_engine, full_state_dict, init_distributed\n"
        "from train.models import FusionSegmenter\n"
        "spec = load_spec('configs/datasets/demo_tiny.yaml')\n"
        "torch.manual_seed(0)\n"
        "model = FusionSegmenter(spec, load_model_config('configs/models/tiny.yaml'))\n"
        "eager = copy.deepcopy(model).eval()\n"
        "init_distributed()\n"
        "cfg = TrainConfig(model='configs/models/tiny.yaml', data=DataConfig(prep_dir='-', batch_size=2),\n"
        "                  output_dir='-', steps=5, compile=True, tracking=TrackingConfig(enabled=False))\n"
        "engine = create_engine(model, cfg, 1)\n"
        "x = {m.name: torch.randn(2, m.bands, 32, 32) for m in spec.modalities}\n"
        "engine.eval()\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(engine(x), eager(x), rtol=1e-4, atol=1e-5)\n"
        "engine.train()\n"
        "loss = F.cross_entropy(engine(x), torch.randint(1, spec.num_logits, (2, 32, 32)), ignore_index=0)\n"
        "engine.backward(loss)\n"
        "engine.step()\n"
        "assert model._compiled_call_impl is not None, 'the model was not compiled'\n"
        "assert list(full_state_dict(engine)) == list(eager.state_dict())\n"
        "print('ok', float(loss))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=train_env(), capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("ok")


def test_bf16_engine_trains_and_keeps_fp32_weights(tiny_prepared, tmp_path):
    """The bf16 engine path on CPU: batches in bf16, finite losses, the consolidated weights saved in fp32 (what
    export and init_from read). fp16 needs a GPU: on CPU it is one line before DeepSpeed starts."""
    from c2seg.train.weights import read_weights

    run = tmp_path / "bf16"
    sets = ["deepspeed.zero_stage=0", "steps=2", "checkpoint_every=2", "finetune.eval_every=2", "finetune.adapt=false"]
    proc = run_train(tiny_args("finetune", tiny_prepared, run, "deepspeed.precision=bf16", *sets))
    assert "ZeRO-0, bf16" in proc.stderr
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    saved = read_weights(run / "checkpoints" / "step_00000002" / "weights.pt")
    assert {t.dtype for t in saved.state_dict.values() if t.is_floating_point()} == {torch.float32}
    fp16 = run_train(tiny_args("finetune", tiny_prepared, tmp_path / "fp16", "deepspeed.precision=fp16", *sets),
                     check=False)
    assert fp16.returncode != 0 and fp16.stderr.strip().splitlines()[-1].endswith(
        "error: deepspeed.precision fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16 kernels); use "
        "bf16 or fp32 on CPU")
