"""A real deployment on loopback: dagster-webserver + dagster-daemon with this repository's
workspace.yaml and dagster.yaml; images dropped into the watched root must come out as
segmentations (runs started by the folder sensor) and a confidences table (automation)."""

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
from pathlib import Path

import pytest

from itk_infer_assets.partitions import case_for_key, layout_for_key
from tests.assets import REPO, make_demo_inputs

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


@pytest.mark.slow
def test_sensor_runs_succeed_on_a_real_server(tmp_path):
    if shutil.which("dagster-webserver", path=str(BIN)) is None:
        pytest.skip("dagster-webserver is not installed")
    inputs = make_demo_inputs(tmp_path / "data")
    watch, out, home = tmp_path / "watch", tmp_path / "out", tmp_path / "dagster_home"
    watch.mkdir()
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
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
    # Create the SQLite schema once: the webserver and the daemon starting together on an
    # empty DAGSTER_HOME race to create it, and the loser dies on an alembic revision error.
    subprocess.run([str(BIN / "dagster"), "instance", "migrate"], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=120)
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
            if len(succeeded) == len(inputs.keys) and confidences_run and tables_hold(
                    out, inputs.keys):
                break
            time.sleep(2)
        else:
            pytest.fail(f"not done within {DEADLINE_S} s: runs {runs}, confidences "
                        f"{confidences_run}\n{tail(logs['daemon'])}")

        print(f"runs and tables done after {time.monotonic() - started:.1f} s")
        partitions = sorted(next(t["value"] for t in r["tags"] if t["key"] == "dagster/partition")
                            for r in runs)
        assert partitions == sorted(inputs.keys)  # one run per image, none twice
        for key in inputs.keys:
            case = case_for_key(watch, key)
            layout = layout_for_key(out, key)
            assert layout.labels(case).is_file(), key
            assert layout.record(case).is_file(), key
    finally:
        for process in processes.values():
            stop(process)
