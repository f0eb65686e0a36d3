"""Write a case's label map as a DICOM Segmentation (``<case>.seg.dcm``) with highdicom.

The label map is put back on the source series' own grid (the LPI map with its axes permuted
and flipped back, never resampled), so frame k of the SEG lies on source slice k: same frame of
reference, same plane positions, references to every source instance. One BINARY segment per
foreground label of the model, numbered by the label value and named by the model's label
names (``label_<v>`` where it has none). Empty frames are left out. A label with no voxel
stays listed as its segment, with no frame, so segment numbers and names are the same in every
SEG of one model; a case with no foreground at all keeps every frame (a SEG needs one frame).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from itk_infer import __version__
from itk_infer.atomic import atomic_output
from itk_infer.backends.base import display_names
from itk_infer.dicom.series import series_grid
from itk_infer.imageio import Geometry

SEGMENT_LABEL_MAX = 64  # SegmentLabel is LO
SERIES_NUMBER = 9900  # high, so viewers list the SEG after the series it segments


def segment_names(labels: Mapping[str, int] | None, num_classes: int) -> dict[int, str]:
    """Segment number → name for labels 1..C-1 (label 1 for a one-channel model): the model's
    names (a mapping name → value, as ``ModelDefaults.labels``), else ``label_<v>``."""
    names = display_names(labels, range(1, max(num_classes - 1, 1) + 1))
    return {v: (name or f"label_{v}")[:SEGMENT_LABEL_MAX] for v, name in names.items()}


def on_source_grid(labels: np.ndarray, geometry: Geometry, files: tuple[Path, ...],
                   label: str) -> tuple[np.ndarray, list[Any]]:
    """The LPI label map as frames of the source slices, and their headers in that order."""
    grid = series_grid(files, label)
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels), isVector=False)
    geometry.apply_to(image)
    image = sitk.DICOMOrient(image, grid.orientation)
    frames = sitk.GetArrayFromImage(image)
    first = grid.headers[0]
    expected = (len(grid.files), int(first.Rows), int(first.Columns))
    if frames.shape != expected or not np.allclose(image.GetOrigin(), grid.geometry.origin_mm,
                                                   atol=1e-3):
        # The map was made from this series: anything else means the series changed since.
        raise RuntimeError(f"{label}: the label map {frames.shape} does not lie on the source "
                           f"grid {expected}; was the series modified during the run?")
    return frames, grid.headers


def _descriptions(names: dict[int, str], fingerprint: str) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="itk_infer", family=codes.DCM.ArtificialIntelligence, version=__version__,
        parameters={"model_fingerprint": fingerprint})
    return [hd.seg.SegmentDescription(
        segment_number=number, segment_label=name,
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    ) for number, name in sorted(names.items())]


def write_seg(labels: np.ndarray, geometry: Geometry, files: tuple[Path, ...], path: Path, *,
              names: dict[int, str], fingerprint: str, label: str) -> int:
    """Write the (Z, Y, X) LPI label map on ``geometry`` as a DICOM-SEG of the series made of
    ``files``, atomically; returns the file's size.

    Args:
        names: segment number (label value) → segment label, from :func:`segment_names`.
        fingerprint: the model's fingerprint, stored in the algorithm identification.
        label: the case's name, for messages.
    """
    import highdicom as hd

    frames, headers = on_source_grid(labels, geometry, files, label)
    top = max(names)
    frames = np.where(frames <= top, frames, 0).astype(np.uint8 if top < 256 else np.uint16)
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(names, fingerprint),
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="itk_infer",
        manufacturer_model_name="itk_infer",
        software_versions=__version__,
        device_serial_number=fingerprint,
        content_label="ITK_INFER",
        content_description="itk_infer segmentation",
        series_description=f"{label} segmentation"[:64],
        omit_empty_frames=True,
    )
    with atomic_output(path) as tmp:
        seg.save_as(tmp)
        size = tmp.stat().st_size
    return size
