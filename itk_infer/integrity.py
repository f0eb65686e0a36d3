"""Is an input file whole? Checked before it is read, because SimpleITK reads the missing
part of a truncated NIfTI as zeros, and would have it segmented and marked done.

* ``.nii.gz`` (and any gzip file): the whole stream is decompressed, which checks its CRC-32
  and length trailer; the decompressed size must hold the header's voxels.
* ``.nii``: the file must hold ``vox_offset + voxels x bytes per voxel`` (NIfTI-1 and -2).
* ``.mha``: the data after the text header must hold the voxels, or, when compressed, the
  header's ``CompressedDataSize`` bytes forming one complete zlib stream (its Adler-32 is
  checked) that inflates to the voxels.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from itk_infer.errors import CaseError

CHUNK = 1 << 20
# MetaImage element types → bytes per component.
MET_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
    "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4, "MET_DOUBLE": 8,
}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 10_000_000 else f"{n:,} bytes"


def check_input(path: Path) -> None:
    """Raise :class:`CaseError` naming ``path`` and what is wrong if it is damaged."""
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            data_size, head = _gunzip_size(path)
            if name.endswith(".nii.gz"):
                _check_nifti_size(path, head, data_size)
        elif name.endswith(".nii"):
            with open(path, "rb") as handle:
                head = handle.read(544)
            _check_nifti_size(path, head, path.stat().st_size)
        elif name.endswith(".mha"):
            _check_metaimage(path)
    except OSError as error:
        raise CaseError(f"{path.name}: cannot read: {error.strerror or error}") from None


def _gunzip_size(path: Path) -> tuple[int, bytes]:
    """Decompress every member of a gzip file to its end; returns the size and the first
    bytes. zlib checks each member's CRC-32 and length."""
    size, head = 0, b""
    inflater, in_member = zlib.decompressobj(wbits=31), False
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            while chunk:
                in_member = True
                try:
                    out = inflater.decompress(chunk)
                except zlib.error as error:
                    if size == 0 and "header" in str(error):  # not a gzip file at all
                        raise CaseError(f"{path.name}: cannot read image: not gzip data "
                                        f"({error})") from None
                    raise CaseError(f"{path.name}: damaged gzip data: {error}") from None
                head += out[: max(0, 544 - len(head))]
                size += len(out)
                chunk = b""
                if inflater.eof:  # a member ended: its checksum matched; more may follow
                    chunk = inflater.unused_data.lstrip(b"\0")
                    inflater, in_member = zlib.decompressobj(wbits=31), False
    if in_member or size == 0:
        raise CaseError(f"{path.name}: truncated gzip stream (ends after {_mb(size)} of "
                        "data, before its checksum)")
    return size, head


def _check_nifti_size(path: Path, head: bytes, available: int) -> None:
    expected = _nifti_expected_size(head)
    if expected is not None and available < expected:
        raise CaseError(f"{path.name}: truncated: {_mb(available)} of {_mb(expected)}")


def _nifti_expected_size(head: bytes) -> int | None:
    """``vox_offset + voxels x bytes`` from a NIfTI-1 or -2 header, or ``None`` if ``head``
    is not one (then SimpleITK's own reader reports the problem)."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = max(348, int(struct.unpack(order + "f", head[108:112])[0]))
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            dims = struct.unpack(order + "8q", head[16:80])
            offset = max(540, struct.unpack(order + "q", head[168:176])[0])
            break
    else:
        return None
    rank = dims[0]
    if not 1 <= rank <= 7 or bitpix <= 0 or min(dims[1 : rank + 1]) < 1:
        return None
    voxels = int(np.prod([int(d) for d in dims[1 : rank + 1]], dtype=np.int64))
    return offset + voxels * bitpix // 8


def _metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """The ``key = value`` lines of a MetaImage header and the offset of its data."""
    fields: dict[str, str] = {}
    with open(path, "rb") as handle:
        offset = 0
        while line := handle.readline(4096):
            offset += len(line)
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                return fields, offset
    raise CaseError(f"{path.name}: truncated: the header has no ElementDataFile line")


def _check_metaimage(path: Path) -> None:
    fields, offset = _metaimage_header(path)
    if fields.get("ElementDataFile", "").upper() != "LOCAL":
        return  # data in another file: SimpleITK reports a missing one
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
        per_voxel = MET_SIZES[fields.get("ElementType", "")] * int(
            fields.get("ElementNumberOfChannels", "1"))
    except (ValueError, KeyError):
        return  # a header SimpleITK will refuse with its own message
    expected = int(np.prod(dims, dtype=np.int64)) * per_voxel
    available = path.stat().st_size - offset
    if fields.get("CompressedData", "").lower() != "true":
        if available < expected:
            raise CaseError(f"{path.name}: truncated: {_mb(available)} of {_mb(expected)} of "
                            "voxel data")
        return
    compressed = int(fields.get("CompressedDataSize", "0") or 0)
    if compressed and available < compressed:
        raise CaseError(f"{path.name}: truncated: {_mb(available)} of {_mb(compressed)} of "
                        "compressed voxel data")
    _check_zlib(path, offset, expected)


def _check_zlib(path: Path, offset: int, expected: int) -> None:
    inflater = zlib.decompressobj()
    size = 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        while (chunk := handle.read(CHUNK)) and not inflater.eof:
            try:
                size += len(inflater.decompress(chunk))
            except zlib.error as error:
                raise CaseError(f"{path.name}: damaged compressed data: {error}") from None
    if not inflater.eof or size < expected:
        raise CaseError(f"{path.name}: truncated compressed data ({_mb(size)} of "
                        f"{_mb(expected)} inflated)")
