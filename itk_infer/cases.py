"""Discover input images, name cases, and lay out where each case's outputs go."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from itk_infer.dicom.series import find_series, series_stamp
from itk_infer.errors import UsageError

# Longest suffix first so "a.nii.gz" is not taken for a ".gz" file.
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".mha", ".nii")
SEG_SUFFIX = ".seg.dcm"  # the segmentation of a DICOM series case
RECORDS_DIRNAME = ".itk_infer"
CONFIDENCES_FILENAME = "confidences.xlsx"


def case_name(filename: str) -> str | None:
    """The file name without its image extension, or ``None`` for a non-image file.

    Examples:
        >>> case_name("ct_01.nii.gz")
        'ct_01'
        >>> case_name("notes.txt") is None
        True
    """
    lower = filename.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    return None


@dataclass(frozen=True)
class Case:
    """One input image: a file, or a DICOM series (``files``; ``path`` is their folder)."""

    name: str
    path: Path
    files: tuple[Path, ...] = ()  # the slices of a DICOM series case; empty for a file

    @property
    def filename(self) -> str:
        """The input as messages name it: the file name, or the series' case name."""
        return self.name if self.files else self.path.name


def input_stamp(case: Case) -> tuple[int, float]:
    """Size and modification time of the input (of a series: total size, latest mtime); a
    changed stamp makes resume redo the case."""
    if case.files:
        return series_stamp(case.files)
    stat = case.path.stat()
    return stat.st_size, stat.st_mtime


def dicom_cases(folder: Path) -> list[Case]:
    """The DICOM series in ``folder``'s subfolders (one level) and loose in ``folder``.

    A subfolder holding one series is a case named after the subfolder; every other series
    (several in one subfolder, or files directly in ``folder``) is named by its
    SeriesInstanceUID.
    """
    cases = []
    subfolders = [p for p in sorted(folder.iterdir(), key=lambda p: p.name)
                  if p.is_dir() and not p.name.startswith(".")]
    for sub in subfolders:
        found = find_series(sub)
        for series in found:
            name = sub.name if len(found) == 1 else series.uid
            cases.append(Case(name=name, path=sub, files=series.files))
    cases += [Case(name=s.uid, path=folder, files=s.files) for s in find_series(folder)]
    return cases


def discover_cases(folder: Path) -> list[Case]:
    """The images directly in ``folder`` and its DICOM series (:func:`dicom_cases`), sorted
    by file (case) name. Image files and DICOM series may share a folder.

    Raises:
        UsageError: the folder is missing, holds no image, or two images share a case name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"Input folder does not exist or is not a folder: {folder}")
    by_name: dict[str, Case] = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        name = case_name(path.name)
        if name is None or path.name.startswith(".") or not path.is_file():
            continue
        if name in by_name:
            raise UsageError(
                f"Two inputs map to the same case name {name!r}: "
                f"{by_name[name].path.name} and {path.name}; rename one"
            )
        by_name[name] = Case(name=name, path=path)
    for case in dicom_cases(folder):
        if case.name in by_name:
            raise UsageError(
                f"Two inputs map to the same case name {case.name!r}: "
                f"{by_name[case.name].path.name} and the DICOM series in {case.path.name}; "
                "rename one"
            )
        by_name[case.name] = case
    if not by_name:
        raise UsageError(f"No input files found in {folder} "
                         "(looked for *.mha, *.nii, *.nii.gz and DICOM series)")
    return sorted(by_name.values(), key=lambda c: c.filename)


@dataclass(frozen=True)
class OutputLayout:
    """Where the outputs of each case live inside one output folder."""

    folder: Path

    def labels(self, case: Case) -> Path:
        """The segmentation: same file name (and so format) as the input; a DICOM-SEG
        ``<case>.seg.dcm`` for a DICOM series."""
        if case.files:
            return self.folder / f"{case.name}{SEG_SUFFIX}"
        return self.folder / case.filename

    def logits(self, case: Case) -> Path:
        return self.folder / f"{case.name}.zarr"

    def record(self, case: Case) -> Path:
        return self.records_folder / f"{case.name}.json"

    @property
    def records_folder(self) -> Path:
        return self.folder / RECORDS_DIRNAME

    @property
    def confidences(self) -> Path:
        return self.folder / CONFIDENCES_FILENAME


def largest_first(case: Case) -> tuple[int, str]:
    """Sort key of the worker pool's queue: the largest input file first (the longest case
    starts early, so no worker is left with it at the end), then by name."""
    try:
        size = case.path.stat().st_size
    except OSError:
        size = 0
    return (-size, case.name)
