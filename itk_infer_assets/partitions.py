"""The ``images`` dynamic partitions: one key per input image, its path relative to the root."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from dagster import DynamicPartitionsDefinition

from itk_infer.cases import Case, OutputLayout, case_name

IMAGES_PARTITIONS_NAME = "images"
images_partitions = DynamicPartitionsDefinition(name=IMAGES_PARTITIONS_NAME)

# Dagster refuses these inside partition keys (see dagster's INVALID_PARTITION_SUBSTRINGS).
_FORBIDDEN_IN_KEYS = ("...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0")


class PartitionKeyError(ValueError):
    """A key that cannot name an image under the watched root."""


def partition_key(root: Path, path: Path) -> str:
    """The key of ``path``: its path relative to ``root`` with ``/`` separators.

    Examples:
        >>> partition_key(Path("/in"), Path("/in/2026-11-26/ct_001.nii.gz"))
        '2026-11-26/ct_001.nii.gz'
    """
    key = PurePosixPath(*Path(path).relative_to(root).parts).as_posix()
    check_key(key)
    return key


def check_key(key: str) -> PurePosixPath:
    """Validate ``key`` and return it as a relative path.

    Raises:
        PartitionKeyError: absolute, escaping the root (``..``), hidden parts, characters
            Dagster refuses, or a file name that is not an image.
    """
    if any(bad in key for bad in _FORBIDDEN_IN_KEYS):
        raise PartitionKeyError(f"partition key {key!r} holds characters Dagster refuses")
    rel = PurePosixPath(key)
    if not key or rel.is_absolute() or any(part in ("", ".", "..") for part in key.split("/")):
        raise PartitionKeyError(f"partition key {key!r} is not a relative path below the root")
    if any(part.startswith(".") for part in rel.parts):
        raise PartitionKeyError(f"partition key {key!r} has a hidden part")
    if case_name(rel.name) is None:
        raise PartitionKeyError(f"partition key {key!r} is not a .mha, .nii or .nii.gz image")
    return rel


def key_folder(key: str) -> str:
    """The relative folder of a key (``""`` for images directly in the root).

    Examples:
        >>> key_folder("2026-11-26/ct_001.nii.gz"), key_folder("ct_002.mha")
        ('2026-11-26', '')
    """
    parent = check_key(key).parent.as_posix()
    return "" if parent == "." else parent


def case_for_key(watch_root: Path, key: str) -> Case:
    """The core's :class:`Case` for a key: same name and path as the CLI would use."""
    rel = check_key(key)
    name = case_name(rel.name)
    assert name is not None  # check_key guarantees an image suffix
    return Case(name=name, path=Path(watch_root).joinpath(*rel.parts))


def layout_for_key(output_root: Path, key: str) -> OutputLayout:
    """Where a key's outputs go: the output root plus the key's relative folder, exactly the
    folder a CLI run on that input folder would be given."""
    folder = key_folder(key)
    base = Path(output_root)
    return OutputLayout(base.joinpath(*folder.split("/")) if folder else base)
