"""Per-case records: content, written last, resume, stale outputs, confidences table, report."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import zarr
from onnx import numpy_helper

import itk_infer
import itk_infer.pipeline
from itk_infer.cli import main
from tests.conftest import RAS, write_volume
from tests.models import default_metadata, pointwise_logits, write_pointwise_model

HEADLINE = re.compile(r"(\d+) done, (\d+) skipped, (\d+) failed")
STALE_WARNING = "outputs were made with other settings; --overwrite to redo"


def run(inputs: Path, output: Path, model: Path, *extra) -> int:
    # --in-process: tests patch the library in this process, which a worker would not see.
    return main(["-i", str(inputs), "-o", str(output), "--onnx", str(model), "--device", "cpu",
                 "--no-progress", "--in-process", *map(str, extra)])


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def tree_size(path: Path) -> int:
    """Bytes of a file, or of all files below a folder, counted with os.walk."""
    if path.is_file():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _dirs, names in os.walk(path) for name in names)


def newest_mtime_ns(path: Path) -> int:
    if path.is_file():
        return path.stat().st_mtime_ns
    return max(os.stat(os.path.join(root, name)).st_mtime_ns
               for root, _dirs, names in os.walk(path) for name in names)


def read_record(output: Path, case: str) -> dict:
    return json.loads((output / ".itk_infer" / f"{case}.json").read_text())


def reference_confidence(voxels: np.ndarray, classes: int = 3) -> float:
    """Float64 mean of 1 - H(softmax)/log C of the pointwise model (window -1..1)."""
    x = (np.clip(voxels.astype(np.float64), -1, 1) + 1) / 2
    logits = pointwise_logits(x.astype(np.float32), classes).astype(np.float64)
    p = np.exp(logits - logits.max(axis=0))
    p /= p.sum(axis=0)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=0)
    return float((1 - entropy / math.log(classes)).mean())


def write_shifted_model(path: Path, shift: float) -> Path:
    """The pointwise model with class 2's bias raised: other weights, other labels."""
    write_pointwise_model(path, 3, metadata=default_metadata())
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == "b":
            bias = numpy_helper.to_array(init).copy()
            bias[2] += shift
            init.CopyFrom(numpy_helper.from_array(bias, "b"))
    onnx.save(model, str(path))
    return path


def volume(seed: int, shape=(11, 13, 10)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.2, 1.2, size=shape).astype(np.float32)


@pytest.fixture
def two_cases(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_volume(inputs / "a.mha", volume(1))  # LPI (conftest default)
    write_volume(inputs / "b.nii.gz", volume(2), direction=RAS)
    model = write_pointwise_model(tmp_path / "model.onnx", 3, metadata=default_metadata())
    return inputs, tmp_path / "out", model


def test_record_content_and_written_last(two_cases, monkeypatch):
    inputs, out, model = two_cases
    seen: list[str] = []
    original = itk_infer.pipeline.write_record

    def checking_write_record(layout, case, record):
        # At the moment the record is written every output it lists is complete.
        assert not layout.record(case).exists()
        for kind, name in record.outputs.items():
            assert tree_size(layout.folder / name) == record.output_sizes[kind]
        seen.append(case.name)
        return original(layout, case, record)

    monkeypatch.setattr(itk_infer.pipeline, "write_record", checking_write_record)
    assert run(inputs, out, model, "--save-logits", "--save-conf") == 0
    assert sorted(seen) == ["a", "b"]
    table = pd.read_excel(out / "confidences.xlsx", sheet_name="Confidences")
    for case, source, orientation in [("a", "a.mha", "LPI"), ("b", "b.nii.gz", "RAS")]:
        record = read_record(out, case)
        record_path = out / ".itk_infer" / f"{case}.json"
        stat = (inputs / source).stat()
        assert record["case"] == case
        assert Path(record["input_path"]) == (inputs / source).resolve()
        assert record["input_size"] == stat.st_size
        assert record["input_mtime"] == stat.st_mtime
        assert record["model_fingerprint"] == sha16(model)
        assert record["settings"] == {
            "backend": "onnx", "window_level": 0.0, "window_width": 2.0,
            "patch_size": [8, 16, 16], "patch_stride": [4, 8, 8], "blend": "gaussian",
            "fp16": False, "device": "cpu",
        }
        assert record["outputs"] == {"labels": source, "logits": f"{case}.zarr"}
        for kind, name in record["outputs"].items():
            assert record["output_sizes"][kind] == tree_size(out / name)
            # Written last: no output file is newer than the record.
            assert newest_mtime_ns(out / name) <= record_path.stat().st_mtime_ns
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / source)))
        counts = np.bincount(labels.ravel())
        assert record["voxels_per_label"] == {str(k): int(n) for k, n in enumerate(counts) if n}
        assert sum(record["voxels_per_label"].values()) == labels.size
        assert set(record["timings_s"]) >= {"read", "infer", "write"}
        assert all(v >= 0 for v in record["timings_s"].values())
        assert record["num_classes"] == 3
        assert record["source_orientation"] == orientation
        expected = reference_confidence(volume(1 if case == "a" else 2))
        assert record["confidence"] == pytest.approx(expected, abs=1e-5)
        assert table.set_index("Case").loc[case, "Confidence"] == pytest.approx(
            record["confidence"], abs=1e-12)
        versions = record["versions"]
        assert versions["itk_infer"] == itk_infer.__version__
        assert versions["numpy"] == np.__version__
        assert versions["torch"] == torch.__version__
        assert versions["zarr"] == zarr.__version__
        assert versions["SimpleITK"] and versions["python"] == platform.python_version()
        assert any(k.startswith("onnxruntime") for k in versions)


def test_deleting_a_record_makes_the_case_run_again(two_cases, tmp_path):
    inputs, out, model = two_cases
    assert run(inputs, out, model) == 0
    kept = (out / "b.nii.gz").stat().st_mtime_ns
    (out / ".itk_infer" / "a.json").unlink()
    report = tmp_path / "report.json"
    assert run(inputs, out, model, "--report", report) == 0
    summary = json.loads(report.read_text())
    assert [(c["case"], c["status"]) for c in summary["cases"]] == [("a", "done"),
                                                                    ("b", "skipped")]
    assert read_record(out, "a")["case"] == "a"
    assert (out / "b.nii.gz").stat().st_mtime_ns == kept


def test_changed_model_warns_skips_and_overwrite_redoes(two_cases, tmp_path, capsys):
    inputs, out, model = two_cases
    assert run(inputs, out, model) == 0
    before = {n: (out / n).read_bytes() for n in ("a.mha", "b.nii.gz")}
    old_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a.mha")))
    old_fingerprint = read_record(out, "a")["model_fingerprint"]
    write_shifted_model(model, 3.0)  # retrained weights, same file name
    new_fingerprint = sha16(model)
    assert new_fingerprint != old_fingerprint
    capsys.readouterr()

    report = tmp_path / "report.json"
    assert run(inputs, out, model, "--report", report) == 0
    captured = capsys.readouterr()
    assert f"2 {STALE_WARNING}" in captured.err
    assert "0 done, 2 skipped, 0 failed" in captured.out
    summary = json.loads(report.read_text())
    assert summary["stale"] == ["a", "b"] and summary["skipped"] == 2
    assert {n: (out / n).read_bytes() for n in before} == before  # not touched
    assert read_record(out, "a")["model_fingerprint"] == old_fingerprint

    assert run(inputs, out, model, "--overwrite") == 0
    captured = capsys.readouterr()
    assert "2 done, 0 skipped, 0 failed" in captured.out and STALE_WARNING not in captured.err
    for name in ("a", "b"):
        assert read_record(out, name)["model_fingerprint"] == new_fingerprint
    # The raised class-2 bias moves the 1|2 boundary: class 2 gains voxels, none loses them.
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a.mha")))
    assert np.all(labels[old_labels == 2] == 2)
    assert (labels == 2).sum() > (old_labels == 2).sum()

    assert run(inputs, out, model) == 0
    captured = capsys.readouterr()
    assert "0 done, 2 skipped, 0 failed" in captured.out and STALE_WARNING not in captured.err


@pytest.mark.parametrize("changed", [["--blend", "constant"], ["--patch-stride", 2, 4, 4],
                                     ["--wl", 0.1]])
def test_changed_settings_are_stale_too(two_cases, capsys, changed):
    inputs, out, model = two_cases
    assert run(inputs, out, model) == 0
    capsys.readouterr()
    assert run(inputs, out, model, *changed) == 0
    captured = capsys.readouterr()
    assert f"2 {STALE_WARNING}" in captured.err
    assert "0 done, 2 skipped, 0 failed" in captured.out


def test_damaged_outputs_under_an_intact_record_are_redone(two_cases, tmp_path):
    inputs, out, model = two_cases
    assert run(inputs, out, model, "--save-logits") == 0
    good_labels = (out / "a.mha").read_bytes()
    good_logits = zarr.open_array(str(out / "b.zarr"), mode="r")[...]
    # A truncated label file (the record still says it is complete) ...
    (out / "a.mha").write_bytes(good_labels[: len(good_labels) // 2])
    # ... and a zarr array that lost a chunk (it would read back as zeros).
    chunk = next(p for p in (out / "b.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    report = tmp_path / "report.json"
    assert run(inputs, out, model, "--save-logits", "--report", report) == 0
    assert json.loads(report.read_text())["done"] == 2
    assert (out / "a.mha").read_bytes() == good_labels
    np.testing.assert_array_equal(zarr.open_array(str(out / "b.zarr"), mode="r")[...],
                                  good_logits)


def test_asking_for_more_outputs_redoes_the_case(two_cases, capsys):
    inputs, out, model = two_cases
    assert run(inputs, out, model) == 0
    assert run(inputs, out, model, "--save-logits", "--save-conf") == 0
    assert "2 done, 0 skipped" in capsys.readouterr().out.splitlines()[-1]
    assert (out / "a.zarr").is_dir() and read_record(out, "a")["confidence"] is not None
    assert run(inputs, out, model, "--save-conf") == 0  # a subset of what is there
    assert "0 done, 2 skipped" in capsys.readouterr().out


def test_confidences_table_over_two_runs(tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    model = write_pointwise_model(tmp_path / "model.onnx", 3, metadata=default_metadata())
    volumes = {"ct_10": volume(10), "ct_02": volume(2), "ab": volume(3), "ct_01": volume(4)}
    write_volume(inputs / "ct_10.nii.gz", volumes["ct_10"])
    write_volume(inputs / "ct_02.mha", volumes["ct_02"], direction=RAS)
    assert run(inputs, out, model, "--save-conf") == 0
    first = pd.read_excel(out / "confidences.xlsx", sheet_name="Confidences")
    # Per-label columns follow the seed's two (tests/core/test_labels.py checks them).
    assert first.columns.tolist() == ["Case", "Confidence"] + [
        f"label_{v} {kind}" for v in range(3) for kind in ("mL", "confidence")]
    assert first["Case"].tolist() == ["ct_02", "ct_10"]

    write_volume(inputs / "ab.nii", volumes["ab"])
    write_volume(inputs / "ct_01.mha", volumes["ct_01"])
    assert run(inputs, out, model, "--save-conf") == 0
    second = pd.read_excel(out / "confidences.xlsx", sheet_name=None)
    assert list(second) == ["Confidences"]
    table = second["Confidences"]
    assert table["Case"].tolist() == sorted(volumes) == ["ab", "ct_01", "ct_02", "ct_10"]
    for case, value in zip(table["Case"], table["Confidence"], strict=True):
        assert value == pytest.approx(reference_confidence(volumes[case]), abs=1e-5)
        assert value == pytest.approx(read_record(out, case)["confidence"], abs=1e-12)
    # Cases of the first run keep their values.
    pd.testing.assert_frame_equal(
        first, table[table["Case"].isin(first["Case"])].reset_index(drop=True))

    # A rerun that skips everything still writes the complete table.
    (out / "confidences.xlsx").unlink()
    assert run(inputs, out, model, "--save-conf") == 0
    pd.testing.assert_frame_equal(
        pd.read_excel(out / "confidences.xlsx", sheet_name="Confidences"), table)


def test_report_json_matches_the_printed_summary(two_cases, tmp_path, capsys):
    inputs, out, model = two_cases
    (inputs / "c.nii.gz").write_bytes(b"not an image")
    report = tmp_path / "reports" / "run.json"
    for expected in [(2, 0, 1), (0, 2, 1)]:
        assert run(inputs, out, model, "--save-conf", "--report", report) == 1
        printed = HEADLINE.search(capsys.readouterr().out)
        assert printed is not None
        counts = tuple(int(n) for n in printed.groups())
        assert counts == expected
        summary = json.loads(report.read_text())
        assert (summary["done"], summary["skipped"], summary["failed"]) == counts
        assert summary["stale"] == [] and summary["wall_seconds"] > 0
        cases = {c["case"]: c for c in summary["cases"]}
        assert list(cases) == ["a", "b", "c"]
        assert cases["c"]["status"] == "failed"
        assert "c.nii.gz: cannot read image" in cases["c"]["reason"]
        if expected[0]:
            for name in ("a", "b"):
                assert cases[name]["status"] == "done"
                assert cases[name]["confidence"] == read_record(out, name)["confidence"]
        else:
            assert [cases[n]["status"] for n in ("a", "b")] == ["skipped", "skipped"]


def test_case_names_that_look_missing_stay_strings_in_the_table(tmp_path):
    """Names like nan/NA/null are text cells in confidences.xlsx (a reader with pandas'
    defaults would turn them into NaN: the confidences asset builds its rows from records)."""
    from openpyxl import load_workbook

    from itk_infer.records import write_confidences

    rows = [("NA", 0.5), ("nan", 0.25), ("null", 0.75), ("1e3", 0.125)]
    path = write_confidences(tmp_path, rows)
    sheet = load_workbook(path)["Confidences"]
    cells = [(c.value, c.data_type) for c in sheet["A"][1:]]
    assert cells == [(name, "s") for name, _ in rows]
    frame = pd.read_excel(path, sheet_name="Confidences", dtype={"Case": str},
                          keep_default_na=False)
    assert list(frame["Case"]) == [name for name, _ in rows]
