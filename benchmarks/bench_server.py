"""Cost of serving (issue 12): ``itk_infer serve`` round trips against the command line on
the demo cases.

For each demo image, interleaved, ``--repeats`` times:

* CLI: the whole ``itk_infer`` process on a folder holding that one image (interpreter
  start, model load, the case), and the core's own time inside it (the record's read +
  infer + write);
* server: the ``monailabel`` client's upload (``PUT /datastore/``) and inference
  (``POST /infer``, result as ``.nrrd`` uint8, as Slicer asks) against one warm server, and
  the core's time inside that request (the answer's ``latencies``).

Overhead of serving = round trip - the core's time in the request (HTTP, multipart, queue,
result conversion). Medians are printed as a Markdown table for BENCHMARKS.md.

Run from the repository root: ``python benchmarks/bench_server.py [--repeats 5]`` (needs the
server extra and ``pip install --no-deps monailabel==0.8.5``; about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo"
MODEL = DEMO / "model.onnx"
CASES = ("case_01.mha", "case_02.nii.gz", "case_03.nii")
READY = re.compile(r"at (http://\S+) \(auth")


def start_server(folder: Path) -> tuple[subprocess.Popen, str, float]:
    """A warm ``itk_infer serve`` on a free loopback port; returns it, its URL and the
    seconds from launch to ready (model loaded)."""
    out = folder / "server-stdout.txt"
    t0 = time.perf_counter()
    with open(out, "w") as stdout, open(folder / "server-stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "itk_infer", "serve", "--onnx", str(MODEL), "--device",
             "cpu", "--port", "0", "--scratch-dir", str(folder / "scratch")],
            stdout=stdout, stderr=stderr, cwd=ROOT)
    while not (found := READY.search(out.read_text())):
        if process.poll() is not None or time.perf_counter() - t0 > 120:
            raise RuntimeError((folder / "server-stderr.txt").read_text())
        time.sleep(0.05)
    return process, found.group(1), time.perf_counter() - t0


def cli_once(image: Path, folder: Path) -> tuple[float, float]:
    """The whole CLI process on one image: wall seconds, and the core's seconds inside."""
    inputs, output = folder / "in", folder / "out"
    inputs.mkdir()
    (inputs / image.name).symlink_to(image)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "itk_infer", "-i", str(inputs), "-o", str(output),
                    "--onnx", str(MODEL), "--device", "cpu", "--no-progress"],
                   check=True, capture_output=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    record = json.loads(next((output / ".itk_infer").glob("*.json")).read_text())
    timings = record["timings_s"]
    return wall, timings["read"] + timings["infer"] + timings["write"]


def server_once(client, image: Path, ident: str) -> tuple[float, float, float]:
    """Upload and inference through the client: upload s, inference s, core s inside."""
    t0 = time.perf_counter()
    client.upload_image(str(image), ident)
    t1 = time.perf_counter()
    result, params = client.infer("model", ident, {"result_extension": ".nrrd",
                                                   "result_dtype": "uint8"})
    t2 = time.perf_counter()
    sitk.ReadImage(result)  # what Slicer does next; not timed, checks the file is whole
    os.unlink(result)
    latencies = params["latencies"]
    return t1 - t0, t2 - t1, latencies["read"] + latencies["infer"] + latencies["write"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the client imports cgi
        from monailabel.client import MONAILabelClient

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server, url, startup = start_server(work)
        try:
            client = MONAILabelClient(url, tmpdir=str(work))
            rows = measure(client, work, args.repeats)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    report(rows, startup, args.repeats)
    return 0


def measure(client, work: Path, repeats: int) -> dict[str, dict[str, list[float]]]:
    rows: dict[str, dict[str, list[float]]] = {c: {} for c in CASES}
    for repeat in range(repeats):
        order = CASES if repeat % 2 == 0 else tuple(reversed(CASES))
        for name in order:
            image = DEMO / "images" / name
            run = work / f"cli-{repeat}-{name}"
            run.mkdir()
            cli_wall, cli_core = cli_once(image, run)
            upload, infer, core = server_once(client, image, f"{name}-{repeat}")
            for key, value in (("cli_wall", cli_wall), ("cli_core", cli_core),
                               ("upload", upload), ("infer", infer), ("core", core)):
                rows[name].setdefault(key, []).append(value)
    return rows


def report(rows: dict[str, dict[str, list[float]]], startup: float, repeats: int) -> None:
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, medians of {repeats}; server start-up "
          f"(launch to ready) {startup:.2f} s\n")
    print("| case | CLI process, s | CLI core, s | upload, s | infer round trip, s | "
          "core in request, s | serving overhead, ms | CLI process / server round trip |")
    print("|---|---|---|---|---|---|---|---|")
    for name, values in rows.items():
        m = {key: statistics.median(v) for key, v in values.items()}
        trip = m["upload"] + m["infer"]
        overhead = statistics.median(u + i - c for u, i, c in zip(
            values["upload"], values["infer"], values["core"], strict=True))
        print(f"| {name} | {m['cli_wall']:.2f} | {m['cli_core']:.2f} | {m['upload']:.3f} | "
              f"{m['infer']:.3f} | {m['core']:.3f} | {overhead * 1000:.0f} | "
              f"{m['cli_wall'] / trip:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
