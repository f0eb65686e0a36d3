"""Memory and time of ``--output-space input --save-logits`` against the default LPI outputs.

An input whose axes are not in LPI order (a RAS phantom from ``examples/phantoms.py``) makes
the input-space logits a transposed/flipped copy, built from logits held in float16 (see
``itk_infer/inputspace.py``); an LPI input streams them as usual. Each mode runs in a fresh
process (``predict_case`` on one case with the demo model) and reports its peak resident
memory (``ru_maxrss``) and wall time; the float16 logits' size C x N x 2 is printed for scale.

Run from the repository root: ``python benchmarks/bench_output_space.py [--size 64 160 160]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import DEMO_MODEL, machine  # noqa: E402

from examples.phantoms import NUM_CLASSES, make_phantom  # noqa: E402

CHILD = '''
import json, resource, sys, time
from pathlib import Path
import torch
from itk_infer.cases import Case, OutputLayout
from itk_infer.config import OutputOptions, Settings
from itk_infer.pipeline import load_model, predict_case
path, out, model, space = sys.argv[1:5]
settings = Settings(onnx_path=Path(model), device="cpu", output_space=space, save_logits=True)
loaded = load_model(settings, torch.device("cpu"))
t0 = time.perf_counter()
predict_case(Case(Path(path).name.split(".")[0], Path(path)), loaded, OutputLayout(Path(out)),
             OutputOptions(save_logits=True))
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def run(path: Path, out: Path, space: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(out), str(DEMO_MODEL),
                           space], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[64, 160, 160])
    args = parser.parse_args()
    print(machine())
    n = args.size[0] * args.size[1] * args.size[2]
    print(f"volume {args.size}, {NUM_CLASSES} classes: float16 logits "
          f"{NUM_CLASSES * n * 2 / 2**20:.0f} MiB, one float32 volume {n * 4 / 2**20:.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("| input | --output-space | peak RSS (MiB) | wall (s) |")
        print("|---|---|---|---|")
        for orientation in ("LPI", "RAS"):
            image, _ = make_phantom(7, size_zyx=tuple(args.size), orientation=orientation)
            path = root / f"p_{orientation}.mha"
            sitk.WriteImage(image, str(path))
            for space in ("lpi", "input"):
                got = run(path, root / f"out_{orientation}_{space}", space)
                print(f"| {orientation} | {space} | {got['peak_mib']:.0f} | "
                      f"{got['seconds']:.2f} |")


if __name__ == "__main__":
    main()
