"""Running a model at the voxel spacing it was trained at, with outputs on the input's grid.

The windowed LPI volume is resampled to the model's spacing (linear interpolation of the
intensities, SimpleITK; same origin and direction). The voxel count per axis is the extent
over the model's spacing, rounded, and the spacing then adjusted a little so that the first
and last voxels of both grids coincide (as nnU-Net rounds shapes): no point is extrapolated,
and the way back is a corner-aligned linear interpolation, done per slab by torch's
``interpolate`` in-plane and by a blend of two model slices along Z. The
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


def grid_spacing(shape_zyx: Triple, spacing_zyx: Sequence[float],
                 model_zyx: Sequence[float]) -> tuple[float, float, float]:
    """The spacing the model grid really has: its first and last voxels on the input's."""
    model_shape = model_grid_shape(shape_zyx, spacing_zyx, model_zyx)
    return tuple(  # type: ignore[return-value]
        (n - 1) * s / (m - 1) if m > 1 and n > 1 else float(want)
        for n, s, m, want in zip(shape_zyx, spacing_zyx, model_shape, model_zyx, strict=True))


def to_model_grid(voxels: np.ndarray, spacing_zyx: Sequence[float],
                  model_zyx: Sequence[float]) -> np.ndarray:
    """``voxels`` (Z, Y, X) resampled linearly to the model grid of :func:`grid_spacing`."""
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    shape = model_grid_shape(voxels.shape, spacing_zyx, model_zyx)  # type: ignore[arg-type]
    reference = sitk.Image([int(n) for n in reversed(shape)], sitk.sitkFloat32)
    effective = grid_spacing(voxels.shape, spacing_zyx, model_zyx)  # type: ignore[arg-type]
    reference.SetSpacing(tuple(float(s) for s in reversed(effective)))
    # Rounding can put the last model point a hair past the last input voxel: one edge slice
    # of padding keeps it interpolated instead of filled.
    padded = sitk.ZeroFluxNeumannPad(image, [0, 0, 0], [1, 1, 1])
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


class BackToInputGrid(Sink):
    """Takes model-grid slabs and hands input-grid slabs to ``sinks``, in increasing Z.

    ``model_zyx`` is the model grid's real spacing (:func:`grid_spacing`): the grids' first
    and last voxels coincide, so in-plane the interpolation is corner-aligned. Input slice j
    lies at model position u = j x s_in / s_model; it is emitted as soon as the model slices
    floor(u) and floor(u) + 1 have arrived.
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
        self.zs = _axis_weights(self.shape[0], self.spacing[0], shape_zyx[0], self.model[0])
        for sink in self.sinks:
            sink.begin(num_classes, self.shape)

    def consume(self, slab: Slab) -> None:
        # (C, dz, Ym, Xm) -> (C, dz, Yt, Xt): classes as the batch, slices as channels.
        plane = torch.nn.functional.interpolate(slab.logits.float(), size=self.shape[1:],
                                                mode="bilinear", align_corners=True)
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
