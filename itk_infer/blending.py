"""Importance maps that weight each window's logits before they are averaged."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from itk_infer.config import Triple

# Relative floor: the map's corners fall to ~1e-11 of its centre, but a zero weight would leave
# voxels covered by corners only undefined, and tiny weights amplify round-off there.
GAUSSIAN_FLOOR = 1e-4


@lru_cache(maxsize=16)
def importance_map(patch: Triple, mode: str) -> np.ndarray:
    """Weights for one window, shape ``patch`` (Z, Y, X), float32, read-only, max 1.

    ``gaussian``: separable Gaussian centred on the patch, sigma = patch/8 per axis (the value
    nnU-Net and MONAI use), floored at ``GAUSSIAN_FLOOR``. Choose it when windows overlap: it
    trusts window centres over borders, where a network sees less context. ``constant``: all
    ones, i.e. the plain average of overlapping windows.

    Examples:
        >>> importance_map((3, 3, 3), "constant").sum()
        np.float32(27.0)
        >>> float(importance_map((5, 5, 5), "gaussian").max())
        1.0
    """
    if mode == "constant":
        weights = np.ones(patch, dtype=np.float32)
    elif mode == "gaussian":
        axes = []
        for p in patch:
            sigma = p / 8.0
            x = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
            axes.append(np.exp(-0.5 * (x / sigma) ** 2))
        weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        weights = weights / weights.max()
        weights = np.maximum(weights, GAUSSIAN_FLOOR).astype(np.float32)
    else:
        raise ValueError(f"unknown blend mode {mode!r}")
    weights.setflags(write=False)
    return weights
