"""Peak memory and time of a model that declares its spacing (issue 13): a 512 x 512 x Z CT at
0.7 x 0.7 x 1.0 mm, a 32-class model at 1.5 mm (resampled down, logits resampled back slab by
slab), against the same model without a spacing (run on the native grid), in one run.

``python benchmarks/bench_resample.py`` (``--z 400`` by default; ``--z 100`` for a check).
Labels and confidence are written (``--save-conf``); peak RSS of each CLI subprocess comes
from the kernel (``wait4``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from bench_memory import run_cli, write_ct  # noqa: E402
from bench_monai import machine_info, write_random_conv_model  # noqa: E402

SPACING_XYZ = (0.7, 0.7, 1.0)
MODEL_SPACING_ZYX = [1.5, 1.5, 1.5]
NUM_CLASSES = 32
PATCH = [64, 128, 128]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--z", type=int, default=400)
    args = parser.parse_args()
    import SimpleITK as sitk

    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="itk_infer-bench-resample-"))
    try:
        inputs = work / "in"
        inputs.mkdir()
        image_path = inputs / "ct.mha"
        write_ct(image_path, (args.z, 512, 512), "LPI")
        image = sitk.ReadImage(str(image_path))
        image.SetSpacing(SPACING_XYZ)
        sitk.WriteImage(image, str(image_path))
        del image
        base = {"window_level": "40", "window_width": "400",
                "inference_config": json.dumps({"patch_size": PATCH,
                                                "forward_batch_windows": 1})}
        rows = []
        for name, metadata in (("model at 1.5 mm (resampled)",
                                {**base, "spacing": json.dumps(MODEL_SPACING_ZYX)}),
                               ("same model, native grid", base)):
            model = write_random_conv_model(work / "m.onnx", NUM_CLASSES, seed=0,
                                            metadata=metadata)
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, "-m", "itk_infer", "-i", str(inputs), "-o", str(out),
                       "--onnx", str(model), "--save-conf", "--device", "cpu",
                       "--no-progress"]
            result = run_cli(command, work / "cli.log")
            if result["returncode"] != 0:
                print((work / "cli.log").read_text()[-2000:])
                return 1
            record = json.loads((out / ".itk_infer" / "ct.json").read_text())
            rows.append((name, result["peak_gb"], result["wall_s"], record["timings_s"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(info))
    print(f"\n512 x 512 x {args.z} at {SPACING_XYZ} mm (x y z), {NUM_CLASSES} classes, patch "
          f"{PATCH}, --save-conf\n")
    print("| run | peak RSS GB | wall s | read s | infer s | write s |")
    print("|---|---|---|---|---|---|")
    for name, peak, wall, t in rows:
        print(f"| {name} | {peak:.2f} | {wall:.0f} | {t['read']:.1f} | {t['infer']:.1f} | "
              f"{t['write']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
