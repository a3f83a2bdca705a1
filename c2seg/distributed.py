"""Small distributed helper: map torchrun / deepspeed / SLURM variables onto one view of the job.

Mirrors what open_clip does: under ``srun`` each task sees SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID, which are exported as RANK / WORLD_SIZE / LOCAL_RANK so that torch.distributed and
DeepSpeed initialise the same way whatever launched the job. Also the project's only collectives
(reductions, barrier, object gather), correct under gloo, NCCL and mixed groups.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from c2seg.errors import C2SegError

log = logging.getLogger("c2seg.distributed")


@dataclass(frozen=True)
class DistEnv:
    """Rank layout of the current process."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        return out[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0] or "127.0.0.1"


def slurm_master(env: Mapping[str, str]) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT of the SLURM job described by ``env``; the one place they are derived.

    The address is the first host of SLURM_JOB_NODELIST. The port, in 20000..59999, comes from SLURM_JOB_ID and
    SLURM_RESTART_COUNT: two jobs sharing a node get different ports, and a requeued job a fresh one (its
    previous store's port may still be held in TIME_WAIT)."""
    job_id, restarts = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_RESTART_COUNT", "0"))
    port = 20000 + (job_id * 7 + restarts) % 40000
    return _first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))), port


def detect_env(default_port: int = 29500) -> DistEnv:
    """Work out the rank layout and export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (under srun
    from :func:`slurm_master`, unless already set; else ``default_port`` on 127.0.0.1 where unset)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun"
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        launcher = "slurm"
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            addr, port = slurm_master(env)
            env.setdefault("MASTER_ADDR", addr)
            env.setdefault("MASTER_PORT", str(port))
    else:
        return DistEnv(0, 1, 0, "single")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(default_port))
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    return DistEnv(rank, world, local, launcher)


def array_task(task_index: int | None = None, num_tasks: int | None = None) -> tuple[int, int]:
    """(task index, task count) of this SLURM array task: given values win, else SLURM_ARRAY_TASK_ID
    (relative to SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_COUNT, else (0, 1)."""
    env = os.environ
    if num_tasks is None:
        num_tasks = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if task_index is None:
        task_index = int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if not 0 <= task_index < num_tasks:
        raise C2SegError(f"task index {task_index} is outside 0..{num_tasks - 1}")
    return task_index, num_tasks


# --- collectives -------------------------------------------------------------------------------------
# Every reduction of the project goes through these functions; nothing else calls torch.distributed's
# collectives. The mechanism: a value is copied to the device the default process group can reduce on
# (CPU when the group declares a CPU backend: plain gloo or a mixed "cpu:gloo,cuda:nccl"; else the
# current CUDA device, for plain NCCL, which refuses CPU tensors), reduced there and copied back.
# The values are small (a few metrics, flags, class counts, a 13 x 14 confusion matrix), so the copy
# costs nothing next to a step, and an NCCL job needs no second (gloo) group with its own sockets.


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def backend_devices(config: str) -> set[str]:
    """The device types a backend config string declares: 'cpu:gloo,cuda:nccl' -> {'cpu', 'cuda'};
    a bare backend name ('nccl', 'gloo') names the devices torch gives it."""
    bare = {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}, "mpi": {"cpu", "cuda"}}
    if ":" not in config:
        return bare.get(config, {"cpu"})
    return {part.split(":", 1)[0].strip() for part in config.split(",") if part.strip()}


def collective_device() -> torch.device:
    """Where the default group reduces: CPU if it declares a CPU backend, else the current CUDA device."""
    if not distributed() or "cpu" in backend_devices(dist.get_backend_config()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        return torch.device("cuda")  # a CUDA-only group without CUDA: torch's own error comes at the copy
    return torch.device("cuda", torch.cuda.current_device())


def reduce_tensor(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced over all ranks (``op``: sum, max or min), on ``tensor``'s own device; the input is
    left as it was. Collective: every rank calls it with a tensor of the same shape and dtype."""
    if not distributed():
        return tensor.clone()
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    work = tensor.detach().to(collective_device(), copy=True)
    dist.all_reduce(work, op=ops[op])
    return work.to(tensor.device)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (float64). Collective: every rank passes the same keys."""
    if not distributed() or not values:
        return dict(values)
    total = reduce_tensor(torch.tensor(list(values.values()), dtype=torch.float64))
    return dict(zip(values, (total / world_size()).tolist()))


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank passes True (e.g. a stop signal seen by one rank)."""
    return bool(reduce_tensor(torch.tensor([int(flag)], dtype=torch.int64), "max").item())


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if distributed():
        if dist.get_backend() == "nccl" and torch.cuda.is_available():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def leave_process_group() -> None:
    """End a finished run's process group on every rank, after a barrier (no-op without one), as torch's docs ask
    rather than leaving it to the interpreter's exit. Only on normal exits: destroying it while another rank
    fails can deadlock."""
    if distributed():
        barrier()
        dist.destroy_process_group()


def exit_without_teardown(code: int) -> NoReturn:
    """End a multi-rank process whose work is all written, skipping the interpreter's teardown.

    Finished 2-rank runs sometimes aborted there, after their last file was written ('terminate called without
    an active exception', SIGABRT on one rank, exit 1; in 2 of 4 full test runs), even after
    :func:`leave_process_group`. A C++ thread of the distributed stack still held when the interpreter
    finalises is the known cause of that message (pytorch/pytorch#190489, #179291). The abort turned a finished
    run into a failed one, which breaks a SLURM ``afterok`` chain. So logging and the standard streams are flushed
    here and the process ends with ``code`` at once (``os._exit``). Only for the CLI's last step: atexit
    handlers do not run."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, produced by this program), in rank order, on every rank."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# --- start-up -----------------------------------------------------------------------------------------


def _listening_socket(addr: str, port: int) -> socket.socket:
    """A TCP socket bound to MASTER_ADDR's interface only (torch's own store binds every interface)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(sockaddr)
    sock.listen(128)
    return sock


def init_process_group(env: DistEnv, backend: str, timeout_s: float = 600.0) -> None:
    """Start torch.distributed for ``env`` from MASTER_ADDR / MASTER_PORT (set by ``detect_env``). Rank 0
    serves the rendezvous store on MASTER_ADDR's interface only: 127.0.0.1 (the single-node default)
    is never reachable from another machine. ``timeout_s`` bounds every collective, so a lost rank
    fails the others instead of hanging them."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = timedelta(seconds=timeout_s)
    # under torchrun its agent already serves the store on MASTER_PORT: every rank is a client
    serve = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    listen = _listening_socket(addr, port) if serve else None
    if serve and env.world_size > 1:
        log.info("rendezvous on %s:%d for %d ranks", addr, port, env.world_size)
    store = dist.TCPStore(addr, port, env.world_size, is_master=serve, timeout=timeout,  # type: ignore[attr-defined]
                          master_listen_fd=listen.fileno() if listen else None)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    _KEEP_ALIVE.append((store, listen))


_KEEP_ALIVE: list[Any] = []  # the store and its socket live as long as the process group
