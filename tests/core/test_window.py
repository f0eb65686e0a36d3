"""Windowing in float32 without integer casts, against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from itk_infer.config import WindowSettings
from itk_infer.errors import UsageError
from itk_infer.window import apply_window


def reference(values: np.ndarray, level: float, width: float) -> np.ndarray:
    lo, hi = level - width / 2, level + width / 2
    return (np.clip(values.astype(np.float64), lo, hi) - lo) / width


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float32, np.float64, np.uint8])
@pytest.mark.parametrize(("level", "width"), [(40, 400), (-600.5, 1500.25), (0.3, 0.7)])
def test_matches_reference(dtype, level, width):
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    lo, hi = (info.min, info.max) if info else (-3000.0, 3000.0)
    values = rng.uniform(lo, hi, size=(4, 5, 6)).astype(dtype)
    out = apply_window(values, WindowSettings(level, width))
    assert out.dtype == np.float32 and out.shape == values.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out, reference(values, level, width), atol=2e-6)


def test_no_integer_truncation_or_wrap():
    floats = np.array([0.2, 0.7], dtype=np.float32)  # int16 would make both 0
    out = apply_window(floats, WindowSettings(0.5, 1.0))
    assert out[0] < out[1]
    big = np.array([40000, 65535], dtype=np.uint16)  # int16 would wrap these to negatives
    out = apply_window(big, WindowSettings(50000, 40000))
    np.testing.assert_allclose(out, [0.25, 0.888375], atol=1e-6)


@pytest.mark.parametrize("width", [0.0, -10.0, float("nan")])
def test_bad_width_is_a_usage_error(width):
    from itk_infer.config import Settings

    with pytest.raises(UsageError, match="--ww"):
        Settings(window_level=40, window_width=width)
