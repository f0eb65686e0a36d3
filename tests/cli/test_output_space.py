"""--output-space input: label maps voxel-aligned with the input file, equal in physical space
to the default LPI label maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from itk_infer.cli import main
from tests.conftest import LPI, RAS, write_volume
from tests.models import pointwise_logits

OBLIQUE = tuple(
    sitk.VersorRigid3DTransform((0.2, 0.1, 0.05, float(np.sqrt(1 - 0.0525)))).GetMatrix()
)
PIR = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # axes permuted and flipped


@pytest.mark.parametrize("direction", [LPI, RAS, PIR, OBLIQUE])
@pytest.mark.parametrize("suffix", [".mha", ".nii.gz"])
def test_input_space_matches_the_input_grid_and_the_lpi_labels(tmp_path, pointwise_model,
                                                              direction, suffix):
    inp = tmp_path / "in"
    inp.mkdir()
    volume = np.random.default_rng(4).uniform(-1.2, 1.2, (9, 13, 17)).astype(np.float32)
    write_volume(inp / f"v{suffix}", volume, direction=direction)
    base = ["-i", str(inp), "--onnx", str(pointwise_model), "--device", "cpu", "--no-progress"]
    assert main([*base, "-o", str(tmp_path / "lpi")]) == 0
    assert main([*base, "-o", str(tmp_path / "input"), "--output-space", "input"]) == 0
    source = sitk.ReadImage(str(inp / f"v{suffix}"))
    native = sitk.ReadImage(str(tmp_path / "input" / f"v{suffix}"))
    lpi = sitk.ReadImage(str(tmp_path / "lpi" / f"v{suffix}"))
    assert native.GetSize() == source.GetSize()
    np.testing.assert_allclose(native.GetSpacing(), source.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(native.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(native.GetDirection(), source.GetDirection(), atol=1e-6)
    # Same label at the same physical point: every voxel centre of the input's grid.
    labels_native = sitk.GetArrayFromImage(native)
    labels_lpi = sitk.GetArrayFromImage(lpi)
    for index in np.ndindex(*reversed(source.GetSize())):
        point = source.TransformIndexToPhysicalPoint(tuple(int(i) for i in reversed(index)))
        where = lpi.TransformPhysicalPointToIndex(point)
        assert labels_native[index] == labels_lpi[tuple(reversed(where))]
    # The pointwise model's labels depend on each voxel alone: on the input's own grid they
    # are its function of the input array, with no reorientation at all.
    windowed = (np.clip(volume, -1.0, 1.0) + 1.0) / 2.0  # wl 0, ww 2
    np.testing.assert_array_equal(labels_native, pointwise_logits(windowed, 3).argmax(axis=0))


@pytest.mark.parametrize("direction", [LPI, RAS, PIR, OBLIQUE])
def test_input_space_logits_are_voxel_aligned_with_the_input(tmp_path, pointwise_model,
                                                             direction):
    import zarr

    inp = tmp_path / "in"
    inp.mkdir()
    volume = np.random.default_rng(5).uniform(-1.2, 1.2, (9, 13, 17)).astype(np.float32)
    write_volume(inp / "v.nii.gz", volume, direction=direction)
    out = tmp_path / "out"
    assert main(["-i", str(inp), "--onnx", str(pointwise_model), "--device", "cpu",
                 "--no-progress", "-o", str(out), "--output-space", "input",
                 "--save-logits"]) == 0
    source = sitk.ReadImage(str(inp / "v.nii.gz"))
    array = zarr.open_array(str(out / "v.zarr"), mode="r")
    logits = np.asarray(array[:], dtype=np.float32)
    assert logits.shape == (3, *volume.shape)  # the input file's array order
    np.testing.assert_allclose(array.attrs["spacing_mm"], source.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(array.attrs["origin_mm"], source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(array.attrs["direction"], source.GetDirection(), atol=1e-6)
    # The pointwise model on the input's own array, no reorientation (float16: 0.02).
    windowed = (np.clip(volume, -1.0, 1.0) + 1.0) / 2.0
    np.testing.assert_allclose(logits, pointwise_logits(windowed, 3), atol=0.02)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "v.nii.gz")))
    np.testing.assert_array_equal(logits.argmax(axis=0), labels)
    record = json.loads((out / ".itk_infer" / "v.json").read_text())
    assert record["grid"] == array.attrs["grid"] == "input"


def _anonymous_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_held_logits_live_in_unnamed_files_not_in_process_memory(tmp_path):
    """What --output-space input holds (C x N float16, twice) is mapped from unnamed files of
    the output folder: filling 128 MiB of it grows the process's anonymous memory by far less,
    where the same volume in memory grows it by all of it; no file is left behind."""
    from itk_infer.inputspace import file_backed

    shape = (4, 64, 512, 512)  # 128 MiB of float16
    before = _anonymous_mib()
    held = file_backed(shape, tmp_path)
    held.fill_(1.5)
    spilled = _anonymous_mib() - before
    assert bool((held[:, ::7, ::61, ::59] == 1.5).all()) and float(held[3, 63, 511, 511]) == 1.5
    in_memory = file_backed(shape, None)
    in_memory.fill_(1.5)
    resident = _anonymous_mib() - before - spilled
    assert spilled < 16 and resident > 120, (spilled, resident)
    assert list(tmp_path.iterdir()) == []
