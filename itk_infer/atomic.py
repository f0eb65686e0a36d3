"""Temporary names, atomic renames and the removal of temporaries left by dead processes.

Every output is first written under a name starting with ``TMP_PREFIX`` in its final folder
(same file system, so the rename is atomic) and renamed when complete. The writer's PID is
part of the name, so a later run can tell leftovers of a dead process from live work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".itk_infer-tmp-"
log = logging.getLogger(__name__)


def temporary_path(final: Path) -> Path:
    """A unique sibling of ``final`` that keeps its extension (SimpleITK picks the format by it)."""
    return final.with_name(f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{final.name}")


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


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> int:
    """Remove temporaries in ``folder`` whose writing process is gone; returns how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    for entry in folder.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        pid_text = entry.name[len(TMP_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        remove_path(entry)
        removed += 1
    if removed:
        log.info("removed %d leftover temporary file(s) in %s", removed, folder)
    return removed
