"""How close ``itk_infer`` runs to the speed of its model: end-to-end wall time of the command
against the bare model forward over exactly the same windows, for 1 and 2 processes.

1. Writes ``--cases`` phantoms (``examples.phantoms.make_phantom``, default 8 of
   160 x 256 x 256, ``.nii.gz``) and takes the demo model ``examples/demo/model.onnx``.
2. (b) bare forward: for every case, the windowed volume as the pipeline makes it, padded and
   cut into the engine's windows and batches (same rows, same batch size, same padding of
   short batches); only the onnxruntime ``session.run`` calls are timed (on CUDA: the
   backend's device-bound forward, synchronised). One session, default threads (all cores).
3. (a) end to end: ``python -m itk_infer`` as a subprocess, timed from start to exit (imports,
   model loading, worker start-up, reading, windowing, blending, writing: everything), once
   with ``--num-proc 1`` and once with ``--num-proc 2``, each into an empty output folder.
4. Prints a Markdown table with the ratio (a)/(b), the machine and the date.

The default stride equals the patch (no overlap) so that three passes over eight realistic
volumes fit in ten minutes on 2 CPU cores; ``--patch-stride 16 32 32`` gives the model's own
overlapping stride (8 times the windows). Run from the repository root:
``python benchmarks/bench_runner.py`` (``--quick``: 2 small cases, a smoke test only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import groupby
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `itk_infer` and `examples` importable
    sys.path.insert(0, str(ROOT))

DEMO_MODEL = ROOT / "examples" / "demo" / "model.onnx"


def machine() -> dict[str, str]:
    """Date, CPU model and count, load, and the GPU if one is used."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": platform.processor() or platform.machine(),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_phantoms(folder: Path, count: int, size: tuple[int, int, int]) -> None:
    import SimpleITK as sitk

    from examples.phantoms import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(count):
        image, _ = make_phantom(seed, size_zyx=size)
        sitk.WriteImage(image, str(folder / f"phantom_{seed:02d}.nii.gz"), useCompression=True)


class BareForward(NamedTuple):
    seconds: float  # wall time inside the model
    cpu_seconds: float  # CPU time of every thread of this process over the same calls
    windows: int
    calls: int


def bare_forward_seconds(folder: Path, model: Path, stride: list[int] | None,
                         device_name: str) -> BareForward:
    """The model alone over the engine's windows and batches of every case."""
    import torch

    from itk_infer.backends import resolve_device
    from itk_infer.cases import discover_cases
    from itk_infer.config import Settings
    from itk_infer.grid import padded_shape, plan_windows
    from itk_infer.pipeline import load_case, load_model

    device = resolve_device(device_name)
    loaded = load_model(Settings(backend="onnx", onnx_path=model, patch_stride=stride), device)
    backend, inference = loaded.backend, loaded.inference
    sliding = inference.sliding
    batch_size = backend.static_batch_size or sliding.batch_size
    pad_batches = backend.static_batch_size is not None or device.type == "cuda"
    if device.type == "cpu":
        import onnxruntime as ort

        # A plain session (default options, all cores), as a bare loop would make it.
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model), options,
                                       providers=["CPUExecutionProvider"])
        name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name

        def forward(x: np.ndarray) -> None:
            session.run([name_out], {name_in: x})
    else:
        def forward(x: np.ndarray) -> None:
            backend.forward(torch.from_numpy(x).to(device))
            torch.cuda.synchronize(device)

    total, cpu, windows_count, calls = 0.0, 0.0, 0, 0
    warmed = False
    for case in discover_cases(folder):
        volume = load_case(case, inference).voxels
        shape = volume.shape
        patch, stride_ = sliding.resolved(shape)
        padded = padded_shape(shape, patch)
        if padded != shape:
            volume = np.pad(volume, [(0, p - s) for s, p in zip(shape, padded, strict=True)],
                            "edge")
        windows = plan_windows(padded, patch, stride_)
        windows_count += len(windows)
        pz, py, px = patch
        for _z, row in groupby(windows, key=lambda w: w[0]):
            row = list(row)
            for start in range(0, len(row), batch_size):
                chunk = row[start : start + batch_size]
                x = np.stack([volume[z : z + pz, y : y + py, x_ : x_ + px]
                              for z, y, x_ in chunk])[:, None]
                if pad_batches and len(chunk) < batch_size:
                    x = np.concatenate([x, np.repeat(x[-1:], batch_size - len(chunk), 0)])
                x = np.ascontiguousarray(x, dtype=np.float32)
                if not warmed:  # first-call set-up is model loading, not forward time
                    forward(x)
                    warmed = True
                t0, c0 = time.perf_counter(), time.process_time()
                forward(x)
                total += time.perf_counter() - t0
                cpu += time.process_time() - c0
                calls += 1
    return BareForward(total, cpu, windows_count, calls)


def end_to_end(folder: Path, out: Path, model: Path, procs: int, stride: list[int] | None,
               device_name: str, extra: list[str]) -> dict:
    """Wall time of the whole command, and what its records say about its parts."""
    shutil.rmtree(out, ignore_errors=True)
    report = out.parent / f"{out.name}.json"
    cmd = [sys.executable, "-m", "itk_infer", "-i", str(folder), "-o", str(out), "--onnx",
           str(model), "--device", device_name, "--num-proc", str(procs), "--no-progress",
           "--report", str(report), *extra]
    if stride:
        cmd += ["--patch-stride", *map(str, stride)]
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"itk_infer failed ({result.returncode}):\n{result.stderr}")
    summary = json.loads(report.read_text())
    parts = {"read": 0.0, "infer": 0.0, "forward": 0.0, "write": 0.0}
    for record in (out / ".itk_infer").glob("*.json"):
        timings = json.loads(record.read_text())["timings_s"]
        for key in parts:
            parts[key] += timings.get(key, 0.0)
    return {"wall": wall, "run_batch": summary["wall_seconds"], "done": summary["done"], **parts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=3, default=(160, 256, 256),
                        metavar=("Z", "Y", "X"))
    parser.add_argument("--patch-stride", type=int, nargs=3, default=(32, 64, 64),
                        metavar=("Z", "Y", "X"), help="default: the demo patch (no overlap)")
    parser.add_argument("--procs", type=int, nargs="+", default=(1, 2))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--save-logits", action="store_true")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--quick", action="store_true", help="2 cases of 64 x 128 x 128")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.size = 2, (64, 128, 128)
    if not args.model.exists():
        raise SystemExit(f"{args.model} not found: make the demo model first (see examples/)")
    stride = list(args.patch_stride)
    extra = ["--save-logits"] if args.save_logits else []

    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench_runner_") as tmp:
        folder = Path(tmp) / "in"
        t0 = time.perf_counter()
        write_phantoms(folder, args.cases, tuple(args.size))
        print(f"{args.cases} phantoms {tuple(args.size)} written in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        bare, _, windows, calls = bare_forward_seconds(folder, args.model, stride, args.device)
        print(f"bare forward: {bare:.1f} s ({windows} windows, {calls} calls)", file=sys.stderr)
        runs = {}
        for procs in args.procs:
            runs[procs] = end_to_end(folder, Path(tmp) / f"out{procs}", args.model, procs,
                                     stride, args.device, extra)
            print(f"{procs} process(es): {runs[procs]['wall']:.1f} s", file=sys.stderr)
    info["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())

    where = info.get("gpu", f"{info['cpu']}, {info['nproc']} cores")
    print(f"\n`benchmarks/bench_runner.py` on {where}, {info['date']} (load average "
          f"{info['load']} before, {info['load_after']} after)\n")
    print(f"{args.cases} phantoms of {' x '.join(map(str, args.size))} (.nii.gz), demo model, "
          f"patch from the model, stride {' x '.join(map(str, stride))}, {windows} windows in "
          f"{calls} forward calls{', logits saved' if extra else ''}.\n")
    print("| processes | (a) end to end, s | (b) bare forward, s | (a)/(b) "
          "| run_batch, s | model time in the run, s |")
    print("|---|---|---|---|---|---|")
    for procs, r in runs.items():
        print(f"| {procs} | {r['wall']:.1f} | {bare:.1f} | {r['wall'] / bare:.2f} "
              f"| {r['run_batch']:.1f} | {r['forward']:.1f} |")
    print("\n(a): the `itk_infer` command, start to exit. (b): `session.run` over the same "
          "windows and batches, one session, default threads. 'model time in the run': "
          "forward seconds summed over the cases' records (summed over workers).")


if __name__ == "__main__":
    main()
