"""Train fixtures: helpers that launch the real ``c2seg train`` CLI (1 process, or 2 under torchrun
with gloo), and session-scoped runs other tests reuse: ``pretrained_tiny`` (2 ranks, ZeRO-2) and
``finetuned_tiny`` (2 ranks, ZeRO-3, initialised from it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN_TINY = ROOT / "configs" / "train" / "pretrain_tiny.yaml"
FINETUNE_TINY = ROOT / "configs" / "train" / "finetune_tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env(**extra: str) -> dict[str, str]:
    """Environment of a training subprocess: one thread per rank, no launcher variables inherited."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def train_cmd(args: list[str], nproc: int = 1) -> list[str]:
    """The command line of ``c2seg <args>``, under torchrun when ``nproc`` > 1."""
    if nproc == 1:
        return [sys.executable, "-m", "c2seg.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", "c2seg.cli", *args]


def run_train(args: list[str], nproc: int = 1, check: bool = True, timeout: int = 300,
              **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(args, nproc), cwd=ROOT, env=train_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"c2seg {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from a run's metrics.jsonl (the last record of a step wins, as after a resume)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def tiny_args(command: str, prep: Path, out: Path, *sets: str) -> list[str]:
    config = PRETRAIN_TINY if command == "pretrain" else FINETUNE_TINY
    return ["train", command, "--config", str(config), "--set", f"data.prep_dir={prep}",
            "--set", f"output_dir={out}", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="session")
def pretrained_tiny(tiny_prepared, tmp_path_factory) -> Path:
    """Run dir of a 2-rank ZeRO-2 masked pretraining of the tiny model (6 steps)."""
    out = tmp_path_factory.mktemp("pretrain_tiny") / "run"
    run_train(tiny_args("pretrain", tiny_prepared, out, "deepspeed.zero_stage=2"), nproc=2)
    return out


@pytest.fixture(scope="session")
def finetuned_tiny(tiny_prepared, pretrained_tiny, tmp_path_factory) -> Path:
    """Run dir of a 2-rank ZeRO-3 fine-tuning with adaptation, initialised from ``pretrained_tiny``."""
    out = tmp_path_factory.mktemp("finetune_tiny") / "run"
    run_train(tiny_args("finetune", tiny_prepared, out, "deepspeed.zero_stage=3", f"init_from={pretrained_tiny}"),
              nproc=2)
    return out


def checkpoint_tensors(run_dir: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The newest checkpoint's tag and every tensor of its weights.pt (model, EMA teacher, ...), by key."""
    import torch

    tag = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    state = torch.load(run_dir / "checkpoints" / tag / "weights.pt", map_location="cpu", weights_only=True)

    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from flat(v, f"{prefix}{k}.")
        elif isinstance(obj, torch.Tensor):
            yield prefix.rstrip("."), obj

    return tag, dict(flat(state))


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """Both runs' newest checkpoints are at the same step and hold bit-identical tensors."""
    import torch

    tag_a, a = checkpoint_tensors(run_a)
    tag_b, b = checkpoint_tensors(run_b)
    assert tag_a == tag_b and a and a.keys() == b.keys(), (tag_a, tag_b, sorted(a.keys() ^ b.keys())[:5])
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, first {differ[0]}: max abs diff " \
                       f"{float((a[differ[0]].float() - b[differ[0]].float()).abs().max()):.3g}"


# Every rank script ends as a multi-rank `c2seg train` ends: the group left, then no interpreter teardown. Left
# to the teardown, a finished rank sometimes aborted ('terminate called without an active exception'), in three
# scripts over three fresh-clone test runs (see c2seg.distributed.exit_without_teardown).
RANK_SCRIPT_END = """
from c2seg.distributed import exit_without_teardown, leave_process_group
leave_process_group()
exit_without_teardown(0)
"""


def run_script_ranks(script: str, world: int, *args: str, timeout: int = 300) -> list[dict]:
    """Run the Python ``script`` as ranks 0..world-1 (RANK / WORLD_SIZE / MASTER_* set, one thread each), each
    ended by ``RANK_SCRIPT_END``; each prints one line ``RESULT <json>``: those, in rank order."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script + RANK_SCRIPT_END, *args], cwd=ROOT,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=train_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(ROOT)))
             for rank in range(world)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT "))))
    return results


def refresh_saved_hash(ckpt: Path, name: str) -> None:
    """Record ``name``'s current size and sha256 in the checkpoint's train state, as whoever replaced the file
    could (a test that edits a checkpoint on purpose, or one whose weights-only check, not the hash, must
    stop the file)."""
    from c2seg.io import file_sha256

    state_file = ckpt / "train_state.json"
    state = json.loads(state_file.read_text())
    state["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": file_sha256(ckpt / name)}
    state_file.write_text(json.dumps(state))


def tile_city_spec(tiny_spec, folder: Path) -> tuple[Path, Path]:
    """The tiny cities generated again as tile folders under ``folder`` (the target city: 3 tiles of 32 x 96 px)
    and a spec file naming them: (spec file, data root)."""
    import yaml

    from c2seg.data_prep.synth import generate_dataset

    data = folder / "tiles"
    spec = generate_dataset(tiny_spec.with_data_root(data), 32, 96, seed=1, fmt="tiles")
    spec_file = folder / "tiles_spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.to_dict()))
    return spec_file, data


def infer_locally(model: Path, spec_file: Path, data: Path, out: Path, args: list[str]) -> list[Path]:
    """``c2seg infer run`` of the target city outside SLURM (no SLURM_* variable); the GeoTIFFs written, relative
    to ``out``, sorted."""
    subprocess.run([sys.executable, "-m", "c2seg.cli", "infer", "run", "--model", str(model), "--spec",
                    str(spec_file), "--data-root", str(data), "--city", "synth_target", "--out", str(out), *args],
                   check=True, cwd=ROOT, capture_output=True,
                   env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    return sorted(p.relative_to(out) for p in out.rglob("*.tif"))
