"""Importance maps against an independent numpy formula."""

from __future__ import annotations

import numpy as np
import pytest

from itk_infer.blending import GAUSSIAN_FLOOR, importance_map


@pytest.mark.parametrize("patch", [(8, 16, 16), (5, 7, 9), (1, 4, 3), (32, 64, 64)])
def test_gaussian_matches_formula(patch):
    grid = np.meshgrid(*[np.arange(p, dtype=np.float64) for p in patch], indexing="ij")
    exponent = sum(((g - (p - 1) / 2) / (p / 8)) ** 2 for g, p in zip(grid, patch, strict=True))
    reference = np.exp(-0.5 * exponent)
    reference = np.maximum(reference / reference.max(), GAUSSIAN_FLOOR)
    weights = importance_map(patch, "gaussian")
    assert weights.dtype == np.float32 and weights.shape == patch
    np.testing.assert_allclose(weights, reference, rtol=1e-6, atol=1e-9)
    assert weights.min() > 0, "no weight may be zero"
    # symmetric under flipping every axis
    np.testing.assert_array_equal(weights, weights[::-1, ::-1, ::-1])


def test_constant_is_ones_and_maps_are_cached_read_only():
    weights = importance_map((4, 5, 6), "constant")
    np.testing.assert_array_equal(weights, np.ones((4, 5, 6), np.float32))
    assert importance_map((4, 5, 6), "constant") is weights
    with pytest.raises(ValueError):
        weights[0, 0, 0] = 2


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown blend mode"):
        importance_map((2, 2, 2), "median")
