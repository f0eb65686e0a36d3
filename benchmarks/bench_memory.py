"""Peak memory of the whole pipeline on a large CT: 512 x 512 x 1000, 32 classes, logits and
confidence saved; the issue's bound is 6 GB (the logits alone would be 34 GB in float32).

Writes a synthetic int16 CT (smooth shapes, no noise, so the float16 logits compress and the
disk is spared) and a random 1x1x1 conv ONNX model (32 classes, patch 64 x 128 x 128, stride
32 x 64 x 64, batch 1), runs the ``itk_infer`` CLI on it in a subprocess with ``--save-logits
--save-conf`` and reads that subprocess's peak RSS from the kernel (``wait4``).
Run from the repository root: ``python benchmarks/bench_memory.py`` (several minutes on 2
cores; needs ~2 GB of disk in the work folder). ``--z 200`` for a shorter check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from bench_monai import machine_info, write_random_conv_model  # noqa: E402

PATCH = (64, 128, 128)
STRIDE = (32, 64, 64)
NUM_CLASSES = 32
LIMIT_GB = 6.0


def write_ct(path: Path, shape_zyx: tuple[int, int, int], orientation: str) -> None:
    """A trunk-like int16 phantom in HU, built slab by slab (air, body, lungs, spine)."""
    import SimpleITK as sitk

    z_n, y_n, x_n = shape_zyx
    hu = np.empty(shape_zyx, dtype=np.int16)
    y, x = np.mgrid[0:y_n, 0:x_n].astype(np.float32)
    cy, cx = (y_n - 1) / 2, (x_n - 1) / 2
    texture = (25 * np.sin(x / 17.0) * np.cos(y / 23.0)).astype(np.float32)
    for z in range(z_n):
        t = z / max(1, z_n - 1)
        body = ((y - cy) / (0.38 * y_n * (0.9 + 0.1 * np.sin(np.pi * t)))) ** 2 + (
            (x - cx) / (0.46 * x_n)
        ) ** 2 < 1
        lung_r = 0.14 * x_n * np.sin(np.pi * min(1.0, max(0.0, (t - 0.2) / 0.5))) + 1e-3
        lungs = (((x - cx - 0.2 * x_n) ** 2 + (y - cy + 0.05 * y_n) ** 2) < lung_r**2) | (
            ((x - cx + 0.2 * x_n) ** 2 + (y - cy + 0.05 * y_n) ** 2) < lung_r**2
        )
        spine = ((x - cx) ** 2 + (y - cy - 0.25 * y_n) ** 2) < (0.05 * x_n) ** 2
        plane = np.full((y_n, x_n), -1000.0, dtype=np.float32)
        plane[body] = 40.0 + texture[body] + 10 * t
        plane[lungs & body] = -800.0 + texture[lungs & body]
        plane[spine] = 700.0
        hu[z] = plane.astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    del hu
    image.SetSpacing((0.8, 0.8, 1.0))
    image.SetDirection(
        sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(orientation)
    )
    sitk.WriteImage(image, str(path), useCompression=False)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_cli(command: list[str], log_path: Path) -> dict:
    """Run the CLI; peak RSS from wait4, plus a VmRSS trace sampled every 0.5 s."""
    trace: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def sample() -> None:
            status = Path(f"/proc/{proc.pid}/status")
            while not stop.wait(0.5):
                try:
                    for line in status.read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            trace.append((time.perf_counter() - t0, int(line.split()[1]) / 2**20))
                except OSError:
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _pid, status, usage = os.wait4(proc.pid, 0)
        stop.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return {"returncode": proc.returncode, "wall_s": wall, "peak_gb": usage.ru_maxrss / 2**20,
            "trace": trace}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--z", type=int, default=1000, help="slices (default %(default)s)")
    parser.add_argument("--orientation", default="LPS",
                        help="direction of the written CT (LPS, as DICOM; not the model's LPI, "
                             "so the reorientation is measured too)")
    parser.add_argument("--workdir", type=Path, help="keep inputs and outputs here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    info = machine_info()
    print(json.dumps(info), flush=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="itk_infer-bench-memory-"))
    inputs, outputs = work / "in", work / "out"
    inputs.mkdir(parents=True, exist_ok=True)
    shape = (args.z, 512, 512)
    try:
        image = inputs / "large_ct.mha"
        if not image.exists():
            print(f"writing {shape} int16 CT ...", flush=True)
            write_ct(image, shape, args.orientation)
        model = write_random_conv_model(
            work / "random32.onnx", NUM_CLASSES, seed=0,
            metadata={
                "window_level": "40", "window_width": "400",
                "inference_config": json.dumps({"patch_size": list(PATCH),
                                                "patch_stride": list(STRIDE),
                                                "forward_batch_windows": 1}),
            },
        )
        if outputs.exists():
            shutil.rmtree(outputs)
        command = [sys.executable, "-m", "itk_infer", "-i", str(inputs), "-o", str(outputs),
                   "--onnx", str(model), "--save-logits", "--save-conf", "--device", "cpu",
                   "--no-progress", "--overwrite"]
        print("running: itk_infer " + " ".join(command[3:]), flush=True)
        result = run_cli(command, work / "cli.log")
        if result["returncode"] != 0:
            print((work / "cli.log").read_text()[-3000:])
            raise SystemExit(f"itk_infer exited with {result['returncode']}")

        import zarr

        record = json.loads((outputs / ".itk_infer" / "large_ct.json").read_text())
        logits = zarr.open_array(str(outputs / record["outputs"]["logits"]), mode="r")
        assert logits.shape == (NUM_CLASSES, *shape), logits.shape
        assert record["confidence"] is not None
        result.update(
            shape=shape, timings_s=record["timings_s"], confidence=record["confidence"],
            logits_gb_on_disk=folder_bytes(outputs / record["outputs"]["logits"]) / 2**30,
            logits_gb_float32=NUM_CLASSES * int(np.prod(shape)) * 4 / 2**30,
            labels_mb=(outputs / record["outputs"]["labels"]).stat().st_size / 2**20,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    info["load_avg_end"] = machine_info().get("load_avg")
    trace = result.pop("trace")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "result": result, "trace": trace},
                                        indent=2, default=str))

    print("\n## Machine\n")
    print("| key | value |\n|---|---|")
    for key, value in info.items():
        print(f"| {key} | {value} |")
    print(f"\n## 4. Whole pipeline, {shape[2]} x {shape[1]} x {shape[0]} CT, {NUM_CLASSES} "
          f"classes, --save-logits --save-conf\n")
    print("| figure | value |\n|---|---|")
    ok = result["peak_gb"] <= LIMIT_GB
    print(f"| peak RSS (wait4 ru_maxrss) | {result['peak_gb']:.2f} GB "
          f"({'within' if ok else 'OVER'} the {LIMIT_GB:g} GB bound) |")
    print(f"| wall time of the CLI | {result['wall_s']:.0f} s |")
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in result["timings_s"].items())
    print(f"| case timings (record) | {timings} |")
    print(f"| logits: zarr on disk / float32 in memory | {result['logits_gb_on_disk']:.2f} GB / "
          f"{result['logits_gb_float32']:.1f} GB |")
    print(f"| label map | {result['labels_mb']:.1f} MB |")
    print(f"| mean confidence | {result['confidence']:.4f} |")
    if trace:
        steps = max(1, len(trace) // 12)
        print("\nRSS trace (s: GB): " + ", ".join(f"{t:.0f}: {g:.2f}" for t, g in trace[::steps]))
    print("\nGB = 2^30 bytes.")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
