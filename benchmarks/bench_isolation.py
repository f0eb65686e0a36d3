"""What running the cases in a worker process costs against running them in the command's
own process (``--in-process``), with ``--num-proc 1``: end-to-end wall time of the command
on the demo images and on ``--cases`` phantoms of bench_runner's setup, the two modes
alternated ``--repeats`` times (medians). Run from the repository root:
``python benchmarks/bench_isolation.py``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_runner import write_phantoms  # noqa: E402

DEMO = ROOT / "examples" / "demo"


def wall(folder: Path, out: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "itk_infer", "-i", str(folder), "-o", str(out), "--onnx",
           str(DEMO / "model.onnx"), "--device", "cpu", "--no-progress", "--overwrite", *extra]
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=3, default=(160, 256, 256))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor()}")
    with tempfile.TemporaryDirectory() as tmp:
        phantoms = Path(tmp) / "phantoms"
        write_phantoms(phantoms, args.cases, tuple(args.size))
        print("| inputs | worker (default) s | --in-process s | worker / in-process |")
        print("|---|---|---|---|")
        for label, folder in (("demo (3 images)", DEMO / "images"),
                              (f"{args.cases} phantoms {args.size}", phantoms)):
            times: dict[str, list[float]] = {"worker": [], "in": []}
            for _ in range(args.repeats):
                times["worker"].append(wall(folder, Path(tmp) / "out", []))
                times["in"].append(wall(folder, Path(tmp) / "out", ["--in-process"]))
            worker, inproc = statistics.median(times["worker"]), statistics.median(times["in"])
            print(f"| {label} | {worker:.2f} | {inproc:.2f} | {worker / inproc:.3f} |")


if __name__ == "__main__":
    main()
