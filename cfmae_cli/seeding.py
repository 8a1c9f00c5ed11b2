"""Seeds derived from integers, so that a random draw depends on *what* it is for, not on who draws it."""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (NumPy's SeedSequence)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint64)
    return int(state[0] & np.uint64(0x7FFF_FFFF_FFFF_FFFF))


@contextlib.contextmanager
def sample_rng(seed: int, epoch: int, index: int) -> Iterator[None]:
    """Inside: torch's CPU generator seeded by (seed, epoch, index), restored after — the augmentation of one
    sample, the same in any worker or process. (The CPU generator only: ``torch.manual_seed`` would also queue
    a lazy CUDA seeding per sample.)"""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(mix_seed(seed, epoch, index))
        yield


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python, NumPy and torch (CPU) generators seeded with ``seed`` inside, restored after."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
