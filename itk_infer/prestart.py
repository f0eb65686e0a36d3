"""The run's worker process, started before this process imports torch.

By default a run's cases go to one worker process (crash isolation, see
:mod:`itk_infer.workers`), which imports torch and loads the model itself. Started by the
pool, after the runner's own imports, the worker's imports only begin when this process's
have ended (about 1.5 s of torch on one core). So the command starts it first
(:func:`begin`, before it imports the runner), the two processes import at the same time,
and the pool adopts it for its first slot (:func:`take`) when the run needs exactly that
worker; :func:`close` stops it otherwise (nothing to run, other arguments).

Only where the worker's arguments are known without torch: one worker on the CPU
(``--device cpu``, or ``auto`` on a host without GPU device files). This module imports
neither torch nor the worker's module.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from itk_infer.backends import cpu_for_certain
from itk_infer.config import Settings
from itk_infer.spawn import new_crash_log, start_process, worker_args


def run_worker(*args: Any) -> None:
    """The worker process's target: imports the worker (torch and all) in the child only,
    after starting a warm start there (:mod:`itk_infer.warmstart`), whose first forwards run
    while torch imports."""
    from itk_infer.warmstart import begin_in_worker

    _slot, _conn, settings, _gpu, threads, *_rest = args
    warm = begin_in_worker(settings, threads)
    try:
        from itk_infer.workers import worker_main

        worker_main(*args)
    finally:
        if warm is not None:
            warm.close()


@dataclass
class Early:
    """A worker started by :func:`begin`, waiting to be adopted."""

    args: tuple  # (slot, settings, gpu_index, threads, log_level, parent_pid): what it runs
    process: BaseProcess
    conn: Connection
    crash_log: str


_early: Early | None = None


def eligible(settings: Settings) -> bool:
    """Whether the run's worker arguments are known now (see the module docstring)."""
    return (not settings.cases_in_process and cpu_for_certain(settings.device)
            and settings.num_proc == 1
            and settings.input_folder is not None and settings.output_folder is not None)


def begin(settings: Settings) -> None:
    """Start the run's worker now if :func:`eligible` (a no-op otherwise)."""
    global _early
    if _early is not None or not eligible(settings):
        return
    from itk_infer.progress import available_cores  # not on the --help path (numpy)

    args = worker_args(settings, 0, 0, available_cores())
    crash_log = new_crash_log()
    process, conn = start_process(run_worker, (*args, crash_log), "itk_infer-worker-0")
    _early = Early(args, process, conn, crash_log)


def take(args: tuple) -> Early | None:
    """The early worker if it was started with ``args`` (then it is the caller's); else
    ``None`` (and an early worker started otherwise is stopped)."""
    global _early
    early, _early = _early, None
    if early is not None and early.args != args:
        _stop(early)
        return None
    return early


def close() -> None:
    """Stop the early worker if nobody took it."""
    global _early
    early, _early = _early, None
    if early is not None:
        _stop(early)


def _stop(early: Early) -> None:
    early.process.terminate()
    early.process.join(5.0)
    if early.process.is_alive():
        early.process.kill()
        early.process.join()
    early.conn.close()
    with contextlib.suppress(OSError):
        os.unlink(early.crash_log)
