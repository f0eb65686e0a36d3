"""Helpers for the Dagster tests: demo inputs (the bundled demo model and images when present,
else small phantoms and a pointwise ONNX model), a watched root laid out in dated folders."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from tests.models import default_metadata, write_pointwise_model

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"
DEMO_MODEL = DEMO / "model.onnx"
DEMO_IMAGES = DEMO / "images"
# Where each demo image goes below the watched root: keys mirror a dated folder layout, and
# one image sits directly in the root.
LAYOUT = {
    "case_01.mha": "2026-11-26/case_01.mha",
    "case_02.nii.gz": "2026-11-26/case_02.nii.gz",
    "case_03.nii": "case_03.nii",
}


def demo_available() -> bool:
    return DEMO_MODEL.is_file() and all((DEMO_IMAGES / name).is_file() for name in LAYOUT)


@dataclass
class DemoInputs:
    """A watched root with images, the model, and the keys (relative paths) of the images."""

    root: Path
    model: Path
    keys: list[str]
    uses_demo: bool


def _synthetic_sources(folder: Path) -> tuple[Path, dict[str, Path]]:
    """Small phantoms in the demo's formats/orientations and a pointwise model (6 classes,
    the phantoms' window) that labels them by intensity."""
    from examples.phantoms import NUM_CLASSES, WL, WW, make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    sources = {}
    for (name, orientation), seed in zip(
        (("case_01.mha", "LPI"), ("case_02.nii.gz", "RAS"), ("case_03.nii", "oblique")),
        (1, 2, 3), strict=True,
    ):
        image, _labels = make_phantom(seed, size_zyx=(20, 40, 44), orientation=orientation)
        sitk.WriteImage(image, str(folder / name), useCompression=True)
        sources[name] = folder / name
    model = write_pointwise_model(
        folder / "pointwise.onnx", NUM_CLASSES,
        metadata=default_metadata(patch=(12, 24, 24), stride=(6, 12, 12), batch=2, wl=WL, ww=WW),
    )
    return model, sources


def make_demo_inputs(base: Path, sources_cache: Path | None = None) -> DemoInputs:
    """Copy the demo images (or synthetic stand-ins) into ``base/in`` following ``LAYOUT``."""
    if demo_available():
        model, sources = DEMO_MODEL, {name: DEMO_IMAGES / name for name in LAYOUT}
        uses_demo = True
    else:
        model, sources = _synthetic_sources(sources_cache or base / "sources")
        uses_demo = False
    root = base / "in"
    keys = []
    for name, key in LAYOUT.items():
        target = root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sources[name], target)
        keys.append(key)
    return DemoInputs(root=root, model=model, keys=keys, uses_demo=uses_demo)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative POSIX path → bytes), lock files left out."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and "/locks/" not in f"/{rel}":
            files[rel] = path.read_bytes()
    return files
