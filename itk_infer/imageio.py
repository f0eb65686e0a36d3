"""Read images into (Z, Y, X) voxels in LPI orientation, and write label maps atomically.

This is the only module that knows SimpleITK's axis order: SimpleITK geometry is (x, y, z),
numpy arrays from it are (Z, Y, X). Orientation codes follow DICOM: each letter names the
direction an axis points to as its index grows, so LPI means x → left, y → posterior,
z → inferior (direction diag(1, 1, -1)).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from itk_infer.atomic import atomic_output, native_safe_path
from itk_infer.errors import CaseError

MODEL_ORIENTATION = "LPI"
LPI_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
# Below this (degrees) a direction counts as axis-aligned: float noise in headers, not a tilt.
ALIGNED_DEG = 1e-4
log = logging.getLogger(__name__)


def obliquity_deg(direction: tuple[float, ...] | np.ndarray) -> float:
    """The largest angle, in degrees, between a direction column and its nearest world axis.

    0 for any permutation/flip of the axes; 45 at most for one rotated axis pair.

    Examples:
        >>> obliquity_deg((1, 0, 0, 0, 1, 0, 0, 0, -1))
        0.0
    """
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    columns = matrix / np.linalg.norm(matrix, axis=0, keepdims=True)
    cosines = np.clip(np.abs(columns).max(axis=0), 0.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


def resample_to_lpi(image: sitk.Image) -> sitk.Image:
    """``image`` resampled linearly (float32) onto an axis-aligned LPI grid covering it.

    Each input axis keeps its spacing on the world axis it is nearest to; the grid is the
    bounding box of the input's voxel corners, so every input voxel lies inside it. Points
    outside the input get its minimum intensity (air, for CT) rather than 0.
    """
    matrix = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    # World axis of each input axis: the assignment with the largest total |cosine|, so two
    # input axes never share one (possible past 45 degrees about two axes).
    nearest = np.array(max(permutations(range(3)),
                           key=lambda p: sum(abs(matrix[p[i], i]) for i in range(3))))
    spacing = np.empty(3)
    spacing[nearest] = image.GetSpacing()
    size_in = np.asarray(image.GetSize(), dtype=float)
    corners = np.array([[a, b, c] for a in (-0.5, size_in[0] - 0.5)
                        for b in (-0.5, size_in[1] - 0.5) for c in (-0.5, size_in[2] - 0.5)])
    world = (corners * np.asarray(image.GetSpacing())) @ matrix.T + np.asarray(image.GetOrigin())
    low, high = world.min(axis=0), world.max(axis=0)
    size = np.maximum(1, np.ceil((high - low) / spacing - 1e-6)).astype(int)
    # LPI: x and y grow with the index, z falls: the first voxel sits at (low x, low y, high z).
    origin = np.array([low[0] + spacing[0] / 2, low[1] + spacing[1] / 2, high[2] - spacing[2] / 2])
    reference = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    reference.SetSpacing(tuple(float(s) for s in spacing))
    reference.SetOrigin(tuple(float(o) for o in origin))
    reference.SetDirection(LPI_DIRECTION)
    floor = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), reference, sitk.Transform(),
                         sitk.sitkLinear, floor, sitk.sitkFloat32)


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a voxel grid, in SimpleITK's (x, y, z) order, millimetres."""

    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3, row-major

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            spacing_mm=tuple(float(v) for v in image.GetSpacing()),  # type: ignore[arg-type]
            origin_mm=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> None:
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_mm)
        image.SetDirection(self.direction)

    def as_dict(self) -> dict:
        return {
            "spacing_mm": list(self.spacing_mm),
            "origin_mm": list(self.origin_mm),
            "direction": list(self.direction),
        }


@dataclass(frozen=True)
class Volume:
    """Voxels (Z, Y, X) in LPI orientation, in the file's own dtype, and their geometry."""

    voxels: np.ndarray
    geometry: Geometry
    source_orientation: str
    obliquity_deg: float = 0.0
    # "lpi": the input's axes permuted/flipped to LPI (its direction kept, oblique or not);
    # "lpi-resampled": resampled onto an axis-aligned LPI grid (identity LPI direction).
    grid: str = "lpi"
    # The input file's own grid and array shape (Z, Y, X): where --output-space input writes.
    source_geometry: Geometry | None = None
    source_shape: tuple[int, int, int] | None = None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    # ITK messages are multi-line with file/line noise; keep the description.
    for line in text.splitlines():
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    return text.splitlines()[-1] if text else type(error).__name__


def read_volume(path: Path, resample_oblique: bool = False) -> Volume:
    """Read a 3-D scalar image and reorient it to LPI.

    Args:
        path: a ``.mha``, ``.nii`` or ``.nii.gz`` file.
        resample_oblique: an oblique image (see :func:`obliquity_deg`) is resampled onto an
            axis-aligned LPI grid (:func:`resample_to_lpi`) instead of only reoriented.

    Returns:
        The reoriented voxels, shape (Z, Y, X), and the LPI geometry.

    Raises:
        CaseError: unreadable file, not 3-D, or more than one component per voxel.
    """
    safe = native_safe_path(path)
    try:
        return _read_volume(path, safe, resample_oblique)
    finally:
        if safe != path:
            shutil.rmtree(safe.parent, ignore_errors=True)


def _read_volume(path: Path, safe: Path, resample_oblique: bool = False) -> Volume:
    """:func:`read_volume` of ``path``, through ``safe``: a name SimpleITK can take."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(safe))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise CaseError(f"{path.name}: cannot read image: {_first_line(error)}") from None
    dimension = reader.GetDimension()
    size = reader.GetSize()
    if dimension != 3:
        raise CaseError(
            f"{path.name}: image is {dimension}-D (size {list(size)}); a 3-D volume is required"
        )
    components = reader.GetNumberOfComponents()
    if components != 1:
        raise CaseError(
            f"{path.name}: image has {components} components per voxel (vector/RGB); "
            "a scalar volume is required"
        )
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise CaseError(f"{path.name}: cannot read image: {_first_line(error)}") from None
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        image.GetDirection()
    )
    source, shape = Geometry.of(image), tuple(reversed(image.GetSize()))
    angle, grid = obliquity_deg(image.GetDirection()), "lpi"
    if resample_oblique and angle > ALIGNED_DEG:
        image, grid = resample_to_lpi(image), "lpi-resampled"
    elif orientation != MODEL_ORIENTATION:
        image = sitk.DICOMOrient(image, MODEL_ORIENTATION)
    return Volume(
        voxels=sitk.GetArrayFromImage(image),
        geometry=Geometry.of(image),
        source_orientation=orientation,
        obliquity_deg=angle,
        grid=grid,
        source_geometry=source,
        source_shape=shape,  # type: ignore[arg-type]
    )


def reorient(voxels: np.ndarray, geometry: Geometry, orientation: str) -> np.ndarray:
    """An LPI (Z, Y, X) array on ``geometry`` in the array order of ``orientation``: a
    permutation and flips of its axes, exact."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels))
    geometry.apply_to(image)
    if orientation != MODEL_ORIENTATION:
        image = sitk.DICOMOrient(image, orientation)
    return sitk.GetArrayFromImage(image)


def write_label_map(labels: np.ndarray, geometry: Geometry, path: Path,
                    orientation: str | None = MODEL_ORIENTATION) -> int:
    """Write a (Z, Y, X) LPI label map with ``geometry`` to ``path`` atomically, compressed.

    ``orientation``: the orientation code to store it in; the input's own code puts it back on
    the input's grid exactly (reorienting permutes and flips axes, it never resamples); ``None``:
    ``labels`` are already on ``geometry``'s grid in its array order, written as they are. The
    format follows the extension of ``path``. Returns the size of the written file.
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels), isVector=False)
    geometry.apply_to(image)
    if orientation is not None and orientation != MODEL_ORIENTATION:
        image = sitk.DICOMOrient(image, orientation)
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        size = tmp.stat().st_size
    return size
