"""Damaged, oddly named and replaced inputs, and leftover temporaries (issue 14)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from itk_infer import caseloop, outfolder
from itk_infer.atomic import temporary_path
from itk_infer.cases import Case, OutputLayout
from itk_infer.cli import main
from itk_infer.locks import try_lock
from tests.conftest import write_volume


def _run(inp: Path, out: Path, model: Path, *extra: str) -> int:
    # --in-process: the tests patch the library in this process, which a worker would not see.
    return main(["-i", str(inp), "-o", str(out), "--onnx", str(model), "--device", "cpu",
                 "--no-progress", "--in-process", *extra])


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (12, 24, 24)).astype(np.float32)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "half":
        data = data[: len(data) // 2]
    elif how == "tail":
        data = data[:-3]
    else:  # "crc": flip a bit of the gzip trailer's CRC-32
        data[-6] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("name", "compress", "how", "reason"), [
    ("cut.nii", False, "half", "truncated"),
    ("cut.nii", False, "tail", "truncated"),
    ("cut.nii.gz", True, "half", "truncated gzip stream"),
    ("cut.nii.gz", True, "crc", "damaged gzip data"),
    ("cut.mha", False, "tail", "truncated"),
    ("cut.mha", True, "half", "truncated"),
])
def test_damaged_input_never_produces_output(tmp_path, pointwise_model, capsys, name,
                                             compress, how, reason):
    inp = tmp_path / "in"
    inp.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(_volume()), str(inp / name), useCompression=compress)
    write_volume(inp / "good.mha", _volume(1))
    _damage(inp / name, how)
    out = tmp_path / "out"
    assert _run(inp, out, pointwise_model) == 1
    err = capsys.readouterr().err
    assert f"FAILED cut: {name}: {reason}" in err
    assert not (out / name).exists() and not (out / ".itk_infer" / "cut.json").exists()
    assert (out / "good.mha").exists()


def test_name_that_is_not_utf8_runs_as_its_own_case(tmp_path, pointwise_model):
    inp = tmp_path / "in"
    inp.mkdir()
    write_volume(inp / "plain.mha", _volume())
    odd = os.fsdecode(b"caf\xe9 \xff.mha")
    os.link(inp / "plain.mha", inp / odd)
    out = tmp_path / "out"
    assert _run(inp, out, pointwise_model, "--save-logits", "--save-conf") == 0
    assert (out / odd).read_bytes() == (out / "plain.mha").read_bytes()
    assert (out / os.fsdecode(b"caf\xe9 \xff.zarr")).is_dir()
    from openpyxl import load_workbook

    names = [c.value for c in load_workbook(out / "confidences.xlsx")["Confidences"]["A"][1:]]
    assert sorted(names) == ["caf\\xe9 \\xff", "plain"]
    report = tmp_path / "report.json"
    assert _run(inp, out, pointwise_model, "--save-logits", "--save-conf",
                "--report", str(report)) == 0
    assert json.loads(report.read_text())["skipped"] == 2  # resumable like any other case


def test_replaced_input_is_redone(tmp_path, pointwise_model):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_volume(inp / "a.mha", _volume(0))
    write_volume(inp / "b.mha", _volume(1))
    assert _run(inp, out, pointwise_model) == 0
    first = (out / "a.mha").read_bytes()
    write_volume(inp / "a.mha", -_volume(0))  # a new scan under the same name
    os.utime(inp / "a.mha", ns=(1, 10**18))
    report = tmp_path / "report.json"
    assert _run(inp, out, pointwise_model, "--report", str(report)) == 0
    cases = {c["case"]: c for c in json.loads(report.read_text())["cases"]}
    assert (cases["a"]["status"], cases["b"]["status"]) == ("done", "skipped")
    assert (out / "a.mha").read_bytes() != first
    expected = tmp_path / "fresh"
    fresh_in = tmp_path / "fresh_in"
    fresh_in.mkdir()
    write_volume(fresh_in / "a.mha", -_volume(0))
    assert _run(fresh_in, expected, pointwise_model) == 0
    assert (out / "a.mha").read_bytes() == (expected / "a.mha").read_bytes()


def test_overwrite_removes_the_record_before_redoing(tmp_path, pointwise_model, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    write_volume(inp / "a.mha", _volume())
    assert _run(inp, out, pointwise_model) == 0
    assert (out / ".itk_infer" / "a.json").exists()

    def failing(*_args, **_kwargs):
        raise RuntimeError("model failed")

    monkeypatch.setattr(caseloop, "infer_case", failing)
    assert _run(inp, out, pointwise_model, "--overwrite") == 1
    # The old label map may stay, but nothing marks the case complete any more.
    assert not (out / ".itk_infer" / "a.json").exists()


def test_leftover_temporaries_are_removed_only_under_their_case_lock(tmp_path):
    layout = OutputLayout(tmp_path)
    (tmp_path / ".itk_infer").mkdir()
    busy = temporary_path(tmp_path / "busy.nii.gz")
    idle = temporary_path(tmp_path / "idle.zarr")
    record = temporary_path(tmp_path / ".itk_infer" / "busy.json")
    for path in (busy, record):
        path.write_bytes(b"partial")
    idle.mkdir()
    lock = try_lock(layout, Case("busy", tmp_path / "busy.nii.gz"))
    assert lock is not None  # as if another process (any PID, any host) were writing busy
    try:
        assert outfolder.remove_temporaries(layout) == 1
        assert busy.exists() and record.exists() and not idle.exists()
    finally:
        lock.release()
    assert outfolder.remove_temporaries(layout) == 2
    assert not busy.exists() and not record.exists()
