"""Synthetic CT volumes for the ITKIT interoperability test (training data and test images)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def phantom(rng: np.random.Generator, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """An int16 HU volume (Z, Y, X) with two ellipsoids, and its labels (0 air, 1 soft
    tissue, 2 bone). int16 because ITKIT's own windowing casts to int16 first."""
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    body = (((grid / 0.8) ** 2).sum(0) < 1.0)
    centre = rng.uniform(-0.3, 0.3, size=3)[:, None, None, None]
    bone = ((((grid - centre) / 0.3) ** 2).sum(0) < 1.0) & body
    labels = body.astype(np.uint8) + bone.astype(np.uint8)
    hu = np.choose(labels, [-900, 40, 700]) + rng.normal(0, 25, size=tuple(shape))
    return hu.round().astype(np.int16), labels


class SyntheticCT:
    """A map-style data set of ``num_volumes`` phantoms passed through an MMEngine pipeline."""

    def __init__(self, pipeline: list[dict], shape: Sequence[int], num_volumes: int = 2,
                 seed: int = 0) -> None:
        from mmengine.dataset import Compose

        self.pipeline = Compose(pipeline)
        rng = np.random.default_rng(seed)
        self.volumes = [phantom(rng, shape) for _ in range(num_volumes)]

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> Any:
        hu, labels = self.volumes[index]
        return self.pipeline({"img": hu.copy(), "gt_seg_map": labels.copy()})
