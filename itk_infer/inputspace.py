"""Outputs voxel-aligned with the input file (``--output-space input``) when the LPI grid the
model ran on is not a plain copy of it.

Two cases need the logits themselves moved, not only the label map: logits saved for an input
whose axes are not in LPI order (its array is the LPI array transposed and flipped), and any
input resampled onto an axis-aligned LPI grid (oblique, :func:`itk_infer.imageio.resample_to_lpi`):
there the labels come from the logits resampled linearly onto the input's grid, then the
argmax, as :class:`itk_infer.resample.BackToInputGrid` does for a model spacing.

A slab of the input file's array can need any slice of the LPI grid (a transposed or tilted
axis), so the logits are held whole, in float16: :class:`HoldLogits` keeps C x N x 2 bytes on
the LPI grid, and :func:`to_input_grid` builds the input-grid logits (float16, C x N x 2 bytes)
one class at a time, with the running maximum (float32) and its label. Both float16 volumes
live in unnamed files in the output folder, mapped into memory: the page cache holds them
while memory is free and the kernel writes them out when it is not, so the process's own
memory stays a few float32 volumes, as the engine's bound promises, whatever C is. The files
have no name (nothing to clean up, nothing that looks like an output) and vanish when closed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from itk_infer.config import Triple
from itk_infer.engine import Sink, Slab
from itk_infer.imageio import Geometry, reorient

# Slices handed on per slab when the input-grid logits are written.
SLAB_SLICES = 8


def file_backed(shape: tuple[int, ...], directory: Path | None) -> torch.Tensor:
    """An uninitialised float16 tensor mapped from an unnamed file in ``directory`` (in
    memory when ``directory`` is None)."""
    if directory is None:
        return torch.empty(shape, dtype=torch.float16)
    with tempfile.TemporaryFile(dir=directory) as handle:  # the mapping outlives the handle
        handle.truncate(int(np.prod(shape)) * 2)
        array = np.memmap(handle, dtype=np.float16, mode="r+", shape=shape)
    return torch.from_numpy(array)


class HoldLogits(Sink):
    """Keeps the blended logits (C, Z, Y, X) of the LPI grid in float16, in an unnamed file of
    ``spill_dir`` if given (see the module's docstring)."""

    def __init__(self, save: bool, spill_dir: Path | None = None) -> None:
        self.save = save  # the logits are an output too, not only the labels' source
        self.spill_dir = spill_dir
        self.logits: torch.Tensor | None = None

    def begin(self, num_classes: int, shape_zyx: Triple) -> None:
        self.logits = file_backed((num_classes, *shape_zyx), self.spill_dir)

    def consume(self, slab: Slab) -> None:
        assert self.logits is not None
        dz = slab.logits.shape[1]
        self.logits[:, slab.z_start : slab.z_start + dz] = slab.logits.to(torch.float16).cpu()

    def abort(self) -> None:
        self.logits = None


def _class_to_input(plane: np.ndarray, lpi: Geometry, source: Geometry,
                    source_shape: tuple[int, int, int], orientation: str,
                    resampled: bool) -> np.ndarray:
    """One class's LPI logits (Z, Y, X) on the input file's grid, as its array (Z, Y, X)."""
    if not resampled:
        return reorient(plane, lpi, orientation)  # a permutation and flips: exact
    image = sitk.GetImageFromArray(plane)
    lpi.apply_to(image)
    reference = sitk.Image([int(n) for n in reversed(source_shape)], sitk.sitkFloat32)
    source.apply_to(reference)
    # The LPI grid covers every input voxel (within half a voxel of its centres): no fill.
    image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32)
    return sitk.GetArrayFromImage(image)


def to_input_grid(held: HoldLogits, lpi: Geometry, source: Geometry,
                  source_shape: tuple[int, int, int], orientation: str,
                  resampled: bool) -> tuple[torch.Tensor, np.ndarray]:
    """The held logits on the input file's grid (float16, (C, Z, Y, X) of its array) and the
    labels: the argmax of the float32 values, the first class on ties (as the engine)."""
    assert held.logits is not None
    classes = held.logits.shape[0]
    out = file_backed((classes, *source_shape), held.spill_dir)
    best = np.empty(source_shape, np.float32)
    labels = np.zeros(source_shape, np.uint8 if classes <= 256 else np.int32)
    for c in range(classes):
        plane = held.logits[c].float().numpy()
        moved = _class_to_input(plane, lpi, source, source_shape, orientation, resampled)
        if c == 0:
            best[...] = moved
        else:
            higher = moved > best
            labels[higher] = c
            np.maximum(best, moved, out=best)
        out[c] = torch.from_numpy(moved)
    held.logits = None  # drop the LPI copy before the caller writes
    return out, labels


def slabs(logits: torch.Tensor, labels: np.ndarray) -> Iterator[Slab]:
    """The input-grid volume as Z-ordered slabs for the sinks."""
    for start in range(0, labels.shape[0], SLAB_SLICES):
        stop = min(start + SLAB_SLICES, labels.shape[0])
        yield Slab(z_start=start, logits=logits[:, start:stop].float(),
                   labels=torch.from_numpy(np.ascontiguousarray(labels[start:stop])))
