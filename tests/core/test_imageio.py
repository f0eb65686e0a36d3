"""Reading, LPI reorientation and atomic label-map writing (SimpleITK round trips)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from itk_infer.errors import CaseError
from itk_infer.imageio import read_volume, write_label_map
from tests.conftest import LPI, RAS, write_volume

OBLIQUE = tuple(
    sitk.VersorRigid3DTransform((0.2, 0.1, 0.05, float(np.sqrt(1 - 0.0525)))).GetMatrix()
)


def physical_values(image: sitk.Image, points) -> list[float]:
    return [image.GetPixel(image.TransformPhysicalPointToIndex(p)) for p in points]


@pytest.mark.parametrize("direction", [LPI, RAS, OBLIQUE])
@pytest.mark.parametrize("suffix", [".mha", ".nii.gz", ".nii"])
def test_read_reorients_to_lpi_keeping_physical_content(tmp_path, direction, suffix):
    rng = np.random.default_rng(1)
    array = rng.integers(-1000, 1000, size=(6, 7, 8)).astype(np.int16)
    path = write_volume(tmp_path / f"img{suffix}", array, direction=direction)
    original = sitk.ReadImage(str(path))
    volume = read_volume(path)
    expected = sitk.DICOMOrient(original, "LPI")
    assert volume.voxels.dtype == np.int16, "no cast of the input"
    np.testing.assert_array_equal(volume.voxels, sitk.GetArrayFromImage(expected))
    np.testing.assert_allclose(volume.geometry.direction, expected.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(volume.geometry.origin_mm, expected.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.geometry.spacing_mm, expected.GetSpacing(), atol=1e-6)
    lpi = sitk.GetImageFromArray(volume.voxels)
    volume.geometry.apply_to(lpi)
    # The same physical point holds the same value before and after reorientation.
    idx = [(int(i), int(j), int(k)) for i, j, k in rng.integers(0, (8, 7, 6), size=(20, 3))]
    points = [original.TransformIndexToPhysicalPoint(i) for i in idx]
    assert physical_values(lpi, points) == physical_values(original, points)
    if direction in (LPI, RAS):
        assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            volume.geometry.direction) == "LPI"


def test_write_label_map_keeps_geometry_and_leaves_no_temporary(tmp_path):
    labels = np.random.default_rng(0).integers(0, 4, size=(5, 6, 7)).astype(np.uint8)
    volume = read_volume(write_volume(tmp_path / "in.nii.gz", labels.astype(np.int16),
                                      direction=RAS))
    out = tmp_path / "out" / "seg.nii.gz"
    out.parent.mkdir()
    size = write_label_map(volume.voxels.astype(np.uint8), volume.geometry, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["seg.nii.gz"]
    assert size == out.stat().st_size
    back = sitk.ReadImage(str(out))
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), volume.voxels)
    np.testing.assert_allclose(back.GetDirection(), volume.geometry.direction, atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), volume.geometry.origin_mm, atol=1e-4)


def test_bad_images_give_clear_case_errors(tmp_path):
    sitk.WriteImage(sitk.Image([9, 8], sitk.sitkInt16), str(tmp_path / "flat.mha"))
    with pytest.raises(CaseError, match=r"flat.mha: image is 2-D"):
        read_volume(tmp_path / "flat.mha")
    sitk.WriteImage(sitk.Image([4, 5, 6, 2], sitk.sitkInt16), str(tmp_path / "time.nii.gz"))
    with pytest.raises(CaseError, match=r"time.nii.gz: image is 4-D"):
        read_volume(tmp_path / "time.nii.gz")
    rgb = sitk.Image([4, 5, 6], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(CaseError, match=r"rgb.mha: image has 3 components"):
        read_volume(tmp_path / "rgb.mha")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CaseError, match=r"broken.nii.gz: cannot read image"):
        read_volume(tmp_path / "broken.nii.gz")
    truncated = write_volume(tmp_path / "cut.mha", np.ones((8, 8, 8), np.int16))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(CaseError, match=r"cut.mha: cannot read image"):
        read_volume(truncated)

