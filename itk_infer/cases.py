"""Discover input images, name cases, and lay out where each case's outputs go."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from itk_infer.errors import UsageError

# Longest suffix first so "a.nii.gz" is not taken for a ".gz" file.
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".mha", ".nii")
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
    """One input image."""

    name: str
    path: Path

    @property
    def filename(self) -> str:
        return self.path.name


def discover_cases(folder: Path) -> list[Case]:
    """The images directly in ``folder``, sorted by file name.

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
    if not by_name:
        raise UsageError(f"No input files found in {folder} (looked for *.mha, *.nii, *.nii.gz)")
    return sorted(by_name.values(), key=lambda c: c.filename)


@dataclass(frozen=True)
class OutputLayout:
    """Where the outputs of each case live inside one output folder."""

    folder: Path

    def labels(self, case: Case) -> Path:
        """The segmentation: same file name (and so format) as the input."""
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
