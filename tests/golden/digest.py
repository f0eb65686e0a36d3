"""SHA-256 digests of everything a demo run writes, for the golden-output test.

Label maps and zarr files are hashed byte for byte. ``confidences.xlsx`` is hashed by its cell
values (the file itself carries a creation time). Records are hashed as JSON without the
fields that differ between runs of the same numbers: timings, the input's absolute path and
mtime, and library versions.

Run as ``python -m tests.golden.digest FILE`` to write the demo's manifest to FILE (only when
an intended change of the outputs is made; say why in the commit).
"""

from __future__ import annotations

import hashlib
import json
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


def _xlsx_cells(path: Path) -> str:
    from openpyxl import load_workbook

    book = load_workbook(path, read_only=True)
    sheets = {name: [[repr(c) for c in row] for row in book[name].iter_rows(values_only=True)]
              for name in book.sheetnames}
    return json.dumps(sheets, sort_keys=True)


def _record(path: Path) -> str:
    data = json.loads(path.read_text())
    for key in RECORD_VOLATILE:
        data.pop(key, None)
    return json.dumps(data, sort_keys=True)


def digest_folder(folder: Path) -> dict[str, str]:
    """``relative path → sha256`` of every output file under ``folder`` (locks excluded)."""
    manifest = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if "/locks/" in f"/{rel}":
            continue
        if path.name.endswith(".xlsx"):
            manifest[rel] = _sha(_xlsx_cells(path).encode())
        elif rel.startswith(".itk_infer/") and path.suffix == ".json":
            manifest[rel] = _sha(_record(path).encode())
        else:
            manifest[rel] = _sha(path.read_bytes())
    return manifest


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
