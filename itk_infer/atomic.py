"""Temporary names and atomic renames.

Every output is first written under a name starting with ``TMP_PREFIX`` in its final folder
(same file system, so the rename is atomic) and renamed when complete. The name ends with the
final name, so the case a temporary belongs to can be told from it: leftovers are removed
only under that case's lock (:func:`itk_infer.outfolder.remove_temporaries`), never by guessing
from PIDs, which mean nothing across containers or hosts sharing a folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".itk_infer-tmp-"
log = logging.getLogger(__name__)


TOKEN_CHARS = 12


def temporary_path(final: Path) -> Path:
    """A unique sibling of ``final`` that ends with its name (SimpleITK picks the format by
    the extension). A name that is not valid UTF-8 is stored as hex, with its extension, so
    that native libraries can write the temporary."""
    token = secrets.token_hex(TOKEN_CHARS // 2)
    name = final.name
    try:
        name.encode("utf-8")
        return final.with_name(f"{TMP_PREFIX}{token}-{name}")
    except UnicodeEncodeError:
        return final.with_name(f"{TMP_PREFIX}{token}~{os.fsencode(name).hex()}{_suffixes(name)}")


def final_name(temporary: Path) -> str | None:
    """The final name a temporary stands for, or ``None`` if ``temporary`` is not one."""
    name = temporary.name
    if not name.startswith(TMP_PREFIX):
        return None
    rest = name[len(TMP_PREFIX) :]
    marker, tail = rest[TOKEN_CHARS : TOKEN_CHARS + 1], rest[TOKEN_CHARS + 1 :]
    if marker == "-" and tail:
        return tail
    if marker == "~":
        encoded = tail[: len(tail) - len(_suffixes(tail))]
        try:
            return os.fsdecode(bytes.fromhex(encoded))
        except ValueError:
            return None
    # Temporaries of earlier versions: <pid>-<8 hex>-<name> (a PID has at most 7 digits, so
    # position 12 is never a marker there).
    legacy = re.fullmatch(r"\d+-[0-9a-z]+-(.+)", rest)
    return legacy.group(1) if legacy else None


def native_safe_path(path: Path) -> Path:
    """``path`` itself when native libraries can take its name; else a link to it with a safe
    name in a fresh temporary folder (the caller removes the folder). SimpleITK aborts the
    whole process on a file name that is not valid UTF-8 (bytes of another encoding)."""
    try:
        str(path).encode("utf-8")
        return path
    except UnicodeEncodeError:
        pass
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="itk_infer-name-"))
    link = folder / f"input{_suffixes(path.name)}"
    os.symlink(os.path.abspath(path), link)
    return link


def _suffixes(name: str) -> str:
    lowered = name.lower()
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"):
        if lowered.endswith(suffix):
            return suffix
    return ""


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` atomically, replacing what was there (files or folders)."""
    if tmp.is_dir() and final.exists():
        # A folder cannot replace a non-empty folder in one rename: move the old one aside first.
        aside = temporary_path(final)
        os.replace(final, aside)
        os.replace(tmp, final)
        remove_path(aside)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary path; publish it as ``final`` on success, remove it on any failure."""
    tmp = temporary_path(final)
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise
