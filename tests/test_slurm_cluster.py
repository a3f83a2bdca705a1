"""The pipeline on a real SLURM cluster (slurm/local_cluster.sh up; scripts/run_tests.sh starts it).

One chain prep -> pretrain -> source_only -> adapted -> export -> infer -> evaluate is submitted through the
tool (2 tasks in the training stages) and reused: its prepared data feed the requeue test, its model the
inference-array test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from c2seg.cli import main
from c2seg.slurm.cluster import SlurmError, run_slurm, slurm_env
from c2seg.slurm.config import load_submit_config
from tests.fixtures_train import assert_same_weights, infer_locally, tile_city_spec

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "configs" / "slurm" / "local.yaml"


@pytest.fixture(scope="module")
def cluster():
    """Skip unless a SLURM controller answers (start one with slurm/local_cluster.sh up)."""
    try:
        run_slurm(["sinfo", "-h", "-o", "%P"], timeout=15)
    except SlurmError as exc:
        pytest.skip(f"no SLURM cluster reachable ({str(exc).splitlines()[0]}); start one with "
                    "`slurm/local_cluster.sh up`")
    os.environ.update({k: v for k, v in slurm_env().items() if k == "SLURM_CONF"})
    os.environ.setdefault("TQDM_DISABLE", "1")


def submit(run_dir: Path, *sets: str, wait: bool = True) -> int:
    args = ["slurm", "submit", "--config", str(LOCAL), "--set", f"run_dir={run_dir}", "--timeout", "400"]
    for s in sets:
        args += ["--set", s]
    return main(args + (["--wait"] if wait else []))


@pytest.fixture(scope="module")
def chain(cluster, tiny_spec, tmp_path_factory) -> Path:
    """The whole chain on the tiny generated cities, with its own MLflow store."""
    run = tmp_path_factory.mktemp("slurm_chain")
    rc = submit(run, f"data_root={tiny_spec.data_root}", f"mlflow.tracking_uri=sqlite:///{run}/mlflow.db")
    assert rc == 0, f"chain failed, logs in {run / 'logs'}"
    return run


def test_whole_chain_completes_with_two_training_tasks(chain, tiny_spec):
    predictions = chain / "predictions" / "adapted" / "synth_target"
    metrics = json.loads((predictions / "metrics.json").read_text())
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["oa"] > 0
    assert (predictions / "synth_target.tif").is_file()
    assert (chain / "models" / "adapted.pt").is_file()
    for stage in ("pretrain", "source_only", "adapted"):
        log = next((chain / "logs").glob(f"{stage}-*.log")).read_text()
        assert "2 tasks" in log and "x 2 ranks" in log, log[-2000:]
        assert re.search(r"rendezvous on \S+:\d+ for 2 ranks", log), log[-2000:]  # slurm_master's port
    for stage, init_from in (("source_only", "pretrain"), ("adapted", "source_only")):
        log = next((chain / "logs").glob(f"{stage}-*.log")).read_text()
        assert f"initialised from {chain / 'train' / init_from}" in log, log[-2000:]
    status = subprocess.run([sys.executable, "-m", "c2seg.cli", "slurm", "status", str(chain)],
                            capture_output=True, text=True, env=slurm_env())
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 8, status.stdout + status.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{chain}/mlflow.db")
    exp = client.get_experiment_by_name("c2seg-slurm-local")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("c2seg.kind") == "slurm-chain"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {r.data.tags["c2seg.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id and "c2seg.stage" in r.data.tags}
    assert set(children) == {"prep", "pretrain", "source_only", "adapted", "export", "infer", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert any(k.endswith("miou") for k in children["evaluate"].data.metrics), children["evaluate"].data.metrics


def test_unknown_partition_is_refused(cluster, tmp_path, capsys):
    assert submit(tmp_path / "run", "resources.partition=nosuchpart", wait=False) == 1
    err = capsys.readouterr().err
    assert "partition 'nosuchpart' does not exist" in err and "debug" in err


def test_failed_job_names_stage_and_log(cluster, tmp_path, capsys):
    rc = submit(tmp_path / "run", f"data_root={tmp_path / 'missing'}", "stages=[prep, pretrain]",
                "mlflow.enabled=false")
    assert rc == 1
    err = capsys.readouterr().err
    m = re.search(r"stage (\w+) \(job \d+\) failed: exit \d+.*; log: (\S+)", err)
    assert m, err
    assert m.group(1) == "prep" and Path(m.group(2)).is_file()
    assert "missing" in Path(m.group(2)).read_text()


def test_usr1_checkpoints_requeues_and_matches_uninterrupted(chain, tmp_path):
    """USR1 midway -> checkpoint, exit 75, scontrol requeue, --resume auto: the final weights equal the
    uninterrupted job's bit for bit (2 ranks, gloo, 1 thread each)."""
    steps = 120
    sets = ["stages=[pretrain]", "mlflow.enabled=false", f"pretrain.set=[data.prep_dir={chain / 'prep'}, "
            f"steps={steps}, checkpoint_every=50]"]
    assert submit(tmp_path / "plain", *sets) == 0
    assert submit(tmp_path / "requeued", *sets, wait=False) == 0
    run = tmp_path / "requeued"
    job = json.loads((run / "chain.json").read_text())["jobs"][0]["job_id"]
    log = run / "logs" / f"pretrain-{job}.log"
    metrics = run / "train" / "pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while len(metrics.read_text().splitlines() if metrics.is_file() else []) < 5:  # training is under way
        assert time.monotonic() < deadline, f"training never started, log {log}"
        time.sleep(0.05)
    run_slurm(["scancel", "--signal=USR1", "--batch", job])
    assert main(["slurm", "status", str(run), "--wait", "--timeout", "400"]) == 0
    text = log.read_text()
    assert "USR1: asking the training tasks to checkpoint" in text
    stopped = re.search(r"stopped at step (\d+) after a signal", text)
    assert stopped and 0 < int(stopped.group(1)) < steps, "the signal did not arrive mid-training"
    assert "requeue count 1" in text  # the requeued run logs its requeue count ...
    assert "starting from step 0" not in text.split("requeue count 1")[1]  # ... and resumed, not restarted
    assert (run / "train" / "pretrain" / "checkpoints" / "LATEST").read_text() == f"step_{steps:08d}"
    assert_same_weights(tmp_path / "plain" / "train" / "pretrain", run / "train" / "pretrain")


def test_inference_array_over_three_scenes_equals_local_run(chain, tiny_spec, tmp_path):
    from c2seg.spec import load_spec
    from c2seg.data_prep.readers import open_city

    spec_file, data = tile_city_spec(tiny_spec, tmp_path)
    assert len(open_city(load_spec(spec_file, data_root=data), "synth_target")) == 3
    model = chain / "models" / "adapted.pt"
    infer_args = list(load_submit_config(LOCAL).infer.args)  # what the chain's infer job passes
    rc = main(["slurm", "submit", "--config", str(LOCAL), "--set", f"run_dir={tmp_path / 'array'}",
               "--set", "stages=[infer]", "--set", f"spec={spec_file}", "--set", f"data_root={data}",
               "--set", f"model={model}", "--set", "city=synth_target", "--set", "infer.array_tasks=3",
               "--set", "mlflow.enabled=false", "--timeout", "300", "--wait"])
    assert rc == 0
    job = json.loads((tmp_path / "array" / "chain.json").read_text())["jobs"][0]["job_id"]
    for task in range(3):  # the scenes were split: one per array task
        log_text = (tmp_path / "array" / "logs" / f"infer-{job}_{task}.log").read_text()
        assert f"3 scenes, 1 for task {task}/3" in log_text, log_text[-2000:]
    local = tmp_path / "local"
    want = infer_locally(model, spec_file, data, local, infer_args)
    predictions = tmp_path / "array" / "predictions" / model.stem
    got = sorted(p.relative_to(predictions) for p in predictions.rglob("*.tif"))
    assert got == want and len([p for p in got if "submission" in str(p)]) == 3
    for rel in want:
        with rasterio.open(local / rel) as a, rasterio.open(predictions / rel) as b:
            assert np.array_equal(a.read(), b.read()), rel
            assert a.transform == b.transform


def test_chain_refused_midway_is_withdrawn(cluster, tmp_path, capsys):
    """A stage that sbatch refuses (more memory than the node has) after earlier stages were queued: those jobs
    are cancelled and the chain's MLflow runs end as KILLED, so nothing is left behind."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = submit(tmp_path / "run", "stages=[prep, pretrain]", "pretrain.resources.mem=100000G",
                f"mlflow.tracking_uri={uri}", wait=False)
    assert rc == 1
    err = capsys.readouterr().err
    assert "stage pretrain was not submitted" in err and "the chain was withdrawn" in err, err
    cancelled = re.search(r"cancelled the jobs already submitted: ([\d, ]+)\)", err)
    assert cancelled, err
    job_ids = cancelled.group(1).split(", ")
    assert len(job_ids) == 2, job_ids  # the prep array and its finalize job
    for job in job_ids:
        state = run_slurm(["scontrol", "show", "job", job])
        assert "JobState=CANCELLED" in state, state

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("c2seg-slurm-local").experiment_id])
    assert len(runs) == 3 and all(r.info.status == "KILLED" for r in runs), [r.info.status for r in runs]
