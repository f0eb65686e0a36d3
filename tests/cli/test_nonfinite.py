"""--nonfinite: NaN/Inf voxels fail their case with a reason, or are replaced by the window's
ends; never NaN in labels, logits or confidence."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
import zarr

from itk_infer.cli import main
from tests.conftest import write_volume


def _run(inp, out, model, *extra) -> int:
    return main(["-i", str(inp), "-o", str(out), "--onnx", str(model), "--device", "cpu",
                 "--no-progress", "--save-logits", "--save-conf", *extra])


def test_nan_and_inf_voxels(tmp_path, pointwise_model, capsys):
    rng = np.random.default_rng(3)
    volume = rng.uniform(-1.2, 1.2, size=(8, 16, 16)).astype(np.float32)
    damaged = volume.copy()
    damaged[2, 3, 4], damaged[5, 6, 7], damaged[1, 1, 1] = np.nan, np.inf, -np.inf
    # The reference: the same voxels set to values beyond the window's ends (wl 0, ww 2).
    reference = volume.copy()
    reference[2, 3, 4], reference[5, 6, 7], reference[1, 1, 1] = -5.0, 5.0, -5.0
    inp = tmp_path / "in"
    inp.mkdir()
    write_volume(inp / "bad.mha", damaged)
    write_volume(inp / "good.mha", volume)
    ref_in = tmp_path / "ref"
    ref_in.mkdir()
    write_volume(ref_in / "bad.mha", reference)

    assert _run(inp, tmp_path / "fail", pointwise_model) == 1
    err = capsys.readouterr().err
    assert "FAILED bad: bad.mha: 3 voxel(s) are NaN or infinite" in err
    assert (tmp_path / "fail" / "good.mha").exists()
    assert not (tmp_path / "fail" / "bad.mha").exists()

    assert _run(inp, tmp_path / "replace", pointwise_model, "--nonfinite", "replace") == 0
    assert "3 NaN or infinite voxel(s) replaced" in capsys.readouterr().err
    assert _run(ref_in, tmp_path / "expected", pointwise_model) == 0
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "replace" / "bad.mha")))
    want = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "expected" / "bad.mha")))
    np.testing.assert_array_equal(got, want)
    logits = zarr.open_array(str(tmp_path / "replace" / "bad.zarr"), mode="r")[:]
    assert np.isfinite(logits).all()
    record = json.loads((tmp_path / "replace" / ".itk_infer" / "bad.json").read_text())
    assert np.isfinite(record["confidence"])
