"""Per-case JSON records (written last: they mark a case complete), what they say about a case
(done, stale, to do), run summaries and the confidences table."""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itk_infer.atomic import atomic_output
from itk_infer.cases import Case, OutputLayout, input_stamp
from itk_infer.locks import try_lock

if TYPE_CHECKING:
    from itk_infer.config import OutputOptions

log = logging.getLogger(__name__)
RECORD_VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers in the outputs."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("itk_infer", "numpy", "SimpleITK", "torch", "onnxruntime-gpu", "onnxruntime",
                 "mmengine", "onedl-mmengine", "zarr", "numcodecs"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class CaseRecord:
    """What one finished case was made from and what it produced."""

    case: str
    input_path: str
    input_size: int
    input_mtime: float
    model_fingerprint: str
    settings: dict[str, Any]
    outputs: dict[str, str]  # kind ("labels", "logits") → file name in the output folder
    output_sizes: dict[str, int]
    voxels_per_label: dict[str, int]
    timings_s: dict[str, float]
    confidence: float | None = None
    num_classes: int = 0
    source_orientation: str = ""
    # Largest tilt (degrees) of the input's axes from the world axes, and the grid of the
    # outputs: "lpi", "lpi-resampled" (oblique input, axis-aligned) or "input".
    obliquity_deg: float = 0.0
    grid: str = "lpi"
    # What ran after out-of-memory errors, in order (e.g. "host accumulation, batch 1", "cpu").
    fallback: list[str] = field(default_factory=list)
    # By label name (the model's, else label_<v>): volume in mL on the grid of the written
    # label map, and the mean confidence of the voxels given that label (None: no voxel;
    # empty without --save-conf, where no confidence is computed).
    volumes_ml: dict[str, float] = field(default_factory=dict)
    confidence_by_label: dict[str, float | None] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    record_version: int = RECORD_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseRecord:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def write_json_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(text + "\n")


def write_record(layout: OutputLayout, case: Case, record: CaseRecord) -> Path:
    """Write the record last, after every output of the case is published."""
    path = layout.record(case)
    write_json_atomic(path, record.to_json())
    return path


def read_record(path: Path) -> CaseRecord | None:
    """The record at ``path``, or ``None`` when missing or unreadable."""
    try:
        return CaseRecord.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def output_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (a zarr array); 0 when missing."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.is_file() else 0


def outputs_intact(layout: OutputLayout, record: CaseRecord) -> bool:
    """Every output the record lists exists, with the size it had when written.

    Folders (zarr arrays) are summed too: a missing chunk would otherwise read back silently
    as the fill value.
    """
    for kind, name in record.outputs.items():
        path = layout.folder / name
        expected = record.output_sizes.get(kind)
        if not path.exists():
            return False
        if expected is not None and output_size(path) != expected:
            return False
    return True


def read_all_records(folder: Path) -> list[CaseRecord]:
    """Every readable record in an output folder, sorted by case name."""
    records_dir = OutputLayout(Path(folder)).records_folder
    if not records_dir.is_dir():
        return []
    found = (read_record(p) for p in sorted(records_dir.glob("*.json")))
    return sorted((r for r in found if r is not None), key=lambda r: r.case)


def confidence_rows(folder: Path) -> list[tuple[str, float]]:
    """``(case, confidence)`` of every intact record with a confidence in ``folder``, by case
    name — cases of earlier runs included."""
    layout = OutputLayout(Path(folder))
    return [(r.case, float(r.confidence)) for r in read_all_records(layout.folder)
            if r.confidence is not None and outputs_intact(layout, r)]


def label_summary(counts: dict[int, int], voxel_mm3: float, names: dict[int, str],
                  confidence: dict[int, float] | None
                  ) -> tuple[dict[str, float], dict[str, float | None]]:
    """``(volumes_ml, confidence_by_label)`` of a case keyed by ``names`` (value → name, one
    entry per label value to report): voxel count x voxel volume (mm³) / 1000, and the mean
    confidence of the label's voxels (``None`` when it has none; nothing when ``confidence``
    is ``None``, i.e. not computed)."""
    volumes = {names[v]: counts.get(v, 0) * voxel_mm3 / 1000.0 for v in sorted(names)}
    by_label: dict[str, float | None] = {}
    if confidence is not None:
        by_label = {names[v]: confidence.get(v) for v in sorted(names)}
    return volumes, by_label


def _label_cells(folder: Path) -> tuple[dict[str, dict[str, float | None]], list[str]]:
    """Per-label xlsx cells by case (``<name> mL``, ``<name> confidence``) from the records
    of ``folder``, and the column order (names in the order the records list them)."""
    cells: dict[str, dict[str, float | None]] = {}
    columns: list[str] = []
    for record in read_all_records(Path(folder)):
        row: dict[str, float | None] = {}
        for name, ml in record.volumes_ml.items():
            row[f"{name} mL"] = ml
            if record.confidence_by_label:
                row[f"{name} confidence"] = record.confidence_by_label.get(name)
        columns += [c for c in row if c not in columns]
        cells[record.case] = row
    return cells, columns


REVIEW_COLUMNS = ["Case", "Failed checks", "Details"]


def write_confidences(folder: Path, rows: list[tuple[str, float]] | None = None,
                      review: list[tuple[str, str, str]] | None = None) -> Path:
    """Write ``confidences.xlsx`` (sheet ``Confidences``: ``Case``, ``Confidence``, then per
    label ``<name> mL`` and ``<name> confidence`` from the records) from
    ``rows``, by default :func:`confidence_rows` of ``folder``; with ``review`` rows (case,
    failed checks, details), also a sheet ``Review`` (only then: the CLI's table stays one
    sheet)."""
    import pandas as pd

    layout = OutputLayout(Path(folder))
    rows = confidence_rows(folder) if rows is None else rows
    by_case, label_columns = _label_cells(folder)
    frame = pd.DataFrame([{"Case": _cell_text(c), "Confidence": v, **by_case.get(c, {})}
                          for c, v in rows],
                         columns=["Case", "Confidence", *label_columns])
    # Under the table's own lock: runs sharing the folder take turns, and leftover cleanup
    # never removes a table being written.
    lock = try_lock(layout, Case(layout.confidences.name, layout.confidences), wait=True)
    try:
        with atomic_output(layout.confidences) as tmp:
            if not review:
                frame.to_excel(tmp, sheet_name="Confidences", index=False, engine="openpyxl")
            else:
                flagged = pd.DataFrame([(_cell_text(c), checks, details)
                                        for c, checks, details in review],
                                       columns=REVIEW_COLUMNS)
                with pd.ExcelWriter(tmp, engine="openpyxl") as writer:
                    frame.to_excel(writer, sheet_name="Confidences", index=False)
                    flagged.to_excel(writer, sheet_name="Review", index=False)
    finally:
        if lock is not None:
            lock.release()
    return layout.confidences


def _cell_text(name: str) -> str:
    """A case name as spreadsheet text: bytes of a name that is not valid UTF-8 are shown as
    backslash escapes (XML cannot hold them)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def complete_record(layout: OutputLayout, case: Case, outputs: OutputOptions) -> CaseRecord | None:
    """The case's record when every output the run asks for exists intact under it, whatever
    model made it; else ``None``."""
    record = read_record(layout.record(case))
    if record is None or not outputs_intact(layout, record) or not same_input(case, record):
        return None
    if outputs.save_logits and "logits" not in record.outputs:
        return None
    if outputs.save_conf and record.confidence is None:
        return None
    return record


def same_input(case: Case, record: CaseRecord) -> bool:
    """The input file is still the one the outputs were made from (same size and mtime: a
    replaced or rewritten image is redone)."""
    try:
        size, mtime = input_stamp(case)
    except OSError:
        return False
    if size == record.input_size and mtime == record.input_mtime:
        return True
    log.info("%s: the input changed since its outputs were made; it is redone", case.filename)
    return False


def record_status(record: CaseRecord | None, fingerprint: str, described: dict[str, Any]) -> str:
    """``"todo"`` (no complete record), ``"done"`` or ``"stale"`` (complete, but made by another
    model or settings), from the model's fingerprint and description alone (all that the parent
    of worker processes knows of it)."""
    if record is None:
        return "todo"
    recorded = {k: v for k, v in record.settings.items() if k != "device"}  # not in the numbers
    if record.model_fingerprint != fingerprint or recorded != described:
        return "stale"
    return "done"


# Reasons given with "skipped" outcomes; a complete, up-to-date case is skipped with no reason.
SKIP_IN_PROGRESS = "in progress in another run"
SKIP_STALE = "complete, but made by another model or settings (--overwrite redoes it)"
NOT_RUN_DISK_FULL = "the run stopped: no space left for the outputs"


@dataclass
class CaseOutcome:
    case: str
    status: str  # "done", "skipped", "failed"
    reason: str = ""
    seconds: float = 0.0
    confidence: float | None = None


@dataclass
class RunSummary:
    """Counts and per-case outcomes of one run."""

    outcomes: list[CaseOutcome] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def headline(self) -> str:
        return (
            f"{self.count('done')} done, {self.count('skipped')} skipped, "
            f"{self.count('failed')} failed"
        )

    def to_json(self) -> str:
        data = {
            "done": self.count("done"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "stale": self.stale,
            "wall_seconds": round(self.wall_seconds, 3),
            "cases": [asdict(o) for o in self.outcomes],
        }
        return json.dumps(data, indent=2)
