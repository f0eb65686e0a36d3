"""A full disk fails the case it hit and stops the run (issue 14): nothing partial looks
complete, no temporaries stay, exit 1. Needs a small tmpfs: mounted by the test (root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from itk_infer.atomic import TMP_PREFIX
from itk_infer.cases import OutputLayout
from itk_infer.records import outputs_intact, read_all_records
from tests.conftest import write_volume

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("procs", ["1", "2"])
def test_full_disk_stops_the_run_cleanly(tmp_path, small_disk, pointwise_model, procs):
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        write_volume(inp / f"c{i}.mha", rng.uniform(-1, 1, (16, 32, 32)).astype(np.float32))
    out = small_disk / "out"
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "itk_infer", "-i", str(inp), "-o", str(out), "--onnx",
         str(pointwise_model), "--device", "cpu", "--no-progress", "--save-logits",
         "--num-proc", procs, "--report", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "no space left for the outputs" in result.stderr
    cases = json.loads(report.read_text())["cases"]
    failed = [c for c in cases if c["status"] == "failed"]
    assert 1 <= len(failed) <= int(procs)  # one per worker at most: then the run stops
    assert all("No space left on device" in c["reason"] for c in failed)
    not_run = [c for c in cases if c["reason"].startswith("not run")]
    assert not_run and len(failed) + len(not_run) + sum(c["status"] == "done" for c in cases) == 6
    # Every record present lists intact outputs; no temporary is left.
    for record in read_all_records(out):
        assert outputs_intact(OutputLayout(out), record)
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX)]
