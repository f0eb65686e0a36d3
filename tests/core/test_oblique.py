"""Oblique inputs: obliquity measured and recorded, a warning, and --resample-oblique putting
volumes tilted 44.9 and 45.1 degrees (whose nearest axis orders differ) onto axis-aligned LPI
grids that hold the same physical objects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import zarr

from itk_infer.cli import main
from itk_infer.imageio import obliquity_deg, resample_to_lpi
from tests.models import pointwise_logits

SHAPE = (22, 36, 40)  # Z, Y, X
SPACING = (1.0, 1.2, 1.5)  # x, y, z (anisotropic: the mapping to world axes matters)
BALL_MM, BALL_R = np.array([2.0, -3.0, 1.0]), 8.0
BOX_LOW, BOX_HIGH = np.array([-14.0, 2.0, -5.0]), np.array([-6.0, 10.0, 4.0])


def rotation_x(degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def phantom_classes(points: np.ndarray) -> np.ndarray:
    """Class of each physical point (..., 3): 2 in the ball, 1 in the box, else 0."""
    out = np.zeros(points.shape[:-1], np.uint8)
    out[np.all((points >= BOX_LOW) & (points <= BOX_HIGH), axis=-1)] = 1
    out[np.linalg.norm(points - BALL_MM, axis=-1) <= BALL_R] = 2
    return out


def voxel_points(image: sitk.Image) -> np.ndarray:
    """Physical centre of every voxel, array order (Z, Y, X, 3)."""
    size = image.GetSize()
    zyx = np.stack(np.meshgrid(*(np.arange(n) for n in reversed(size)), indexing="ij"), -1)
    index = zyx[..., ::-1].astype(float)  # x, y, z
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return (index * image.GetSpacing()) @ direction.T + np.asarray(image.GetOrigin())


def write_phantom(path: Path, direction: np.ndarray) -> sitk.Image:
    """Intensity -1 outside, 0 in the box, 1 in the ball (window -1..1: classes 0, 1, 2),
    centred on the world origin."""
    image = sitk.Image([n for n in reversed(SHAPE)], sitk.sitkFloat32)
    image.SetSpacing(SPACING)
    image.SetDirection(tuple(direction.ravel()))
    half = np.asarray(SPACING) * (np.array(SHAPE[::-1]) - 1) / 2
    image.SetOrigin(tuple(-direction @ half))
    values = np.array([-1.0, 0.0, 1.0], np.float32)[phantom_classes(voxel_points(image))]
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))
    return out


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    """Dice of ``label`` (2: the ball) or, for 1, of the foreground (labels >= 1): linear
    interpolation puts a class-1 shell round the ball, so box and ball count together."""
    x, y = (a == 2, b == 2) if label == 2 else (a >= 1, b >= 1)
    return 2.0 * np.count_nonzero(x & y) / (np.count_nonzero(x) + np.count_nonzero(y))


def run(folder: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["-i", str(folder), "-o", str(out), "--onnx", str(model), "--device", "cpu",
                 "--no-progress", *extra])


def warned(capfd, name: str) -> bool:
    """The run's log (workers log through the parent's stderr) warned about ``name``."""
    return any(line.startswith(f"WARNING: {name}: axes") and "oblique" in line
               for line in capfd.readouterr().err.splitlines())


def record(out: Path, case: str) -> dict:
    return json.loads((out / ".itk_infer" / f"{case}.json").read_text())


@pytest.mark.parametrize("degrees", [0.0, 0.5, 10.0, 30.0, 44.9, 45.1, 60.0, 90.0, 135.0])
def test_obliquity_of_a_rotation_about_x(degrees):
    # Rotating about x tilts y and z by the angle to the nearest of the 4 in-plane axes.
    expected = abs((degrees + 45.0) % 90.0 - 45.0)
    direction = rotation_x(degrees) @ np.diag([1.0, 1.0, -1.0])
    assert obliquity_deg(tuple(direction.ravel())) == pytest.approx(expected, abs=1e-9)


def test_obliquity_of_random_rotations_by_brute_force():
    rng = np.random.default_rng(3)
    axes = np.concatenate([np.eye(3), -np.eye(3)])
    for _ in range(20):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        angles = np.degrees(np.arccos(np.clip(axes @ q, -1, 1)))  # (6 axes, 3 columns)
        assert obliquity_deg(tuple(q.ravel())) == pytest.approx(angles.min(axis=0).max(),
                                                               abs=1e-6)


@pytest.mark.parametrize("degrees", [44.9, 45.1])
def test_resampled_oblique_holds_the_same_objects(tmp_path, pointwise_model, degrees, capfd):
    inp = tmp_path / "in"
    inp.mkdir()
    source = write_phantom(inp / "p.nii.gz", rotation_x(degrees))
    assert run(inp, tmp_path / "out", pointwise_model, "--resample-oblique") == 0
    assert warned(capfd, "p.nii.gz")
    labels = sitk.ReadImage(str(tmp_path / "out" / "p.nii.gz"))
    np.testing.assert_allclose(labels.GetDirection(), (1, 0, 0, 0, 1, 0, 0, 0, -1), atol=1e-9)
    # The spacing of each input axis goes to the world axis nearest to it.
    y_to = "y" if degrees < 45 else "z"
    expected = {"x": 1.0, y_to: 1.2, ("z" if y_to == "y" else "y"): 1.5}
    np.testing.assert_allclose(labels.GetSpacing(), [expected[k] for k in "xyz"], atol=1e-6)
    # The grid covers the input: its 8 corner voxel centres lie inside it.
    for corner in np.ndindex(2, 2, 2):
        index = [c * (n - 1) for c, n in zip(corner, source.GetSize(), strict=True)]
        point = source.TransformIndexToPhysicalPoint(index)
        inside = labels.TransformPhysicalPointToContinuousIndex(point)
        assert all(-0.5 <= i <= n - 0.5 for i, n in zip(inside, labels.GetSize(), strict=True))
    # Independent reference: SimpleITK's linear resample of the input onto the written grid,
    # then the pointwise model in numpy.
    reference = sitk.Resample(source, labels, sitk.Transform(), sitk.sitkLinear, -1.0,
                              sitk.sitkFloat32)
    windowed = (np.clip(sitk.GetArrayFromImage(reference), -1, 1) + 1) / 2
    expected_labels = pointwise_logits(windowed, 3).argmax(axis=0)
    got = sitk.GetArrayFromImage(labels)
    assert np.count_nonzero(got != expected_labels) <= 1e-4 * got.size
    # Physical truth: the analytic objects at the written voxel centres.
    truth = phantom_classes(voxel_points(labels))
    for label in (1, 2):
        assert dice(got, truth, label) >= 0.93
    rec = record(tmp_path / "out", "p")
    assert rec["grid"] == "lpi-resampled"
    assert rec["obliquity_deg"] == pytest.approx(44.9, abs=1e-4)  # nii: float32


def test_44_9_and_45_1_agree_in_physical_space(tmp_path, pointwise_model):
    outputs = []
    for degrees in (44.9, 45.1):
        inp = tmp_path / f"in{degrees}"
        inp.mkdir()
        write_phantom(inp / "p.mha", rotation_x(degrees))
        assert run(inp, tmp_path / f"out{degrees}", pointwise_model, "--resample-oblique") == 0
        outputs.append(sitk.ReadImage(str(tmp_path / f"out{degrees}" / "p.mha")))
    # The 45.1 map looked up (nearest) at the voxel centres of the 44.9 map.
    moved = sitk.Resample(outputs[1], outputs[0], sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    a, b = sitk.GetArrayFromImage(outputs[0]), sitk.GetArrayFromImage(moved)
    for label in (1, 2):
        assert dice(a, b, label) >= 0.9


def test_default_keeps_the_tilt_and_records_it(tmp_path, pointwise_model, capfd):
    inp = tmp_path / "in"
    inp.mkdir()
    write_phantom(inp / "a.mha", rotation_x(44.9))
    write_phantom(inp / "b.mha", rotation_x(0.5))  # below the 1 degree default: no warning
    assert run(inp, tmp_path / "out", pointwise_model) == 0
    err = capfd.readouterr().err
    assert "WARNING: a.mha: axes 44.90 deg oblique" in err
    assert "b.mha: axes" not in err
    written = sitk.ReadImage(str(tmp_path / "out" / "a.mha"))
    assert obliquity_deg(written.GetDirection()) == pytest.approx(44.9, abs=1e-6)
    assert record(tmp_path / "out", "a")["grid"] == "lpi"
    assert record(tmp_path / "out", "b")["obliquity_deg"] == pytest.approx(0.5, abs=1e-6)
    # A lower threshold warns about b as well.
    assert run(inp, tmp_path / "out2", pointwise_model, "--oblique-warn-deg", "0.1") == 0
    assert warned(capfd, "b.mha")


def test_resampled_output_space_input(tmp_path, pointwise_model):
    """Labels of a resampled oblique input go back to its grid through the logits."""
    inp = tmp_path / "in"
    inp.mkdir()
    source = write_phantom(inp / "p.nii.gz", rotation_x(30.0))
    out = tmp_path / "out"
    assert run(inp, out, pointwise_model, "--resample-oblique", "--output-space", "input",
               "--save-logits") == 0
    labels = sitk.ReadImage(str(out / "p.nii.gz"))
    assert labels.GetSize() == source.GetSize()
    np.testing.assert_allclose(labels.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(labels.GetOrigin(), source.GetOrigin(), atol=1e-4)
    got = sitk.GetArrayFromImage(labels)
    direct = pointwise_logits((sitk.GetArrayFromImage(source) + 1) / 2, 3).argmax(axis=0)
    # Twice interpolated (to LPI and back), the 0.75 threshold of class 2 erodes the ball.
    assert dice(got, direct, 1) >= 0.95
    assert dice(got, direct, 2) >= 0.9
    array = zarr.open_array(str(out / "p.zarr"), mode="r")
    assert array.shape == (3, *got.shape)
    assert array.attrs["grid"] == "input"
    np.testing.assert_allclose(array.attrs["direction"], source.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(array[:]).argmax(axis=0), got)
    # The pointwise logits are linear in the intensity, so resampling them equals the model
    # on the intensities resampled to the LPI grid and back (float16 storage: 0.02).
    there = resample_to_lpi(source)
    back = sitk.Resample(there, source, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    expected = pointwise_logits((sitk.GetArrayFromImage(back) + 1) / 2, 3)
    np.testing.assert_allclose(np.asarray(array[:], np.float32), expected, atol=0.02)
    assert record(out, "p")["grid"] == "input"
