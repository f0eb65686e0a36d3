"""Find DICOM image series in a folder, check their geometry, and read them as LPI volumes.

A series is the set of files sharing a SeriesInstanceUID. Its slices are ordered by their
position along the slice normal (ImagePositionPatient projected on the cross product of the
ImageOrientationPatient cosines), never by file name or InstanceNumber, and the slice spacing
is the distance between those positions (SliceThickness is the thickness of the slab a slice
images, not the distance between slices). A stack the voxel grid cannot describe exactly is
refused: slices offset in-plane (gantry tilt, sheared stacks), uneven steps (missing slices),
two slices at one position, differing orientation, size or pixel spacing. Stored values are
mapped to modality units (HU for CT) with each slice's RescaleSlope/RescaleIntercept.

pydicom is imported only here and only once a file carries the DICOM preamble.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from itk_infer.errors import CaseError, UsageError
from itk_infer.imageio import MODEL_ORIENTATION, Geometry, Volume

log = logging.getLogger(__name__)

PREAMBLE = 128
MAGIC = b"DICM"
# Modalities whose instances are not images of the patient (derived objects, documents).
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO",
                                  "REG", "DOC", "PLAN"})
HEADER_TAGS = ("SeriesInstanceUID", "Modality", "SOPClassUID")
# Tolerances of the geometry checks, in mm and as a fraction of the slice step: positions are
# stored as decimal strings, so allow their rounding, but nothing a reader would resample.
TOL_MM = 0.01
TOL_REL = 0.01


def is_dicom_file(path: Path) -> bool:
    """``path`` is a DICOM Part 10 file (128-byte preamble, then ``DICM``)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(PREAMBLE + len(MAGIC))
    except OSError:
        return False
    return head[PREAMBLE:] == MAGIC


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:
        raise UsageError("DICOM input needs pydicom and highdicom: "
                         "pip install 'itk_infer[dicom]'") from None
    return pydicom


@dataclass(frozen=True)
class SeriesFiles:
    """The files of one image series found in one folder."""

    uid: str
    files: tuple[Path, ...]


def find_series(folder: Path) -> list[SeriesFiles]:
    """The DICOM image series directly in ``folder`` (not below it), by SeriesInstanceUID.

    Files without the DICOM preamble, hidden files and non-image objects (SEG, RTSTRUCT, SR,
    ...: our own outputs among them) are left out; a DICOM file whose header cannot be read is
    left out with a warning naming it.
    """
    candidates = [p for p in sorted(Path(folder).iterdir(), key=lambda p: p.name)
                  if not p.name.startswith(".") and p.is_file() and is_dicom_file(p)]
    if not candidates:
        return []
    pydicom = _pydicom()
    groups: dict[str, list[Path]] = {}
    for path in candidates:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            uid = str(header.SeriesInstanceUID)
        except Exception as error:  # any parse failure: the file is not usable
            log.warning("%s: not a readable DICOM file, ignored (%s)", path, error)
            continue
        if str(header.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
            continue
        groups.setdefault(uid, []).append(path)
    return [SeriesFiles(uid, tuple(files)) for uid, files in sorted(groups.items())]


@dataclass(frozen=True)
class SeriesGrid:
    """The voxel grid of a checked series: its headers in slice order and its geometry."""

    headers: list[Any]  # pydicom datasets without pixel data, sorted along the normal
    files: list[Path]  # in the same order
    geometry: Geometry  # of the series' own grid (x: columns, y: rows, z: slice order)

    @property
    def orientation(self) -> str:
        return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            self.geometry.direction)


def _floats(header: Any, keyword: str, count: int, where: str) -> np.ndarray:
    value = header.get(keyword)
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.shape != (count,):
        raise CaseError(f"{where}: {keyword} is missing or malformed ({value!r})")
    return array


def _read_headers(files: tuple[Path, ...], label: str) -> list[Any]:
    pydicom = _pydicom()
    headers = []
    for path in files:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as error:
            raise CaseError(f"{label}: cannot read {path.name}: {error}") from None
    return headers


def series_grid(files: tuple[Path, ...], label: str) -> SeriesGrid:
    """Sort the slices of a series along their normal and check that one regular voxel grid
    holds them.

    Raises:
        CaseError: naming the series (``label``) and what prevents a regular grid.
    """
    if len(files) < 2:
        raise CaseError(f"{label}: {len(files)} slice(s); a 3-D series needs at least 2")
    headers = _read_headers(files, label)
    first = headers[0]
    cosines = _floats(first, "ImageOrientationPatient", 6, f"{label}: {files[0].name}")
    row, col = cosines[:3], cosines[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 \
            or abs(row @ col) > 1e-3:
        raise CaseError(f"{label}: ImageOrientationPatient {cosines.tolist()} is not two "
                        "orthogonal unit vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    spacing_rc = _check_same_plane(headers, files, cosines, label)
    positions = np.stack([_floats(h, "ImagePositionPatient", 3, f"{label}: {p.name}")
                          for h, p in zip(headers, files, strict=True)])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    step = _check_steps(positions, normal, [files[i] for i in order], label)
    direction = np.stack([row, col, normal], axis=1)  # columns: the x, y, z axes
    geometry = Geometry(
        spacing_mm=(float(spacing_rc[1]), float(spacing_rc[0]), step),
        origin_mm=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.ravel()),
    )
    return SeriesGrid([headers[i] for i in order], [files[i] for i in order], geometry)


def _check_same_plane(headers: list[Any], files: tuple[Path, ...], cosines: np.ndarray,
                      label: str) -> np.ndarray:
    """Every slice has the first one's orientation, size and pixel spacing, and one frame of
    one sample; returns the pixel spacing (between rows, between columns)."""
    first = headers[0]
    spacing = _floats(first, "PixelSpacing", 2, f"{label}: {files[0].name}")
    size = (first.get("Rows"), first.get("Columns"))
    for header, path in zip(headers, files, strict=True):
        where = f"{label}: {path.name}"
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            raise CaseError(f"{where}: multi-frame (enhanced) images are not supported")
        if int(header.get("SamplesPerPixel", 1)) != 1:
            raise CaseError(f"{where}: {header.SamplesPerPixel} samples per pixel (colour); "
                            "a scalar image is required")
        if not np.allclose(_floats(header, "ImageOrientationPatient", 6, where), cosines,
                           atol=1e-4):
            raise CaseError(f"{where}: its ImageOrientationPatient differs from "
                            f"{files[0].name}'s; the series mixes orientations")
        if (header.get("Rows"), header.get("Columns")) != size:
            raise CaseError(f"{where}: {header.get('Rows')}x{header.get('Columns')} pixels, "
                            f"{files[0].name} has {size[0]}x{size[1]}")
        if not np.allclose(_floats(header, "PixelSpacing", 2, where), spacing, rtol=1e-4):
            raise CaseError(f"{where}: its PixelSpacing differs from {files[0].name}'s")
    return spacing


def _check_steps(positions: np.ndarray, normal: np.ndarray, files: list[Path],
                 label: str) -> float:
    """The slice spacing of positions sorted along ``normal``, after refusing tilted, uneven
    or doubled stacks."""
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    in_plane = np.linalg.norm(steps - along[:, None] * normal[None, :], axis=1)
    mean = float((positions[-1] - positions[0]) @ normal) / (len(positions) - 1)
    tolerance = max(TOL_MM, TOL_REL * abs(mean))
    if np.any(along < TOL_MM):
        k = int(np.argmin(along))
        raise CaseError(f"{label}: slices {files[k].name} and {files[k + 1].name} are at the "
                        "same position (several acquisitions, echoes or phases in one "
                        "series?); refused")
    worst = int(np.argmax(in_plane))
    if in_plane[worst] > tolerance:
        angle = float(np.degrees(np.arctan2(in_plane[worst], along[worst])))
        raise CaseError(f"{label}: gantry tilt or sheared stack: each slice is offset "
                        f"{in_plane[worst]:.3f} mm in-plane ({angle:.2f} degrees from the "
                        "slice normal); resample it to an orthogonal grid first")
    if float(np.max(np.abs(along - mean))) > tolerance:
        raise CaseError(f"{label}: uneven slice spacing: steps from {along.min():.4g} to "
                        f"{along.max():.4g} mm along the normal (missing slices?); refused")
    return mean


def read_series(files: tuple[Path, ...], label: str) -> Volume:
    """Read a series as a float32 volume in modality units (HU for CT), reoriented to LPI.

    Raises:
        CaseError: a geometry check fails (see :func:`series_grid`) or a slice's pixel data
            cannot be decoded.
    """
    grid = series_grid(files, label)
    pydicom = _pydicom()
    first = grid.headers[0]
    voxels = np.empty((len(grid.files), int(first.Rows), int(first.Columns)), np.float32)
    for k, path in enumerate(grid.files):
        try:
            dataset = pydicom.dcmread(path)
            pixels = dataset.pixel_array
        except Exception as error:
            raise CaseError(f"{label}: cannot decode the pixels of {path.name}: {error}") \
                from None
        slope = float(dataset.get("RescaleSlope", 1) or 1)
        intercept = float(dataset.get("RescaleIntercept", 0) or 0)
        voxels[k] = pixels.astype(np.float64) * slope + intercept
    image = sitk.GetImageFromArray(voxels, isVector=False)
    grid.geometry.apply_to(image)
    orientation = grid.orientation
    if orientation != MODEL_ORIENTATION:
        image = sitk.DICOMOrient(image, MODEL_ORIENTATION)
    return Volume(voxels=sitk.GetArrayFromImage(image), geometry=Geometry.of(image),
                  source_orientation=orientation)


def series_stamp(files: tuple[Path, ...]) -> tuple[int, float]:
    """Total size and latest modification time of a series' files: a file replaced, added
    or removed changes it, so resume redoes the case."""
    stats = [path.stat() for path in files]
    return sum(s.st_size for s in stats), max(s.st_mtime for s in stats)
