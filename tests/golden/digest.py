"""SHA-256 digests of everything a demo run writes, for the golden-output test.

Label maps and zarr files are hashed byte for byte. ``confidences.xlsx`` is digested by its cell
values (the file itself carries a creation time), records as JSON without the fields that
differ between runs of the same numbers (timings, the input's absolute path and mtime, library
versions); in both, floats are kept as numbers and compared to ``FLOAT_RTOL`` (see there),
everything else is hashed.

Run as ``python -m tests.golden.digest FILE`` to write the demo's manifest to FILE (only when
an intended change of the outputs is made; say why in the commit).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

from itk_infer.cli import main as cli_main

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
RECORD_VOLATILE = ("timings_s", "input_path", "input_mtime", "versions")

BACKEND_ARGS = {
    "onnx": ["--backend", "onnx", "--onnx", str(DEMO / "model.onnx")],
    "mmengine": ["--backend", "mmengine", "-cfg", str(DEMO / "mmengine_config.py"),
                 "-ckpt", str(DEMO / "mmengine_checkpoint.pth")],
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _xlsx_cells(path: Path) -> list:
    from openpyxl import load_workbook

    book = load_workbook(path, read_only=True)
    return [[name, [list(row) for row in book[name].iter_rows(values_only=True)]]
            for name in book.sheetnames]


def _record(path: Path) -> dict:
    data = json.loads(path.read_text())
    for key in RECORD_VOLATILE:
        data.pop(key, None)
    return data


# Confidences are means of a float32 softmax of the model's float32 logits, whose last bits
# depend on the CPU's kernels (onnxruntime's and oneDNN's pick by instruction set and vendor:
# the demo's label maps and float16 logits agree across x86-64 machines, its confidence
# differs from the 11th digit on). So numbers in records and tables are compared to this
# relative tolerance, everything else exactly.
FLOAT_RTOL = 1e-8


def _split_floats(value: object, floats: list[float]) -> object:
    """``value`` with each float replaced by a marker and appended to ``floats``."""
    if isinstance(value, float):
        floats.append(value)
        return "<float>"
    if isinstance(value, dict):
        return {k: _split_floats(v, floats) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_split_floats(v, floats) for v in value]
    return value


def _structured(value: object) -> dict:
    """A digest entry: SHA-256 of ``value`` with its floats marked, and the floats."""
    floats: list[float] = []
    skeleton = _split_floats(value, floats)
    return {"sha256": _sha(json.dumps(skeleton, sort_keys=True, default=repr).encode()),
            "floats": floats}


def digest_folder(folder: Path) -> dict[str, object]:
    """``relative path → digest`` of every output file under ``folder`` (locks excluded): the
    SHA-256 of its bytes, or for records and tables a :func:`_structured` entry."""
    manifest: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if "/locks/" in f"/{rel}":
            continue
        if path.name.endswith(".xlsx"):
            manifest[rel] = _structured(_xlsx_cells(path))
        elif rel.startswith(".itk_infer/") and path.suffix == ".json":
            manifest[rel] = _structured(_record(path))
        else:
            manifest[rel] = _sha(path.read_bytes())
    return manifest


def _same(expected: object, got: object) -> bool:
    if isinstance(expected, dict) and isinstance(got, dict):
        if expected["sha256"] != got["sha256"] or len(expected["floats"]) != len(got["floats"]):
            return False
        return all(math.isclose(a, b, rel_tol=FLOAT_RTOL) or (math.isnan(a) and math.isnan(b))
                   for a, b in zip(expected["floats"], got["floats"], strict=True))
    return expected == got


def differences(expected: dict[str, object], got: dict[str, object]) -> list[str]:
    """Files missing, extra or different between two :func:`digest_folder` manifests."""
    names = sorted(set(expected) | set(got))
    return [n for n in names if n not in expected or n not in got
            or not _same(expected[n], got[n])]


# oneDNN picks its convolution kernels by the CPU's instruction set, and AVX-512 kernels sum
# in another order than AVX2 ones: the MMEngine demo's logits then differ in the last bits
# from one machine to the next. Capped at AVX2, every x86-64 machine CI runs on agrees.
PORTABLE_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def run_demo(backend: str, out: Path, *extra: str) -> int:
    """Run the demo with every optional output, on the CPU, in a worker process started with
    :data:`PORTABLE_ENV` (oneDNN reads it once, when the process first uses it)."""
    saved = {key: os.environ.get(key) for key in PORTABLE_ENV}
    os.environ.update(PORTABLE_ENV)
    try:
        return cli_main(["-i", str(DEMO / "images"), "-o", str(out), *BACKEND_ARGS[backend],
                         "--save-logits", "--save-conf", "--device", "cpu", "--no-progress",
                         *extra])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if __name__ == "__main__":
    import tempfile

    result = {}
    for name in BACKEND_ARGS:
        with tempfile.TemporaryDirectory() as tmp:
            code = run_demo(name, Path(tmp) / "out")
            if code != 0:
                sys.exit(code)
            result[name] = digest_folder(Path(tmp) / "out")
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
