"""Starting worker processes: a fresh interpreter each (``spawn``), SIGINT left to the parent,
a pipe, and a file for a crash dump. Used by the pool (:mod:`itk_infer.workers`) and by the
early start (:mod:`itk_infer.prestart`); imports no torch.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from itk_infer.config import Settings

CONTEXT = get_context("spawn")  # a fresh interpreter: no state of this process inherited


def quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker without its leak warning.

    numcodecs' Blosc makes a multiprocessing lock in each worker; a worker that is killed
    cannot unregister it, so the tracker removes it at the end and warns about a "leaked
    semaphore" that it has just cleaned up. The tracker takes its -W options from
    ``sys.warnoptions`` when it starts, hence the short-lived entry.
    """
    from multiprocessing import resource_tracker

    option = "ignore:resource_tracker:UserWarning"
    sys.warnoptions.append(option)
    try:
        resource_tracker.ensure_running()
    except Exception:  # only cosmetics are at stake
        pass
    finally:
        sys.warnoptions.remove(option)


def start_process(target: Callable[..., None], args: tuple, name: str
                  ) -> tuple[BaseProcess, Connection]:
    """Spawn a worker process running ``target(slot, conn, *rest)`` for ``args = (slot,
    *rest)``, ``conn`` its end of a new pipe. Returns the process and the parent's end."""
    quiet_resource_tracker()
    parent_conn, child_conn = CONTEXT.Pipe(duplex=True)
    process = CONTEXT.Process(target=target, args=(args[0], child_conn, *args[1:]),
                              name=name, daemon=True)
    # Start with SIGINT ignored: the child inherits that across exec, so a Ctrl-C while it
    # imports cannot kill it halfway; the parent stops workers itself.
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    child_conn.close()  # so the parent sees EOF when the worker dies
    return process, parent_conn


def new_crash_log() -> str:
    """A file for a worker's faulthandler dump (read and removed by the parent)."""
    handle, path = tempfile.mkstemp(prefix="itk_infer-crash-", suffix=".txt")
    os.close(handle)
    return path


def worker_args(settings: Settings, slot: int, gpu_index: int, threads: int) -> tuple:
    """What :func:`itk_infer.workers.worker_main` gets after its pipe (and before its crash
    log): also what an early worker is compared by (:func:`itk_infer.prestart.take`)."""
    level = logging.getLogger("itk_infer").getEffectiveLevel()
    return (slot, settings, gpu_index, threads, level, os.getpid())


@contextlib.contextmanager
def collections_paused() -> Iterator[None]:
    """No garbage collection inside, e.g. around importing torch: the import makes hundreds of
    thousands of objects that all stay alive, so the collections it triggers free nothing and
    cost about 0.2 s of CPU per process (BENCHMARKS.md, "Start-up")."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def skip_final_collection() -> None:
    """Call when the process is about to exit: its last garbage collection then skips every
    object alive now (they go with the process anyway). With torch loaded that collection
    walks millions of objects, about 0.3 s of a 2-core machine's wall at every exit (measured
    in BENCHMARKS.md, "Start-up"); atexit handlers still run. Not for a process that goes on:
    garbage alive now would never be collected."""
    gc.freeze()
