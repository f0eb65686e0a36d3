"""Many cases: discover, skip what is done, run the rest with reading and writing overlapped
with the model, and summarise."""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from itk_infer.atomic import remove_stale_temporaries
from itk_infer.backends import load_backend, resolve_device
from itk_infer.backends.base import Backend
from itk_infer.cases import Case, OutputLayout, discover_cases
from itk_infer.config import InferenceSettings, RunSettings
from itk_infer.errors import CaseError
from itk_infer.pipeline import (
    LoadedCase,
    case_settings,
    case_status,
    infer_case,
    load_case,
    resolve_inference_settings,
    write_case,
)
from itk_infer.records import CaseOutcome, RunSummary, write_confidences, write_json_atomic

log = logging.getLogger(__name__)


def _describe_failure(error: BaseException) -> str:
    if isinstance(error, CaseError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def prepare_output(folder: Path) -> OutputLayout:
    """Create the output folder and clear temporaries that dead runs left behind."""
    layout = OutputLayout(Path(folder))
    layout.folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(layout.folder)
    remove_stale_temporaries(layout.records_folder)
    return layout


def run_cases(
    cases: list[Case],
    backend: Backend,
    inference: InferenceSettings,
    layout: OutputLayout,
    settings: RunSettings,
) -> list[CaseOutcome]:
    """Run ``cases`` in order with one model: the next case is read while the current one is
    in the model, and outputs are written while the next one is (one of each in flight, so
    memory stays bounded)."""
    from tqdm import tqdm

    outcomes: list[CaseOutcome] = []
    if not cases:
        return outcomes
    bar = tqdm(total=len(cases), unit="case", file=sys.stderr, disable=not settings.progress,
               dynamic_ncols=True)
    started: dict[str, float] = {}

    def finish_write(case: Case, future: Future) -> None:
        try:
            record = future.result()
            outcomes.append(CaseOutcome(case.name, "done", seconds=time.perf_counter()
                                        - started[case.name], confidence=record.confidence))
        except Exception as error:
            fail(case, error)

    def fail(case: Case, error: BaseException) -> None:
        reason = _describe_failure(error)
        log.error("%s failed: %s", case.filename, reason)
        outcomes.append(CaseOutcome(case.name, "failed", reason=reason))

    with ThreadPoolExecutor(1, "itk-read") as reader, ThreadPoolExecutor(1, "itk-write") as writer:
        def submit_read(case: Case) -> Future:
            started[case.name] = time.perf_counter()
            return reader.submit(load_case, case, inference.window)

        pending_write: tuple[Case, Future] | None = None
        next_read = submit_read(cases[0])
        try:
            for index, case in enumerate(cases):
                bar.set_postfix_str(case.name, refresh=False)
                current = next_read
                if index + 1 < len(cases):
                    next_read = submit_read(cases[index + 1])
                try:
                    loaded: LoadedCase = current.result()
                    inferred = infer_case(loaded, backend, inference, layout, settings.outputs)
                    del loaded
                except Exception as error:
                    fail(case, error)
                    bar.update(1)
                    continue
                if pending_write is not None:
                    finish_write(*pending_write)
                    bar.update(1)
                pending_write = (case, writer.submit(write_case, inferred, backend, inference,
                                                     layout))
                del inferred
            if pending_write is not None:
                finish_write(*pending_write)
                bar.update(1)
        finally:
            bar.close()
    return outcomes


def run_batch(settings: RunSettings) -> RunSummary:
    """Run every case of ``settings.input_folder`` that is not done yet.

    Returns:
        The summary; its ``exit_code`` is 1 if any case failed.

    Raises:
        UsageError: bad settings, no inputs, colliding case names, or an unusable model;
            raised before any case runs.
    """
    t0 = time.perf_counter()
    cases = discover_cases(settings.input_folder)
    layout = prepare_output(settings.output_folder)
    device = resolve_device(settings.device)
    if settings.gpus > 1 and device.type != "cuda":
        log.warning("--gpus %d ignored: no CUDA device is visible", settings.gpus)
    backend = load_backend(settings.model, device, fp16=settings.fp16)
    inference = resolve_inference_settings(settings.overrides, backend, settings.fp16)
    described = case_settings(backend, inference)

    summary = RunSummary()
    todo: list[Case] = []
    for case in cases:
        status = "todo" if settings.overwrite else case_status(
            layout, case, backend.fingerprint, described, settings.outputs
        )
        if status == "todo":
            todo.append(case)
            continue
        if status == "stale":
            summary.stale.append(case.name)
        log.info("Skipping %s: done", case.name)
        summary.outcomes.append(CaseOutcome(case.name, "skipped"))
    if summary.stale:
        log.warning(
            "%d outputs were made with other settings; --overwrite to redo: %s",
            len(summary.stale), ", ".join(summary.stale),
        )
    summary.outcomes.extend(run_cases(todo, backend, inference, layout, settings))
    summary.outcomes.sort(key=lambda o: o.case)
    if settings.outputs.save_conf:
        write_confidences(layout.folder)
    summary.wall_seconds = time.perf_counter() - t0
    if settings.report_path is not None:
        write_json_atomic(Path(settings.report_path), summary.to_json())
    return summary
