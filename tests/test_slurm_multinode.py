"""The pipeline across nodes, on a real multi-node SLURM cluster (slurm/multinode_cluster.sh: 3 compute nodes,
each in a network namespace of its own; needs root). The module starts the cluster and stops it after.

One chain (configs/slurm/multinode.yaml: prep and infer arrays, every training stage on 2 nodes x 1 task) is
submitted with one command and reused: its prep is compared with a one-task prep, its source-only fine-tune
with the same fine-tune on 1 node x 2 tasks and with a 2-node run that loses a node midway, its model's
inference over 2 nodes with a local run.
"""

from __future__ import annotations

import hashlib
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
from c2seg.slurm.cluster import MULTINODE_CLUSTER_SCRIPT, run_slurm
from c2seg.slurm.config import load_submit_config
from tests.fixtures_train import assert_same_weights, infer_locally, tile_city_spec

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "slurm" / "multinode.yaml"
# the source-only fine-tune every comparison uses: long enough to lose a node after its first checkpoint
SOURCE_ONLY = "[finetune.adapt=false, steps=60, checkpoint_every=20, finetune.eval_every=60]"


def _cluster_script(*args: str, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(["bash", str(MULTINODE_CLUSTER_SCRIPT), *args], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def nodes():
    """A 3-node cluster (started here, stopped after; SLURM_CONF points at it meanwhile)."""
    if os.environ.get("C2SEG_NO_SLURM") == "1":
        pytest.skip("C2SEG_NO_SLURM=1: no SLURM cluster is started")
    if os.geteuid() != 0:
        pytest.skip("the multi-node cluster needs root (network namespaces)")
    conf = Path(os.environ.get("C2SEG_SLURM_NODES_DIR", "/tmp/c2seg-slurm-nodes")) / "etc" / "slurm.conf"
    before = os.environ.get("SLURM_CONF")
    t0 = time.monotonic()
    _cluster_script("up", "--nodes", "3")
    print(f"multi-node cluster (3 nodes) up in {time.monotonic() - t0:.1f} s")
    os.environ["SLURM_CONF"] = str(conf)
    os.environ.setdefault("TQDM_DISABLE", "1")
    yield ["node1", "node2", "node3"]
    _cluster_script("down")
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before


def submit(run_dir: Path, *sets: str, wait: bool = True) -> int:
    args = ["slurm", "submit", "--config", str(CONFIG), "--set", f"run_dir={run_dir}", "--timeout", "600"]
    for s in sets:
        args += ["--set", s]
    return main(args + (["--wait"] if wait else []))


def hostnames(nodelist: str) -> list[str]:
    return run_slurm(["scontrol", "show", "hostnames", nodelist]).split()


def test_each_node_has_its_own_address_and_the_first_host_is_the_master(nodes, tmp_path):
    task = tmp_path / "where.sh"  # each task: rank, node, the address its host name resolves to, MASTER_ADDR
    task.write_text(f"""#!/bin/bash
addr=$(getent hosts "$(hostname)" | cut -d' ' -f1)
master=$({sys.executable} -c 'import os; from c2seg.distributed import slurm_master; print(slurm_master(os.environ)[0])')
echo "$SLURM_PROCID $SLURMD_NODENAME $addr $master"
""")
    task.chmod(0o755)
    job = tmp_path / "job.sh"
    job.write_text(f"#!/bin/bash\nsrun {task}\n")
    out = tmp_path / "where.out"
    run_slurm(["sbatch", "--wait", "-N", "3", "--ntasks-per-node=1", "-o", str(out), f"--chdir={ROOT}", str(job)],
              timeout=120)
    rows = sorted(line.split() for line in out.read_text().splitlines() if line[:1].isdigit())
    assert rows == [["0", "node1", "10.203.0.11", "node1"], ["1", "node2", "10.203.0.12", "node1"],
                    ["2", "node3", "10.203.0.13", "node1"]]


def test_up_is_idempotent_and_recovers_from_a_crashed_cluster(nodes):
    """`up` on a running cluster changes nothing; after every daemon of the cluster died (kill -9), `up` removes
    what the dead one left (by the names it recorded) and starts a working cluster with the same names."""
    assert "already up" in _cluster_script("up", "--nodes", "3")
    state = Path(os.environ["SLURM_CONF"]).parent.parent
    pids = [int(f.read_text()) for f in (state / "run").glob("*.pid")] + [int((state / "munge/munged.pid").read_text())]
    assert len(pids) == 5  # slurmctld, 3 slurmd, munged
    for pid in pids:
        os.kill(pid, 9)
    out = _cluster_script("up", "--nodes", "3")
    assert "up: node1 node2 node3" in out, out
    created = (state / "run" / "created").read_text().split("\n")
    assert sorted(line for line in created if line.startswith("netns")) == [
        "netns c2s-ctl", "netns c2s-node1", "netns c2s-node2", "netns c2s-node3"]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert sorted(n.split()[0] for n in listed.splitlines() if n.startswith("c2s-")) == [
        "c2s-ctl", "c2s-node1", "c2s-node2", "c2s-node3"]
    assert run_slurm(["sinfo", "-h", "-N", "-o", "%N %T"]).split() == [
        "node1", "idle", "node2", "idle", "node3", "idle"]


@pytest.fixture(scope="module")
def chain(nodes, tiny_spec, tmp_path_factory) -> Path:
    """The README's chain, submitted with one command, across the nodes, with its own MLflow store."""
    run = tmp_path_factory.mktemp("multinode_chain")
    t0 = time.monotonic()
    rc = submit(run, f"data_root={tiny_spec.data_root}", f"mlflow.tracking_uri=sqlite:///{run}/mlflow.db",
                f"source_only.set={SOURCE_ONLY}")
    print(f"multi-node chain in {time.monotonic() - t0:.1f} s")
    assert rc == 0, f"chain failed, logs in {run / 'logs'}"
    return run


def _ran_on(log: Path) -> tuple[str, list[str]]:
    """The node a job's batch shell ran on, and the job's nodes (the preamble's first line)."""
    m = re.search(r"on (\S+) \(nodes (\S+)\), requeue count", log.read_text())
    assert m, log.read_text()[-2000:]
    return m.group(1), hostnames(m.group(2))


def test_headline_chain_runs_across_nodes_to_its_metrics(chain):
    metrics = json.loads((chain / "predictions" / "adapted" / "synth_target" / "metrics.json").read_text())
    assert set(metrics) >= {"miou", "oa", "macro_f1", "kappa"}
    logs = chain / "logs"
    for stage in ("pretrain", "source_only", "adapted"):
        log = next(logs.glob(f"{stage}-*.log"))
        assert "2 tasks (1 per node on 2 nodes)" in log.read_text()
        _, job_nodes = _ran_on(log)
        assert len(job_nodes) == 2
        assert f"rendezvous on {job_nodes[0]}:" in log.read_text()  # the first host of the job serves the store
    for stage in ("prep", "infer"):  # array tasks on different nodes (least-loaded scheduling)
        assert len({_ran_on(log)[0] for log in logs.glob(f"{stage}-*_*.log")}) == 2, stage

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{chain}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("c2seg-slurm-multinode").experiment_id])
    parent = [r for r in runs if r.data.tags.get("c2seg.kind") == "slurm-chain"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {r.data.tags["c2seg.stage"]: r.data.tags for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id and "c2seg.stage" in r.data.tags}
    assert set(children) == {"prep", "pretrain", "source_only", "adapted", "export", "infer", "evaluate"}
    for stage in ("pretrain", "source_only", "adapted"):  # the node list of each job, logged
        assert len(hostnames(children[stage][f"slurm.{stage}.nodes"])) == 2, children[stage]
    for stage in ("prep", "infer"):  # one node per array task, two different ones
        assert len(set(children[stage][f"slurm.{stage}.nodes"].split())) == 2, children[stage]


def _digest(prep: Path) -> dict[str, str]:
    """sha256 of the manifest (but its creation time), every shard and every file of the Zarr store."""
    manifest = {k: v for k, v in json.loads((prep / "manifest.json").read_text()).items() if k != "created"}
    files = [*(prep / "shards").rglob("*.tar"), *(prep / "dataset.zarr").rglob("*")]
    return {"manifest": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
            **{str(p.relative_to(prep)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}}


def test_prep_array_over_two_nodes_equals_one_task(chain, tiny_spec, tmp_path):
    cfg = load_submit_config(CONFIG)
    local = tmp_path / "prep"
    sets = [a for s in cfg.prep.set for a in ("--set", s)]
    subprocess.run([sys.executable, "-m", "c2seg.cli", "data", "prep", "--spec", str(ROOT / cfg.spec),
                    "--data-root", str(tiny_spec.data_root), "--config", str(ROOT / cfg.prep.config),
                    "--out", str(local), *sets], check=True, cwd=ROOT, capture_output=True,
                   env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    got, want = _digest(chain / "prep"), _digest(local)
    assert sum(k.endswith(".tar") for k in want) == 13 and "manifest" in want  # train and val of both cities
    assert got == want


def _source_only(run: Path, chain: Path, *sets: str, wait: bool = True) -> int:
    stage_sets = SOURCE_ONLY[:-1] + f", data.prep_dir={chain / 'prep'}, init_from={chain / 'train' / 'pretrain'}]"
    return submit(run, "stages=[source_only]", "mlflow.enabled=false", f"source_only.set={stage_sets}", *sets,
                  wait=wait)


def test_two_node_finetune_equals_one_node_with_two_tasks(chain, tmp_path):
    """Same ranks, same gloo reductions: bit for bit the same weights whether the 2 ranks share a node."""
    assert _source_only(tmp_path / "one_node", chain, "resources.nodes=1", "resources.tasks_per_node=2") == 0
    log = next((tmp_path / "one_node" / "logs").glob("source_only-*.log")).read_text()
    assert "2 tasks (2 per node on 1 nodes)" in log
    assert_same_weights(chain / "train" / "source_only", tmp_path / "one_node" / "train" / "source_only")


def test_node_lost_midway_requeues_resumes_and_matches_the_uninterrupted_run(chain, tmp_path):
    """SIGKILL of every process of one of the job's nodes (its slurmd and its rank) after the first checkpoint:
    the other rank fails at once, SLURM marks the node down and requeues the job, which resumes from the
    checkpoint on two live nodes; the final weights equal the uninterrupted 2-node run's."""
    run = tmp_path / "lost"
    assert _source_only(run, chain, wait=False) == 0
    job = json.loads((run / "chain.json").read_text())["jobs"][0]["job_id"]
    log = run / "logs" / f"source_only-{job}.log"
    metrics = run / "train" / "source_only" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while len(metrics.read_text().splitlines() if metrics.is_file() else []) < 25:  # past the step-20 checkpoint
        assert time.monotonic() < deadline, f"training never got past its first checkpoint, log {log}"
        time.sleep(0.05)
    _, job_nodes = _ran_on(log)
    lost = job_nodes[1]
    t0 = time.monotonic()
    _cluster_script("kill-node", lost)
    try:
        assert main(["slurm", "status", str(run), "--wait", "--timeout", "400"]) == 0
        print(f"node {lost} lost: the job requeued and finished {time.monotonic() - t0:.1f} s later")
        text = log.read_text()
        assert "NODE FAILURE" in text and "requeue count 1" in text
        after = text.split("requeue count 1")[1]
        assert "resumed from" in after and "step_00000020" in after and "starting from step 0" not in after
        assert lost not in _ran_on_last(log)
        assert_same_weights(chain / "train" / "source_only", run / "train" / "source_only")
    finally:
        _cluster_script("start-node", lost)


def _ran_on_last(log: Path) -> list[str]:
    """The nodes of the job's last start (after a requeue)."""
    starts = re.findall(r"\(nodes (\S+)\), requeue count", log.read_text())
    return hostnames(starts[-1])


def test_inference_over_two_nodes_equals_a_local_run(chain, tiny_spec, tmp_path):
    spec_file, data = tile_city_spec(tiny_spec, tmp_path)
    model = chain / "models" / "adapted.pt"
    cfg = load_submit_config(CONFIG)
    rc = submit(tmp_path / "array", "stages=[infer]", f"spec={spec_file}", f"data_root={data}", f"model={model}",
                "city=synth_target", "mlflow.enabled=false")
    assert rc == 0
    logs = sorted((tmp_path / "array" / "logs").glob("infer-*_*.log"))
    assert len(logs) == 2 and len({_ran_on(log)[0] for log in logs}) == 2
    local = tmp_path / "local"
    want = infer_locally(model, spec_file, data, local, list(cfg.infer.args))
    predictions = tmp_path / "array" / "predictions" / model.stem
    assert sorted(p.relative_to(predictions) for p in predictions.rglob("*.tif")) == want and len(want) >= 4
    for rel in want:
        assert (local / rel).read_bytes() == (predictions / rel).read_bytes(), rel
        with rasterio.open(local / rel) as a:
            assert np.unique(a.read()).size > 1, rel
