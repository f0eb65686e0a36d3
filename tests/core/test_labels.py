"""Label names from the model; per-label volumes (mL) and confidences in records and xlsx."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from itk_infer.backends import load_backend
from itk_infer.backends.base import display_names, parse_labels
from itk_infer.cli import main
from itk_infer.config import Settings
from tests.models import default_metadata, pointwise_logits, write_pointwise_model

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
# "NA" looks like a missing value to spreadsheet readers; class 3 never wins below.
NAMES = {"background": 0, "liver": 1, "spleen": 2, "NA": 3}
SPACING = (0.7, 1.3, 2.5)  # x, y, z mm: anisotropic on purpose


def test_parse_labels_forms_and_bad_values(itk_logs):
    assert parse_labels('{"liver": 1, "background": 0}', "m.onnx") == {"background": 0,
                                                                       "liver": 1}
    assert parse_labels(("background", "kidney"), "cfg.py") == {"background": 0, "kidney": 1}
    assert parse_labels(None, "m.onnx") is None
    with itk_logs.at_level(logging.WARNING):
        for bad in ('{"a": 1, "b": 1}', '{"a": "one"}', '{"a": 1.5}', "not json", "7",
                    '{"a": -1}'):
            assert parse_labels(bad, "bad.onnx") is None
        assert parse_labels({"a": 3}, "bad.onnx", num_classes=3) is None
    warned = [r.getMessage() for r in itk_logs.records if "bad.onnx" in r.getMessage()]
    assert len(warned) == 7
    assert parse_labels({"a": 1}, "m.onnx", num_classes=1) == {"a": 1}  # sigmoid: 0 and 1


def test_display_names_fall_back_to_label_value():
    assert display_names({"liver": 1}, [0, 1, 2]) == {0: "label_0", 1: "liver", 2: "label_2"}
    assert display_names(None, [0, 1]) == {0: "label_0", 1: "label_1"}


def test_labels_from_onnx_metadata(tmp_path, itk_logs):
    named = write_pointwise_model(tmp_path / "named.onnx", 4, metadata={
        **default_metadata(), "labels": json.dumps(NAMES)})
    backend = load_backend(Settings(onnx_path=named), CPU)
    assert backend.defaults.labels == dict(sorted(NAMES.items(), key=lambda kv: kv[1]))
    plain = write_pointwise_model(tmp_path / "plain.onnx", 4, metadata=default_metadata())
    assert load_backend(Settings(onnx_path=plain), CPU).defaults.labels is None
    # Value 4 is out of range for four output channels: a warning naming the file, no names.
    wrong = write_pointwise_model(tmp_path / "wrong.onnx", 4, metadata={
        **default_metadata(), "labels": '{"a": 4}'})
    with itk_logs.at_level(logging.WARNING):
        assert load_backend(Settings(onnx_path=wrong), CPU).defaults.labels is None
    assert any("wrong.onnx" in r.getMessage() for r in itk_logs.records)


def test_labels_from_the_demo_mmengine_config():
    demo = REPO / "examples" / "demo"
    backend = load_backend(Settings(backend="mmengine", cfg_path=demo / "mmengine_config.py",
                                    ckpt_path=demo / "mmengine_checkpoint.pth"), CPU)
    from examples.phantoms import CLASS_NAMES

    assert backend.defaults.labels == {name: v for v, name in enumerate(CLASS_NAMES)}
    onnx_backend = load_backend(Settings(onnx_path=demo / "model.onnx"), CPU)
    assert onnx_backend.defaults.labels == backend.defaults.labels


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labels")
    # Windowed x = (clip(v, -1, 1) + 1) / 2 stays below 0.75: class 3 (centre 1) never wins.
    voxels = np.random.default_rng(5).uniform(-1.1, 0.5, size=(9, 14, 11)).astype(np.float32)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing(SPACING)
    (tmp / "in").mkdir()
    sitk.WriteImage(image, str(tmp / "in" / "p.nii.gz"))
    model = write_pointwise_model(tmp / "m.onnx", 4, metadata={
        **default_metadata(), "labels": json.dumps(NAMES)})
    out = tmp / "out"
    assert main(["-i", str(tmp / "in"), "-o", str(out), "--onnx", str(model),
                 "--save-conf", "--device", "cpu"]) == 0
    record = json.loads((out / ".itk_infer" / "p.json").read_text())
    return {"voxels": voxels, "out": out, "record": record}


def _reference(voxels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax and float64 confidence 1 - H(softmax)/log C of the raw float32 logits."""
    x = ((np.clip(voxels.astype(np.float64), -1, 1) + 1) / 2).astype(np.float32)
    logits = pointwise_logits(x, 4)  # float32, as the model computes them
    wide = logits.astype(np.float64)
    p = np.exp(wide - wide.max(axis=0))
    p /= p.sum(axis=0)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=0)
    return np.argmax(logits, axis=0), 1 - entropy / math.log(4)


def test_volumes_ml_match_a_brute_force_count(labelled_run):
    record, voxels = labelled_run["record"], labelled_run["voxels"]
    labels, _ = _reference(voxels)
    # NIfTI stores the spacing as float32: the label map's header is the grid measured on.
    written = sitk.ReadImage(str(labelled_run["out"] / "p.nii.gz"))
    assert written.GetSpacing() == pytest.approx(SPACING, rel=1e-6)
    voxel_ml = float(np.prod(written.GetSpacing())) / 1000.0
    expected = {name: float((labels == v).sum()) * voxel_ml for name, v in NAMES.items()}
    assert record["volumes_ml"] == pytest.approx(expected, rel=1e-12)
    assert record["volumes_ml"]["NA"] == 0.0
    array = sitk.GetArrayFromImage(written)
    assert {n: float((array == v).sum()) * voxel_ml for n, v in NAMES.items()} == \
        pytest.approx(record["volumes_ml"], rel=1e-12)


def test_confidence_by_label_matches_numpy(labelled_run):
    record, voxels = labelled_run["record"], labelled_run["voxels"]
    labels, conf = _reference(voxels)
    for name, v in NAMES.items():
        got = record["confidence_by_label"][name]
        if not (labels == v).any():
            assert got is None
        else:
            assert got == pytest.approx(float(conf[labels == v].mean()), abs=1e-5)
    assert record["confidence"] == pytest.approx(float(conf.mean()), abs=1e-5)
    # A failed structure: the per-label means differ from the global mean.
    assert len({round(c, 3) for c in record["confidence_by_label"].values() if c}) > 1


def test_xlsx_has_per_label_columns(labelled_run):
    record = labelled_run["record"]
    path = labelled_run["out"] / "confidences.xlsx"
    table = pd.read_excel(path, sheet_name="Confidences", dtype={"Case": str},
                          keep_default_na=False, na_values={"NA confidence": [""]})
    assert list(table.columns[:2]) == ["Case", "Confidence"]
    expected = {f"{n} mL" for n in NAMES} | {f"{n} confidence" for n in NAMES}
    assert set(table.columns[2:]) == expected and len(table.columns) == 2 + len(expected)
    row = table.iloc[0]
    assert row["Confidence"] == pytest.approx(record["confidence"], abs=1e-12)
    for name in NAMES:
        assert row[f"{name} mL"] == pytest.approx(record["volumes_ml"][name], rel=1e-12)
    assert math.isnan(row["NA confidence"])
    assert row["liver confidence"] == pytest.approx(record["confidence_by_label"]["liver"])


def test_without_save_conf_no_per_label_confidence(tmp_path):
    voxels = np.random.default_rng(6).uniform(-1, 1, size=(4, 5, 6)).astype(np.float32)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(tmp_path / "in" / "q.nii.gz"))
    model = write_pointwise_model(tmp_path / "m.onnx", 3, metadata=default_metadata())
    out = tmp_path / "out"
    assert main(["-i", str(tmp_path / "in"), "-o", str(out), "--onnx", str(model),
                 "--device", "cpu"]) == 0
    record = json.loads((out / ".itk_infer" / "q.json").read_text())
    assert record["confidence_by_label"] == {}
    assert record["volumes_ml"] == pytest.approx(
        {f"label_{v}": float((np.argmax(pointwise_logits(
            ((np.clip(voxels, -1, 1) + 1) / 2).astype(np.float32), 3), axis=0) == v).sum())
            / 1000.0 for v in range(3)})
