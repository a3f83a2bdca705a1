"""MLflow tracking against a real ``mlflow server`` the test starts, and a server that is down."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures_train import free_port, run_train, tiny_args, train_env

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                            env=train_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    end = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.time() < end, "mlflow server did not start"
            time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_finetune_logs_params_metrics_artifacts_and_tags(mlflow_server, tiny_prepared, tmp_path):
    out = tmp_path / "run"
    run_train(tiny_args("finetune", tiny_prepared, out, "tracking.enabled=true", "tracking.experiment=t",
                        "steps=3", "finetune.eval_every=3", "tracking.previews=1"),
              MLFLOW_TRACKING_URI=mlflow_server)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.get_run((out / "mlflow_run_id").read_text())
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model_config.name"] == "tiny"
    assert run.data.tags["world_size"] == "1" and len(run.data.tags["manifest_hash"]) == 64
    assert run.data.tags["git_commit"] and run.data.tags["slurm_job_id"] == "none"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    for key in ("lr", "grad_norm", "samples_per_s", "step_time_s", "memory_mb", "val_miou", "val_kappa",
                "val_iou_01"):
        assert key in run.data.metrics, key
    names = {a.path for folder in ("config", "figures") for a in client.list_artifacts(run.info.run_id, folder)}
    assert "config/config.yaml" in names and "figures/confusion_step000003.png" in names
    assert "figures/preview_step000003_0.png" in names


def test_a_tracking_server_that_is_down_never_stops_training(tiny_prepared, tmp_path):
    out = tmp_path / "run"
    proc = run_train(tiny_args("pretrain", tiny_prepared, out, "tracking.enabled=true", "steps=2"),
                     MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    assert (out / "COMPLETED").is_file()
    assert "MLflow tracking disabled" in proc.stderr
