"""200 demo-size images end to end: a real dagster-webserver + dagster-daemon vs one CLI run.

Inputs: ``--images`` phantoms (:func:`examples.phantoms.make_phantom`, the demo's size
96 x 96 x 40 and its three formats/orientations in turn), in nested folders
``day-D/series-S/case_NNN.ext`` for the daemon and all in one flat folder for the CLI (the
CLI does not search folders recursively; case names are unique, so outputs pair by name).
Model: the bundled demo ONNX model, ``--save-conf`` in both.

(a) one CLI run (subprocess) over the flat folder;
(b) a DAGSTER_HOME in a temporary folder (SQLite storage, the DefaultRunLauncher: one
    subprocess per run; ``max_concurrent_runs`` = ``--max-runs``, the ``gpu`` pool at 1 so
    inference steps take turns on the 2 cores while the next run starts up), the webserver
    and the daemon started and answering, then the images copied into the watched root;
    timed from the copy until every partition of ``segmentation`` is materialised (GraphQL
    partition stats), and until ``confidences`` is materialised after that.

Prints runs created (target ceil(N / 32)), wall (b)/(a), per-run timings (queue wait, run
duration) and the per-run overhead (run duration minus the run's images at the CLI's
per-image rate), and compares every label map with the CLI's byte for byte.

Not a test: run it from the repository root, ``python benchmarks/bench_dagster_e2e.py
[--images 200] [--max-runs 2] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the packages importable
    sys.path.insert(0, str(ROOT))

import SimpleITK as sitk  # noqa: E402

from examples.phantoms import make_phantom  # noqa: E402
from itk_infer.cases import Case  # noqa: E402
from itk_infer_assets.partitions import case_for_key, layout_for_key  # noqa: E402
from tests.assets.live import BIN, free_port, graphql, stop, tail  # noqa: E402

MODEL = ROOT / "examples" / "demo" / "model.onnx"
FORMATS = ((".mha", "LPI"), (".nii.gz", "RAS"), (".nii", "oblique"))
BATCH = 32
RUNS_QUERY = """
{ runsOrError(filter: {tags: [{key: "dagster/sensor_name", value: "image_folder_sensor"}]}) {
    ... on Runs { results { runId status creationTime startTime endTime
                            tags { key value } } } } }
"""
STATS_QUERY = """
{ assetNodes(assetKeys: [{path: ["segmentation"]}]) {
    partitionStats { numMaterialized numPartitions numFailed } } }
"""
CONF_QUERY = """
{ assetOrError(assetKey: {path: ["confidences"]}) {
    ... on Asset { assetMaterializations(limit: 1) { runId timestamp } } } }
"""
INSTANCE_YAML = """\
concurrency:
  pools:
    default_limit: 1
    granularity: op
    op_granularity_run_buffer: {run_buffer}
  runs:
    max_concurrent_runs: {max_runs}
telemetry:
  enabled: false
"""


def make_inputs(base: Path, count: int) -> tuple[Path, dict[str, Path]]:
    """Phantoms written once into a flat folder; returns it and key -> source file."""
    flat = base / "flat"
    flat.mkdir(parents=True)
    keys = {}
    for i in range(count):
        suffix, orientation = FORMATS[i % len(FORMATS)]
        image, _ = make_phantom(1000 + i, orientation=orientation)
        name = f"case_{i:03d}{suffix}"
        sitk.WriteImage(image, str(flat / name), useCompression=suffix != ".nii")
        # 5 days x 4 series x 10 images at 200
        keys[f"day-{i // 40}/series-{(i // 10) % 4}/{name}"] = flat / name
    return flat, keys


def run_cli(flat: Path, out: Path) -> float:
    command = [sys.executable, "-m", "itk_infer", "-i", str(flat), "-o", str(out),
               "--backend", "onnx", "--onnx", str(MODEL), "--device", "cpu", "--save-conf",
               "--no-progress"]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"CLI failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return wall


def start_servers(base: Path, env: dict, port: int) -> dict[str, subprocess.Popen]:
    migrate = subprocess.run([str(BIN / "dagster"), "instance", "migrate"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    if migrate.returncode != 0:
        raise SystemExit(f"migrate failed:\n{migrate.stdout}{migrate.stderr}")
    commands = {
        "webserver": [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                      "-w", "workspace.yaml"],
        "daemon": [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
    }
    processes = {}
    for name, command in commands.items():
        with (base / f"{name}.log").open("wb") as log:
            processes[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    while True:
        try:
            graphql(port, "{ version }")
            # the code location must be loaded too, or the first ticks are lost to loading
            if graphql(port, STATS_QUERY)["assetNodes"]:
                return processes
        except (OSError, AssertionError):
            pass
        if time.monotonic() - started > 300:
            raise SystemExit(f"webserver not up:\n{tail(base / 'webserver.log')}")
        time.sleep(1)


# long: one polling loop with its stop conditions and the timings it records
def run_daemon(base: Path, keys: dict[str, Path], max_runs: int, run_buffer: int,
               timeout: float) -> dict:
    home, watch, out = base / "home", base / "watch", base / "out_dagster"
    home.mkdir()
    watch.mkdir()
    (home / "dagster.yaml").write_text(
        INSTANCE_YAML.format(max_runs=max_runs, run_buffer=run_buffer))
    env = {**os.environ, "DAGSTER_HOME": str(home), "ITK_INFER_WATCH_ROOT": str(watch),
           "ITK_INFER_OUTPUT_ROOT": str(out), "ITK_INFER_ONNX": str(MODEL),
           "ITK_INFER_DEVICE": "cpu", "ITK_INFER_SENSOR_INTERVAL": "2",
           "ITK_INFER_SENSOR_SETTLE": "1", "ITK_INFER_LEASE_DIR": str(base / "leases")}
    port = free_port()
    processes = start_servers(base, env, port)
    try:
        drop = time.monotonic()
        drop_epoch = time.time()
        for key, source in keys.items():
            target = watch / key
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        seg_done = conf_done = None
        runs: list[dict] = []
        while time.monotonic() - drop < timeout:
            for name, process in processes.items():
                if process.poll() is not None:
                    raise SystemExit(f"{name} exited:\n{tail(base / f'{name}.log')}")
            runs = graphql(port, RUNS_QUERY)["runsOrError"]["results"]
            stats = graphql(port, STATS_QUERY)["assetNodes"][0]["partitionStats"] or {}
            settled = runs and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs)
            if settled and any(r["status"] != "SUCCESS" for r in runs):
                print(f"runs failed:\n{tail(base / 'daemon.log')}", flush=True)
                break  # the sensor does not retry a failed run: nothing more will come
            if seg_done is None and stats.get("numMaterialized") == len(keys) and runs and all(
                    r["status"] == "SUCCESS" for r in runs):
                seg_done = time.monotonic() - drop
            if seg_done is not None:
                mats = graphql(port, CONF_QUERY)["assetOrError"].get("assetMaterializations")
                last_end = max(r["endTime"] for r in runs)
                if mats and float(mats[0]["timestamp"]) / 1000 >= last_end:
                    conf_done = time.monotonic() - drop
                    break
            time.sleep(1)
        steps = step_times(base / "daemon.log")
        return {"seg_s": seg_done, "steps": steps, "conf_s": conf_done, "runs": runs,
                "stats": stats, "drop_epoch": drop_epoch, "out": out, "watch": watch}
    finally:
        for process in processes.values():
            stop(process)


def step_times(log: Path) -> list[tuple[float, float]]:
    """(step seconds, model load seconds) of each run, from the runs' own log lines."""
    found = re.findall(r"\d+ done, \d+ failed in ([\d.]+) s \(model load ([\d.]+) s\)",
                       log.read_text(errors="replace"))
    return [(float(step), float(load)) for step, load in found]


def compare(keys: dict[str, Path], result: dict, cli_out: Path) -> list[str]:
    """Label maps of the daemon's outputs that differ from (or lack) the CLI's."""
    from itk_infer.cases import OutputLayout

    cli_layout = OutputLayout(cli_out)
    bad = []
    for key in keys:
        case = case_for_key(result["watch"], key)
        mine = layout_for_key(result["out"], key).labels(case)
        theirs = cli_layout.labels(Case(name=case.name, path=keys[key]))
        if not mine.is_file() or not theirs.is_file() or mine.read_bytes() != theirs.read_bytes():
            bad.append(key)
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--max-runs", type=int, default=2)
    parser.add_argument("--run-buffer", type=int, default=0,
                        help="runs launched beyond the gpu pool's free slots (Dagster's "
                             "op_granularity_run_buffer; 0: its default)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--cli-after", action="store_true",
                        help="run the CLI again after the daemon (load drift on a shared box)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        base = Path(tmp)
        flat, keys = make_inputs(base, args.images)
        cli_wall = run_cli(flat, base / "out_cli")
        print(f"(a) CLI: {cli_wall:.1f} s for {len(keys)} images", flush=True)
        result = run_daemon(base, keys, args.max_runs, args.run_buffer, args.timeout)
        runs = sorted(result["runs"], key=lambda r: r["creationTime"])
        per_image = cli_wall / len(keys)
        rows = []
        for run in runs:
            tags = {t["key"]: t["value"] for t in run["tags"]}
            size = int(tags.get("itk_infer/batch_size", tags.get("dagster/batch_size", 0)) or 0)
            duration = (run["endTime"] or 0) - (run["startTime"] or 0)
            rows.append({"queued_s": (run["startTime"] or 0) - run["creationTime"],
                         "duration_s": duration, "images": size,
                         "overhead_s": duration - size * per_image if size else None})
        bad = compare(keys, result, base / "out_cli")
        cli_after = run_cli(flat, base / "out_cli_after") if args.cli_after else None
        steps = result["steps"]
        print(f"in-run steps (s, model load s): {steps}; sum {sum(s for s, _ in steps):.1f} s, "
              f"model loads {sum(m for _, m in steps):.1f} s")
        if cli_after:
            print(f"(a') CLI again after the daemon: {cli_after:.1f} s (machine load drift)")
        print(f"(b) daemon: segmentation done {result['seg_s']} s, confidences "
              f"{result['conf_s']} s after the drop; partitions {result['stats']}")
        print(f"runs created {len(runs)} (target {math.ceil(len(keys) / BATCH)})")
        for row in rows:
            print(f"  run: queued {row['queued_s']:.1f} s, duration {row['duration_s']:.1f} s, "
                  f"images {row['images']}, overhead {row['overhead_s']}")
        if result["seg_s"]:
            print(f"wall (b)/(a): seg {result['seg_s'] / cli_wall:.2f}x, with confidences "
                  f"{(result['conf_s'] or float('nan')) / cli_wall:.2f}x")
        print(f"label maps differing from the CLI's: {len(bad)} {bad[:10]}")
        if args.json:
            args.json.write_text(json.dumps({
                "machine": platform.platform(), "images": len(keys), "cli_s": cli_wall,
                "seg_s": result["seg_s"], "conf_s": result["conf_s"], "runs": rows,
                "mismatches": bad, "max_runs": args.max_runs, "run_buffer": args.run_buffer,
                "steps": steps, "cli_after_s": cli_after}, indent=1))
        return 0 if result["seg_s"] and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
