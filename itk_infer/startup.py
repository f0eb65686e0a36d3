"""Start-up bookkeeping shared by the command and the backends, with no heavy imports: the
time since this process started, a ``-vv`` log line at the first model forward, and the
hand-over of things prepared while torch loads (see :mod:`itk_infer.warmstart`).

``itk_infer -vv`` logs ``first model forward (...) N s after the process started``;
``benchmarks/bench_startup.py`` measures the same point from outside the process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)


def _process_age() -> float:
    """Seconds since the kernel started this process (Linux: /proc, 10 ms ticks); 0 where
    that cannot be read (then times count from this module's import)."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            # Field 22 (starttime, clock ticks since boot); split after the ")" of the name.
            started = int(stat.read().rsplit(b")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime", "rb") as uptime:
            return max(0.0, float(uptime.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return 0.0


# perf_counter() + _OFFSET = seconds since the process started (read once: /proc is coarse).
_OFFSET = _process_age() - time.perf_counter()
_first_forward: float | None = None
_lock = threading.Lock()
_prepared: dict[str, Future[Any]] = {}


def since_process_start() -> float:
    """Seconds since this process started."""
    return time.perf_counter() + _OFFSET


def note_first_forward(where: str) -> None:
    """Log (debug) the time of this process's first model forward; later calls do nothing."""
    global _first_forward
    if _first_forward is not None:
        return
    with _lock:
        if _first_forward is not None:
            return
        _first_forward = since_process_start()
    log.debug("first model forward (%s) %.2f s after the process started", where, _first_forward)


def model_key(backend: str, path: str | os.PathLike[str]) -> str:
    """The key of a model prepared for ``backend`` from the file ``path``."""
    return f"{backend}:{os.path.realpath(path)}"


def file_key(kind: str, path: str | os.PathLike[str], *how: object) -> str | None:
    """The key of ``kind`` made from the file ``path`` as it is now (path, size, mtime) and
    ``how``: a file replaced meanwhile has another key. ``None`` if it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return f"{kind}:{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}:{how!r}"


def offer(key: str, prepared: Future[Any]) -> None:
    """Hand ``prepared`` (being made by a start-up thread) to the first :func:`claim` of
    ``key``."""
    with _lock:
        _prepared[key] = prepared


def claim(key: str) -> Future[Any] | None:
    """What was offered under ``key``, once; ``None`` if nothing was."""
    with _lock:
        return _prepared.pop(key, None)


def claim_result(key: str | None) -> Any | None:
    """The result of what was offered under ``key``, waiting for it; ``None`` if nothing was
    or making it failed (the caller then does the work itself and reports the error)."""
    pending = claim(key) if key is not None else None
    if pending is None:
        return None
    try:
        return pending.result()
    except Exception:
        return None


def withdraw(keys: list[str]) -> None:
    """Drop offers nobody claimed (what they hold is freed)."""
    with _lock:
        for key in keys:
            _prepared.pop(key, None)
