"""The project's collectives (c2seg/distributed.py) under real process groups: 2 gloo ranks, a mixed
'cpu:gloo,cuda:gloo' group, and a group that declares no CPU backend (as NCCL does), plus the rule that
no other module calls torch.distributed's collectives itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from c2seg.distributed import backend_devices
from tests.fixtures_train import ROOT, free_port, run_script_ranks

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from c2seg.distributed import (DistEnv, any_rank, barrier, collective_device, gather_objects,
                                   init_process_group, mean_over_ranks, reduce_tensor)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_process_group(DistEnv(rank, world, rank, "torchrun"), sys.argv[1], timeout_s=60)
    out = {"config": dist.get_backend_config(), "device": str(collective_device())}
    if out["device"] == "cpu":
        counts = torch.tensor([rank + 1, 10 * rank], dtype=torch.int64)
        out["sum"] = reduce_tensor(counts).tolist()
        out["input_kept"] = counts.tolist()
        out["max"] = reduce_tensor(torch.tensor([float(rank)]), "max").tolist()
        out["mean"] = mean_over_ranks({"loss": 1.0 + rank, "acc": 0.5 * rank})
        out["any_false"], out["any_one"] = any_rank(False), any_rank(rank == world - 1)
        out["gathered"] = gather_objects({"rank": rank})
        barrier()
    else:  # a group with no CPU backend: a raw CPU reduction is refused, as NCCL refuses it
        try:
            dist.all_reduce(torch.ones(1))
            out["raw_cpu"] = "accepted"
        except RuntimeError as exc:
            out["raw_cpu"] = str(exc).splitlines()[0]
        dist.destroy_process_group()  # no barrier first: it would need CUDA
    print("RESULT " + json.dumps(out), flush=True)
""")


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:gloo"])
def test_reductions_at_two_ranks(backend):
    for rank, r in enumerate(run_script_ranks(WORKER, 2, backend)):
        assert r["config"] == "cpu:gloo,cuda:gloo"
        assert r["device"] == "cpu"
        assert r["sum"] == [3, 10]
        assert r["input_kept"] == [rank + 1, 10 * rank]  # the caller's tensor is not reduced in place
        assert r["max"] == [1.0]
        assert r["mean"] == {"loss": 1.5, "acc": 0.25}
        assert (r["any_false"], r["any_one"]) == (False, True)
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}]


def test_a_group_without_cpu_backend_reduces_on_cuda():
    """'cuda:gloo' declares CUDA only, like NCCL: torch refuses CPU tensors there, and the helper picks the
    CUDA device (this CPU machine cannot run a CUDA reduction, so the choice is what is checked)."""
    (r,) = run_script_ranks(WORKER, 1, "cuda:gloo")
    assert r["config"] == "cuda:gloo"
    assert r["raw_cpu"] == "No backend type associated with device type cpu"
    assert r["device"] == "cuda"


@pytest.mark.parametrize("config, devices", [
    ("nccl", {"cuda"}), ("gloo", {"cpu", "cuda"}), ("cuda:nccl", {"cuda"}),
    ("cpu:gloo,cuda:nccl", {"cpu", "cuda"}), ("cpu:gloo", {"cpu"}),
])
def test_backend_devices(config, devices):
    assert backend_devices(config) == devices


def test_no_collective_outside_the_helper():
    pattern = re.compile(r"\bdist\.(all_reduce|barrier|all_gather\w*|broadcast\w*|reduce_scatter\w*|reduce)\(")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for pkg in ("c2seg", "train", "inference", "data_prep", "slurm",
                                                         "benchmarks")
                 for p in sorted((ROOT / pkg).rglob("*.py")) if p.name != "distributed.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_rendezvous_store_listens_on_master_addr_only():
    """The rank-0 store of a single-node job binds 127.0.0.1, not every interface."""
    port = free_port()
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rank0 = subprocess.Popen([sys.executable, "-c", WORKER, "gloo"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        addrs = set()
        for _ in range(300):  # until rank 0 listens (it then waits for rank 1)
            addrs = {c.laddr.ip for c in psutil.Process(rank0.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
            if addrs:
                break
            assert rank0.poll() is None, rank0.communicate()[1][-2000:]
            time.sleep(0.1)
        assert addrs == {"127.0.0.1"}
    finally:
        rank0.kill()
        rank0.communicate()


SILENT_PEER = textwrap.dedent("""
    import os, sys, time
    import torch
    from c2seg.distributed import DistEnv, init_process_group, reduce_tensor
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_process_group(DistEnv(rank, world, rank, "torchrun"), "gloo", timeout_s=float(sys.argv[1]))
    if rank == 1:  # alive, connected, and silent: a frozen node
        time.sleep(120)
    t0 = time.monotonic()
    try:
        reduce_tensor(torch.ones(1))
        print("RESULT reduced")
    except RuntimeError as exc:
        print(f"RESULT failed after {time.monotonic() - t0:.1f} s: {str(exc).splitlines()[0]}")
    sys.stdout.flush()
    os._exit(0)
""")


def test_a_silent_peer_fails_the_collective_after_the_timeout_instead_of_hanging():
    """collective_timeout_s (train config) reaches every collective: a rank whose peer stops answering gets an
    error after the timeout (3 s here), not a hang until the job's time limit."""
    port = free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", SILENT_PEER, "3"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        out, err = procs[0].communicate(timeout=60)
    finally:
        procs[1].kill()
        procs[1].wait()
    result = next(line[7:] for line in out.splitlines() if line.startswith("RESULT "))
    match = re.fullmatch(r"failed after ([\d.]+) s: (.*)", result)
    assert match, result + err[-2000:]
    assert 3.0 <= float(match.group(1)) < 15.0, result
    assert "timed out" in match.group(2).lower() or "timeout" in match.group(2).lower(), result
