"""A backfill through Dagster against the CLI on the same cases: ratio of wall times.

8 demo-like cases (phantoms of the demo's size, 40 x 96 x 96, in the demo's three formats)
in one folder; the demo model (``examples/demo/model.onnx``); same settings both ways:

* CLI: ``itk_infer.cli.main([-i folder, -o out, --onnx model, --save-conf, ...])``, in this
  process (model load included);
* Dagster: ``materialize`` of ``segmentation`` over the 8 partitions in one run (a partition
  range, as one backfill chunk under the asset's backfill policy) on an ephemeral instance,
  in this process (run setup, model load, per-partition metadata and previews included).

Runs alternate (CLI, Dagster, CLI, Dagster, ...) after one warm-up of each, every run into a
fresh output folder; medians are reported. Not a test: run it from the repository root,
``python benchmarks/bench_dagster.py [--repeats N] [--device cpu|cuda|auto]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the packages importable
    sys.path.insert(0, str(ROOT))

import SimpleITK as sitk  # noqa: E402
from dagster import DagsterInstance, materialize  # noqa: E402

from examples.phantoms import make_phantom  # noqa: E402
from itk_infer.cli import main as cli_main  # noqa: E402
from itk_infer_assets.assets import SEGMENTATION, confidences, itk_infer_inference  # noqa: E402
from itk_infer_assets.partitions import IMAGES_PARTITIONS_NAME  # noqa: E402
from itk_infer_assets.resources import ItkInferResource  # noqa: E402

DEMO_MODEL = ROOT / "examples" / "demo" / "model.onnx"
FORMATS = (("LPI", ".mha"), ("RAS", ".nii.gz"), ("oblique", ".nii"))


def make_cases(folder: Path, count: int) -> list[str]:
    """``count`` phantoms (seeds 101..) in the demo's formats; returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        orientation, suffix = FORMATS[index % len(FORMATS)]
        image, _ = make_phantom(101 + index, orientation=orientation)
        name = f"case_{index + 1:02d}{suffix}"
        sitk.WriteImage(image, str(folder / name), useCompression=True)
        names.append(name)
    return names


def run_cli(inputs: Path, out: Path, model: Path, device: str) -> float:
    t0 = time.perf_counter()
    code = cli_main(["-i", str(inputs), "-o", str(out), "--onnx", str(model), "--device", device,
                     "--save-conf", "--no-progress"])
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"CLI exited with {code}")
    return seconds


def run_dagster(root: Path, keys: list[str], out: Path, model: Path, device: str) -> float:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(IMAGES_PARTITIONS_NAME, keys)
    resource = ItkInferResource(watch_root=str(root), output_root=str(out), onnx_path=str(model),
                                device=device)
    t0 = time.perf_counter()
    result = materialize(
        [itk_infer_inference, confidences], instance=instance,
        resources={"itk_infer": resource}, selection=[SEGMENTATION],
        # Console lines per event would be timed too; the run's events are stored either way.
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        tags={"dagster/asset_partition_range_start": keys[0],
              "dagster/asset_partition_range_end": keys[-1]},
    )
    seconds = time.perf_counter() - t0
    if not result.success:
        raise SystemExit("Dagster run failed")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"model not found: {args.model} (see examples/README or make_demo)")
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

    with tempfile.TemporaryDirectory(prefix="bench_dagster_") as tmp_text:
        tmp = Path(tmp_text)
        root = tmp / "watch"
        names = make_cases(root / "batch", args.cases)
        keys = [f"batch/{name}" for name in names]
        print(f"{len(keys)} cases of 40x96x96, model {args.model.name}, device {args.device}")

        run_cli(root / "batch", tmp / "warm_cli", args.model, args.device)
        run_dagster(root, keys, tmp / "warm_dagster", args.model, args.device)
        cli_times, dagster_times = [], []
        for rep in range(args.repeats):
            cli_times.append(run_cli(root / "batch", tmp / f"cli_{rep}" / "batch", args.model,
                                     args.device))
            dagster_times.append(run_dagster(root, keys, tmp / f"dagster_{rep}", args.model,
                                             args.device))
            print(f"  repeat {rep + 1}: CLI {cli_times[-1]:.2f} s, "
                  f"Dagster {dagster_times[-1]:.2f} s")
        # Same outputs both ways (the tests check this byte for byte; here: label maps).
        for name in names:
            ours = (tmp / "dagster_0" / "batch" / name).read_bytes()
            theirs = (tmp / "cli_0" / "batch" / name).read_bytes()
            if ours != theirs:
                raise SystemExit(f"outputs differ for {name}")

    cli_median, dagster_median = statistics.median(cli_times), statistics.median(dagster_times)
    figures = {
        "cases": len(keys),
        "device": args.device,
        "repeats": args.repeats,
        "cli_s": [round(t, 3) for t in cli_times],
        "dagster_s": [round(t, 3) for t in dagster_times],
        "cli_median_s": round(cli_median, 3),
        "dagster_median_s": round(dagster_median, 3),
        "ratio_dagster_over_cli": round(dagster_median / cli_median, 3),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    print(f"CLI median {cli_median:.2f} s, Dagster median {dagster_median:.2f} s, "
          f"ratio Dagster/CLI = {dagster_median / cli_median:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
