"""A model that declares its spacing: labels on the input's LPI grid equal an independent
SimpleITK resample-run-resample reference; the back-resampling streams slab by slab."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itk_infer.cli import main
from itk_infer.engine import Sink, Slab
from itk_infer.imageio import read_volume
from itk_infer.resample import BackToInputGrid, grid_spacing, model_grid_shape
from tests.conftest import LPI, RAS, write_volume
from tests.models import default_metadata, pointwise_logits, write_pointwise_model

MODEL_SPACING = (1.5, 1.5, 1.5)


def phantom(shape, spacing_zyx) -> np.ndarray:
    """A sphere and a box with known physical extents, intensities in the model's window."""
    z, y, x = (np.arange(n) * s for n, s in zip(shape, spacing_zyx, strict=True))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    out = np.full(shape, -0.9, np.float32)
    centre = [n * s / 2 for n, s in zip(shape, spacing_zyx, strict=True)]
    sphere = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 < 12.0 ** 2
    out[sphere] = 0.9
    box = (abs(zz - centre[0]) < 6) & (abs(yy - 8) < 5) & (abs(xx - 10) < 7)
    out[box] = 0.0
    return out


def reference_labels(image: sitk.Image) -> np.ndarray:
    """Resample the windowed LPI image to the model's spacing, run the pointwise model, and
    resample every class's logits back (all SimpleITK, linear), then argmax."""
    lpi = sitk.DICOMOrient(image, "LPI")
    windowed = sitk.Cast((sitk.Clamp(lpi, sitk.sitkFloat32, -1.0, 1.0) + 1.0) / 2.0,
                         sitk.sitkFloat32)
    size = [max(1, round(n * s / m)) for n, s, m in
            zip(lpi.GetSize(), lpi.GetSpacing(), MODEL_SPACING, strict=True)]
    # The documented model grid: that many voxels, first and last on the input's.
    spacing = [(n - 1) * s / (k - 1) for n, s, k in
               zip(lpi.GetSize(), lpi.GetSpacing(), size, strict=True)]
    coarse = sitk.Resample(windowed, size, sitk.Transform(), sitk.sitkLinear, lpi.GetOrigin(),
                           spacing, lpi.GetDirection(), 0.0, sitk.sitkFloat32,
                           True)  # nearest-neighbour extrapolation past the last voxel
    logits = pointwise_logits(sitk.GetArrayFromImage(coarse), 3)
    back = []
    for plane in logits:
        class_image = sitk.GetImageFromArray(plane)
        class_image.CopyInformation(coarse)
        back.append(sitk.GetArrayFromImage(sitk.Resample(
            class_image, lpi, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32,
            True)))
    return np.argmax(np.stack(back), axis=0)


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    a, b = a == label, b == label
    return 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize("direction", [LPI, RAS])
@pytest.mark.parametrize("spacing_xyz", [(0.7, 0.8, 2.0), (2.5, 1.1, 0.9)])
def test_model_spacing_labels_match_the_reference(tmp_path, direction, spacing_xyz):
    metadata = {**default_metadata(patch=(8, 16, 16), stride=(4, 8, 8)),
                "spacing": json.dumps(list(MODEL_SPACING))}
    model = write_pointwise_model(tmp_path / "m.onnx", 3, metadata=metadata)
    shape = (30, 44, 50)
    inp = tmp_path / "in"
    inp.mkdir()
    write_volume(inp / "p.nii.gz", phantom(shape, tuple(reversed(spacing_xyz))),
                 direction=direction, spacing=spacing_xyz)
    out = tmp_path / "out"
    assert main(["-i", str(inp), "-o", str(out), "--onnx", str(model), "--device", "cpu",
                 "--no-progress", "--save-logits"]) == 0
    got = read_volume(out / "p.nii.gz")
    source = read_volume(inp / "p.nii.gz")
    assert got.voxels.shape == source.voxels.shape
    np.testing.assert_allclose(got.geometry.origin_mm, source.geometry.origin_mm, atol=1e-4)
    np.testing.assert_allclose(got.geometry.spacing_mm, source.geometry.spacing_mm, atol=1e-6)
    expected = reference_labels(sitk.ReadImage(str(inp / "p.nii.gz")))
    for label in (0, 1, 2):
        assert dice(got.voxels, expected, label) > 0.99, label
    record = json.loads((out / ".itk_infer" / "p.json").read_text())
    assert record["settings"]["spacing"] == list(MODEL_SPACING)
    import zarr

    logits = zarr.open_array(str(out / "p.zarr"), mode="r")
    assert logits.shape[1:] == shape
    np.testing.assert_allclose(logits.attrs["model_spacing_zyx"], MODEL_SPACING, rtol=0.05)


class Collect(Sink):
    def begin(self, num_classes, shape_zyx):
        self.logits = np.zeros((num_classes, *shape_zyx), np.float32)
        self.slabs = 0

    def consume(self, slab: Slab) -> None:
        self.slabs += 1
        dz = slab.logits.shape[1]
        self.logits[:, slab.z_start : slab.z_start + dz] = slab.logits.numpy()


def test_back_resampling_streams_and_equals_trilinear_interpolation():
    """Fed in uneven slabs, the sink's output equals a direct trilinear interpolation."""
    rng = np.random.default_rng(2)
    target, spacing, wanted = (17, 12, 30), (0.6, 1.1, 0.5), (1.5, 1.4, 1.3)
    model_spacing = grid_spacing(target, spacing, wanted)
    coarse = rng.normal(size=(2, *model_grid_shape(target, spacing, wanted))).astype(np.float32)
    assert coarse.shape[1] == 7  # fed below in four uneven slabs
    sink = Collect()
    back = BackToInputGrid([sink], target, spacing, model_spacing)
    back.begin(2, coarse.shape[1:])
    for start, stop in ((0, 1), (1, 4), (4, 5), (5, 7)):
        part = torch.from_numpy(coarse[:, start:stop].copy())
        back.consume(Slab(start, part, part.argmax(0).to(torch.uint8)))
    assert sink.slabs >= 3  # emitted as slices became ready, not at the end
    expected = np.zeros_like(sink.logits)
    for index in np.ndindex(*target):
        u = [min(i * s / m, n - 1) for i, s, m, n in
             zip(index, spacing, model_spacing, coarse.shape[1:], strict=True)]
        lo = [int(np.floor(v)) for v in u]
        value = 0.0
        for corner in np.ndindex(2, 2, 2):
            idx = [min(lo[k] + corner[k], coarse.shape[k + 1] - 1) for k in range(3)]
            w = np.prod([(u[k] - lo[k]) if corner[k] else (1 - (u[k] - lo[k]))
                         for k in range(3)])
            value = value + w * coarse[(slice(None), *idx)]
        expected[(slice(None), *index)] = value
    np.testing.assert_allclose(sink.logits, expected, rtol=1e-5, atol=1e-5)
