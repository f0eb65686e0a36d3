"""A real ``itk_infer serve`` in a subprocess on a loopback port, and helpers to compare its
answers with the command line's label maps."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"
DEMO_MODEL = DEMO / "model.onnx"
DEMO_IMAGES = DEMO / "images"
TOKEN = "test-token-0123456789abcdef"  # a test secret, not a credential
READY = re.compile(r"at (http://\S+) \(auth (on|off)\)")


@dataclass
class LiveServer:
    process: subprocess.Popen
    url: str
    scratch: Path  # the parent given as --scratch-dir
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def scratch_files(self) -> list[Path]:
        return sorted(p for p in self.scratch.rglob("*") if p.is_file())

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as a service manager stops it; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def start_server(folder: Path, *options: str, token: str | None = None,
                 timeout: float = 90.0) -> LiveServer:
    """``itk_infer serve`` on the demo model, any free loopback port; waits until it says
    where it listens (after the model is loaded)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "ITK_INFER_SERVE_TOKEN"}
    if token is not None:
        env["ITK_INFER_SERVE_TOKEN"] = token
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
    command = [sys.executable, "-m", "itk_infer", "serve", "--onnx", str(DEMO_MODEL),
               "--device", "cpu", "--port", "0", "--scratch-dir", str(folder / "scratch"),
               *options]
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = READY.search(stdout.read_text())
        if found:
            return LiveServer(process, found.group(1), folder / "scratch", stderr)
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n"
                               f"{stderr.read_text()}")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the server did not start in {timeout} s:\n{stderr.read_text()}")


def assert_same_label_map(served: Path, reference: Path) -> None:
    """Same voxels at the same physical places: geometry within float32 rounding (NIfTI
    stores it in float32), then identical arrays."""
    a, b = sitk.ReadImage(str(served)), sitk.ReadImage(str(reference))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
