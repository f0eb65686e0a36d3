"""Quality checks of each segmentation, reported as Dagster asset checks on ``segmentation``
(one result per partition, so the UI shows them per image).

* ``confidence``: the case's mean confidence is at least ``ITK_INFER_QC_MIN_CONFIDENCE``.
* ``label_volumes``: every expected label is present, with its volume in mL inside the range
  declared for it (``ITK_INFER_QC_VOLUMES``, else the model's ``qc`` declaration).
* ``geometry``: the label map lies on the input's voxel grid (same voxel centres in physical
  space, same size and spacing along matching axes; an LPI label map is a permutation/flip of
  the input's axes, which this allows).

A check with nothing configured passes and says so. Everything is computed from the case's
record (voxel counts, confidence) and image headers; no voxel is read again.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itk_infer.config import Settings
from itk_infer.errors import ModelError, UsageError
from itk_infer.records import CaseRecord

CONFIDENCE = "confidence"
LABEL_VOLUMES = "label_volumes"
GEOMETRY = "geometry"
CHECK_DESCRIPTIONS = {
    CONFIDENCE: "Mean confidence at least ITK_INFER_QC_MIN_CONFIDENCE (passes when unset).",
    LABEL_VOLUMES: "Every expected label present with its volume (mL) inside its range "
                   "(ITK_INFER_QC_VOLUMES, else the model's 'qc' metadata; passes when none).",
    GEOMETRY: "The label map lies on the input image's voxel grid.",
}
# A grid matches when corresponding voxel centres agree to this fraction of a voxel.
GRID_TOLERANCE = 1e-3


@dataclass(frozen=True)
class VolumeRange:
    """What one expected label must satisfy."""

    name: str
    label: int
    min_ml: float | None = None
    max_ml: float | None = None


@dataclass(frozen=True)
class QcSpec:
    """The checks' thresholds for a run."""

    min_confidence: float | None = None
    volumes: tuple[VolumeRange, ...] = ()
    volumes_source: str = ""  # where the ranges come from, for the check's metadata


@dataclass(frozen=True)
class CheckOutcome:
    """One check's result for one case."""

    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


# --- what is expected --------------------------------------------------------------------


def _as_mapping(value: Any, what: str) -> dict[str, Any]:
    """A JSON text or a mapping (an MMEngine ConfigDict) as a plain dict."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise UsageError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, Mapping):
        raise UsageError(f"{what} must be a JSON object, got {type(value).__name__}")
    return json.loads(json.dumps(value))  # nested ConfigDicts → plain dicts


def parse_labels(value: Any, what: str) -> dict[str, int]:
    """A model's ``labels`` declaration ``{name: value}``."""
    labels = _as_mapping(value, what)
    for name, number in labels.items():
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise UsageError(f"{what}: label {name!r} must map to an integer >= 0, got {number!r}")
    return labels


def _label_value(name: str, labels: Mapping[str, int], what: str) -> int:
    """The voxel value of a label named in a ``qc`` declaration."""
    if name in labels:
        return int(labels[name])
    prefix, _, number = name.partition("_")
    if prefix == "label" and number.isdigit():
        return int(number)
    known = ", ".join(sorted(labels)) or "none; name them label_<n>"
    raise UsageError(f"{what}: unknown label {name!r} (model labels: {known})")


def _bound(entry: Mapping[str, Any], key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0:
        raise UsageError(f"{where}.{key} must be a number >= 0, got {value!r}")
    return float(value)


def parse_volumes(value: Any, labels: Mapping[str, int], what: str) -> tuple[VolumeRange, ...]:
    """A ``qc`` declaration ``{label: {"min_ml": a, "max_ml": b}}`` (either bound optional).

    Raises:
        UsageError: not JSON, unknown keys or labels, bounds that are not numbers >= 0, or a
            minimum above the maximum.
    """
    ranges = []
    for name, entry in sorted(_as_mapping(value, what).items()):
        where = f"{what}: {name}"
        if not isinstance(entry, Mapping):
            raise UsageError(f"{where} must be an object like {{\"min_ml\": 1, \"max_ml\": 2}}")
        unknown = sorted(set(entry) - {"min_ml", "max_ml"})
        if unknown:
            raise UsageError(f"{where}: unknown keys {unknown} (min_ml, max_ml)")
        low, high = _bound(entry, "min_ml", where), _bound(entry, "max_ml", where)
        if low is not None and high is not None and low > high:
            raise UsageError(f"{where}: min_ml {low:g} is above max_ml {high:g}")
        ranges.append(VolumeRange(name, _label_value(name, labels, what), low, high))
    return tuple(ranges)


def model_declarations(settings: Settings) -> dict[str, Any]:
    """The model's own ``qc`` and ``labels`` entries (raw): ONNX custom metadata, or top-level
    keys of the MMEngine config. Read from the files the settings name, since the loaded
    backends keep only the settings they use."""
    keys = ("qc", "labels")
    if settings.backend == "onnx" and settings.onnx_path is not None:
        import onnx

        try:
            proto = onnx.load_model(str(settings.onnx_path), load_external_data=False)
        except Exception as error:  # onnx raises several types for unreadable files
            raise ModelError(f"{settings.onnx_path.name}: cannot read its metadata: {error}") \
                from None
        meta = {entry.key: entry.value for entry in proto.metadata_props}
        return {key: meta[key] for key in keys if key in meta}
    if settings.backend == "mmengine" and settings.cfg_path is not None:
        from mmengine.config import Config

        try:
            cfg = Config.fromfile(str(settings.cfg_path), import_custom_modules=False)
        except Exception as error:  # mmengine raises many types for broken configs
            raise ModelError(f"{settings.cfg_path.name}: cannot read qc/labels: {error}") \
                from None
        return {key: cfg.get(key) for key in keys if cfg.get(key) is not None}
    return {}


def qc_spec(settings: Settings, qc_volumes: str, min_confidence: float | None) -> QcSpec:
    """The run's thresholds: ``qc_volumes`` (JSON) replaces the model's ``qc`` when set.

    Raises:
        UsageError: ``ITK_INFER_QC_VOLUMES`` that does not parse or names unknown labels.
        ModelError: the same in the model's declarations.
    """
    declared = model_declarations(settings)
    source = settings.onnx_path or settings.cfg_path
    model_name = Path(str(source)).name if source else "model"
    try:
        labels = parse_labels(declared["labels"], f"{model_name}: labels") \
            if "labels" in declared else {}
    except UsageError as error:
        raise ModelError(str(error)) from None
    if qc_volumes.strip():
        volumes = parse_volumes(qc_volumes, labels, "ITK_INFER_QC_VOLUMES")
        return QcSpec(min_confidence, volumes, "ITK_INFER_QC_VOLUMES")
    if "qc" in declared:
        try:
            volumes = parse_volumes(declared["qc"], labels, f"{model_name}: qc")
        except UsageError as error:
            raise ModelError(str(error)) from None
        return QcSpec(min_confidence, volumes, f"{model_name} 'qc'")
    return QcSpec(min_confidence)


# --- the checks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """An image's voxel grid from its header (ITK order: x, y, z)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def read(cls, path: Path) -> Grid:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return cls(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                   tuple(reader.GetDirection()))

    def axes(self) -> np.ndarray:
        """The direction matrix (columns: the index axes in physical space)."""
        n = len(self.size)
        return np.asarray(self.direction, float).reshape(n, n)

    def corners(self) -> np.ndarray:
        """Physical positions of the centres of the 8 corner voxels."""
        axes, spacing = self.axes(), np.asarray(self.spacing, float)
        ends = [(0, s - 1) for s in self.size]
        index = np.asarray(list(itertools.product(*ends)), float)
        return np.asarray(self.origin, float) + (index * spacing) @ axes.T

    def as_dict(self) -> dict[str, list]:
        return {"size": list(self.size), "spacing": [round(s, 6) for s in self.spacing],
                "origin": [round(o, 4) for o in self.origin]}


def same_grid(a: Grid, b: Grid) -> tuple[bool, str]:
    """Whether two grids hold the same voxels in physical space (axes may be permuted or
    flipped), and why not."""
    if len(a.size) != len(b.size):
        return False, f"{len(b.size)}-D label map for a {len(a.size)}-D image"
    dots = np.abs(a.axes().T @ b.axes())  # |cos| between every pair of index axes
    for i in range(len(a.size)):
        j = int(np.argmax(dots[i]))
        if dots[i, j] < 1 - 1e-6:
            return False, "axes are not parallel to the input's"
        if a.size[i] != b.size[j] or not math.isclose(a.spacing[i], b.spacing[j],
                                                      rel_tol=GRID_TOLERANCE):
            return False, (f"size/spacing {list(b.size)}/{b.as_dict()['spacing']} differ from "
                           f"the input's {list(a.size)}/{a.as_dict()['spacing']}")
    tolerance = GRID_TOLERANCE * min(a.spacing)
    ours, theirs = a.corners(), b.corners()
    worst = max(float(np.min(np.linalg.norm(theirs - c, axis=1))) for c in ours)
    if worst > tolerance:
        return False, f"voxel centres are up to {worst:.3g} mm away from the input's"
    return True, "label map on the input's voxel grid"


def check_confidence(record: CaseRecord, spec: QcSpec) -> CheckOutcome:
    value = record.confidence
    meta = {"confidence": value, "min_confidence": spec.min_confidence}
    if spec.min_confidence is None:
        return CheckOutcome(CONFIDENCE, True, "no minimum set (ITK_INFER_QC_MIN_CONFIDENCE)",
                            meta)
    if value is None:
        return CheckOutcome(CONFIDENCE, False, "no confidence was computed", meta)
    passed = value >= spec.min_confidence
    relation = ">=" if passed else "<"
    return CheckOutcome(CONFIDENCE, passed,
                        f"confidence {value:.4f} {relation} {spec.min_confidence:g}", meta)


def check_volumes(record: CaseRecord, spec: QcSpec, voxel_ml: float) -> CheckOutcome:
    """Presence and volume of each expected label, from the record's voxel counts."""
    if not spec.volumes:
        return CheckOutcome(LABEL_VOLUMES, True, "no expected labels declared",
                            {"voxel_ml": voxel_ml})
    rows: dict[str, dict[str, Any]] = {}
    problems = []
    for item in spec.volumes:
        voxels = int(record.voxels_per_label.get(str(item.label), 0))
        ml = voxels * voxel_ml
        if voxels == 0:
            problems.append(f"{item.name} missing")
        elif item.min_ml is not None and ml < item.min_ml:
            problems.append(f"{item.name} {ml:.1f} mL < {item.min_ml:g}")
        elif item.max_ml is not None and ml > item.max_ml:
            problems.append(f"{item.name} {ml:.1f} mL > {item.max_ml:g}")
        rows[item.name] = {"label": item.label, "voxels": voxels, "ml": round(ml, 3),
                           "min_ml": item.min_ml, "max_ml": item.max_ml}
    text = "; ".join(problems) if problems else f"{len(rows)} label(s) within range"
    return CheckOutcome(LABEL_VOLUMES, not problems, text,
                        {"labels": rows, "ranges_from": spec.volumes_source,
                         "voxel_ml": voxel_ml})


def check_geometry(image: Grid, labels: Grid) -> CheckOutcome:
    passed, text = same_grid(image, labels)
    return CheckOutcome(GEOMETRY, passed, text,
                        {"input": image.as_dict(), "label_map": labels.as_dict()})


def _read_grid(path: Path) -> tuple[Grid | None, str]:
    """The grid of ``path``, or ``None`` and why not."""
    try:
        return Grid.read(path), ""
    except RuntimeError as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        return None, f"cannot read the header of {path.name}: {lines[-1] if lines else error}"


def evaluate(record: CaseRecord, spec: QcSpec, image_path: Path, labels_path: Path,
             spacing_zyx: tuple[float, float, float] | None = None) -> list[CheckOutcome]:
    """All checks of one done case. The voxel size is ``spacing_zyx`` (the case's result, when
    it kept its arrays), else the label map header's. A header that cannot be read fails the
    checks that need it, never the run."""
    outcomes = [check_confidence(record, spec)]
    image, image_error = _read_grid(image_path)
    labels, labels_error = _read_grid(labels_path)
    spacing = spacing_zyx if spacing_zyx is not None else labels.spacing if labels else None
    if spacing is None:
        outcomes.append(CheckOutcome(LABEL_VOLUMES, False, labels_error))
    else:
        voxel_ml = float(np.prod(np.asarray(spacing, float))) / 1000.0
        outcomes.append(check_volumes(record, spec, voxel_ml))
    if image is None or labels is None:
        outcomes.append(CheckOutcome(GEOMETRY, False, image_error or labels_error))
    else:
        outcomes.append(check_geometry(image, labels))
    return outcomes
