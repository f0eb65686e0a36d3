"""Cost of the input integrity check (itk_infer.integrity.check_input) next to reading the
same file (itk_infer.imageio.read_volume), for a CT-sized volume in each input format.

``python benchmarks/bench_integrity.py`` (``--quick``: a small volume). Prints a Markdown
table. The check runs in the reader thread, overlapped with the model's work on the previous
case, so it adds to a run's time only when reading is the bottleneck.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from itk_infer.imageio import read_volume
from itk_infer.integrity import check_input


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    shape = (40, 128, 128) if args.quick else (300, 512, 512)
    rng = np.random.default_rng(0)
    # CT-like: smooth body plus noise, int16 HU, so compression ratios are realistic.
    _z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < (0.4 * shape[1]) ** 2
    hu = np.where(body, 40, -1000) + rng.normal(0, 20, shape)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    print(f"{shape[2]}x{shape[1]}x{shape[0]} int16, {platform.processor() or platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| file | size MB | check s | read s | check / read |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, compress in (("ct.nii", False), ("ct.nii.gz", True), ("ct.mha", False),
                               ("ctz.mha", True)):
            path = Path(tmp) / name
            sitk.WriteImage(image, str(path), useCompression=compress)
            check = best_of(lambda path=path: check_input(path))
            read = best_of(lambda path=path: read_volume(path))
            print(f"| {name} | {path.stat().st_size / 1e6:.0f} | {check:.3f} | {read:.3f} | "
                  f"{check / read:.2f} |")


if __name__ == "__main__":
    main()
