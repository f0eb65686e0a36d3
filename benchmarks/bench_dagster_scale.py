"""The folder sensor at scale: 10,000 small images in nested folders.

What one tick costs and what it asks for, from the sensor's own functions: the scan
(:func:`itk_infer_assets.sensors.scan_watch_root`, real file system, real header probes)
with stand-ins for the instance (a set of known keys, a dict of recorded data versions), and
the runs it would request (:func:`plan_batches` and :func:`run_request`, ``run_batch`` 32).

Scenarios, in order, on one tree (``days x series x images`` .mha files of 4 x 4 x 4 voxels,
settled: mtimes in the past):

1. registration: ticks until every image is a key (at most ``whole_batches(1000, 32)`` = 992
   per tick): time and cursor size per tick, runs requested in all (target ceil(N / 32));
2. a quiet tick (nothing new), median of 5;
3. one new image in a known folder;
4. ``--replace`` images of one series replaced (written elsewhere, renamed over): the tick
   finds them through their data versions and batches neighbours of the partition order.

With ``--dagster``, registration and a quiet tick also go through the real sensor on an
on-disk SQLite instance (``build_sensor_context``; the partitions added as the daemon adds
them), so the instance queries are included.

Not a test: run it from the repository root, ``python benchmarks/bench_dagster_scale.py
[--days 20 --series 10 --images 50] [--dagster] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the packages importable
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from itk_infer_assets.partitions import input_version  # noqa: E402
from itk_infer_assets.sensors import (  # noqa: E402
    ScanResult,
    ScanState,
    plan_batches,
    run_request,
    scan_watch_root,
    whole_batches,
)

BATCH = 32
SETTLED_S = 600  # mtimes this far in the past: no file waits, no folder is re-listed


class FakeInstance:
    """The instance as the sensor sees it: partitions in insertion order, and the data
    version of each partition's latest materialisation."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.known: set[str] = set()
        self.versions: dict[str, str] = {}

    def is_known(self, keys: Sequence[str]) -> set[str]:
        return self.known & set(keys)

    def recorded(self, keys: Sequence[str]) -> dict[str, str]:
        return {k: self.versions[k] for k in keys if k in self.versions}

    def apply(self, root: Path, scan: ScanResult) -> None:
        """What the daemon and the runs do: add the keys, materialise every requested key."""
        self.order.extend(scan.new_keys)
        self.known.update(scan.new_keys)
        for key in [*scan.new_keys, *scan.rerun_keys]:
            st = (root / key).stat()
            self.versions[key] = input_version(st.st_size, st.st_mtime)


def make_tree(root: Path, days: int, series: int, images: int) -> int:
    """``days/series/images`` small .mha files, all settled; returns how many."""
    sample = root.parent / "sample.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16)), str(sample))
    data = sample.read_bytes()
    past = time.time() - SETTLED_S
    count = 0
    for day in range(days):
        for s in range(series):
            folder = root / f"2026-{1 + day // 28:02d}-{1 + day % 28:02d}" / f"series_{s:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(images):
                (folder / f"img_{i:04d}.mha").write_bytes(data)
                os.utime(folder / f"img_{i:04d}.mha", (past, past))
                count += 1
    for folder in sorted(root.rglob("*"), reverse=True):
        if folder.is_dir():
            os.utime(folder, (past, past))
    os.utime(root, (past, past))
    return count


def tick(root: Path, state: ScanState, fake: FakeInstance) -> tuple[dict, ScanState]:
    """One tick as the sensor runs it; returns its figures and the next state."""
    t0 = time.perf_counter()
    scan = scan_watch_root(root, state, fake.is_known, versions=fake.recorded,
                           margin_seconds=30, settle_seconds=5,
                           max_new_per_tick=whole_batches(1000, BATCH),
                           time_budget_seconds=20.0)
    batches = plan_batches(scan.new_keys, scan.rerun_keys, BATCH, lambda: fake.order)
    requests = [run_request(keys, scan.new_files, [], {}) for keys in batches]
    cursor = scan.state.to_json()
    seconds = time.perf_counter() - t0
    fake.apply(root, scan)
    figures = {"seconds": round(seconds, 4), "cursor_bytes": len(cursor.encode()),
               "new": len(scan.new_keys), "rerun": len(scan.rerun_keys),
               "runs": len(requests), "folders_listed": scan.folders_listed,
               "folders_checked": scan.folders_checked, "out_of_time": scan.out_of_time,
               "run_sizes": sorted({len(keys) for keys in batches})}
    return figures, ScanState.from_json(cursor)


def register(root: Path, fake: FakeInstance, total: int) -> tuple[list[dict], ScanState]:
    state, ticks = ScanState(), []
    while len(fake.known) < total:
        figures, state = tick(root, state, fake)
        ticks.append(figures)
        print(f"  tick {len(ticks)}: {figures['new']} new, {figures['runs']} runs, "
              f"{figures['seconds']:.2f} s, cursor {figures['cursor_bytes']} B")
        if len(ticks) > 100:
            raise SystemExit("registration does not finish")
    return ticks, state


def replace_series(root: Path, count: int) -> list[str]:
    """Replace the first ``count`` images of one series as copy tools do (temporary, rename)."""
    folder = sorted(p for p in root.rglob("series_*") if p.is_dir())[0]
    replaced = []
    other = sitk.GetImageFromArray(np.ones((4, 4, 5), np.int16))
    past = time.time() - SETTLED_S
    for path in sorted(folder.glob("*.mha"))[:count]:
        tmp = path.with_name(f".tmp-{path.name}")
        sitk.WriteImage(other, str(tmp))
        os.utime(tmp, (past, past))
        os.replace(tmp, path)
        replaced.append(path.relative_to(root).as_posix())
    return replaced


def run_scenarios(root: Path, total: int, replace: int) -> dict:
    fake = FakeInstance()
    ticks, state = register(root, fake, total)
    runs = sum(t["runs"] for t in ticks)
    time.sleep(0.05)
    quiet = []
    for _ in range(5):
        figures, state = tick(root, state, fake)
        quiet.append(figures)
    folder = next(p for p in sorted(root.rglob("series_*")) if p.is_dir())
    (folder / "late.mha").write_bytes((folder / "img_0000.mha").read_bytes())
    past = time.time() - SETTLED_S
    os.utime(folder / "late.mha", (past, past))
    one_new, state = tick(root, state, fake)
    replaced = replace_series(root, replace)
    after_replace, state = tick(root, state, fake)
    return {
        "images": total,
        "registration": {"ticks": len(ticks), "runs": runs, "target_runs": math.ceil(total / 32),
                         "seconds_per_tick": [t["seconds"] for t in ticks],
                         "max_cursor_bytes": max(t["cursor_bytes"] for t in ticks),
                         "out_of_time_ticks": sum(t["out_of_time"] for t in ticks)},
        "quiet_tick": {"median_s": statistics.median(t["seconds"] for t in quiet),
                       "cursor_bytes": quiet[-1]["cursor_bytes"],
                       "folders_checked": quiet[-1]["folders_checked"],
                       "folders_listed": quiet[-1]["folders_listed"]},
        "one_new": one_new,
        "replaced": {**after_replace, "expected": len(replaced)},
    }


def through_the_sensor(root: Path, total: int) -> dict:
    """Registration and a quiet tick through the Dagster sensor on a SQLite instance."""
    from dagster import SensorResult, build_sensor_context, instance_for_test

    from itk_infer_assets.definitions import inference_job
    from itk_infer_assets.resources import ItkInferResource
    from itk_infer_assets.sensors import build_folder_sensor

    sensor = build_folder_sensor(inference_job, settle_seconds=5)
    resource = ItkInferResource(watch_root=str(root), output_root=str(root.parent / "out"))
    cursor, ticks, runs = None, [], 0
    with instance_for_test() as instance:
        while True:
            t0 = time.perf_counter()
            result = sensor(build_sensor_context(instance=instance, cursor=cursor,
                                                 resources={"itk_infer": resource}))
            seconds = time.perf_counter() - t0
            if not isinstance(result, SensorResult) or not result.run_requests:
                break
            t1 = time.perf_counter()
            for request in result.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(request.partitions_def_name,
                                                list(request.partition_keys))
            ticks.append({"seconds": round(seconds, 4),
                          "add_seconds": round(time.perf_counter() - t1, 4)})
            runs += len(result.run_requests)
            cursor = result.cursor
        quiet = seconds
        known = len(instance.get_dynamic_partitions("images"))
    return {"ticks": len(ticks), "runs": runs, "partitions": known, "expected": total,
            "seconds_per_tick": [t["seconds"] for t in ticks],
            "add_seconds_per_tick": [t["add_seconds"] for t in ticks],
            "quiet_tick_s": round(quiet, 4), "cursor_bytes": len((cursor or "").encode())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=20)
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--images", type=int, default=50, help="per series folder")
    parser.add_argument("--replace", type=int, default=40, help="images replaced in one series")
    parser.add_argument("--dagster", action="store_true",
                        help="also register through the real sensor on a SQLite instance")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp_text:
        root = Path(tmp_text) / "watch"
        root.mkdir()
        t0 = time.perf_counter()
        total = make_tree(root, args.days, args.series, args.images)
        print(f"{total} images in {args.days * args.series} folders, "
              f"written in {time.perf_counter() - t0:.1f} s")
        figures = run_scenarios(root, total, args.replace)
        if args.dagster:
            os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
            fresh = Path(tmp_text) / "watch2"
            fresh.mkdir()
            make_tree(fresh, args.days, args.series, args.images)
            figures["sensor"] = through_the_sensor(fresh, total)
            sensor = figures["sensor"]
            print(f"through the sensor: {sensor['ticks']} ticks, {sensor['runs']} runs, "
                  f"{sensor['partitions']} partitions; quiet tick "
                  f"{sensor['quiet_tick_s'] * 1000:.1f} ms")
    figures.update({"python": platform.python_version(), "machine": platform.machine(),
                    "cpus": os.cpu_count()})
    reg = figures["registration"]
    print(f"registration: {reg['ticks']} ticks, {reg['runs']} runs (target "
          f"{reg['target_runs']}), max cursor {reg['max_cursor_bytes']} B")
    print(f"quiet tick: {figures['quiet_tick']['median_s'] * 1000:.1f} ms; one new: "
          f"{figures['one_new']['seconds'] * 1000:.1f} ms; replaced "
          f"{figures['replaced']['rerun']}/{figures['replaced']['expected']} in "
          f"{figures['replaced']['runs']} runs")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
