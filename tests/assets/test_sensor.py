"""The folder sensor: the pure scan, and the Dagster sensor on a sensor context."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from dagster import (
    PartitionKeyRange,
    SensorResult,
    SkipReason,
    build_sensor_context,
    instance_for_test,
    materialize,
)

from itk_infer_assets.assets import LOGITS, SEGMENTATION, confidences, itk_infer_inference
from itk_infer_assets.definitions import RUN_TAGS, inference_job
from itk_infer_assets.partitions import (
    BATCH_SIZE_TAG,
    IMAGES_PARTITIONS_NAME,
    RANGE_END_TAG,
    RANGE_START_TAG,
    images_partitions,
    input_version,
)
from itk_infer_assets.resources import ItkInferResource
from itk_infer_assets.sensors import (
    ScanState,
    build_folder_sensor,
    plan_batches,
    probe_image,
    scan_watch_root,
)
from tests.assets import make_demo_inputs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_inputs(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def sources(demo) -> dict[str, Path]:
    """One small valid image per format, copied wherever a test needs images."""
    return {Path(key).name: demo.root / key for key in demo.keys}


def put(sources: dict[str, Path], root: Path, key: str, age_s: float = 120.0) -> Path:
    """Copy a valid image to ``root/key``, its mtime ``age_s`` in the past (a finished file)."""
    suffix = next(s for s in (".nii.gz", ".mha", ".nii") if key.endswith(s))
    source = next(p for name, p in sources.items() if name.endswith(suffix))
    target = root / key
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    past = time.time() - age_s
    os.utime(target, (past, past))
    return target


class Instance:
    """Stands in for the instance's partition list between ticks of the pure scan."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.asked: list[list[str]] = []

    def is_known(self, keys):
        self.asked.append(list(keys))
        return self.keys & set(keys)

    def tick(self, root: Path, state: ScanState, **kwargs):
        result = scan_watch_root(root, state, self.is_known, probe=lambda _p: None, **kwargs)
        assert not self.keys & set(result.new_keys), "a known key was added again"
        self.keys |= set(result.new_keys)
        # The cursor travels as JSON between ticks.
        return result, ScanState.from_json(result.state.to_json())


def test_new_files_and_new_subfolders_become_keys_once(tmp_path, sources):
    root = tmp_path / "watch"
    put(sources, root, "a.mha")
    put(sources, root, "2026-11-26/ct_001.nii.gz")
    inst = Instance()
    first, state = inst.tick(root, ScanState())
    assert first.new_keys == ["2026-11-26/ct_001.nii.gz", "a.mha"]
    second, state = inst.tick(root, state)
    assert second.new_keys == []
    put(sources, root, "2026-11-27/deeper/ct_002.nii")  # a folder tree that appears later
    put(sources, root, "2026-11-26/ct_003.mha")  # a new file in a known folder
    third, state = inst.tick(root, state)
    assert third.new_keys == ["2026-11-26/ct_003.mha", "2026-11-27/deeper/ct_002.nii"]
    fourth, _ = inst.tick(root, state)
    assert fourth.new_keys == []
    assert inst.keys == {"a.mha", "2026-11-26/ct_001.nii.gz", "2026-11-26/ct_003.mha",
                         "2026-11-27/deeper/ct_002.nii"}


def test_unchanged_folders_are_not_listed(tmp_path, sources):
    """Ticks over untouched folders look at folder mtimes only, not at the files; a change
    makes only the newcomer a candidate."""
    root = tmp_path / "watch"
    for day in range(5):
        for case in range(4):
            put(sources, root, f"2026-11-{day + 10:02d}/ct_{case}.mha")
    past = time.time() - 600
    for folder in [root, *root.iterdir()]:  # settled: folders last changed long ago
        os.utime(folder, (past, past))
    inst = Instance()
    # No margin: this file system and clock are the sensor's own.
    first, state = inst.tick(root, ScanState(), margin_seconds=0)
    assert len(first.new_keys) == 20 and first.folders_listed == 6
    asked = len(inst.asked)
    second, state = inst.tick(root, state, margin_seconds=0)
    assert second.new_keys == [] and second.folders_listed == 0
    assert second.folders_checked == 6 and len(inst.asked) == asked  # nothing asked
    time.sleep(0.05)  # past the file system's timestamp granularity
    put(sources, root, "2026-11-12/ct_9.mha")
    third, _ = inst.tick(root, state, margin_seconds=0)
    assert third.new_keys == ["2026-11-12/ct_9.mha"]
    assert third.folders_listed == 1
    assert inst.asked[-1] == ["2026-11-12/ct_9.mha"]  # only the newcomer, not its folder


def test_growing_file_waits_until_its_size_stops_changing(tmp_path, sources):
    root = tmp_path / "watch"
    path = put(sources, root, "scan.mha", age_s=0)  # just written: may still grow
    inst = Instance()
    first, state = inst.tick(root, ScanState(), settle_seconds=30)
    assert first.new_keys == [] and first.waiting == ["scan.mha"]
    with path.open("ab") as handle:  # still being written
        handle.write(b"\0" * 1024)
    second, state = inst.tick(root, state, settle_seconds=30)
    assert second.new_keys == [] and second.waiting == ["scan.mha"]
    third, state = inst.tick(root, state, settle_seconds=30)  # same size as last tick
    assert third.new_keys == ["scan.mha"] and third.waiting == []
    fourth, _ = inst.tick(root, state, settle_seconds=30)
    assert fourth.new_keys == []


def test_unsupported_unreadable_and_colliding_files_are_skipped(tmp_path, sources):
    root = tmp_path / "watch"
    put(sources, root, "good.nii.gz")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.mha").write_bytes(b"garbage")
    put(sources, root, "twin.nii")
    put(sources, root, "twin.nii.gz")  # same case name "twin": outputs would collide
    (root / ".hidden.mha").write_bytes(b"x")
    old = time.time() - 120
    for p in root.iterdir():
        os.utime(p, (old, old))
    known: set[str] = set()
    result = scan_watch_root(root, ScanState(), lambda keys: known & set(keys))
    assert result.new_keys == ["good.nii.gz"]
    reasons = dict(result.skipped)
    assert set(reasons) == {"notes.txt", "broken.mha", "twin.nii", "twin.nii.gz"}
    assert "unsupported" in reasons["notes.txt"]
    assert "cannot read" in reasons["broken.mha"]
    assert "same case name" in reasons["twin.nii"]
    # Skipped files are reported once, not on every tick.
    again = scan_watch_root(root, result.state, lambda keys: {"good.nii.gz"} & set(keys),
                            margin_seconds=0)
    assert again.new_keys == [] and again.skipped == []


def test_probe_accepts_images_and_names_the_problem_otherwise(tmp_path, sources):
    import numpy as np
    import SimpleITK as sitk

    assert probe_image(sources["case_01.mha"]) is None
    flat = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.int16)), str(flat))
    assert "2-D" in probe_image(flat)
    rgb = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True),
                    str(rgb))
    assert "components" in probe_image(rgb)


def test_output_folder_inside_the_root_is_never_scanned(tmp_path, sources):
    root = tmp_path / "watch"
    put(sources, root, "in/a.mha")
    put(sources, root, "out/in/a.mha")  # what an output folder inside the root looks like
    result = scan_watch_root(root, ScanState(), lambda keys: set(), exclude=[root / "out"],
                             probe=lambda _p: None)
    assert result.new_keys == ["in/a.mha"]


def test_a_flood_is_split_over_ticks_without_losing_or_repeating_keys(tmp_path, sources):
    root = tmp_path / "watch"
    expected = set()
    for folder in ("a", "b"):
        for case in range(5):
            put(sources, root, f"{folder}/c{case}.mha")
            expected.add(f"{folder}/c{case}.mha")
    inst = Instance()
    state, ticks = ScanState(), 0
    while True:
        result, state = inst.tick(root, state, max_new_per_tick=3)
        ticks += 1
        assert len(result.new_keys) <= 3
        if not result.new_keys and not result.capped:
            break
        assert ticks < 10
    assert inst.keys == expected and ticks >= 4


def test_settled_pending_files_over_the_cap_wait_for_the_next_tick(tmp_path):
    """A cursor holding more waiting files than the cap (the cap was lowered, say): one tick
    still adds at most the cap, and the rest stay waiting instead of being dropped."""
    root = tmp_path / "watch"
    root.mkdir()
    pending = {}
    past = time.time() - 120
    for name in ("a.mha", "b.mha", "c.mha"):
        (root / name).write_bytes(b"x")
        os.utime(root / name, (past, past))
        st = (root / name).stat()
        pending[name] = (st.st_size, st.st_mtime_ns)  # unchanged since the last tick: settled
    inst = Instance()
    first, state = inst.tick(root, ScanState(pending=pending), max_new_per_tick=2)
    assert first.new_keys == ["a.mha", "b.mha"] and first.capped
    assert first.waiting == ["c.mha"]
    second, state = inst.tick(root, state, max_new_per_tick=2)
    assert second.new_keys == ["c.mha"] and not second.capped and second.waiting == []
    third, _ = inst.tick(root, state, max_new_per_tick=2)
    assert third.new_keys == [] and third.waiting == []


def test_a_flood_of_files_being_written_keeps_the_cursor_bounded(tmp_path):
    root = tmp_path / "watch"
    root.mkdir()
    names = [f"c{i}.mha" for i in range(5)]
    for name in names:
        (root / name).write_bytes(b"x")  # just written: waits for the next tick
    start = time.time_ns()
    inst = Instance()
    state, added = ScanState(), []
    for tick in range(10):
        # The clock is pinned: after the first tick every file is older than `settle`.
        result, state = inst.tick(root, state, now_ns=start + tick * 60 * 10**9,
                                  settle_seconds=30, max_new_per_tick=2)
        assert len(result.new_keys) <= 2 and len(result.waiting) <= 2
        assert len(state.pending) <= 2
        added += result.new_keys
        if tick == 0:
            assert result.new_keys == [] and result.capped
        if not (result.new_keys or result.waiting or result.capped):
            break
    assert sorted(added) == names  # each exactly once


def test_a_folder_changed_just_before_its_listing_is_listed_again(tmp_path):
    """An entry added within the clock's granularity (or skew) of a listing may leave the
    folder's mtime as it was; so a folder whose mtime lies within ``margin`` of its last
    listing is listed once more, and after that only when it changes."""
    root = tmp_path / "watch"
    root.mkdir()
    (root / "a.mha").write_bytes(b"x")
    changed = time.time_ns() - 600 * 10**9
    os.utime(root / "a.mha", ns=(changed - 100 * 10**9, changed - 100 * 10**9))
    os.utime(root, ns=(changed, changed))
    inst = Instance()
    ticks = []
    for after_s in (1, 100, 200):
        result, state = inst.tick(root, ticks[-1][1] if ticks else ScanState(),
                                  now_ns=changed + after_s * 10**9, margin_seconds=30)
        ticks.append((result, state))
    assert [r.folders_listed for r, _ in ticks] == [1, 1, 0]
    assert [r.new_keys for r, _ in ticks] == [["a.mha"], [], []]


def test_damaged_cursor_starts_over_without_re_adding(tmp_path, sources):
    root = tmp_path / "watch"
    put(sources, root, "a.mha")
    inst = Instance()
    inst.tick(root, ScanState())
    assert ScanState.from_json("{not json") == ScanState()
    result, _ = inst.tick(root, ScanState.from_json('{"version": 99}'))
    assert result.new_keys == []  # known through the instance, not the cursor


# --- the Dagster sensor -----------------------------------------------------------------


def sensor_tick(sensor, instance, resource, cursor):
    context = build_sensor_context(instance=instance, cursor=cursor,
                                   resources={"itk_infer": resource})
    result = sensor(context)
    if isinstance(result, SensorResult):
        # What the daemon does with the result: add the partitions, keep the cursor.
        for request in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(request.partitions_def_name,
                                            list(request.partition_keys))
        return result, result.cursor
    return result, cursor


def range_of(request) -> tuple[str, str] | None:
    tags = request.tags
    if RANGE_START_TAG not in tags:
        return None
    return tags[RANGE_START_TAG], tags[RANGE_END_TAG]


def test_sensor_adds_partitions_and_requests_runs(tmp_path, sources):
    root, out = tmp_path / "watch", tmp_path / "watch" / "out"
    put(sources, root, "case_03.nii")
    put(sources, root, "2026-11-26/case_01.mha")
    out.mkdir(parents=True)
    res = ItkInferResource(watch_root=str(root), output_root=str(out))
    sensor = build_folder_sensor(inference_job, settle_seconds=30, run_tags=RUN_TAGS)
    with instance_for_test() as instance:
        result, cursor = sensor_tick(sensor, instance, res, None)
        keys = ["2026-11-26/case_01.mha", "case_03.nii"]
        assert list(result.dynamic_partitions_requests[0].partition_keys) == keys
        # One run for both (run_batch 32): a range over the two keys, no single partition.
        (request,) = result.run_requests
        assert request.partition_key is None and range_of(request) == tuple(keys)
        assert request.tags[BATCH_SIZE_TAG] == "2"
        assert all(r.asset_selection == [SEGMENTATION] for r in result.run_requests)
        assert all("nvidia.com/gpu" in r.tags["dagster-k8s/config"] for r in result.run_requests)
        assert sorted(instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME)) == keys

        again, cursor = sensor_tick(sensor, instance, res, cursor)
        assert not again.run_requests and not again.dynamic_partitions_requests

        put(sources, root, "2026-11-27/case_02.nii.gz")
        growing = put(sources, root, "2026-11-27/partial.mha", age_s=0)
        third, cursor = sensor_tick(sensor, instance, res, cursor)
        assert [r.partition_key for r in third.run_requests] == ["2026-11-27/case_02.nii.gz"]
        with growing.open("ab") as handle:
            handle.write(b"\0" * 100)
        fourth, cursor = sensor_tick(sensor, instance, res, cursor)
        assert not fourth.run_requests  # still growing
        fifth, cursor = sensor_tick(sensor, instance, res, cursor)
        assert [r.partition_key for r in fifth.run_requests] == ["2026-11-27/partial.mha"]
        assert len(set(instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME))) == 4


def test_sensor_can_request_logits_too(tmp_path, sources):
    root = tmp_path / "watch"
    put(sources, root, "a.mha")
    res = ItkInferResource(watch_root=str(root), output_root=str(tmp_path / "out"),
                           sensor_logits=True)
    sensor = build_folder_sensor(inference_job)
    with instance_for_test() as instance:
        result, _ = sensor_tick(sensor, instance, res, None)
        assert result.run_requests[0].asset_selection == [SEGMENTATION, LOGITS]


def test_sensor_skips_without_a_watch_root(tmp_path):
    sensor = build_folder_sensor(inference_job)
    with instance_for_test() as instance:
        result, _ = sensor_tick(sensor, instance, ItkInferResource(watch_root=""), None)
        assert isinstance(result, SkipReason) and "ITK_INFER_WATCH_ROOT" in result.skip_message


# --- batches of new keys (issue 15, item 1) ---------------------------------------------


def resolve_range(instance, start: str, end: str) -> list[str]:
    """The keys Dagster's dynamic partitions definition puts in a range, on this instance."""
    from dagster._core.definitions.partitions.context import partition_loading_context

    with partition_loading_context(dynamic_partitions_store=instance):
        return list(images_partitions.get_partition_keys_in_range(PartitionKeyRange(start, end)))


def keys_of(instance, request) -> list[str]:
    bounds = range_of(request)
    return [request.partition_key] if bounds is None else resolve_range(instance, *bounds)


def test_a_tick_batches_its_new_keys_into_contiguous_ranges(tmp_path, sources):
    root = tmp_path / "watch"
    new = [f"d{i // 4}/c{i}.mha" for i in range(7)]
    for key in new:
        put(sources, root, key)
    res = ItkInferResource(watch_root=str(root), output_root=str(tmp_path / "out"), run_batch=3)
    sensor = build_folder_sensor(inference_job, run_tags=RUN_TAGS)
    run_keys = []
    for _attempt in range(2):  # the same tick twice, on fresh instances: same runs
        with instance_for_test() as instance:
            # Keys added earlier sort between the new ones but lie before them in the order.
            instance.add_dynamic_partitions(IMAGES_PARTITIONS_NAME, ["d0/a.mha", "d1/z.mha"])
            result, _ = sensor_tick(sensor, instance, res, None)
            requests = result.run_requests
            assert [len(keys_of(instance, r)) for r in requests] == [3, 3, 1]
            runs = [keys_of(instance, r) for r in requests]
            assert sorted(k for keys in runs for k in keys) == sorted(new)  # each exactly once
            assert [r.tags.get(BATCH_SIZE_TAG) for r in requests] == ["3", "3", None]
            assert requests[-1].partition_key == runs[-1][0]  # a lone key: a plain partition
            run_keys.append([r.run_key for r in requests])
    assert run_keys[0] == run_keys[1] and len(set(run_keys[0])) == 3


def test_the_per_tick_cap_is_whole_batches(tmp_path, sources):
    root = tmp_path / "watch"
    for i in range(5):
        put(sources, root, f"c{i}.mha")
    res = ItkInferResource(watch_root=str(root), output_root=str(tmp_path / "out"), run_batch=2)
    sensor = build_folder_sensor(inference_job, max_new_per_tick=5)
    with instance_for_test() as instance:
        first, cursor = sensor_tick(sensor, instance, res, None)
        assert [len(keys_of(instance, r)) for r in first.run_requests] == [2, 2]
        second, _ = sensor_tick(sensor, instance, res, cursor)
        assert [keys_of(instance, r) for r in second.run_requests] == [["c4.mha"]]


def test_reruns_share_a_run_only_with_their_neighbours_in_the_partition_order():
    order = ["a", "b", "c", "d", "e", "f"]
    assert plan_batches(["n1", "n2", "n3"], ["e", "b", "c", "f", "a"], 2, lambda: order) == [
        ["n1", "n2"], ["n3"], ["a", "b"], ["c"], ["e", "f"]]
    assert plan_batches([], ["d", "b"], 8, lambda: order) == [["b"], ["d"]]
    asked = []
    assert plan_batches(["n"], [], 8, lambda: asked.append(1) or order) == [["n"]]
    assert asked == []  # no reruns: the partition list is not read


def bad_copy(source: Path, target: Path) -> Path:
    """A float copy of ``source`` with one NaN voxel: its header reads, its case fails."""
    image = sitk.ReadImage(str(source), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[array.shape[0] // 2, 0, 0] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(broken, str(target))
    past = time.time() - 120
    os.utime(target, (past, past))
    return target


def execute(instance, res, request, raise_on_error=True):
    """What the daemon's run does with a sensor's request, in this process."""
    return materialize([itk_infer_inference, confidences], instance=instance,
                       resources={"itk_infer": res}, selection=request.asset_selection,
                       partition_key=request.partition_key, tags=dict(request.tags),
                       raise_on_error=raise_on_error)


def test_a_batch_loads_the_model_once_and_a_bad_image_fails_only_itself(
        tmp_path, sources, demo, monkeypatch):
    from itk_infer_assets import resources

    loads = []
    original = resources._ResourceMethods.load_model
    monkeypatch.setattr(resources._ResourceMethods, "load_model",
                        lambda self, device: loads.append(1) or original(self, device))
    root = tmp_path / "watch"
    good = ["d/a.mha", "d/b.nii.gz", "d/c.nii"]
    for key in good:
        put(sources, root, key)
    bad_copy(sources["case_01.mha"], root / "d" / "bad.mha")  # sorts between b and c
    res = ItkInferResource(watch_root=str(root), output_root=str(tmp_path / "out"),
                           onnx_path=str(demo.model), device="cpu", preview=False)
    sensor = build_folder_sensor(inference_job)
    with instance_for_test() as instance:
        result, _ = sensor_tick(sensor, instance, res, None)
        (request,) = result.run_requests
        assert keys_of(instance, request) == ["d/a.mha", "d/b.nii.gz", "d/bad.mha", "d/c.nii"]
        run = execute(instance, res, request, raise_on_error=False)
        assert not run.success and len(loads) == 1
        assert instance.get_materialized_partitions(SEGMENTATION) == set(good)
        (failure,) = run.get_step_failure_events()
        message = failure.step_failure_data.user_failure_data.description
        assert "1 of 4" in message and "d/bad.mha" in message and "NaN" in message


# --- replaced images (item 2) -------------------------------------------------------------


def replace(source: Path, target: Path) -> None:
    """Replace ``target`` the way copy tools do: write a temporary, rename it over."""
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.copyfile(source, tmp)
    past = time.time() - 120
    os.utime(tmp, (past, past))
    os.replace(tmp, target)


def data_version(record) -> str | None:
    """The data version Dagster reads from a materialisation (what the UI shows)."""
    from dagster._core.definitions.data_version import extract_data_version_from_entry

    version = extract_data_version_from_entry(record.event_log_entry)
    return None if version is None else version.value


def version_of(path: Path) -> str:
    st = path.stat()
    return input_version(st.st_size, st.st_mtime)


def test_only_known_files_replaced_since_their_materialisation_run_again(tmp_path, sources):
    root = tmp_path / "watch"
    keys = [f"x/{name}.mha" for name in "abcde"]
    for key in keys:
        put(sources, root, key)
    inst = Instance()
    recorded: dict[str, str] = {}
    first, state = inst.tick(root, ScanState(), margin_seconds=0,
                             versions=lambda ks: {k: recorded[k] for k in ks if k in recorded})
    assert first.new_keys == keys
    recorded.update({key: version_of(root / key) for key in keys[:3]})  # materialised
    recorded["x/d.mha"] = "5f3a9c"  # a version from before item 2 (Dagster's own hash)
    time.sleep(0.05)
    for name in "bde":  # e: known but never materialised (its run failed, say)
        replace(sources["case_02.nii.gz"], root / f"x/{name}.mha")
    second, state = inst.tick(root, state, margin_seconds=0,
                              versions=lambda ks: {k: recorded[k] for k in ks if k in recorded})
    assert second.rerun_keys == ["x/b.mha"] and second.new_keys == []
    assert second.new_files["x/b.mha"][0] == (root / "x/b.mha").stat().st_size
    third, _ = inst.tick(root, state, margin_seconds=0, versions=lambda ks: {})
    assert third.rerun_keys == [] and third.new_keys == []


def test_a_replaced_image_is_materialised_again_with_its_new_data_version(
        tmp_path, sources, demo):
    root = tmp_path / "watch"
    key = "d/a.mha"
    put(sources, root, key)
    res = ItkInferResource(watch_root=str(root), output_root=str(tmp_path / "out"),
                           onnx_path=str(demo.model), device="cpu", preview=False)
    sensor = build_folder_sensor(inference_job)
    with instance_for_test() as instance:
        first, cursor = sensor_tick(sensor, instance, res, None)
        execute(instance, res, first.run_requests[0])
        (event,) = instance.fetch_materializations(SEGMENTATION, limit=10).records
        assert event.partition_key == key and data_version(event) == version_of(root / key)
        old_version = version_of(root / key)
        quiet, cursor = sensor_tick(sensor, instance, res, cursor)
        assert not quiet.run_requests

        replace(sources["case_01.mha"], root / key)  # another image under the same name
        again, cursor = sensor_tick(sensor, instance, res, cursor)
        (request,) = again.run_requests
        assert request.partition_key == key and not again.dynamic_partitions_requests
        assert request.run_key != first.run_requests[0].run_key
        execute(instance, res, request)
        events = instance.fetch_materializations(SEGMENTATION, limit=10).records
        assert [e.partition_key for e in events] == [key, key]
        assert data_version(events[0]) == version_of(root / key) != old_version


# --- names that cannot be keys, and bounded ticks (item 3) --------------------------------


def make_awkward_names(root: Path, sources: dict[str, Path]) -> None:
    """Good and bad names side by side: bytes that are not UTF-8 (in a file and in a folder
    name), a tab, and '...' (Dagster refuses both in keys)."""
    put(sources, root, "ok.mha")
    image = sources["case_01.mha"].read_bytes()
    raw = os.fsencode(root)
    os.mkdir(raw + b"/dir\xfe")
    for name in (b"bad\xff.mha", b"tab\tname.mha", b"a...b.mha", b"dir\xfe/in.mha"):
        with open(raw + b"/" + name, "wb") as handle:
            handle.write(image)
        past = time.time() - 120
        os.utime(raw + b"/" + name, (past, past))


def test_names_that_cannot_be_keys_are_skipped_counted_and_reported_once(tmp_path, sources):
    root = tmp_path / "watch"
    make_awkward_names(root, sources)
    inst = Instance()
    first, state = inst.tick(root, ScanState())
    assert first.new_keys == ["ok.mha"]
    assert first.invalid_names == 4 and len(first.skipped) == 4
    reasons = dict(first.skipped)
    assert set(reasons) == {"bad\\xff.mha", "tab\tname.mha", "a...b.mha", "dir\\xfe"}
    assert "UTF-8" in reasons["bad\\xff.mha"] and "UTF-8" in reasons["dir\\xfe"]
    assert "refuses" in reasons["tab\tname.mha"] and "refuses" in reasons["a...b.mha"]
    for path in reasons:  # reported as text a log can hold (encode raises on surrogates)
        path.encode("utf-8")
    asked = [key for keys in inst.asked for key in keys]
    assert asked == ["ok.mha"]  # the instance is never asked about a name that is not a key
    again, _ = inst.tick(root, state, margin_seconds=0)
    assert again.new_keys == [] and again.skipped == []


def test_the_sensor_tick_survives_names_that_cannot_be_keys(tmp_path, sources):
    root = tmp_path / "watch"
    make_awkward_names(root, sources)
    res = ItkInferResource(watch_root=str(root), output_root=str(tmp_path / "out"))
    sensor = build_folder_sensor(inference_job)
    with instance_for_test() as instance:
        result, _ = sensor_tick(sensor, instance, res, None)
        assert [r.partition_key for r in result.run_requests] == ["ok.mha"]
        assert instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME) == ["ok.mha"]


class FakeClock:
    """Monotonic seconds that advance by one on every reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_tick_out_of_time_leaves_the_rest_to_the_next(tmp_path):
    root = tmp_path / "watch"
    expected = set()
    for folder in range(6):
        for case in range(3):
            path = root / f"f{folder}" / f"c{case}.mha"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
            expected.add(f"f{folder}/c{case}.mha")
    past = time.time_ns() - 600 * 10**9
    for path in [*root.rglob("*"), root]:
        os.utime(path, ns=(past, past))
    inst = Instance()
    state, seen, ticks = ScanState(), [], []
    for _ in range(20):
        result, state = inst.tick(root, state, margin_seconds=0, time_budget_seconds=8,
                                  clock=FakeClock())
        ticks.append(result)
        seen += result.new_keys
        if not (result.new_keys or result.capped or result.waiting):
            break
    first = ticks[0]
    assert first.out_of_time and first.capped and first.folders_listed < 7
    assert first.folders_checked == 7  # every known folder is still stat'ed
    assert 0 < len(first.new_keys) < len(expected)
    assert first.waiting  # settled but not probed in time: in the cursor, not lost
    assert sorted(seen) == sorted(expected)  # each exactly once, over several ticks
    assert len(ticks) > 2
