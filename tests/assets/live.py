"""The live deployment scenario shared by the server tests: real dagster-webserver and
dagster-daemon processes on loopback with this repository's workspace.yaml and a given
DAGSTER_HOME; images dropped into the watched root must come out as segmentations (runs
started by the folder sensor) and a confidences table (automation)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from itk_infer_assets.partitions import case_for_key, layout_for_key
from tests.assets import REPO, DemoInputs, make_demo_inputs

DEADLINE_S = 180  # the whole wait for runs and outputs, after the server answers
BIN = Path(sys.executable).parent

RUNS_QUERY = """
query SensorRuns {
  runsOrError(filter: {tags: [{key: "dagster/sensor_name", value: "image_folder_sensor"}]}) {
    __typename
    ... on Runs { results { runId status tags { key value } } }
  }
}
"""
CONFIDENCES_QUERY = """
query Confidences {
  assetOrError(assetKey: {path: ["confidences"]}) {
    __typename
    ... on Asset { assetMaterializations(limit: 1) { runId } }
  }
}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    if body.get("errors"):
        raise AssertionError(f"GraphQL errors: {body['errors']}")
    return body["data"]


def stop(process: subprocess.Popen) -> None:
    """Stop a process this test started, then whatever it started (its own session)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        # Code servers and run workers the process started live in its session group.
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.wait(timeout=10)


def tables_hold(out: Path, keys: list[str]) -> bool:
    """Every key's case is a row of its folder's confidences.xlsx."""
    import pandas as pd

    for key in keys:
        layout = layout_for_key(out, key)
        try:
            frame = pd.read_excel(layout.confidences, sheet_name="Confidences")
        except (OSError, ValueError):
            return False
        if Path(key).name.split(".")[0] not in set(frame["Case"].astype(str)):
            return False
    return True


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def webserver_available() -> bool:
    return shutil.which("dagster-webserver", path=str(BIN)) is not None


@dataclass
class LiveResult:
    """What a finished scenario saw: the inputs, its folders, the sensor's runs (as GraphQL
    lists them), the run that materialised the confidences, and `dagster instance migrate`."""

    inputs: DemoInputs
    watch: Path
    out: Path
    runs: list[dict]
    confidences_run: str
    migrate: subprocess.CompletedProcess


def run_live_scenario(tmp_path: Path, home: Path) -> LiveResult:
    """Run the scenario against the instance of ``home`` (a DAGSTER_HOME holding the
    dagster.yaml under test); every process it starts is stopped before it returns."""
    inputs = make_demo_inputs(tmp_path / "data")
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "ITK_INFER_WATCH_ROOT": str(watch),
        "ITK_INFER_OUTPUT_ROOT": str(out),
        "ITK_INFER_ONNX": str(inputs.model),
        "ITK_INFER_DEVICE": "cpu",
        "ITK_INFER_SENSOR_INTERVAL": "2",
        "ITK_INFER_SENSOR_SETTLE": "1",
        "ITK_INFER_LEASE_DIR": str(tmp_path / "leases"),
    }
    logs = {name: tmp_path / f"{name}.log" for name in ("webserver", "daemon")}
    commands = {
        "webserver": [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                      "-w", "workspace.yaml"],
        "daemon": [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
    }
    # Create the schema once: the webserver and the daemon starting together on an empty
    # DAGSTER_HOME race to create it, and the loser dies on an alembic revision error.
    migrate = subprocess.run([str(BIN / "dagster"), "instance", "migrate"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, f"dagster instance migrate:\n{migrate.stdout}{migrate.stderr}"
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            with logs[name].open("wb") as log:
                processes[name] = subprocess.Popen(
                    command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
        started = time.monotonic()
        while True:  # the server answers (code location loaded or not)
            try:
                graphql(port, "{ version }")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                assert time.monotonic() - started < 120, tail(logs["webserver"])
                assert processes["webserver"].poll() is None, tail(logs["webserver"])
                time.sleep(1)

        print(f"server answers after {time.monotonic() - started:.1f} s")
        # Drop the images: a dated subfolder that appears now, and one file in the root.
        for key in inputs.keys:
            target = watch / key
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(inputs.root / key, target)

        deadline = time.monotonic() + DEADLINE_S
        runs, confidences_run = [], None
        while time.monotonic() < deadline:
            for name, process in processes.items():
                assert process.poll() is None, f"{name} exited:\n{tail(logs[name])}"
            data = graphql(port, RUNS_QUERY)["runsOrError"]
            assert data["__typename"] == "Runs", data
            runs = data["results"]
            failed = [r for r in runs if r["status"] in ("FAILURE", "CANCELED")]
            assert not failed, f"runs failed: {failed}\n{tail(logs['daemon'])}"
            succeeded = [r for r in runs if r["status"] == "SUCCESS"]
            asset = graphql(port, CONFIDENCES_QUERY)["assetOrError"]
            if asset["__typename"] == "Asset" and asset["assetMaterializations"]:
                confidences_run = asset["assetMaterializations"][0]["runId"]
            if runs and len(succeeded) == len(runs) and confidences_run and tables_hold(
                    out, inputs.keys):
                break
            time.sleep(2)
        else:
            pytest.fail(f"not done within {DEADLINE_S} s: runs {runs}, confidences "
                        f"{confidences_run}\n{tail(logs['daemon'])}")

        print(f"runs and tables done after {time.monotonic() - started:.1f} s")
        order = sorted(inputs.keys)  # the sensor adds a tick's keys in this order
        partitions: list[str] = []
        for run in runs:  # a run is one partition, or a range of them (batched sensor runs)
            tags = {t["key"]: t["value"] for t in run["tags"]}
            if "dagster/partition" in tags:
                partitions.append(tags["dagster/partition"])
            else:
                start = order.index(tags["dagster/asset_partition_range_start"])
                end = order.index(tags["dagster/asset_partition_range_end"])
                partitions.extend(order[start : end + 1])
        assert sorted(partitions) == order  # every image in exactly one run
        for key in inputs.keys:
            case = case_for_key(watch, key)
            layout = layout_for_key(out, key)
            assert layout.labels(case).is_file(), key
            assert layout.record(case).is_file(), key
    finally:
        for process in processes.values():
            stop(process)
    return LiveResult(inputs=inputs, watch=watch, out=out, runs=runs,
                      confidences_run=confidences_run, migrate=migrate)
