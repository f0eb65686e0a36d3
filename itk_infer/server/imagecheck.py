"""What an uploaded file may be, checked before ITK reads it.

Only single-file formats are accepted, and only when the file holds its own voxels: a
MetaImage header or an NRRD header can name another file to read the voxels from (any path
on the server), and a NIfTI ``ni1`` header belongs with a separate ``.img``. Such uploads are
refused, so no request can make the server read a file it did not receive. Then SimpleITK
reads the header with the format's own reader: a 3-D scalar image within the voxel cap.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from pathlib import Path

# Longest first: "a.nii.gz" is not a ".gz" file.
SUFFIXES = (".nii.gz", ".nrrd", ".mha", ".nii")
IMAGE_IO = {".nii.gz": "NiftiImageIO", ".nii": "NiftiImageIO", ".nrrd": "NrrdImageIO",
            ".mha": "MetaImageIO"}
HEADER_LIMIT = 1 << 16  # text headers longer than this are refused
NIFTI1_MAGIC = b"n+1\0"
NIFTI2_MAGIC = b"n+2\0\r\n\x1a\n"


class BadUpload(Exception):
    """An upload the server refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def suffix_of(filename: str) -> str | None:
    """The allowlisted extension of a client's file name (any folders in it ignored), or
    ``None``.

    Examples:
        >>> suffix_of("C:\\\\scans\\\\CT.NII.GZ"), suffix_of("x.mhd"), suffix_of(".nrrd")
        ('.nii.gz', None, None)
    """
    base = re.split(r"[\\/]", filename)[-1].lower()
    for suffix in SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            return suffix
    return None


def check_upload(path: Path, suffix: str, max_voxels: int) -> tuple[int, ...]:
    """Check a received file; returns its size (x, y, z).

    Raises:
        BadUpload: a detached or foreign header (400), not a readable 3-D scalar image
            (400), or more voxels than ``max_voxels`` (413).
    """
    _check_self_contained(path, suffix)
    return _check_with_itk(path, suffix, max_voxels)


def _check_self_contained(path: Path, suffix: str) -> None:
    if suffix == ".mha":
        fields = _text_header(path, "MetaImage")
        if fields.get("elementdatafile", "").strip().upper() != "LOCAL":
            raise BadUpload(400, "the MetaImage header must keep its voxels in the file "
                                 "(ElementDataFile = LOCAL)")
    elif suffix == ".nrrd":
        with open(path, "rb") as handle:
            if not handle.read(7) == b"NRRD000":
                raise BadUpload(400, "not an NRRD file (no NRRD magic)")
        fields = _text_header(path, "NRRD")
        if "datafile" in fields:
            raise BadUpload(400, "the NRRD header must keep its voxels in the file (no "
                                 "'data file' field)")
    else:
        _check_nifti_magic(path, suffix)


def _text_header(path: Path, what: str) -> dict[str, str]:
    """``key → value`` of a text header's lines (keys lower case, spaces removed), up to
    its end: NRRD's blank line (after the magic line), MetaImage's ElementDataFile line."""
    nrrd = what == "NRRD"
    sep = ":" if nrrd else "="
    with open(path, "rb") as handle:
        head = handle.read(HEADER_LIMIT)
    fields: dict[str, str] = {}
    for raw in head.split(b"\n")[1 if nrrd else 0 :]:
        line = raw.decode("latin-1").rstrip("\r")
        if line.startswith("#"):
            continue
        if not line.strip() or sep not in line:
            return fields
        key, _, value = line.partition(sep)
        key = key.strip().lower().replace(" ", "")
        fields[key] = value
        if not nrrd and key == "elementdatafile":
            return fields
    raise BadUpload(400, f"the {what} header is missing its end or longer than "
                         f"{HEADER_LIMIT} bytes")


def _check_nifti_magic(path: Path, suffix: str) -> None:
    try:
        if suffix == ".nii.gz":
            with gzip.open(path, "rb") as handle:
                head = handle.read(544)
        else:
            with open(path, "rb") as handle:
                head = handle.read(544)
    except (OSError, EOFError, zlib.error):
        raise BadUpload(400, "not gzip data (a .nii.gz must be gzip-compressed)") from None
    if head[344:348] != NIFTI1_MAGIC and head[4:12] != NIFTI2_MAGIC:
        raise BadUpload(400, "not a single-file NIfTI image (no n+1/n+2 magic)")


def _check_with_itk(path: Path, suffix: str, max_voxels: int) -> tuple[int, ...]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO(IMAGE_IO[suffix])  # the format's own reader, whatever the bytes say
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise BadUpload(400, f"not a readable {suffix} image") from None
    size = tuple(int(v) for v in reader.GetSize())
    if reader.GetDimension() != 3:
        raise BadUpload(400, f"the image is {reader.GetDimension()}-D; a 3-D volume is "
                             "required")
    if reader.GetNumberOfComponents() != 1:
        raise BadUpload(400, "the image has several components per voxel; a scalar volume "
                             "is required")
    if math.prod(size) > max_voxels:
        raise BadUpload(413, f"the image has {math.prod(size):,} voxels; this server takes "
                             f"at most {max_voxels:,}")
    return size
