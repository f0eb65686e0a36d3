"""A real deployment on loopback: dagster-webserver + dagster-daemon with this repository's
workspace.yaml and dagster.yaml; images dropped into the watched root must come out as
segmentations (runs started by the folder sensor) and a confidences table (automation)."""

from __future__ import annotations

import shutil

import pytest

from tests.assets import REPO
from tests.assets.live import run_live_scenario, webserver_available


@pytest.mark.slow
def test_sensor_runs_succeed_on_a_real_server(tmp_path):
    if not webserver_available():
        pytest.skip("dagster-webserver is not installed")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    run_live_scenario(tmp_path, home)
