"""Intensity windowing (CT level/width) into [0, 1] float32."""

from __future__ import annotations

import numpy as np

from itk_infer.config import WindowSettings


def apply_window(voxels: np.ndarray, window: WindowSettings) -> np.ndarray:
    """Clip to the window and scale to [0, 1], in float32, without any integer cast.

    Args:
        voxels: any real array, e.g. (Z, Y, X) HU values of any dtype.
        window: level and width, in the units of ``voxels``.

    Returns:
        A new float32 array of the same shape with values in [0, 1].

    Examples:
        >>> import numpy as np
        >>> apply_window(np.array([-1000, 40, 1000]), WindowSettings(40, 400)).tolist()
        [0.0, 0.5, 1.0]
    """
    lo, hi = window.bounds
    out = np.asarray(voxels, dtype=np.float32).copy()
    np.clip(out, np.float32(lo), np.float32(hi), out=out)
    out -= np.float32(lo)
    out /= np.float32(window.width)
    return out
