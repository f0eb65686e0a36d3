"""In-process materialisations on an ephemeral instance, compared with the CLI byte for byte."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from dagster import DagsterInstance, materialize

from itk_infer.cli import main as cli_main
from itk_infer_assets.assets import (
    CONFIDENCES,
    GPU_POOL,
    LOGITS,
    SEGMENTATION,
    confidences,
    itk_infer_inference,
)
from itk_infer_assets.partitions import (
    BATCH_SIZE_TAG,
    IMAGES_PARTITIONS_NAME,
    PartitionKeyError,
    case_for_key,
    check_key,
    images_partitions,
    input_version,
    key_folder,
    layout_for_key,
)
from itk_infer_assets.resources import ItkInferResource
from tests.assets import DemoInputs, make_demo_inputs, tree

ASSETS = [itk_infer_inference, confidences]
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def resource(inputs: DemoInputs, out: Path) -> ItkInferResource:
    return ItkInferResource(watch_root=str(inputs.root), output_root=str(out),
                            onnx_path=str(inputs.model), device="cpu")


def instance_with(keys: list[str]) -> DagsterInstance:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(IMAGES_PARTITIONS_NAME, keys)
    return instance


def run_range(instance, res, keys, selection, raise_on_error=True):
    """One run over ``keys`` (a partition range, as a backfill chunk is): one model load."""
    return materialize(ASSETS, instance=instance, resources={"itk_infer": res},
                       selection=selection, raise_on_error=raise_on_error,
                       tags={RANGE_START: keys[0], RANGE_END: keys[-1]})


def cli_run(inputs: DemoInputs, out: Path, folders: list[str], *extra: str) -> None:
    """The CLI on each input folder, with the same model and settings, into the mirrored
    output folder."""
    for folder in folders:
        code = cli_main(["-i", str(inputs.root / folder), "-o", str(out / folder),
                         "--onnx", str(inputs.model), "--device", "cpu", "--no-progress",
                         "--save-conf", *extra])
        assert code == 0


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_excel(path, sheet_name="Confidences")


def record_without_timings(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("timings_s")
    return data


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The three demo partitions materialised in one run (both assets), and the CLI on the
    same images and settings."""
    base = tmp_path_factory.mktemp("both")
    inputs = make_demo_inputs(base)
    instance = instance_with(inputs.keys)
    res = resource(inputs, base / "dagster")
    result = run_range(instance, res, inputs.keys, [SEGMENTATION, LOGITS])
    materialize(ASSETS, instance=instance, resources={"itk_infer": res}, selection=[CONFIDENCES])
    cli_run(inputs, base / "cli", ["2026-11-26", "."], "--save-logits")
    return inputs, instance, res, result, base / "dagster", base / "cli"


def test_outputs_equal_the_cli_byte_for_byte(both):
    inputs, _, _, _, dagster_out, cli_out = both
    ours, theirs = tree(dagster_out), tree(cli_out)
    assert sorted(ours) == sorted(theirs)  # same files in the same places
    for key in inputs.keys:  # label maps, in the input's own format
        assert ours[key] == theirs[key], key
    zarr_files = [rel for rel in ours if ".zarr/" in rel]
    assert any(rel.endswith("zarr.json") for rel in zarr_files)
    for rel in zarr_files:  # logits: metadata and every compressed chunk
        assert ours[rel] == theirs[rel], rel
    for rel in ours:
        if "/.itk_infer/" in f"/{rel}" and rel.endswith(".json"):
            assert record_without_timings(dagster_out / rel) == record_without_timings(
                cli_out / rel), rel
    for folder in ("2026-11-26", "."):  # the table: same rows (xlsx zips carry timestamps)
        pd.testing.assert_frame_equal(read_table(dagster_out / folder / "confidences.xlsx"),
                                      read_table(cli_out / folder / "confidences.xlsx"))


def test_logits_arrays_equal_the_cli(both):
    inputs, _, _, _, dagster_out, cli_out = both
    for key in inputs.keys:
        case = case_for_key(inputs.root, key)
        ours = zarr.open_array(str(layout_for_key(dagster_out, key).logits(case)), mode="r")
        theirs = zarr.open_array(str(layout_for_key(cli_out, key).logits(case)), mode="r")
        assert ours.dtype == np.float16 and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours[:], theirs[:])
        assert dict(ours.attrs) == dict(theirs.attrs)


def test_one_materialisation_per_partition_with_metadata(both):
    inputs, _, _, result, dagster_out, _ = both
    events = [e.materialization for e in result.get_asset_materialization_events()]
    by_asset = {}
    for m in events:
        by_asset.setdefault(m.asset_key, {})[m.partition] = m.metadata
    assert sorted(by_asset[SEGMENTATION]) == sorted(inputs.keys)
    assert sorted(by_asset[LOGITS]) == sorted(inputs.keys)
    for key in inputs.keys:
        meta = by_asset[SEGMENTATION][key]
        case = case_for_key(inputs.root, key)
        layout = layout_for_key(dagster_out, key)
        record = json.loads(layout.record(case).read_text())
        # Metadata of *this* partition, not of the run's last case.
        assert meta["path"].value == str(layout.labels(case))
        assert meta["confidence"].value == pytest.approx(record["confidence"])
        assert meta["voxels_per_label"].value == record["voxels_per_label"]
        assert meta["volumes_ml"].value == record["volumes_ml"]
        assert set(meta["timings_s"].value) >= {"read", "infer", "write"}
        md = meta["preview"].value
        prefix = "data:image/png;base64,"
        png = base64.b64decode(md[md.index(prefix) + len(prefix): md.rindex(")")])
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert by_asset[LOGITS][key]["path"].value == str(layout.logits(case))
    for event in events:  # each partition's data version: its input file's size and mtime
        st = (inputs.root / event.partition).stat()
        assert event.tags["dagster/data_version"] == input_version(st.st_size, st.st_mtime)


def test_confidences_asset_holds_every_partition(both):
    inputs, instance, _, _, dagster_out, _ = both
    rows = {}
    for folder in ("2026-11-26", "."):
        frame = read_table(dagster_out / folder / "confidences.xlsx")
        # The demo model names its classes: per-label columns follow the seed's two.
        from examples.phantoms import CLASS_NAMES

        assert list(frame.columns) == ["Case", "Confidence"] + [
            f"{name} {kind}" for name in sorted(CLASS_NAMES) for kind in ("mL", "confidence")]
        for case, value in zip(frame["Case"], frame["Confidence"], strict=True):
            rows[f"{folder}/{case}".removeprefix("./")] = value
    expected = {}
    for key in inputs.keys:
        case = case_for_key(inputs.root, key)
        record = json.loads(layout_for_key(dagster_out, key).record(case).read_text())
        expected[f"{key_folder(key)}/{case.name}".removeprefix("/")] = record["confidence"]
    assert rows == pytest.approx(expected)
    event = instance.get_latest_materialization_event(CONFIDENCES)
    assert event is not None
    assert event.asset_materialization.metadata["rebuilt"].value == 2


def test_confidences_rebuilds_only_changed_folders(tmp_path):
    inputs = make_demo_inputs(tmp_path)
    instance = instance_with(inputs.keys)
    res = resource(inputs, tmp_path / "out")
    run_range(instance, res, inputs.keys, [SEGMENTATION])
    conf = [CONFIDENCES]
    first = materialize(ASSETS, instance=instance, resources={"itk_infer": res}, selection=conf)
    second = materialize(ASSETS, instance=instance, resources={"itk_infer": res}, selection=conf)
    run_range(instance, res, [inputs.keys[-1]], [SEGMENTATION])  # the root-level case
    third = materialize(ASSETS, instance=instance, resources={"itk_infer": res}, selection=conf)

    def counts(result):
        meta = result.get_asset_materialization_events()[0].materialization.metadata
        return meta["rebuilt"].value, meta["unchanged"].value, sorted(meta["tables"].value)

    assert counts(first) == (2, 0, [".", "2026-11-26"])
    assert counts(second) == (0, 2, [])
    assert counts(third) == (1, 1, ["."])


def test_rematerialisation_replaces_outputs(tmp_path):
    inputs = make_demo_inputs(tmp_path)
    key = inputs.keys[0]
    instance = instance_with(inputs.keys)
    res = resource(inputs, tmp_path / "out")
    case, layout = case_for_key(inputs.root, key), layout_for_key(tmp_path / "out", key)
    run_range(instance, res, [key], [SEGMENTATION])
    paths = [layout.labels(case), layout.record(case)]
    before = {p: (p.read_bytes(), p.stat().st_ino) for p in paths}
    old_record = json.loads(layout.record(case).read_text())
    run_range(instance, res, [key], [SEGMENTATION])  # complete and up to date: redone anyway
    for path, (_content, inode) in before.items():
        assert path.stat().st_ino != inode, f"{path.name} was not replaced by a new file"
    assert layout.labels(case).read_bytes() == before[layout.labels(case)][0]
    new_record = json.loads(layout.record(case).read_text())
    assert new_record["voxels_per_label"] == old_record["voxels_per_label"]
    assert not [p for p in layout.folder.iterdir() if p.name.startswith(".itk_infer-tmp-")]


def test_deselected_logits_write_none(tmp_path):
    inputs = make_demo_inputs(tmp_path)
    instance = instance_with(inputs.keys)
    out = tmp_path / "out"
    result = run_range(instance, resource(inputs, out), inputs.keys, [SEGMENTATION])
    assert not list(out.rglob("*.zarr"))
    assert {e.materialization.asset_key for e in result.get_asset_materialization_events()} == {
        SEGMENTATION}
    for key in inputs.keys:
        case = case_for_key(inputs.root, key)
        layout = layout_for_key(out, key)
        assert layout.labels(case).is_file()
        assert json.loads(layout.record(case).read_text())["outputs"] == {
            "labels": layout.labels(case).name}


def test_a_failed_case_fails_the_step_with_its_reason(tmp_path):
    inputs = make_demo_inputs(tmp_path)
    bad = "2026-11-26/broken.nii.gz"
    (inputs.root / bad).write_bytes(b"this is not a NIfTI file" * 10)
    keys = [inputs.keys[0], bad]
    instance = instance_with(keys)
    out = tmp_path / "out"
    result = run_range(instance, resource(inputs, out), keys, [SEGMENTATION],
                       raise_on_error=False)
    assert not result.success
    failures = result.get_step_failure_events()
    assert len(failures) == 1
    message = str(failures[0].step_failure_data.user_failure_data.description)
    assert bad in message and "cannot read image" in message
    # The good case is complete on disk and recorded as materialised; the broken one is not.
    assert instance.get_materialized_partitions(SEGMENTATION) == {inputs.keys[0]}
    good = case_for_key(inputs.root, inputs.keys[0])
    assert layout_for_key(out, inputs.keys[0]).labels(good).is_file()
    assert not (out / "2026-11-26" / "broken.nii.gz").exists()


def test_a_sensor_range_stretched_by_foreign_keys_is_refused(tmp_path):
    """The sensor's range relies on its keys being added together; a key added in between
    elsewhere would make the run redo it, or thousands like it: nothing runs instead."""
    inputs = make_demo_inputs(tmp_path)
    first, foreign, last = inputs.keys
    instance = instance_with([first, foreign, last])  # foreign landed between the batch's two
    result = materialize(ASSETS, instance=instance, selection=[SEGMENTATION],
                         resources={"itk_infer": resource(inputs, tmp_path / "out")},
                         tags={RANGE_START: first, RANGE_END: last, BATCH_SIZE_TAG: "2"},
                         raise_on_error=False)
    assert not result.success
    message = result.get_step_failure_events()[0].step_failure_data.user_failure_data.description
    assert "resolves to 3 keys" in message and "put 2" in message
    assert instance.get_materialized_partitions(SEGMENTATION) == set()
    assert not (tmp_path / "out").exists()


def test_model_errors_fail_the_step(tmp_path):
    inputs = make_demo_inputs(tmp_path)
    instance = instance_with(inputs.keys[:1])
    res = ItkInferResource(watch_root=str(inputs.root), output_root=str(tmp_path / "out"),
                           onnx_path=str(tmp_path / "missing.onnx"), device="cpu")
    result = run_range(instance, res, inputs.keys[:1], [SEGMENTATION], raise_on_error=False)
    assert not result.success
    message = result.get_step_failure_events()[0].step_failure_data.user_failure_data.description
    assert "missing.onnx" in message


def test_asset_definitions_carry_gpu_pool_tags_and_backfill_policy():
    op = itk_infer_inference.op
    assert op.pool == GPU_POOL
    k8s = op.tags["dagster-k8s/config"]
    k8s = json.loads(k8s) if isinstance(k8s, str) else k8s
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    policy = itk_infer_inference.backfill_policy
    assert policy is not None and (policy.max_partitions_per_run or 0) > 1
    assert itk_infer_inference.can_subset
    specs = {spec.name: spec for spec in itk_infer_inference.check_specs}
    assert set(specs) == {"confidence", "label_volumes", "geometry"}
    assert all(spec.asset_key == SEGMENTATION and spec.partitions_def == images_partitions
               and not spec.blocking for spec in specs.values())
    condition = confidences.automation_conditions_by_key[CONFIDENCES]
    assert condition is not None and "after new segmentations" in condition.get_label()


@pytest.mark.parametrize("key", ["../x.nii", "/abs.mha", "a/../b.nii", "notes.txt",
                                 ".hidden/a.nii", "a...b.nii"])
def test_bad_keys_are_refused(key):
    with pytest.raises(PartitionKeyError):
        check_key(key)


def test_key_maps_to_the_cli_layout(tmp_path):
    key = "2026-11-26/ct_001.nii.gz"
    case = case_for_key(tmp_path / "in", key)
    layout = layout_for_key(tmp_path / "out", key)
    assert case.name == "ct_001" and case.path == tmp_path / "in" / "2026-11-26" / "ct_001.nii.gz"
    assert layout.labels(case) == tmp_path / "out" / "2026-11-26" / "ct_001.nii.gz"
    assert layout.record(case) == tmp_path / "out" / "2026-11-26" / ".itk_infer" / "ct_001.json"


def test_resource_from_environment(monkeypatch):
    from itk_infer.errors import UsageError
    from itk_infer_assets.resources import resource_from_env

    env = {"ITK_INFER_WATCH_ROOT": "/data/in", "ITK_INFER_OUTPUT_ROOT": "/data/out",
           "ITK_INFER_ONNX": "/m.onnx", "ITK_INFER_WW": "400", "ITK_INFER_FP16": "yes",
           "ITK_INFER_PATCH_SIZE": "32 64 64", "ITK_INFER_DEVICE": "cpu"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    res = resource_from_env()
    # String fields stay environment-backed until the resource is built for a run.
    resolved = res.process_config_and_initialize()
    assert resolved.watch_root == "/data/in" and resolved.output_root == "/data/out"
    assert resolved.window_width == 400.0 and resolved.window_level is None
    assert resolved.fp16 is True and resolved.patch_size == [32, 64, 64]
    settings = resolved.settings()
    assert settings.patch_size == (32, 64, 64)
    assert settings.onnx_path == Path("/m.onnx") and settings.device == "cpu"
    monkeypatch.setenv("ITK_INFER_PATCH_SIZE", "32 64")
    with pytest.raises(UsageError, match="ITK_INFER_PATCH_SIZE"):
        resource_from_env()


def test_gpu_lease_gives_each_holder_its_own_device(tmp_path):
    from itk_infer_assets.resources import gpu_lease

    with gpu_lease(tmp_path, ["uuid-a", "uuid-b"]) as first:
        with gpu_lease(tmp_path, ["uuid-a", "uuid-b"]) as second:
            assert {first, second} == {0, 1}
            with pytest.raises(TimeoutError):
                with gpu_lease(tmp_path, ["uuid-a", "uuid-b"], poll_seconds=0.05,
                               timeout_seconds=0.2):
                    pass
    with gpu_lease(tmp_path, ["uuid-a"], timeout_seconds=0) as again:  # released on exit
        assert again == 0


def test_each_step_on_a_gpu_host_gets_its_own_card(tmp_path, monkeypatch):
    """The resource's device block: CUDA requested, two cards visible, two steps at once."""
    from itk_infer_assets import resources

    monkeypatch.setattr(resources, "visible_gpu_ids", lambda limit=0: ["uuid-a", "uuid-b"])
    monkeypatch.setattr(resources, "resolve_device", lambda kind, index=0: f"{kind}:{index}")
    res = ItkInferResource(device="cuda", lease_dir=str(tmp_path))
    with res.leased_device() as first, res.leased_device() as second:
        assert {first, second} == {"cuda:0", "cuda:1"}
    cpu = ItkInferResource(device="cpu", lease_dir=str(tmp_path / "unused"))
    with cpu.leased_device() as device:
        assert str(device).startswith("cpu")
    assert not (tmp_path / "unused").exists()  # no lease on the CPU


def test_preview_png_decodes_to_the_expected_pixels():
    pil = pytest.importorskip("PIL.Image")
    from itk_infer_assets.preview import OVERLAY_ALPHA, PALETTE, encode_png, preview_rgb

    image = np.zeros((10, 20, 30), np.float32)
    image[5, :, :] = 1.0  # the axial mid-slice is white
    labels = np.zeros(image.shape, np.uint8)
    labels[5, 10, 15] = 2  # one voxel of label 2 at the centre of every mid-slice
    rgb = preview_rgb(image, labels, spacing_zyx=(1.0, 1.0, 1.0), max_side=30)
    decoded = np.asarray(pil.open(io.BytesIO(encode_png(rgb))).convert("RGB"))
    np.testing.assert_array_equal(decoded, rgb)
    # Axial panel first: 20 x 30 pixels at unit spacing; centre pixel is white blended with
    # label 2's colour.
    expected = np.round((1 - OVERLAY_ALPHA) * 255 + OVERLAY_ALPHA * np.asarray(PALETTE[1]))
    np.testing.assert_array_equal(rgb[10, 15], expected.astype(np.uint8))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb.shape == (20, 30 + 2 + 30 + 2 + 20, 3)
