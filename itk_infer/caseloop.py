"""The case loop of one process: take a case, lock it, read the next one while the model runs
this one, write the previous one meanwhile, and report each case's result.

The CLI (in its own process or in each worker process) and the Dagster asset both run their
cases through :func:`run_cases` / :class:`CaseLoop`; both run the steps of
:mod:`itk_infer.pipeline`, the same ones :func:`itk_infer.pipeline.predict_case` runs in a row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from itk_infer.cases import Case, OutputLayout
from itk_infer.config import OutputOptions
from itk_infer.errors import CaseError, DiskFullError, is_disk_full
from itk_infer.locks import CaseLock, lock_holder, try_lock
from itk_infer.pipeline import (
    CaseResult,
    InferredCase,
    LoadedCase,
    Model,
    case_status,
    done_result,
    infer_case,
    load_case,
    write_case,
)
from itk_infer.progress import Progress
from itk_infer.records import NOT_RUN_DISK_FULL, SKIP_IN_PROGRESS, SKIP_STALE, CaseOutcome

log = logging.getLogger(__name__)

Report = Callable[[CaseResult], None]
Phase = Callable[[Case, str], None]


def describe_failure(error: BaseException) -> str:
    """The reason a case failed, as reported: a CaseError's own message, else its type too."""
    if isinstance(error, CaseError):
        return str(error)
    return f"{type(error).__name__}: {error}"


@dataclass
class _Held:
    """A case this process has locked and started to read."""

    case: Case
    lock: CaseLock
    started: float
    read: Future[LoadedCase]


class CaseLoop:
    """Pull cases from ``next_case`` until it returns ``None`` and run them with one model.

    Each case is locked first (one held by another run is reported skipped, in progress) and
    checked again under the lock (another run may have finished it), unless ``overwrite``.
    The next case is read while the current one is in the model, and outputs are written
    while the next one is: one of each in flight, so memory stays bounded. A failing case is
    reported failed and the loop goes on. ``phase(case, "read" | "model" | "write")`` follows
    each case. ``keep_arrays`` hands each result its label map and windowed input (a third
    volume in flight: for faces that show them).
    """

    def __init__(self, next_case: Callable[[], Case | None], model: Model, layout: OutputLayout,
                 outputs: OutputOptions, report: Report, *, overwrite: bool = False,
                 phase: Phase | None = None, keep_arrays: bool = False) -> None:
        self.next_case, self.model, self.layout, self.outputs = next_case, model, layout, outputs
        self.report, self.overwrite, self.keep_arrays = report, overwrite, keep_arrays
        self.note = phase or (lambda _case, _phase: None)
        self.held: list[_Held] = []
        self.reader = ThreadPoolExecutor(1, "itk-read")
        self.writer = ThreadPoolExecutor(1, "itk-write")

    def run(self) -> None:
        try:
            self._loop()
        finally:
            # On an interrupt: drop queued reads, let a running write finish (it publishes a
            # whole case or nothing), then free the locks.
            self.reader.shutdown(wait=True, cancel_futures=True)
            self.writer.shutdown(wait=True, cancel_futures=True)
            for item in self.held:
                item.lock.release()

    def _loop(self) -> None:
        pending: tuple[_Held, Future[CaseResult]] | None = None
        current = self._claim()
        try:
            while current is not None:
                inferred, upcoming = self._infer(current)
                if inferred is not None:
                    if pending is not None:
                        previous, pending = pending, None
                        self._finish_write(*previous)
                    self.note(current.case, "write")
                    pending = (current, self.writer.submit(self._write, inferred,
                                                           current.started))
                    del inferred
                current = upcoming
        finally:
            # Also when the loop stops early (a full disk): the write in flight still counts.
            if pending is not None:
                self._finish_write(*pending)

    def _claim(self) -> _Held | None:
        """Lock the next case that still needs running and start reading it."""
        while True:
            case = self.next_case()
            if case is None:
                return None
            lock = try_lock(self.layout, case)
            if lock is None:
                holder = lock_holder(self.layout, case)
                reason = f"{SKIP_IN_PROGRESS} (pid {holder})" if holder else SKIP_IN_PROGRESS
                self.report(CaseResult(case, "skipped", reason=reason))
                continue
            if self.overwrite:
                # Redone from scratch: until its new record is written, the case is not
                # complete, whichever of its old outputs are replaced meanwhile.
                self.layout.record(case).unlink(missing_ok=True)
            else:
                status = case_status(self.layout, case, self.model, self.outputs)
                if status != "todo":  # finished by another run since this one looked
                    lock.release()
                    self.report(CaseResult(case, "skipped",
                                           reason=SKIP_STALE if status == "stale" else ""))
                    continue
            self.note(case, "read")
            item = _Held(case, lock, time.perf_counter(),
                         self.reader.submit(load_case, case, self.model.inference))
            self.held.append(item)
            return item

    def _infer(self, current: _Held) -> tuple[InferredCase | None, _Held | None]:
        """Run the model on ``current``; returns its results (``None`` if it failed) and the
        case claimed meanwhile."""
        try:
            loaded = current.read.result()
        except Exception as error:
            self._fail(current, error)
            return None, self._claim()
        # Claimed only now, not earlier: a case waiting in our read-ahead is a case another
        # worker cannot take, so claim as late as still keeps the model busy.
        upcoming = self._claim()
        try:
            self.note(current.case, "model")
            inferred = infer_case(loaded, self.model, self.layout, self.outputs)
        except Exception as error:
            self._fail(current, error)
            return None, upcoming
        finally:
            del loaded
        if not self.keep_arrays:
            # The writer needs the labels and the geometry, not the input volume: drop it now
            # so a worker holds at most two volumes (in the model, read ahead), not three.
            inferred.loaded.voxels = np.empty((0, 0, 0), np.float32)
        return inferred, upcoming

    def _write(self, inferred: InferredCase, started: float) -> CaseResult:
        record = write_case(inferred, self.model, self.layout)
        return done_result(inferred, record, started, self.keep_arrays)

    def _finish_write(self, item: _Held, future: Future[CaseResult]) -> None:
        try:
            result = future.result()
        except Exception as error:
            self._fail(item, error)
            return
        self._settle(item, result)

    def _fail(self, item: _Held, error: Exception) -> None:
        """Report ``item`` failed; stop the loop if the disk is full (every case left would
        fail the same way)."""
        self._settle(item, CaseResult(item.case, "failed", reason=describe_failure(error)))
        if is_disk_full(error):
            raise DiskFullError(f"no space left for the outputs in {self.layout.folder}: "
                                "the run stopped; free space and rerun to resume")

    def _settle(self, item: _Held, result: CaseResult) -> None:
        item.lock.release()
        self.held.remove(item)
        self.report(result)


def run_cases(
    cases: Iterable[Case],
    model: Model,
    layout: OutputLayout,
    outputs: OutputOptions,
    *,
    overwrite: bool = False,
    progress: bool = False,
    keep_arrays: bool = False,
    on_result: Report | None = None,
) -> list[CaseOutcome]:
    """Run ``cases`` in order in this process with one model (see :class:`CaseLoop`).

    ``on_result`` sees each :class:`~itk_infer.pipeline.CaseResult` as it is settled (in this
    thread), with its arrays when ``keep_arrays``; they are not kept afterwards.

    Returns:
        One outcome per case: done, failed, or skipped (locked by another run, or finished
        by one since the caller looked).
    """
    cases = list(cases)
    outcomes: list[CaseOutcome] = []
    if not cases:
        return outcomes
    bar = Progress(len(cases), 0, progress)
    pending = iter(cases)

    def report(result: CaseResult) -> None:
        outcome = result.outcome()
        outcomes.append(outcome)
        bar.done(outcome)
        if on_result is not None:
            on_result(result)

    try:
        CaseLoop(lambda: next(pending, None), model, layout, outputs, report,
                 overwrite=overwrite, keep_arrays=keep_arrays,
                 phase=lambda case, phase: bar.phase(0, case.name, phase)).run()
    except DiskFullError as error:
        log.error("%s", error)
        reported = {o.case for o in outcomes}
        outcomes += [CaseOutcome(c.name, "skipped", reason=f"not run: {NOT_RUN_DISK_FULL}")
                     for c in cases if c.name not in reported]
    finally:
        bar.close()
    return outcomes
