"""The folder sensor: the pure scan, and the Dagster sensor on a sensor context."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from dagster import SensorResult, SkipReason, build_sensor_context, instance_for_test

from itk_infer_assets.assets import LOGITS, SEGMENTATION
from itk_infer_assets.definitions import RUN_TAGS, inference_job
from itk_infer_assets.partitions import IMAGES_PARTITIONS_NAME
from itk_infer_assets.resources import ItkInferResource
from itk_infer_assets.sensors import (
    ScanState,
    build_folder_sensor,
    probe_image,
    scan_watch_root,
)
from tests.assets import make_demo_inputs


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One small valid image per format, copied wherever a test needs images."""
    inputs = make_demo_inputs(tmp_path_factory.mktemp("sources"))
    return {Path(key).name: inputs.root / key for key in inputs.keys}


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


def test_sensor_adds_partitions_and_requests_one_run_each(tmp_path, sources):
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
        assert [r.partition_key for r in result.run_requests] == keys
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
