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
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from itk_infer.atomic import atomic_output, native_safe_path
from itk_infer.errors import CaseError

MODEL_ORIENTATION = "LPI"
log = logging.getLogger(__name__)


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


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    # ITK messages are multi-line with file/line noise; keep the description.
    for line in text.splitlines():
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    return text.splitlines()[-1] if text else type(error).__name__


def read_volume(path: Path) -> Volume:
    """Read a 3-D scalar image and reorient it to LPI.

    Args:
        path: a ``.mha``, ``.nii`` or ``.nii.gz`` file.

    Returns:
        The reoriented voxels, shape (Z, Y, X), and the LPI geometry.

    Raises:
        CaseError: unreadable file, not 3-D, or more than one component per voxel.
    """
    safe = native_safe_path(path)
    try:
        return _read_volume(path, safe)
    finally:
        if safe != path:
            shutil.rmtree(safe.parent, ignore_errors=True)


def _read_volume(path: Path, safe: Path) -> Volume:
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
    if orientation != MODEL_ORIENTATION:
        image = sitk.DICOMOrient(image, MODEL_ORIENTATION)
    return Volume(
        voxels=sitk.GetArrayFromImage(image),
        geometry=Geometry.of(image),
        source_orientation=orientation,
    )


def write_label_map(labels: np.ndarray, geometry: Geometry, path: Path,
                    orientation: str = MODEL_ORIENTATION) -> int:
    """Write a (Z, Y, X) LPI label map with ``geometry`` to ``path`` atomically, compressed.

    ``orientation``: the orientation code to store it in; the input's own code puts it back on
    the input's grid exactly (reorienting permutes and flips axes, it never resamples). The
    format follows the extension of ``path``. Returns the size of the written file.
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels), isVector=False)
    geometry.apply_to(image)
    if orientation != MODEL_ORIENTATION:
        image = sitk.DICOMOrient(image, orientation)
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        size = tmp.stat().st_size
    return size
