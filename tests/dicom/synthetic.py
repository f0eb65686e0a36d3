"""Synthetic CT series written as DICOM files by the tests (pydicom), with their exact
geometry, so each test knows the answer independently of the reader under test."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))  # row, column cosines; normal +z (superior)
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))  # normal -x
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))  # normal +y
_C, _S = float(np.cos(np.radians(20))), float(np.sin(np.radians(20)))
OBLIQUE = ((_C, _S, 0.0), (-_S, _C, 0.0))  # axial, rotated 20 degrees about z

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Series:
    """A written series: its files in slice order (along the normal) and its true grid."""

    files: list[Path]
    hu: np.ndarray  # (Z, Y, X) in slice order: Z along the normal, Y rows, X columns
    spacing: tuple[float, float, float]  # x (columns), y (rows), z (slices)
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # row-major 3x3, columns: row cosine, column cosine, normal
    uid: str
    sop_uids: list[str]

    def image(self) -> sitk.Image:
        """The same voxels and geometry as a SimpleITK image (for the NIfTI twin)."""
        image = sitk.GetImageFromArray(self.hu.astype(np.float32))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def phantom(shape: tuple[int, int, int], values: Sequence[float] = (-1000.0, 0.0, 120.0, 400.0),
            slope: float = 2.0, intercept: float = -1024.0) -> np.ndarray:
    """Nested ellipsoids of HU ``values`` (outside to inside), off-centre so that any flip or
    transpose of the axes changes the picture; each value is slope * integer + intercept."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(((z - 0.2) / 0.9) ** 2 + ((y + 0.15) / 0.8) ** 2 + ((x - 0.25) / 0.7) ** 2)
    hu = np.full(shape, values[0])
    for k, value in enumerate(values[1:], start=1):
        hu[r < 1.0 - 0.3 * (k - 1)] = value
    hu += slope * (np.arange(shape[2]) % 3)[None, None, :]  # stored values: varied integers
    return hu


# long: one flat list of the DICOM attributes a CT slice carries
def write_series(folder: Path, hu: np.ndarray, *, cosines=AXIAL,
                 spacing: tuple[float, float, float] = (0.7, 0.8, 2.5),
                 origin: tuple[float, float, float] = (-30.0, -40.0, 100.0),
                 slope: float = 2.0, intercept: float = -1024.0,
                 positions: np.ndarray | None = None, seed: int = 0,
                 study_uid: str | None = None) -> Series:
    """Write ``hu`` (Z, Y, X) as one CT series in ``folder``, one file per slice, under
    shuffled file names and reversed instance numbers (the reader must sort by position).

    ``positions``: ImagePositionPatient per slice instead of the regular grid (uneven or
    tilted stacks).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.array(cosines[0]), np.array(cosines[1])
    normal = np.cross(row, col)
    if positions is None:
        positions = np.array(origin)[None] + np.arange(hu.shape[0])[:, None] * spacing[2] \
            * normal[None]
    study = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    names = rng.permutation(len(hu))
    files, sops = [], []
    stored_all = np.rint((hu - intercept) / slope)
    assert np.array_equal(stored_all * slope + intercept, hu), "HU not on the stored grid"
    for k, plane in enumerate(stored_all):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.Modality, ds.Manufacturer = "CT", "tests"
        ds.PatientName, ds.PatientID = "Phantom^Test", "PHANTOM01"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.SeriesNumber, ds.InstanceNumber = 3, len(hu) - k
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP, ds.AcquisitionNumber, ds.PatientPosition = "120", 1, "HFS"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # rows, columns
        ds.SliceThickness = f"{spacing[2] * 2:g}"  # deliberately not the spacing
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{intercept:g}", \
            f"{slope:g}", "HU"
        ds.PixelData = plane.astype("<i2").tobytes()
        path = folder / f"IM{seed}_{names[k]:04d}"  # seed: several series per folder
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
        sops.append(sop)
    direction = tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel())
    return Series(files, hu, spacing, tuple(float(v) for v in positions[0]), direction,
                  series_uid, sops)
