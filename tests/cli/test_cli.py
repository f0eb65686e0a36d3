"""The command in-process (cli.main) and as a real subprocess: outputs, exit codes, messages."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from itk_infer.cli import main
from tests.conftest import LPI, RAS, write_volume
from tests.models import default_metadata, pointwise_logits, write_pointwise_model


def run(inp, out, model, *extra) -> int:
    return main(["-i", str(inp), "-o", str(out), "--onnx", str(model), "--device", "cpu",
                 "--no-progress", *map(str, extra)])


def expected_labels(hu: np.ndarray, wl: float = 0.0, ww: float = 2.0) -> np.ndarray:
    x = (np.clip(hu.astype(np.float64), wl - ww / 2, wl + ww / 2) - (wl - ww / 2)) / ww
    return pointwise_logits(x.astype(np.float32), 3).argmax(axis=0)


@pytest.fixture
def folder(tmp_path, random_volume):
    inp = tmp_path / "in"
    inp.mkdir()
    write_volume(inp / "a.mha", random_volume)
    write_volume(inp / "b.nii.gz", random_volume[:, ::-1] * 0.5, direction=RAS)
    return inp


def test_segments_every_case_with_input_geometry(tmp_path, folder, pointwise_model, capsys):
    out = tmp_path / "out"
    assert run(folder, out, pointwise_model) == 0
    assert "2 done, 0 skipped, 0 failed" in capsys.readouterr().out
    for name in ("a.mha", "b.nii.gz"):
        source = sitk.DICOMOrient(sitk.ReadImage(str(folder / name)), "LPI")
        seg = sitk.ReadImage(str(out / name))
        assert seg.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_allclose(seg.GetDirection(), LPI, atol=1e-6)
        np.testing.assert_allclose(seg.GetOrigin(), source.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(seg.GetSpacing(), source.GetSpacing(), atol=1e-6)
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(seg), expected_labels(sitk.GetArrayFromImage(source))
        )
    assert not [p for p in out.iterdir() if p.name.startswith(".itk_infer-tmp")]


def test_same_phantom_lpi_and_ras_give_same_labels_at_same_points(tmp_path, pointwise_model):
    rng = np.random.default_rng(5)
    hu = rng.uniform(-1.5, 1.5, size=(12, 20, 24)).astype(np.float32)
    lpi = write_volume(tmp_path / "lpi.mha", hu, direction=LPI)
    inp = tmp_path / "in"
    inp.mkdir()
    os.replace(lpi, inp / "lpi.mha")
    ras = sitk.DICOMOrient(sitk.ReadImage(str(inp / "lpi.mha")), "RAS")
    sitk.WriteImage(ras, str(inp / "ras.nii.gz"))
    out = tmp_path / "out"
    assert run(inp, out, pointwise_model) == 0
    a, b = sitk.ReadImage(str(out / "lpi.mha")), sitk.ReadImage(str(out / "ras.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    for index in rng.integers(0, (24, 20, 12), size=(50, 3)):
        point = ras.TransformIndexToPhysicalPoint([int(i) for i in index])
        assert a.GetPixel(a.TransformPhysicalPointToIndex(point)) == b.GetPixel(
            b.TransformPhysicalPointToIndex(point))


def test_resume_skips_done_and_redoes_what_a_kill_left(tmp_path, folder, pointwise_model,
                                                       capsys):
    out = tmp_path / "out"
    assert run(folder, out, pointwise_model) == 0
    capsys.readouterr()
    assert run(folder, out, pointwise_model) == 0
    captured = capsys.readouterr()
    assert "0 done, 2 skipped, 0 failed" in captured.out
    assert "Skipping a: done" in captured.err
    # A killed run: a truncated label file with no record, and a leftover temporary.
    good = (out / "a.mha").read_bytes()
    (out / ".itk_infer" / "a.json").unlink()
    (out / "a.mha").write_bytes(good[: len(good) // 2])
    leftover = out / ".itk_infer-tmp-999999999-dead-b.nii.gz"
    leftover.write_bytes(b"partial")
    assert run(folder, out, pointwise_model) == 0
    assert "1 done, 1 skipped, 0 failed" in capsys.readouterr().out
    assert (out / "a.mha").read_bytes() == good
    assert not leftover.exists()
    assert run(folder, out, pointwise_model, "--overwrite") == 0
    assert "2 done, 0 skipped, 0 failed" in capsys.readouterr().out


def test_bad_inputs_fail_alone_and_good_cases_still_run(tmp_path, folder, pointwise_model,
                                                        capsys):
    sitk.WriteImage(sitk.Image([9, 8], sitk.sitkInt16), str(folder / "flat.mha"))
    sitk.WriteImage(sitk.Image([4, 5, 6, 2], sitk.sitkInt16), str(folder / "time.nii"))
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkVectorUInt8, 3), str(folder / "rgb.mha"))
    (folder / "corrupt.nii.gz").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    assert run(folder, out, pointwise_model) == 1
    captured = capsys.readouterr()
    assert "2 done, 0 skipped, 4 failed" in captured.out
    assert "flat.mha: image is 2-D" in captured.err
    assert "time.nii: image is 4-D" in captured.err
    assert "rgb.mha: image has 3 components" in captured.err
    assert "corrupt.nii.gz: cannot read image" in captured.err
    assert (out / "a.mha").exists() and (out / "b.nii.gz").exists()
    assert not (out / "flat.mha").exists() and not (out / "corrupt.nii.gz").exists()


def usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_usage_errors_exit_2_before_any_case(tmp_path, folder, pointwise_model, capsys):
    out = tmp_path / "out"
    base = ["-i", str(folder), "-o", str(out), "--device", "cpu", "--no-progress"]
    empty = tmp_path / "empty"
    empty.mkdir()
    err = usage_error(capsys, ["-i", str(empty), "-o", str(out), "--onnx", str(pointwise_model)])
    assert f"No input files found in {empty}" in err
    err = usage_error(capsys, [*base, "--onnx", str(tmp_path / "missing.onnx")])
    assert "missing.onnx" in err and "not found" in err
    four_d = write_pointwise_model(tmp_path / "4d.onnx", metadata=default_metadata(),
                                   input_shape=["N", 1, "Y", "X"], output_shape=["N", 3, "Y", "X"])
    assert "expected 5-D" in usage_error(capsys, [*base, "--onnx", str(four_d)])
    two = write_pointwise_model(tmp_path / "two.onnx", metadata=default_metadata(),
                                two_outputs=True)
    assert "exactly one input and one output" in usage_error(capsys, [*base, "--onnx", str(two)])
    err = usage_error(capsys, [*base, "--onnx", str(pointwise_model),
                               "--patch-size", "8", "8", "8", "--patch-stride", "9", "4", "4"])
    assert "larger than patch size" in err
    bare = write_pointwise_model(tmp_path / "bare.onnx")
    assert "requires --wl/--ww" in usage_error(capsys, [*base, "--onnx", str(bare)])
    err = usage_error(capsys, [*base, "--onnx", str(bare), "--wl", "0", "--ww", "0"])
    assert "--ww" in err
    (folder / "a.nii").write_bytes((folder / "a.mha").read_bytes())
    err = usage_error(capsys, [*base, "--onnx", str(pointwise_model)])
    assert "a.mha" in err and "a.nii" in err
    assert not out.exists() or not any(out.glob("*.mha"))
    usage_error(capsys, [*base])  # --backend onnx without --onnx
    err = usage_error(capsys, [*base, "--onnx", str(pointwise_model), "--patch-size", "8", "8"])
    assert "--patch-size" in err


def test_static_onnx_shape_sets_the_patch_and_must_match(tmp_path, folder, capsys):
    static = write_pointwise_model(
        tmp_path / "static.onnx", metadata={"window_level": "0", "window_width": "2"},
        input_shape=[1, 1, 8, 16, 16], output_shape=[1, 3, 8, 16, 16])
    out = tmp_path / "out"
    assert run(folder, out, static) == 0
    err = usage_error(capsys, ["-i", str(folder), "-o", str(out), "--onnx", str(static),
                               "--patch-size", "8", "8", "8", "--overwrite"])
    assert "[8, 8, 8]" in err and "[8, 16, 16]" in err


def test_window_overrides_metadata_field_by_field(tmp_path, folder, pointwise_model):
    out = tmp_path / "out"
    assert run(folder, out, pointwise_model, "--ww", "4") == 0
    source = sitk.DICOMOrient(sitk.ReadImage(str(folder / "a.mha")), "LPI")
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a.mha")))
    np.testing.assert_array_equal(seg, expected_labels(sitk.GetArrayFromImage(source), ww=4.0))


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t=time.perf_counter(); import itk_infer.cli as c; "
            "c.build_parser().format_help(); "
            "assert 'torch' not in sys.modules and 'SimpleITK' not in sys.modules, 'heavy'; "
            "print(time.perf_counter()-t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert float(done.stdout) < 0.5
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "itk_infer", "--help"], capture_output=True,
                   check=True)
    assert time.perf_counter() - t0 < 2.0  # interpreter start included


def test_real_subprocess_run(tmp_path, folder, pointwise_model):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "itk_infer", "-i", str(folder), "-o", str(out), "--onnx",
         str(pointwise_model), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "2 done, 0 skipped, 0 failed" in done.stdout
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [".itk_infer", "a.mha", "b.nii.gz"]
