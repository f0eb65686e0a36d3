"""Many cases: discover, skip what is done, lock each case, run the rest with reading and
writing overlapped with the model (in this process, or in worker processes), and summarise."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itk_infer.atomic import remove_stale_temporaries
from itk_infer.backends import load_backend, resolve_device
from itk_infer.backends.base import Backend
from itk_infer.cases import Case, OutputLayout, discover_cases
from itk_infer.config import InferenceSettings, RunSettings
from itk_infer.errors import CaseError
from itk_infer.locks import CaseLock, lock_holder, remove_stale_locks, try_lock
from itk_infer.pipeline import (
    LoadedCase,
    case_settings,
    case_status,
    complete_record,
    infer_case,
    load_case,
    resolve_inference_settings,
    write_case,
)
from itk_infer.records import (
    CaseOutcome,
    CaseRecord,
    RunSummary,
    write_confidences,
    write_json_atomic,
)

log = logging.getLogger(__name__)

# Reasons given with "skipped" outcomes; a complete, up-to-date case is skipped with no reason.
SKIP_IN_PROGRESS = "in progress in another run"
SKIP_STALE = "complete, but made by another model or settings (--overwrite redoes it)"

Report = Callable[[CaseOutcome], None]
Phase = Callable[[Case, str], None]


def _describe_failure(error: BaseException) -> str:
    if isinstance(error, CaseError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def prepare_output(folder: Path) -> OutputLayout:
    """Create the output folder and clear temporaries and lock files that dead runs left."""
    layout = OutputLayout(Path(folder))
    layout.folder.mkdir(parents=True, exist_ok=True)
    remove_temporaries(layout)
    remove_stale_locks(layout)
    return layout


def remove_temporaries(layout: OutputLayout) -> int:
    """Remove the temporaries of processes that are gone (live runs keep theirs)."""
    return remove_stale_temporaries(layout.folder) + remove_stale_temporaries(
        layout.records_folder
    )


def is_complete(layout: OutputLayout, case: Case, settings: RunSettings) -> bool:
    """Every output the run asks for exists intact under a record, whatever model made it.

    Needs no model: a complete case is skipped either way (done or stale), the model only
    tells which of the two it is.
    """
    return complete_record(layout, case, settings.outputs) is not None


class Progress:
    """An overall bar and one status line per worker on a terminal; otherwise one log line
    per finished case (no bar spam in log files)."""

    def __init__(self, total: int, workers: int, enabled: bool) -> None:
        self.total, self.finished, self.enabled = total, 0, enabled
        self._overall: Any = None
        self._lines: dict[int, Any] = {}
        self._redirect: Any = None
        if not enabled or total == 0:
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Log lines go through tqdm.write so they do not tear the bars.
        self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger("itk_infer")])
        self._redirect.__enter__()
        self._overall = tqdm(total=total, unit="case", desc="cases", file=sys.stderr,
                             dynamic_ncols=True, position=0)
        for slot in range(workers):
            # A status line, not a bar: a worker's current case and what it does with it.
            self._lines[slot] = tqdm(total=0, desc=f"worker {slot}: starting", position=slot + 1,
                                     bar_format="{desc}", file=sys.stderr, leave=False,
                                     dynamic_ncols=True)

    def phase(self, slot: int, case: str, phase: str) -> None:
        """The case a worker holds in the model now (or reads/writes, when idle otherwise)."""
        line = self._lines.get(slot)
        if line is not None:
            line.set_description_str(f"worker {slot}: {case}: {phase}")
        elif self._overall is not None and phase == "model":
            self._overall.set_postfix_str(case)

    def done(self, outcome: CaseOutcome, slot: int | None = None) -> None:
        """Count a finished case; failures are always logged, as errors."""
        self.finished += 1
        if self._overall is not None:
            self._overall.update(1)
            if outcome.status == "failed":
                log.error("%s failed: %s", outcome.case, outcome.reason)
            elif outcome.reason:
                log.info("%s skipped: %s", outcome.case, outcome.reason)
            return
        where = f" (worker {slot})" if slot is not None else ""
        count = f"[{self.finished}/{self.total}]"
        if outcome.status == "failed":
            log.error("%s %s failed: %s%s", count, outcome.case, outcome.reason, where)
            return
        detail = (
            f"done in {outcome.seconds:.1f} s" if outcome.status == "done"
            else f"skipped: {outcome.reason or 'done'}"
        )
        log.info("%s %s %s%s", count, outcome.case, detail, where)

    def idle(self, slot: int, text: str) -> None:
        line = self._lines.get(slot)
        if line is not None:
            line.set_description_str(f"worker {slot}: {text}")

    def close(self) -> None:
        for line in self._lines.values():
            line.close()
        if self._overall is not None:
            self._overall.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
        self._lines, self._overall, self._redirect = {}, None, None


@dataclass
class _Held:
    """A case this process has locked and started to read."""

    case: Case
    lock: CaseLock
    started: float
    read: Future[LoadedCase]


def process_cases(
    next_case: Callable[[], Case | None],
    backend: Backend,
    inference: InferenceSettings,
    layout: OutputLayout,
    settings: RunSettings,
    report: Report,
    phase: Phase | None = None,
) -> None:
    """Pull cases from ``next_case`` until it returns ``None`` and run them with one model.

    Each case is locked first (one held by another run is reported skipped, in progress) and
    checked again under the lock (another run may have finished it). The next case is read
    while the current one is in the model, and outputs are written while the next one is:
    one of each in flight, so memory stays bounded. A failing case is reported failed and
    the loop goes on. ``phase(case, "read" | "model" | "write")`` follows each case.
    """
    described = case_settings(backend, inference)
    note = phase or (lambda _case, _phase: None)
    held: list[_Held] = []
    reader = ThreadPoolExecutor(1, "itk-read")
    writer = ThreadPoolExecutor(1, "itk-write")

    def claim() -> _Held | None:
        while True:
            case = next_case()
            if case is None:
                return None
            lock = try_lock(layout, case)
            if lock is None:
                holder = lock_holder(layout, case)
                reason = f"{SKIP_IN_PROGRESS} (pid {holder})" if holder else SKIP_IN_PROGRESS
                report(CaseOutcome(case.name, "skipped", reason=reason))
                continue
            if not settings.overwrite:
                status = case_status(layout, case, backend.fingerprint, described,
                                     settings.outputs)
                if status != "todo":  # finished by another run since this one looked
                    lock.release()
                    report(CaseOutcome(case.name, "skipped",
                                       reason=SKIP_STALE if status == "stale" else ""))
                    continue
            note(case, "read")
            item = _Held(case, lock, time.perf_counter(),
                         reader.submit(load_case, case, inference.window))
            held.append(item)
            return item

    def settle(item: _Held, error: BaseException | None = None,
               record: CaseRecord | None = None) -> None:
        item.lock.release()
        held.remove(item)
        if error is not None:
            report(CaseOutcome(item.case.name, "failed", reason=_describe_failure(error)))
        else:
            assert record is not None
            report(CaseOutcome(item.case.name, "done",
                               seconds=time.perf_counter() - item.started,
                               confidence=record.confidence))

    def finish_write(item: _Held, future: Future[CaseRecord]) -> None:
        try:
            record = future.result()
        except Exception as error:
            settle(item, error)
        else:
            settle(item, record=record)

    try:
        pending: tuple[_Held, Future[CaseRecord]] | None = None
        current = claim()
        while current is not None:
            try:
                loaded = current.read.result()
            except Exception as error:
                settle(current, error)
                current = claim()
                continue
            # Claimed only now, not earlier: a case waiting in our read-ahead is a case another
            # worker cannot take, so claim as late as still keeps the model busy.
            upcoming = claim()
            try:
                note(current.case, "model")
                inferred = infer_case(loaded, backend, inference, layout, settings.outputs)
            except Exception as error:
                settle(current, error)
                current = upcoming
                continue
            finally:
                del loaded
            # The writer needs the labels and the geometry, not the input volume: drop it now
            # so a worker holds at most two volumes (in the model, read ahead), not three.
            inferred.loaded.voxels = np.empty((0, 0, 0), np.float32)
            if pending is not None:
                finish_write(*pending)
            note(current.case, "write")
            pending = (current, writer.submit(write_case, inferred, backend, inference, layout))
            del inferred
            current = upcoming
        if pending is not None:
            finish_write(*pending)
    finally:
        # On an interrupt: drop queued reads, let a running write finish (it publishes a whole
        # case or nothing), then free the locks.
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
        for item in held:
            item.lock.release()


def run_cases(
    cases: list[Case],
    backend: Backend,
    inference: InferenceSettings,
    layout: OutputLayout,
    settings: RunSettings,
) -> list[CaseOutcome]:
    """Run ``cases`` in order in this process with one model (see :func:`process_cases`).

    Returns:
        One outcome per case: done, failed, or skipped (locked by another run, or finished
        by one since the caller looked).
    """
    outcomes: list[CaseOutcome] = []
    if not cases:
        return outcomes
    progress = Progress(len(cases), 0, settings.progress)
    pending = iter(cases)

    def report(outcome: CaseOutcome) -> None:
        outcomes.append(outcome)
        progress.done(outcome)

    try:
        process_cases(lambda: next(pending, None), backend, inference, layout, settings, report,
                      lambda case, phase: progress.phase(0, case.name, phase))
    finally:
        progress.close()
    return outcomes


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset / cgroup CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def worker_count(settings: RunSettings, device: torch.device) -> int:
    """``max(num_proc, gpus)`` on CUDA; ``num_proc`` on the CPU, where ``--gpus`` means nothing."""
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if settings.gpus > visible:
            log.warning("--gpus %d but only %d CUDA device(s) visible: workers share them",
                        settings.gpus, visible)
        return max(settings.num_proc, settings.gpus)
    if settings.gpus > 1:
        log.warning("--gpus %d ignored: no CUDA device is used; %d worker(s) on the CPU",
                    settings.gpus, settings.num_proc)
    return settings.num_proc


def _summarise(summary: RunSummary, outcomes: Iterable[CaseOutcome]) -> None:
    summary.outcomes.extend(outcomes)
    summary.outcomes.sort(key=lambda o: o.case)
    summary.stale = [o.case for o in summary.outcomes if o.reason == SKIP_STALE]
    if summary.stale:
        log.warning(
            "%d outputs were made with other settings; --overwrite to redo: %s",
            len(summary.stale), ", ".join(summary.stale),
        )


def _classify_skipped(layout: OutputLayout, cases: list[Case], fingerprint: str,
                      described: dict, settings: RunSettings) -> list[CaseOutcome]:
    outcomes = []
    for case in cases:
        status = case_status(layout, case, fingerprint, described, settings.outputs)
        log.info("Skipping %s: %s", case.name, status)
        outcomes.append(CaseOutcome(case.name, "skipped",
                                    reason=SKIP_STALE if status == "stale" else ""))
    return outcomes


def run_batch(settings: RunSettings) -> RunSummary:
    """Run every case of ``settings.input_folder`` that is not done yet.

    With one worker the cases run in this process; with more (``--num-proc``/``--gpus``)
    they run in worker processes fed from one queue, largest input first.

    Returns:
        The summary; its ``exit_code`` is 1 if any case failed.

    Raises:
        UsageError: bad settings, no inputs, colliding case names, or an unusable model;
            raised before any case runs.
        KeyboardInterrupt: Ctrl-C or SIGTERM; workers are stopped and temporaries removed.
    """
    t0 = time.perf_counter()
    cases = discover_cases(settings.input_folder)
    layout = prepare_output(settings.output_folder)
    device = resolve_device(settings.device)
    workers = worker_count(settings, device)
    summary = RunSummary()

    todo = cases if settings.overwrite else [
        c for c in cases if not is_complete(layout, c, settings)
    ]
    names = {c.name for c in todo}
    complete = [c for c in cases if c.name not in names]
    if workers > 1 and todo:
        from itk_infer.workers import run_parallel

        result = run_parallel(todo, settings, layout, workers, device)
        outcomes = result.outcomes + _classify_skipped(
            layout, complete, result.fingerprint, result.described, settings
        )
    else:
        # One process, or nothing to run (the model still tells done from stale).
        backend = load_backend(settings.model, device, fp16=settings.fp16)
        inference = resolve_inference_settings(settings.overrides, backend, settings.fp16)
        described = case_settings(backend, inference)
        outcomes = _classify_skipped(layout, complete, backend.fingerprint, described, settings)
        outcomes += run_cases(todo, backend, inference, layout, settings)
    _summarise(summary, outcomes)
    if settings.outputs.save_conf:
        write_confidences(layout.folder)
    summary.wall_seconds = time.perf_counter() - t0
    if settings.report_path is not None:
        write_json_atomic(Path(settings.report_path), summary.to_json())
    return summary
