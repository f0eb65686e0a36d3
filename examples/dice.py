"""Dice overlap of label maps.

Import it as ``from examples.dice import dice_per_label`` from the repository root.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """Dice coefficient ``2|P & T| / (|P| + |T|)`` of each label in ``labels``.

    ``pred`` and ``truth`` are integer label maps of the same shape. A label
    absent from both counts as a perfect match (1.0).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs truth {truth.shape}")
    scores = {}
    for label in labels:
        p = pred == label
        t = truth == label
        total = int(p.sum()) + int(t.sum())
        scores[int(label)] = 1.0 if total == 0 else 2.0 * int(np.logical_and(p, t).sum()) / total
    return scores
