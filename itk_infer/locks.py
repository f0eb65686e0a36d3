"""Per-case locks, so two runs on one output folder never work on the same case at once.

A lock is an ``fcntl.flock`` on ``<output>/.itk_infer/locks/<case>.lock``. The kernel drops
the lock when its holder dies, however it dies (SIGKILL included), so a lock left by a dead
run breaks itself: the next run simply takes it. Lock files are removed on release; a file
that survives a crash is harmless (it holds no lock, only the PID of its last holder).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from itk_infer.cases import Case, OutputLayout

LOCKS_DIRNAME = "locks"


def lock_path(layout: OutputLayout, case: Case) -> Path:
    """Where the lock of ``case`` lives."""
    return layout.records_folder / LOCKS_DIRNAME / f"{case.name}.lock"


class CaseLock:
    """A held lock; :meth:`release` (or process death) lets others take the case."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock; safe to call twice."""
        if self._fd is None:
            return
        # Unlink while still holding the lock: a waiter that opened the old file notices the
        # replaced inode in try_lock and retries, so two holders never coexist.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def try_lock(layout: OutputLayout, case: Case, *, wait: bool = False) -> CaseLock | None:
    """Take the lock of ``case``; without ``wait``, ``None`` if another process holds it."""
    path = lock_path(layout, case)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            # The holder released (and unlinked) between our open and our flock: the lock we
            # got is on a dead inode. Try again on the current file.
            os.close(fd)
            continue
        # Who holds it, for people looking at a stuck folder; not used for correctness.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return CaseLock(path, fd)


def lock_holder(layout: OutputLayout, case: Case) -> str:
    """The ``"<pid> <host>"`` written by the current holder, or ``""`` if unknown."""
    try:
        return lock_path(layout, case).read_text().strip()
    except OSError:
        return ""


def remove_stale_locks(layout: OutputLayout) -> int:
    """Remove lock files nobody holds (left by killed runs; cosmetic, they block nothing)."""
    folder = layout.records_folder / LOCKS_DIRNAME
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.glob("*.lock"):
        lock = try_lock(layout, Case(path.stem, path))
        if lock is not None:
            lock.release()  # unlinks it under the lock, so no live holder is affected
            removed += 1
    return removed
