"""What ``--tta`` (8 mirror images per window) costs and what it buys on noisy phantoms.

Phantoms from ``examples/phantoms.py`` (seeds 500.., unseen by the demo's training) get extra
Gaussian noise of ``--noise`` HU on top of the phantom's own 20 HU, so the demo model errs
where mirroring could average the errors out. One process loads the demo ONNX model twice
(without and with ``--tta``) and runs every case with both, alternating the order per case;
wall time per case (``predict_case``: read, model, write) and the mean Dice over the
foreground classes against the phantom's truth are reported for each noise level, with and
without, and the wall-time ratio within the run.

Run from the repository root: ``python benchmarks/bench_tta.py [--cases 3] [--noise 0 60 120]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import DEMO_MODEL, machine  # noqa: E402

from examples.dice import dice_per_label  # noqa: E402
from examples.phantoms import NUM_CLASSES, make_phantom  # noqa: E402
from itk_infer.cases import Case, OutputLayout  # noqa: E402
from itk_infer.config import Settings  # noqa: E402
from itk_infer.pipeline import load_model, predict_case  # noqa: E402


def noisy_case(folder: Path, seed: int, noise_hu: float) -> tuple[Case, np.ndarray]:
    """A phantom with ``noise_hu`` extra noise written to ``folder``, and its truth (Z, Y, X)."""
    image, labels = make_phantom(seed, size_zyx=(40, 96, 96))
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    hu += np.random.default_rng(seed + 1).normal(0.0, noise_hu, hu.shape).astype(np.float32)
    noisy = sitk.GetImageFromArray(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
    noisy.CopyInformation(image)
    path = folder / f"n{int(noise_hu)}_s{seed}.mha"
    sitk.WriteImage(noisy, str(path))
    return Case(path.name[: -len(".mha")], path), sitk.GetArrayFromImage(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 60.0, 120.0])
    args = parser.parse_args()
    print(machine())
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        base = Settings(onnx_path=DEMO_MODEL, device="cpu")
        models = {False: load_model(base, device), True: load_model(base.replace(tta=True), device)}
        print("| extra noise (HU) | cases | Dice without | Dice with | s/case without | "
              "s/case with | ratio |")
        print("|---|---|---|---|---|---|---|")
        for noise in args.noise:
            dice: dict[bool, list[float]] = {False: [], True: []}
            wall: dict[bool, list[float]] = {False: [], True: []}
            for k in range(args.cases):
                case, truth = noisy_case(root / "in", 500 + k, noise)
                order = (False, True) if k % 2 == 0 else (True, False)
                for tta in order:
                    layout = OutputLayout(root / f"out_{tta}")
                    t0 = time.perf_counter()
                    result = predict_case(case, models[tta], layout, keep_arrays=True)
                    wall[tta].append(time.perf_counter() - t0)
                    scores = dice_per_label(result.labels, truth, range(1, NUM_CLASSES))
                    dice[tta].append(float(np.mean(list(scores.values()))))
            ratio = statistics.median(w / o for w, o in zip(wall[True], wall[False], strict=True))
            print(f"| {noise:g} | {args.cases} | {np.mean(dice[False]):.4f} | "
                  f"{np.mean(dice[True]):.4f} | {statistics.median(wall[False]):.2f} | "
                  f"{statistics.median(wall[True]):.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
