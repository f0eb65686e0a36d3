"""--tta: the engine's output equals the mean of 8 explicitly mirrored runs."""

from __future__ import annotations

import numpy as np
import torch

from itk_infer.config import SlidingWindowSettings
from itk_infer.engine import Sink, Slab, slide
from itk_infer.tta import FLIPS, mirrored


class Collect(Sink):
    def begin(self, num_classes, shape_zyx):
        self.logits = np.zeros((num_classes, *shape_zyx), np.float32)

    def consume(self, slab: Slab) -> None:
        dz = slab.logits.shape[1]
        self.logits[:, slab.z_start : slab.z_start + dz] = slab.logits.numpy()


def conv_model() -> torch.nn.Module:
    """A 3-class model with an asymmetric kernel, so mirroring changes its answer."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 3, kernel_size=3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.2, 2.0, 27).reshape(1, 1, 3, 3, 3))
    return conv.eval()


def run(volume: np.ndarray, predict, batch: int = 1) -> np.ndarray:
    sink = Collect()
    # One window over the whole volume: the grid is the same for every mirror image.
    slide(volume, predict, SlidingWindowSettings(volume.shape, None, batch, "constant"), [sink])
    return sink.logits


def test_mirrored_equals_the_mean_of_eight_flipped_runs():
    volume = np.random.default_rng(1).uniform(0, 1, (6, 10, 12)).astype(np.float32)
    model = conv_model()

    def predict(x):
        with torch.no_grad():
            return model(x)

    got = run(volume, mirrored(predict))
    expected = np.zeros_like(got)
    for axes in FLIPS:
        volume_axes = tuple(a - 2 for a in axes)
        flipped = np.ascontiguousarray(np.flip(volume, volume_axes)) if axes else volume
        out = run(flipped, predict)
        expected += np.flip(out, tuple(a - 1 for a in axes)) if axes else out
    expected /= len(FLIPS)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, run(volume, predict), atol=1e-3)  # mirroring mattered
    # One call per flip (static batch models) gives the same numbers.
    np.testing.assert_allclose(run(volume, mirrored(predict, static_batch=True)), got,
                               rtol=1e-6, atol=1e-6)
