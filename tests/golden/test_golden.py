"""The demo's outputs stay byte-identical through refactors (manifest in demo_outputs.json).

If an intended change alters the numbers, regenerate the manifest with
``python -m tests.golden.digest tests/golden/demo_outputs.json`` and say why in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.golden.digest import BACKEND_ARGS, DEMO, differences, digest_folder, run_demo

MANIFEST = json.loads((Path(__file__).with_name("demo_outputs.json")).read_text())


@pytest.mark.parametrize("backend", sorted(BACKEND_ARGS))
def test_demo_outputs_match_golden_digests(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_demo(backend, out) == 0
    assert differences(MANIFEST[backend], digest_folder(out)) == []


def test_worker_processes_write_the_same_bytes(tmp_path: Path) -> None:
    from itk_infer.cli import main

    out = tmp_path / "out"
    code = main(["-i", str(DEMO / "images"), "-o", str(out), *BACKEND_ARGS["onnx"],
                 "--save-logits", "--save-conf", "--device", "cpu", "--no-progress",
                 "--num-proc", "2"])
    assert code == 0
    assert differences(MANIFEST["onnx"], digest_folder(out)) == []


def test_digest_sees_a_changed_voxel(tmp_path: Path) -> None:
    """The manifest check is not vacuous: one flipped label changes the digest."""
    import SimpleITK as sitk

    out = tmp_path / "out"
    assert run_demo("onnx", out) == 0
    path = out / "case_01.mha"
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = (int(array[0, 0, 0]) + 1) % 2
    flipped = sitk.GetImageFromArray(array)
    flipped.CopyInformation(image)
    sitk.WriteImage(flipped, str(path))
    assert differences(MANIFEST["onnx"], digest_folder(out)) == ["case_01.mha"]


def test_digest_tolerates_only_last_digits_of_a_confidence(tmp_path: Path) -> None:
    """Record numbers are compared to FLOAT_RTOL: a change in the 12th digit (what another
    CPU's kernels give) passes, one in the 7th digit (a real change) is seen."""
    out = tmp_path / "out"
    assert run_demo("onnx", out) == 0
    record = out / ".itk_infer" / "case_02.json"
    data = json.loads(record.read_text())
    for relative, seen in ((3e-11, []), (1e-6, [".itk_infer/case_02.json"])):
        changed = dict(data, confidence=data["confidence"] * (1 + relative))
        record.write_text(json.dumps(changed))
        assert differences(MANIFEST["onnx"], digest_folder(out)) == seen
