"""QC asset checks on ``segmentation`` (issue 15, item 4): what is expected, each check on its
own, and the checks per partition in the instance plus the Review sheet of confidences.xlsx."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import SimpleITK as sitk
from dagster import AssetCheckKey, DagsterInstance, instance_for_test, materialize

from itk_infer.config import Settings
from itk_infer.errors import UsageError
from itk_infer.records import CaseRecord
from itk_infer_assets import qc
from itk_infer_assets.assets import (
    CONFIDENCES,
    SEGMENTATION,
    confidences,
    itk_infer_inference,
    qc_failures,
)
from itk_infer_assets.partitions import IMAGES_PARTITIONS_NAME, case_for_key, layout_for_key
from itk_infer_assets.resources import ItkInferResource
from tests.assets import make_demo_inputs

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def record(voxels: dict[int, int], confidence: float | None = 0.9) -> CaseRecord:
    return CaseRecord(case="c", input_path="/x/c.mha", input_size=1, input_mtime=0.0,
                      model_fingerprint="f", settings={}, outputs={}, output_sizes={},
                      voxels_per_label={str(k): v for k, v in voxels.items()}, timings_s={},
                      confidence=confidence)


# --- what is expected ---------------------------------------------------------------------


def test_volume_ranges_name_labels_by_the_models_names_or_label_n():
    labels = {"background": 0, "liver": 3}
    ranges = qc.parse_volumes('{"liver": {"min_ml": 800, "max_ml": 3500}, "label_5": {}}',
                              labels, "test")
    assert ranges == (qc.VolumeRange("label_5", 5), qc.VolumeRange("liver", 3, 800.0, 3500.0))


@pytest.mark.parametrize("text, message", [
    ('{"spleen": {}}', "unknown label 'spleen'"),
    ('{"liver": {"min_ml": 9, "max_ml": 2}}', "above max_ml"),
    ('{"liver": {"min": 1}}', "unknown keys"),
    ('{"liver": {"max_ml": -1}}', "number >= 0"),
    ('{"liver": 5}', "must be an object"),
    ("[1, 2]", "JSON object"),
    ("{liver", "not valid JSON"),
])
def test_bad_volume_ranges_are_refused_with_the_reason(text, message):
    with pytest.raises(UsageError, match=message):
        qc.parse_volumes(text, {"liver": 3}, "ITK_INFER_QC_VOLUMES")


def onnx_with_metadata(source: Path, target: Path, **entries: object) -> Path:
    model = onnx.load(str(source))
    for key, value in entries.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(target))
    return target


def test_the_environment_replaces_the_models_ranges(tmp_path):
    demo = make_demo_inputs(tmp_path / "demo")
    model = onnx_with_metadata(demo.model, tmp_path / "m.onnx", labels={"body": 1, "lung": 2},
                               qc={"body": {"min_ml": 10}})
    settings = Settings(onnx_path=model)
    from_model = qc.qc_spec(settings, "", 0.5)
    assert from_model.volumes == (qc.VolumeRange("body", 1, 10.0, None),)
    assert from_model.min_confidence == 0.5 and "m.onnx" in from_model.volumes_source
    from_env = qc.qc_spec(settings, '{"lung": {"max_ml": 2}}', None)
    assert from_env.volumes == (qc.VolumeRange("lung", 2, None, 2.0),)
    assert from_env.volumes_source == "ITK_INFER_QC_VOLUMES"
    assert qc.qc_spec(Settings(onnx_path=demo.model), "", None) == qc.QcSpec()


def test_an_mmengine_config_declares_ranges_with_top_level_keys(tmp_path):
    pytest.importorskip("mmengine")
    config = tmp_path / "cfg.py"
    config.write_text('labels = dict(liver=1)\nqc = dict(liver=dict(min_ml=1.5, max_ml=3))\n')
    spec = qc.qc_spec(Settings(backend="mmengine", cfg_path=config, ckpt_path=config), "", None)
    assert spec.volumes == (qc.VolumeRange("liver", 1, 1.5, 3.0),)


# --- the checks on their own --------------------------------------------------------------


def test_volumes_come_from_the_voxel_counts_and_the_voxel_size():
    spec = qc.QcSpec(volumes=(qc.VolumeRange("a", 1, 1.0, 2.0), qc.VolumeRange("b", 2, 1.0),
                              qc.VolumeRange("c", 3, None, 0.5), qc.VolumeRange("d", 4)))
    voxel_ml = 0.5 * 0.5 * 2.0 / 1000  # 0.5 x 0.5 x 2 mm
    result = qc.check_volumes(record({1: 3000, 2: 1000, 3: 1000}), spec, voxel_ml)
    assert not result.passed
    assert result.description == "b 0.5 mL < 1; d missing"  # c: 0.5 mL is within max 0.5
    rows = result.metadata["labels"]
    assert rows["a"]["ml"] == pytest.approx(1.5) and rows["d"]["voxels"] == 0
    assert qc.check_volumes(record({1: 3000}), qc.QcSpec(), voxel_ml).passed


def test_confidence_check_only_fails_below_a_set_minimum():
    assert qc.check_confidence(record({}, 0.4), qc.QcSpec()).passed
    assert qc.check_confidence(record({}, 0.4), qc.QcSpec(min_confidence=0.4)).passed
    low = qc.check_confidence(record({}, 0.39), qc.QcSpec(min_confidence=0.4))
    assert not low.passed and "0.3900 < 0.4" in low.description
    assert not qc.check_confidence(record({}, None), qc.QcSpec(min_confidence=0.1)).passed


def image_file(path: Path, direction: tuple, origin=(10.0, -20.0, 30.0),
               spacing=(0.8, 0.9, 2.5), size=(6, 5, 4)) -> Path:
    image = sitk.Image(list(size), sitk.sitkUInt8)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def reoriented(source: Path, target: Path, orientation: str) -> Path:
    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(source)), orientation), str(target))
    return target


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),  # RAS-like
    (0, 0, 1, 1, 0, 0, 0, 1, 0),  # axes permuted
])
def test_a_label_map_reoriented_to_lpi_is_on_the_inputs_grid(tmp_path, direction):
    source = image_file(tmp_path / "in.mha", tuple(float(d) for d in direction))
    for orientation in ("LPI", "RAS", "SLA"):
        target = reoriented(source, tmp_path / f"{orientation}.mha", orientation)
        outcome = qc.check_geometry(qc.Grid.read(source), qc.Grid.read(target))
        assert outcome.passed, (orientation, outcome.description)


def test_a_label_map_off_the_inputs_grid_fails(tmp_path):
    lpi = (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0)
    source = qc.Grid.read(image_file(tmp_path / "in.mha", lpi))
    shifted = qc.Grid.read(image_file(tmp_path / "s.mha", lpi, origin=(10.4, -20.0, 30.0)))
    finer = qc.Grid.read(image_file(tmp_path / "f.mha", lpi, spacing=(0.4, 0.9, 2.5),
                                    size=(12, 5, 4)))
    rotated = qc.Grid.read(image_file(tmp_path / "r.mha", (0.8, -0.6, 0, 0.6, 0.8, 0, 0, 0, 1)))
    assert "away" in qc.check_geometry(source, shifted).description
    assert "size/spacing" in qc.check_geometry(source, finer).description
    assert "parallel" in qc.check_geometry(source, rotated).description
    assert not any(qc.check_geometry(source, g).passed for g in (shifted, finer, rotated))


# --- in Dagster -------------------------------------------------------------------------


def label_volumes_ml(path: Path, label: int) -> float:
    """A label's volume from the written label map itself (not from the record)."""
    image = sitk.ReadImage(str(path))
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(image) == label))
    return voxels * float(np.prod(image.GetSpacing())) / 1000.0


def latest_check_results(instance: DagsterInstance) -> dict[tuple[str, str], bool]:
    """(check, partition) → passed, as the instance stores each partition's latest result."""
    from dagster._core.storage.asset_check_execution_record import (
        AssetCheckExecutionRecordStatus,
    )

    keys = [AssetCheckKey(SEGMENTATION, name) for name in qc.CHECK_DESCRIPTIONS]
    infos = instance.event_log_storage.get_asset_check_partition_info(keys)
    return {(i.check_key.name, i.partition_key):
            i.latest_execution_status == AssetCheckExecutionRecordStatus.SUCCEEDED
            for i in infos}


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """The demo images through two runs: first with nothing configured, then with a minimum
    confidence and a 'body' range chosen (from the first run's label maps) so that some case
    fails each; then the confidences tables."""
    base = tmp_path_factory.mktemp("qc")
    inputs = make_demo_inputs(base)
    model = onnx_with_metadata(inputs.model, base / "model.onnx", labels={"body": 1})
    with instance_for_test() as instance:  # on disk: the GraphQL test loads the code location
        instance.add_dynamic_partitions(IMAGES_PARTITIONS_NAME, inputs.keys)
        yield run_twice(inputs, instance, model, base / "out")


def run_twice(inputs, instance: DagsterInstance, model: Path, out: Path) -> tuple:
    """The two segmentation runs and the tables; returns what the tests compare."""
    settings = {"watch_root": str(inputs.root), "output_root": str(out),
                "onnx_path": str(model), "device": "cpu", "preview": False}
    plain = ItkInferResource(**settings)
    tags = {RANGE_START: inputs.keys[0], RANGE_END: inputs.keys[-1]}
    assets = [itk_infer_inference, confidences]
    materialize(assets, instance=instance, resources={"itk_infer": plain},
                selection=[SEGMENTATION], tags=tags)
    first = latest_check_results(instance)
    cases = {key: (case_for_key(inputs.root, key), layout_for_key(out, key)) for key in inputs.keys}
    body = {key: label_volumes_ml(layout.labels(case), 1) for key, (case, layout) in cases.items()}
    conf = {key: json.loads(layout.record(case).read_text())["confidence"]
            for key, (case, layout) in cases.items()}
    # Thresholds between the cases' own values: the smallest body and the lowest confidence
    # fail (the same case or two different ones).
    low_body, low_conf = sorted(body.values())[:2], sorted(conf.values())[:2]
    ranges = {"body": {"min_ml": sum(low_body) / 2}}
    strict = ItkInferResource(**settings, qc_volumes=json.dumps(ranges),
                              qc_min_confidence=sum(low_conf) / 2)
    materialize(assets, instance=instance, resources={"itk_infer": strict},
                selection=[SEGMENTATION], tags=tags)
    materialize(assets, instance=instance, resources={"itk_infer": strict},
                selection=[CONFIDENCES])
    return inputs, instance, out, first, body, conf, ranges, strict


def test_every_partition_gets_every_check_and_unconfigured_ones_pass(checked):
    inputs, _instance, _out, first, *_ = checked
    assert first == {(name, key): True for name in qc.CHECK_DESCRIPTIONS for key in inputs.keys}


def test_check_results_per_partition_follow_the_thresholds(checked):
    inputs, instance, _out, _first, body, conf, ranges, strict = checked
    results = latest_check_results(instance)
    for key in inputs.keys:
        assert results["geometry", key]  # RAS and oblique inputs too: LPI label maps
        assert results["label_volumes", key] == (body[key] >= ranges["body"]["min_ml"]), key
        assert results["confidence", key] == (conf[key] >= strict.qc_min_confidence), key
    assert not all(results.values())  # the thresholds did fail something


def test_the_review_sheet_lists_the_failing_cases_with_their_checks(checked):
    inputs, instance, out, _first, body, conf, ranges, strict = checked
    failing = {}  # key → failed checks, from the thresholds and the cases' own values
    for key in inputs.keys:
        failed = [name for name, bad in (
            ("confidence", conf[key] < strict.qc_min_confidence),
            ("label_volumes", body[key] < ranges["body"]["min_ml"])) if bad]
        if failed:
            failing[key] = ", ".join(failed)
    expected = {(str(layout_for_key(out, key).folder), case_for_key(inputs.root, key).name):
                checks for key, checks in failing.items()}
    found = {}
    for table in out.rglob("confidences.xlsx"):
        sheets = pd.read_excel(table, sheet_name=None)
        # The seed's two columns first; the per-label columns (model names) follow.
        assert list(sheets["Confidences"].columns)[:2] == ["Case", "Confidence"]
        if "Review" in sheets:
            review = sheets["Review"]
            assert list(review.columns) == ["Case", "Failed checks", "Details"]
            for case, checks, details in review.itertuples(index=False):
                found[str(table.parent), case] = checks
                assert isinstance(details, str) and details
    assert found == expected and found
    # The sheet is built from the instance's check results, which say the same.
    assert {key: ", ".join(sorted(check for check, _ in checks))
            for key, checks in qc_failures(instance).items()} == failing


def test_a_table_without_failures_has_no_review_sheet(tmp_path):
    from itk_infer.records import write_confidences

    plain = write_confidences(tmp_path / "a", [("c1", 0.5)])
    flagged = write_confidences(tmp_path / "b", [("c1", 0.5), ("c2", 0.1)],
                                review=[("c2", "confidence", "confidence 0.1000 < 0.2")])
    assert list(pd.read_excel(plain, sheet_name=None)) == ["Confidences"]
    sheets = pd.read_excel(flagged, sheet_name=None)
    assert list(sheets) == ["Confidences", "Review"]
    assert sheets["Review"].values.tolist() == [["c2", "confidence", "confidence 0.1000 < 0.2"]]
    pd.testing.assert_frame_equal(sheets["Confidences"],
                                  pd.DataFrame({"Case": ["c1", "c2"], "Confidence": [0.5, 0.1]}))


CHECKS_QUERY = """
query Checks($check: String!, $partition: String) {
  assetCheckExecutions(assetKey: {path: ["segmentation"]}, checkName: $check,
                       partition: $partition, limit: 1) {
    partition status evaluation { success description }
  }
}
"""


def test_the_ui_shows_each_partitions_check_results(checked):
    """What the webserver answers (its GraphQL schema, on this code location in-process)."""
    from dagster._core.test_utils import in_process_test_workspace
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster_graphql.test.utils import execute_dagster_graphql

    inputs, instance, *_ = checked
    expected = latest_check_results(instance)
    origin = LoadableTargetOrigin(module_name="itk_infer_assets",
                                  working_directory=str(Path(__file__).parents[2]))
    with in_process_test_workspace(instance, origin) as context:
        for (check, key), passed in expected.items():
            result = execute_dagster_graphql(context, CHECKS_QUERY,
                                             {"check": check, "partition": key})
            assert not result.errors, result.errors
            (execution,) = result.data["assetCheckExecutions"]
            assert execution["partition"] == key
            assert execution["status"] == ("SUCCEEDED" if passed else "FAILED")
            assert execution["evaluation"]["success"] is passed
            assert execution["evaluation"]["description"]
    assert len(expected) == 3 * len(inputs.keys)
