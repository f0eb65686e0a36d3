"""Window grid: coverage, flush last window, stride multiples, padding — against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from itk_infer.grid import axis_starts, padded_shape, plan_windows


def random_cases(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        shape = tuple(int(v) for v in rng.integers(1, 40, size=3))
        patch = tuple(int(v) for v in rng.integers(1, 24, size=3))
        stride = tuple(int(rng.integers(1, p + 1)) for p in patch)
        yield shape, patch, stride


@pytest.mark.parametrize(("shape", "patch", "stride"), list(random_cases(300)))
def test_windows_cover_every_voxel_and_end_flush(shape, patch, stride):
    padded = padded_shape(shape, patch)
    assert padded == tuple(max(s, p) for s, p in zip(shape, patch, strict=True))
    windows = plan_windows(padded, patch, stride)
    coverage = np.zeros(padded, dtype=np.int32)
    for z, y, x in windows:
        assert 0 <= z <= padded[0] - patch[0]
        assert 0 <= y <= padded[1] - patch[1]
        assert 0 <= x <= padded[2] - patch[2]
        coverage[z : z + patch[0], y : y + patch[1], x : x + patch[2]] += 1
    assert coverage.min() >= 1, "some voxel is not covered"
    assert len(set(windows)) == len(windows), "duplicate windows"
    assert list(windows) == sorted(windows), "windows must come in Z, then Y, then X order"
    for axis in range(3):
        starts = sorted({w[axis] for w in windows})
        last = padded[axis] - patch[axis]
        assert starts[-1] == last, "the last window must end flush with the far edge"
        # every start but the flush one is a multiple of the stride, and none is skipped
        regular = [s for s in starts if s != last or s % stride[axis] == 0]
        assert regular == list(range(0, regular[-1] + 1, stride[axis]))


def test_axis_starts_examples():
    assert axis_starts(10, 10, 5) == (0,)
    assert axis_starts(12, 4, 4) == (0, 4, 8)
    assert axis_starts(13, 4, 4) == (0, 4, 8, 9)
    with pytest.raises(ValueError, match="shorter than the patch"):
        axis_starts(3, 4, 2)


def test_small_volume_is_one_padded_window():
    shape, patch = (3, 5, 40), (8, 16, 16)
    padded = padded_shape(shape, patch)
    assert padded == (8, 16, 40)
    windows = plan_windows(padded, patch, (4, 8, 8))
    assert {w[0] for w in windows} == {0} and {w[1] for w in windows} == {0}
