"""Data mix: each dataset's `sample_ratio` decides how many of its samples a run sees.

The integer part repeats the whole dataset, the fraction adds a seeded random subset of it
(without replacement), so `2.5` means every sample twice plus half of them a third time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ratio_indices(n: int, ratio: float, seed: int, salt: int) -> np.ndarray:
    """Sample indices of one dataset of `n` samples under `ratio` (sorted within each repeat)."""
    if ratio < 0:
        raise ValueError(f"sample_ratio must be >= 0, got {ratio}")
    whole = int(ratio)
    frac = ratio - whole
    parts = [np.arange(n, dtype=np.int64)] * whole
    k = int(round(frac * n))
    if k:
        rng = np.random.default_rng([seed, salt, 0x5A3])
        parts.append(np.sort(rng.choice(n, size=k, replace=False)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def mix(sizes: Sequence[int], ratios: Sequence[float], seed: int) -> np.ndarray:
    """[(dataset, sample)] pairs of the whole mix as an int64 array [m, 2], in dataset order."""
    out: list[np.ndarray] = []
    for d, (n, r) in enumerate(zip(sizes, ratios)):
        idx = ratio_indices(n, r, seed, d)
        out.append(np.stack([np.full(len(idx), d, dtype=np.int64), idx], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)
