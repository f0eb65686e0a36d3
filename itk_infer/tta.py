"""Test-time mirroring: a predictor that averages the model's logits over the 8 mirror images
of each window (flips along any subset of Z, Y, X), each flipped back before averaging.

It wraps any predictor callable, so the engine is unchanged: windows, blending and memory
bound stay as they are; only each forward call does 8 passes' work.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import torch

Predictor = Callable[[torch.Tensor], torch.Tensor]

# Spatial axes of a (N, C, Z, Y, X) batch; the empty flip is the window itself.
FLIPS: tuple[tuple[int, ...], ...] = tuple(
    axes for k in range(4) for axes in combinations((2, 3, 4), k)
)


def mirrored(predict: Predictor, *, static_batch: bool = False) -> Predictor:
    """``predict`` averaged over :data:`FLIPS`. The 8 copies of a batch go to the model in
    one call (8 x N windows), unless the model takes only its static batch size: then one
    call per flip."""

    def run(batch: torch.Tensor) -> torch.Tensor:
        copies = [batch.flip(axes) if axes else batch for axes in FLIPS]
        if static_batch:
            outputs = [predict(copy) for copy in copies]
        else:
            outputs = list(predict(torch.cat(copies)).split(batch.shape[0]))
        total = torch.zeros(outputs[0].shape, dtype=torch.float32, device=outputs[0].device)
        for axes, out in zip(FLIPS, outputs, strict=True):
            total += (out.flip(axes) if axes else out).float()
        return total / len(FLIPS)

    return run
