"""Running a model at the voxel spacing it was trained at, with outputs on the input's grid.

The windowed LPI volume is resampled to the model's spacing (linear interpolation of the
intensities, SimpleITK; same origin and direction, the extent rounded to whole voxels). The
engine runs there, and :class:`BackToInputGrid` resamples the blended logits back to the
input's LPI grid slab by slab (trilinear, like the intensities) before the argmax, so the
full-resolution logits of all classes are never held: only the model-grid slab in hand, one
model slice carried over between slabs, and the input-grid slab being emitted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from itk_infer.config import Triple
from itk_infer.engine import Sink, Slab, labels_from_logits

# Spacings within this relative difference count as equal: no resampling.
SPACING_RTOL = 1e-3


def needs_resampling(spacing_zyx: Sequence[float], model_zyx: Sequence[float] | None) -> bool:
    if model_zyx is None:
        return False
    return not np.allclose(spacing_zyx, model_zyx, rtol=SPACING_RTOL, atol=0)


def model_grid_shape(shape_zyx: Triple, spacing_zyx: Sequence[float],
                     model_zyx: Sequence[float]) -> Triple:
    """Voxels per axis at the model's spacing covering the same extent (at least 1)."""
    return tuple(max(1, round(n * s / m))  # type: ignore[return-value]
                 for n, s, m in zip(shape_zyx, spacing_zyx, model_zyx, strict=True))


def to_model_grid(voxels: np.ndarray, spacing_zyx: Sequence[float],
                  model_zyx: Sequence[float]) -> np.ndarray:
    """``voxels`` (Z, Y, X) resampled linearly to ``model_zyx`` mm, same origin; points past
    the last input voxel take the nearest edge value (as the engine's padding does)."""
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    shape = model_grid_shape(voxels.shape, spacing_zyx, model_zyx)  # type: ignore[arg-type]
    reference = sitk.Image([int(n) for n in reversed(shape)], sitk.sitkFloat32)
    reference.SetSpacing(tuple(float(s) for s in reversed(model_zyx)))
    # Clamp to the edge: extend the image by one edge slice per axis first, so that model
    # points up to half a model voxel past the input's last voxel interpolate, not fill.
    padded = sitk.ZeroFluxNeumannPad(image, [0, 0, 0], [2, 2, 2])
    out = sitk.Resample(padded, reference, sitk.Transform(), sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _axis_weights(target: int, target_mm: float, source: int, source_mm: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each target index: the two source indices around it and the weight of the upper."""
    u = torch.arange(target, dtype=torch.float64) * (target_mm / source_mm)
    u = u.clamp(0, source - 1)
    lower = u.floor().long()
    upper = (lower + 1).clamp(max=source - 1)
    return lower, upper, (u - lower).float()


def _lerp(tensor: torch.Tensor, dim: int, axis: tuple[torch.Tensor, ...]) -> torch.Tensor:
    lower, upper, weight = axis
    shape = [1] * tensor.dim()
    shape[dim] = -1
    a = tensor.index_select(dim, lower)
    b = tensor.index_select(dim, upper)
    return a.lerp_(b, weight.view(shape))


class BackToInputGrid(Sink):
    """Takes model-grid slabs and hands input-grid slabs to ``sinks``, in increasing Z.

    Input slice j lies at model position u = j x s_in / s_model; it is emitted as soon as
    the model slices floor(u) and floor(u) + 1 have arrived.
    """

    def __init__(self, sinks: Sequence[Sink], shape_zyx: Triple, spacing_zyx: Sequence[float],
                 model_zyx: Sequence[float]) -> None:
        self.sinks, self.shape = list(sinks), shape_zyx
        self.spacing, self.model = tuple(spacing_zyx), tuple(model_zyx)
        self.next_z = 0  # the next input slice to emit
        self.carry: torch.Tensor | None = None  # last model slice, in-plane resampled
        self.carry_index = -1

    def begin(self, num_classes: int, shape_zyx: Triple) -> None:
        self.model_shape = shape_zyx
        self.ys = _axis_weights(self.shape[1], self.spacing[1], shape_zyx[1], self.model[1])
        self.xs = _axis_weights(self.shape[2], self.spacing[2], shape_zyx[2], self.model[2])
        self.zs = _axis_weights(self.shape[0], self.spacing[0], shape_zyx[0], self.model[0])
        for sink in self.sinks:
            sink.begin(num_classes, self.shape)

    def consume(self, slab: Slab) -> None:
        plane = _lerp(_lerp(slab.logits.float(), 2, self.ys), 3, self.xs)  # (C, dz, Yt, Xt)
        first = slab.z_start
        if self.carry is not None:
            plane, first = torch.cat([self.carry, plane], dim=1), self.carry_index
        last = slab.z_start + slab.logits.shape[1] - 1  # model slices first..last in hand
        lower, upper, weight = self.zs
        stop = self.next_z
        while stop < self.shape[0] and int(upper[stop]) <= last:
            stop += 1
        if stop > self.next_z:
            rows = slice(self.next_z, stop)
            a = plane.index_select(1, lower[rows] - first)
            b = plane.index_select(1, upper[rows] - first)
            logits = a.lerp_(b, weight[rows].view(1, -1, 1, 1))
            out = Slab(z_start=self.next_z, logits=logits, labels=labels_from_logits(logits))
            for sink in self.sinks:
                sink.consume(out)
            self.next_z = stop
        self.carry, self.carry_index = plane[:, -1:].clone(), last

    def abort(self) -> None:
        for sink in self.sinks:
            sink.abort()
