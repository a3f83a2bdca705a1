"""Random numbers that depend only on the position in training, so that a run resumed from a
checkpoint (kill -9, preemption, requeue) draws exactly what the uninterrupted run drew.

Every micro-batch reseeds torch (CPU and CUDA), numpy and python ``random`` from (seed, rank, global
micro-batch index): masking, modality dropout and ClassMix of micro-batch i are the same whatever
happened before it (validation, a loader's start-up, a resume). Batch streams are read through
:func:`rng_isolated`, because a DataLoader seeds itself from torch's generator each time an epoch
starts: inside a micro-batch that draw would happen in a resumed run (loader re-created mid-epoch)
but not in the uninterrupted one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def seed_micro_batch(seed: int, rank: int, micro_batch: int) -> None:
    """Reseed torch, numpy and python ``random`` for global micro-batch ``micro_batch`` of ``rank``."""
    state = np.random.SeedSequence([seed, rank, micro_batch]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))  # also seeds every CUDA device
    np.random.seed(int(state[0]))
    random.seed(int(state[1]))


_WAITED_S = [0.0]  # seconds this process spent in the next() of its batch streams


def rng_isolated(stream: Iterator[T]) -> Iterator[T]:
    """The items of ``stream``, each drawn with torch's CPU generator saved and restored around it; the
    time each draw takes (the training loop waiting for data) adds to :func:`data_wait_seconds`."""
    while True:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            item = next(stream)
        _WAITED_S[0] += time.perf_counter() - t0
        yield item


def data_wait_seconds() -> float:
    """Seconds spent so far, in this process, waiting for the batches of streams read via rng_isolated."""
    return _WAITED_S[0]
