"""Run ``itk_infer`` on the bundled demo images and print Dice against the phantom truth.

Usage, from the repository root: ``python examples/demo.py [--output demo_out] [extra flags]``.
Extra flags go to ``itk_infer`` unchanged (e.g. ``--save-logits --save-conf``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo"
sys.path.insert(0, str(ROOT))  # so "examples" imports when run as a script

from examples.dice import dice_per_label  # noqa: E402
from examples.phantoms import CLASS_NAMES, NUM_CLASSES  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("demo_out"))
    args, extra = parser.parse_known_args()
    flags = ["-i", str(DEMO / "images"), "-o", str(args.output), "--backend", "onnx",
             "--onnx", str(DEMO / "model.onnx"), "--save-conf", *extra]
    print("$ itk_infer " + " ".join(flags), flush=True)
    itk_infer = shutil.which("itk_infer")
    launcher = [itk_infer] if itk_infer else [sys.executable, "-m", "itk_infer"]
    code = subprocess.call(launcher + flags)
    if code not in (0, 1):
        return code
    print(f"\nSegmentations (LPI) are in {args.output.resolve()}")
    print(f"{'case':<16}" + "".join(f"{n:>10}" for n in CLASS_NAMES[1:]) + f"{'mean':>10}")
    means = []
    for truth_path in sorted((DEMO / "labels").iterdir()):
        seg_path = args.output / truth_path.name
        if not seg_path.exists():
            print(f"{truth_path.name:<16} (no segmentation)")
            continue
        truth = sitk.DICOMOrient(sitk.ReadImage(str(truth_path)), "LPI")
        seg = sitk.ReadImage(str(seg_path))
        scores = dice_per_label(sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(truth),
                                range(1, NUM_CLASSES))
        mean = float(np.mean(list(scores.values())))
        means.append(mean)
        print(f"{truth_path.name:<16}" + "".join(f"{scores[k]:>10.3f}" for k in sorted(scores))
              + f"{mean:>10.3f}")
    if means:
        print(f"mean Dice over cases and foreground labels: {np.mean(means):.3f}")
    return code


if __name__ == "__main__":
    sys.exit(main())
