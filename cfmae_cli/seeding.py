"""Seeds derived from integers, so that a random draw depends on *what* it is for, not on who draws it."""

from __future__ import annotations

import numpy as np


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (NumPy's SeedSequence)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint64)
    return int(state[0] & np.uint64(0x7FFF_FFFF_FFFF_FFFF))
