"""Uploaded images on disk, in one private scratch folder.

Files are named by random uuids with an allowlisted extension: a client's image id or file
name never reaches a path. The folder is made with mode 0700 (``tempfile.mkdtemp``), entries
unused for ``ttl`` seconds are deleted, at most ``max_entries`` are kept (the least recently
used unpinned one goes first), and :meth:`UploadStore.close` removes everything.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Kinds of entries; ids are separate namespaces per kind.
IMAGE = "image"
SESSION = "session"


class StoreFull(Exception):
    """Every kept upload is in use by a request: nothing can be evicted for a new one."""


@dataclass
class Entry:
    """One stored upload. ``pins`` counts requests using it; a pinned entry is never
    deleted, and one replaced or removed while pinned goes when its last pin is released."""

    kind: str
    ident: str
    path: Path
    size: int
    last_used: float
    pins: int = 0
    dropped: bool = False


class UploadStore:
    """Thread-safe: the event loop adds and pins, the inference thread reads the files."""

    def __init__(self, parent: Path | None, ttl: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="itk_infer-serve-", dir=parent))  # 0700
        self.uploads = self.root / "uploads"
        self.work = self.root / "work"
        self.uploads.mkdir(mode=0o700)
        self.work.mkdir(mode=0o700)
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[tuple[str, str], Entry] = {}
        self._lock = threading.Lock()
        self._closed = False

    def new_path(self, suffix: str) -> Path:
        """A fresh name for an upload being received (not yet an entry)."""
        return self.uploads / f"{uuid.uuid4().hex}{suffix}"

    def work_folder(self) -> Path:
        """A new private folder for one request's outputs (the caller removes it)."""
        folder = self.work / uuid.uuid4().hex
        folder.mkdir(mode=0o700)
        return folder

    def add(self, kind: str, ident: str, path: Path, size: int, *, pinned: bool = False
            ) -> Entry:
        """Keep the received file ``path`` as ``(kind, ident)``, replacing an entry of that id;
        ``pinned``: in use from the start (see :meth:`pin`).

        Raises:
            StoreFull: the cap is reached and every entry is pinned (``path`` is deleted).
        """
        with self._lock:
            now = self._clock()
            self._sweep_locked(now)
            old = self._entries.pop((kind, ident), None)
            if old is not None:
                self._drop_locked(old)
            while len(self._entries) >= self.max_entries:
                if not self._evict_one_locked():
                    _unlink(path)
                    raise StoreFull(f"all {self.max_entries} uploads are in use")
            entry = Entry(kind, ident, path, size, now, pins=int(pinned))
            self._entries[(kind, ident)] = entry
            return entry

    def pin(self, kind: str, ident: str) -> Entry | None:
        """The entry ``(kind, ident)``, marked in use until :meth:`release`; ``None`` if
        absent (never uploaded, expired or evicted)."""
        with self._lock:
            entry = self._entries.get((kind, ident))
            if entry is not None:
                entry.pins += 1
                entry.last_used = self._clock()
            return entry

    def release(self, entry: Entry) -> None:
        """End one use of ``entry``; its TTL counts from now."""
        with self._lock:
            entry.pins -= 1
            entry.last_used = self._clock()
            if entry.dropped and entry.pins == 0:
                _unlink(entry.path)

    def remove(self, kind: str, ident: str) -> bool:
        with self._lock:
            entry = self._entries.pop((kind, ident), None)
            if entry is not None:
                self._drop_locked(entry)
            return entry is not None

    def get(self, kind: str, ident: str) -> Entry | None:
        with self._lock:
            return self._entries.get((kind, ident))

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for key in self._entries if key[0] == kind)

    def sweep(self) -> int:
        """Delete the entries unused for longer than the TTL; returns how many."""
        with self._lock:
            return self._sweep_locked(self._clock())

    def close(self) -> None:
        """Delete every file and the scratch folder (shutdown). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._entries.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        log.info("scratch folder removed")

    # --- under the lock

    def _sweep_locked(self, now: float) -> int:
        expired = [e for e in self._entries.values()
                   if e.pins == 0 and now - e.last_used > self.ttl]
        for entry in expired:
            del self._entries[(entry.kind, entry.ident)]
            self._drop_locked(entry)
        if expired:
            log.info("%d upload(s) expired", len(expired))
        return len(expired)

    def _evict_one_locked(self) -> bool:
        idle = [e for e in self._entries.values() if e.pins == 0]
        if not idle:
            return False
        oldest = min(idle, key=lambda e: e.last_used)
        del self._entries[(oldest.kind, oldest.ident)]
        self._drop_locked(oldest)
        return True

    @staticmethod
    def _drop_locked(entry: Entry) -> None:
        entry.dropped = True
        if entry.pins == 0:
            _unlink(entry.path)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
