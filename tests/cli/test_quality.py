"""The bundled demo model segments fresh phantoms well through the CLI (mean Dice >= 0.9)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from examples.dice import dice_per_label
from examples.phantoms import NUM_CLASSES, make_phantom
from itk_infer.cli import main

DEMO_MODEL = Path(__file__).resolve().parents[2] / "examples" / "demo" / "model.onnx"


def test_demo_model_reaches_dice_09_on_fresh_phantoms(tmp_path):
    images, truth = tmp_path / "images", {}
    images.mkdir()
    # Seeds unused by training (1000+) and by the bundled demo images (1-3).
    for seed, orientation, suffix in ((7, "LPI", ".mha"), (8, "RAS", ".nii.gz"),
                                      (9, "oblique", ".nii")):
        image, labels = make_phantom(seed, orientation=orientation)
        name = f"fresh_{seed}{suffix}"
        sitk.WriteImage(image, str(images / name))
        truth[name] = sitk.GetArrayFromImage(sitk.DICOMOrient(labels, "LPI"))
    out = tmp_path / "out"
    code = main(["-i", str(images), "-o", str(out), "--onnx", str(DEMO_MODEL),
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    means = []
    for name, expected in truth.items():
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / name)))
        assert predicted.shape == expected.shape
        scores = dice_per_label(predicted, expected, range(1, NUM_CLASSES))
        means.append(np.mean(list(scores.values())))
    assert min(means) >= 0.9, means
    assert np.mean(means) >= 0.9
