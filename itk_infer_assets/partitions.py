"""The ``images`` dynamic partitions: one key per input image, its path relative to the root."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from dagster import DynamicPartitionsDefinition

from itk_infer.cases import Case, OutputLayout, case_name

IMAGES_PARTITIONS_NAME = "images"
images_partitions = DynamicPartitionsDefinition(name=IMAGES_PARTITIONS_NAME)

# Dagster refuses these inside partition keys (see dagster's INVALID_PARTITION_SUBSTRINGS).
FORBIDDEN_IN_KEYS = ("...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0")

# Dagster's run tags for a run over a range of partitions (what its own backfills and
# automation set); a dynamic partitions definition ranges keys in the order they were added.
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
# How many keys the folder sensor put in a range: the step refuses a range that resolves to
# more (a key added elsewhere between them would otherwise stretch it).
BATCH_SIZE_TAG = "itk_infer/batch_size"
# Dagster's tags of an asset event's data version (the data_version module's DATA_VERSION_TAG
# and DATA_VERSION_IS_USER_PROVIDED_TAG); the version of a segmentation is its input's.
DATA_VERSION_TAG = "dagster/data_version"
DATA_VERSION_IS_USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"


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
        PartitionKeyError: not valid UTF-8, absolute, escaping the root (``..``), hidden
            parts, characters Dagster refuses, or a file name that is not an image.
    """
    if not is_utf8(key):
        # os.fsdecode turns bytes that are not UTF-8 into lone surrogates; no database, log or
        # tag can store them, so such a name never reaches Dagster.
        raise PartitionKeyError(f"partition key {shown(key)!r} is not valid UTF-8")
    if any(bad in key for bad in FORBIDDEN_IN_KEYS):
        raise PartitionKeyError(f"partition key {key!r} holds characters Dagster refuses")
    rel = PurePosixPath(key)
    if not key or rel.is_absolute() or any(part in ("", ".", "..") for part in key.split("/")):
        raise PartitionKeyError(f"partition key {key!r} is not a relative path below the root")
    if any(part.startswith(".") for part in rel.parts):
        raise PartitionKeyError(f"partition key {key!r} has a hidden part")
    if case_name(rel.name) is None:
        raise PartitionKeyError(f"partition key {key!r} is not a .mha, .nii or .nii.gz image")
    return rel


def is_utf8(name: str) -> bool:
    """Whether ``name`` is valid text (no lone surrogates from undecodable bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: str) -> str:
    """``name`` safe for logs and messages: undecodable bytes as backslash escapes.

    Examples:
        >>> shown("caf\\udcc3.mha")
        'caf\\\\xc3.mha'
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def input_version(size: int, mtime_s: float) -> str:
    """The data version of an input file: its size and mtime in ns, ``"<size>:<mtime_ns>"``.

    The mtime comes as the float seconds that ``os.stat`` gives and the case record keeps (so
    the last digits of the ns are rounded); both the sensor and the asset derive it from that
    same float, so equal files give equal versions exactly.

    Examples:
        >>> input_version(1024, 1767225600.5)
        '1024:1767225600500000000'
    """
    return f"{int(size)}:{round(mtime_s * 1e9)}"


def input_version_ns(size: int, mtime_ns: int) -> str:
    """:func:`input_version` from an integer ``st_mtime_ns``: rebuilds the float ``st_mtime``
    the way CPython's ``os.stat`` does (whole seconds plus nanoseconds times 1e-9)."""
    seconds, nanos = divmod(int(mtime_ns), 10**9)
    return input_version(size, float(seconds) + nanos * 1e-9)


def is_input_version(text: str | None) -> bool:
    """Whether ``text`` is a version made by :func:`input_version` (older materialisations
    carry Dagster's own hash instead)."""
    if not text:
        return False
    size, sep, ns = text.partition(":")
    return bool(sep) and size.isdigit() and ns.lstrip("-").isdigit()


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
