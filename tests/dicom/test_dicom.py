"""DICOM series in, DICOM-SEG out: reading and its refusals, discovery, and SEGs that equal the
NIfTI path's labels in physical space and pass dciodvfy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from itk_infer.cases import discover_cases  # noqa: E402
from itk_infer.cli import main  # noqa: E402
from itk_infer.dicom.seg import segment_names, write_seg  # noqa: E402
from itk_infer.dicom.series import read_series  # noqa: E402
from itk_infer.errors import CaseError  # noqa: E402
from itk_infer.imageio import read_volume  # noqa: E402
from tests.dicom.synthetic import (  # noqa: E402
    AXIAL,
    CORONAL,
    OBLIQUE,
    SAGITTAL,
    phantom,
    write_series,
)
from tests.models import default_metadata, pointwise_logits, write_pointwise_model  # noqa: E402

ORIENTATIONS = {"axial": AXIAL, "sagittal": SAGITTAL, "coronal": CORONAL, "oblique": OBLIQUE}
SHAPE = (7, 11, 13)  # slices, rows, columns: all different, so a transpose cannot pass
WL, WW, CLASSES = 40.0, 400.0, 4


@pytest.fixture
def model(tmp_path):
    """4 classes, window 40/400: HU -1000 -> 0, 0 -> 1, 120 -> 2, 400 -> 3."""
    return write_pointwise_model(tmp_path / "m.onnx", CLASSES,
                                 metadata=default_metadata(wl=WL, ww=WW))


def expected_labels(hu: np.ndarray) -> np.ndarray:
    """The pointwise model's labels, computed here from the HU values alone."""
    windowed = (np.clip(hu, WL - WW / 2, WL + WW / 2) - (WL - WW / 2)) / WW
    return pointwise_logits(windowed.astype(np.float32), CLASSES).argmax(axis=0)


def run(inp, out, model, *extra) -> int:
    return main(["-i", str(inp), "-o", str(out), "--onnx", str(model), "--device", "cpu",
                 "--no-progress", *extra])


def seg_on_source_grid(path, series) -> np.ndarray:
    """The SEG's label map on the source slices, in slice order, read by highdicom."""
    seg = hd.seg.segread(path)
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=series.sop_uids, combine_segments=True,
        assert_missing_frames_are_empty=True)


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_reader_equals_the_same_volume_read_from_a_file(tmp_path, orientation):
    series = write_series(tmp_path / "s", phantom(SHAPE), cosines=ORIENTATIONS[orientation])
    sitk.WriteImage(series.image(), str(tmp_path / "twin.mha"))
    dicom = read_series(tuple(series.files), "s")
    twin = read_volume(tmp_path / "twin.mha")
    assert dicom.voxels.dtype == np.float32
    np.testing.assert_array_equal(dicom.voxels, twin.voxels)  # HU through slope/intercept
    assert dicom.source_orientation == twin.source_orientation
    np.testing.assert_allclose(dicom.geometry.spacing_mm, twin.geometry.spacing_mm, atol=1e-6)
    np.testing.assert_allclose(dicom.geometry.origin_mm, twin.geometry.origin_mm, atol=1e-5)
    np.testing.assert_allclose(dicom.geometry.direction, twin.geometry.direction, atol=1e-6)


def _positions(n, step, shift=0.0, missing=None):
    z = np.arange(n + (1 if missing is not None else 0)) * step
    if missing is not None:
        z = np.delete(z, missing)
    return np.stack([-30 + shift * np.arange(n), np.full(n, -40.0), 100 + z], axis=1)


@pytest.mark.parametrize("positions, reason", [
    (_positions(7, 2.5, missing=3), "uneven slice spacing"),
    (_positions(7, 2.5, shift=0.5), "gantry tilt"),
    (np.repeat(_positions(4, 2.5), [2, 2, 2, 1], axis=0), "same position"),
])
def test_irregular_stacks_are_refused_naming_the_series(tmp_path, positions, reason):
    series = write_series(tmp_path / "bad", phantom(SHAPE), positions=positions)
    with pytest.raises(CaseError, match=reason) as caught:
        read_series(tuple(series.files), "bad_series")
    assert str(caught.value).startswith("bad_series:")


def test_a_truncated_slice_fails_the_case_naming_the_file(tmp_path):
    series = write_series(tmp_path / "s", phantom(SHAPE))
    damaged = series.files[3]
    damaged.write_bytes(damaged.read_bytes()[:-100])  # pixel data cut short
    with pytest.raises(CaseError, match=f"s: cannot decode the pixels of {damaged.name}"):
        read_series(tuple(series.files), "s")


def test_discovery_names_series_by_folder_else_uid(tmp_path):
    inp = tmp_path / "in"
    single = write_series(inp / "ct_a", phantom(SHAPE))
    two = [write_series(inp / "mixed", phantom(SHAPE), seed=s) for s in (1, 2)]
    loose = write_series(inp, phantom(SHAPE), seed=3)
    sitk.WriteImage(single.image(), str(inp / "ct_nifti.nii.gz"))
    (inp / "notes").mkdir()
    (inp / "notes" / "readme.txt").write_text("not dicom")
    cases = {c.name: c for c in discover_cases(inp)}
    assert set(cases) == {"ct_a", two[0].uid, two[1].uid, loose.uid, "ct_nifti"}
    assert set(cases["ct_a"].files) == set(single.files)
    assert set(cases[two[1].uid].files) == set(two[1].files)
    assert cases["ct_nifti"].files == ()


# long: one end-to-end run, then every property of its SEG against independent references
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_seg_equals_the_nifti_path_in_physical_space(tmp_path, model, orientation):
    series = write_series(tmp_path / "dcm" / "ct", phantom(SHAPE),
                          cosines=ORIENTATIONS[orientation])
    (tmp_path / "nii").mkdir()
    sitk.WriteImage(series.image(), str(tmp_path / "nii" / "ct.nii.gz"))
    assert run(tmp_path / "dcm", tmp_path / "out_dcm", model, "--save-logits") == 0
    assert run(tmp_path / "nii", tmp_path / "out_nii", model) == 0
    seg_path = tmp_path / "out_dcm" / "ct.seg.dcm"
    labels = seg_on_source_grid(seg_path, series)
    # On the source grid: the model's answer computed here from the HU values.
    np.testing.assert_array_equal(labels, expected_labels(series.hu))
    # In physical space: the same grid and labels as the NIfTI path's LPI label map.
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing(series.spacing)
    image.SetOrigin(series.origin)
    image.SetDirection(series.direction)
    image = sitk.DICOMOrient(image, "LPI")
    nifti = sitk.ReadImage(str(tmp_path / "out_nii" / "ct.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(nifti))
    np.testing.assert_allclose(image.GetOrigin(), nifti.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), nifti.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), nifti.GetDirection(), atol=1e-5)
    # The SEG's identity: segments, algorithm, references, frame of reference.
    seg = hd.seg.segread(seg_path)
    source = hd.imread(series.files[0])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["label_1", "label_2", "label_3"]
    assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2, 3]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    record = json.loads((tmp_path / "out_dcm" / ".itk_infer" / "ct.json").read_text())
    assert algorithm.AlgorithmName == "itk_infer"
    assert record["model_fingerprint"] in algorithm.AlgorithmParameters
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
    assert record["outputs"] == {"labels": "ct.seg.dcm", "logits": "ct.zarr"}
    assert record["output_sizes"]["labels"] == seg_path.stat().st_size


def test_resume_skips_done_series_and_redoes_a_changed_one(tmp_path, model):
    series = write_series(tmp_path / "in" / "ct", phantom(SHAPE))
    report = tmp_path / "report.json"
    assert run(tmp_path / "in", tmp_path / "out", model) == 0
    first = (tmp_path / "out" / "ct.seg.dcm").stat().st_mtime_ns
    assert run(tmp_path / "in", tmp_path / "out", model, "--report", str(report)) == 0
    assert json.loads(report.read_text())["skipped"] == 1
    assert (tmp_path / "out" / "ct.seg.dcm").stat().st_mtime_ns == first
    stamp = series.files[2].stat()
    os.utime(series.files[2], ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    assert run(tmp_path / "in", tmp_path / "out", model, "--report", str(report)) == 0
    assert json.loads(report.read_text())["done"] == 1


def test_refused_series_fails_its_case_and_the_batch_goes_on(tmp_path, model):
    write_series(tmp_path / "in" / "good", phantom(SHAPE))
    write_series(tmp_path / "in" / "tilted", phantom(SHAPE),
                 positions=_positions(SHAPE[0], 2.5, shift=1.0))
    report = tmp_path / "report.json"
    assert run(tmp_path / "in", tmp_path / "out", model, "--report", str(report)) == 1
    outcomes = {c["case"]: c for c in json.loads(report.read_text())["cases"]}
    assert outcomes["good"]["status"] == "done"
    assert outcomes["tilted"]["status"] == "failed"
    assert outcomes["tilted"]["reason"].startswith("tilted: gantry tilt")
    assert not (tmp_path / "out" / "tilted.seg.dcm").exists()


def test_segment_names_come_from_the_model_else_label_v():
    assert segment_names({"background": 0, "liver": 1, "spleen": 3}, 4) == {
        1: "liver", 2: "label_2", 3: "spleen"}
    assert segment_names(None, 1) == {1: "label_1"}  # one-channel (sigmoid) model


def _write_direct(tmp_path, hu, names):
    """write_seg on the LPI labels of ``hu``'s series, as the pipeline calls it."""
    series = write_series(tmp_path / "s", hu)
    volume = read_series(tuple(series.files), "s")
    labels = expected_labels(volume.voxels).astype(np.uint8)  # pointwise: grid-independent
    path = tmp_path / "s.seg.dcm"
    write_seg(labels, volume.geometry, tuple(series.files), path, names=names,
              fingerprint="abc123", label="s")
    return series, path


def test_empty_label_stays_a_segment_without_frames(tmp_path):
    hu = phantom(SHAPE, values=(-1000.0, 0.0, 120.0))  # nothing reaches label 3
    names = {1: "liver", 2: "spleen", 3: "tumour"}
    series, path = _write_direct(tmp_path, hu, names)
    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen", "tumour"]
    referenced = [f.SegmentIdentificationSequence[0].ReferencedSegmentNumber
                  for f in seg.PerFrameFunctionalGroupsSequence]
    assert set(referenced) == {1, 2}  # no frame for the empty segment
    labels = seg_on_source_grid(path, series)
    np.testing.assert_array_equal(labels, expected_labels(hu))


def _dciodvfy_errors(path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                            timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not installed (Debian package dicom3tools, .ci/dicom.sh)")
@pytest.mark.parametrize("values", [(-1000.0, 0.0, 120.0, 400.0), (-1000.0, 0.0, 120.0),
                                    (-1000.0,)], ids=["all", "one_empty", "all_empty"])
def test_dciodvfy_reports_no_error(tmp_path, values):
    _, path = _write_direct(tmp_path, phantom(SHAPE, values=values),
                            {1: "liver", 2: "spleen", 3: "tumour"})
    assert _dciodvfy_errors(path) == []


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not installed (Debian package dicom3tools, .ci/dicom.sh)")
def test_dciodvfy_sees_errors_in_a_broken_seg(tmp_path):
    # The check itself can fail: a SEG without its segment sequence is reported.
    import pydicom

    _, path = _write_direct(tmp_path, phantom(SHAPE), {1: "a", 2: "b", 3: "c"})
    seg = pydicom.dcmread(path)
    del seg.SegmentSequence
    seg.save_as(path)
    assert _dciodvfy_errors(path)
