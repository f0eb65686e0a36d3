"""A batch run: discover the cases, skip what is done, run the rest in this process or in
worker processes, and summarise. The command line's ``main`` calls :func:`run_batch`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from itk_infer import prestart
from itk_infer.backends import cpu_for_certain, visible_gpus
from itk_infer.cases import Case, OutputLayout, discover_cases
from itk_infer.config import Settings
from itk_infer.outfolder import prepare_output
from itk_infer.records import (
    SKIP_STALE,
    CaseOutcome,
    RunSummary,
    complete_record,
    record_status,
    write_confidences,
    write_json_atomic,
)
from itk_infer.workers import run_parallel

log = logging.getLogger(__name__)


def device_type(settings: Settings) -> str:
    """``"cpu"`` or ``"cuda"``: what the run's processes resolve ``--device`` to. Known
    without torch where the CPU is certain, so that a run whose cases go to a worker process
    never loads torch here (about 1.2 s of a core, shared with the worker's own start)."""
    if cpu_for_certain(settings.device):
        return "cpu"
    from itk_infer.backends import resolve_device

    return resolve_device(settings.device).type


def worker_count(settings: Settings, device_type: str) -> int:
    """``max(num_proc, GPUs)`` on CUDA (``--gpus 0``: every visible one); ``num_proc`` on the
    CPU, where ``--gpus`` means nothing."""
    if device_type == "cuda":
        visible = visible_gpus()
        if settings.gpus > visible:
            log.warning("--gpus %d but only %d CUDA device(s) visible: workers share them",
                        settings.gpus, visible)
        return max(settings.num_proc, settings.gpus or visible)
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
                      described: dict, settings: Settings) -> list[CaseOutcome]:
    """Outcomes of the cases found complete before the run: done, or stale."""
    outcomes = []
    for case in cases:
        record = complete_record(layout, case, settings.outputs)
        status = record_status(record, fingerprint, described)
        log.info("Skipping %s: %s", case.name, status)
        outcomes.append(CaseOutcome(case.name, "skipped",
                                    reason=SKIP_STALE if status == "stale" else ""))
    return outcomes


def _run(todo: list[Case], complete: list[Case], layout: OutputLayout, settings: Settings,
         device: str) -> list[CaseOutcome]:
    workers = worker_count(settings, device)
    # A case can only be stopped from outside its process (time limits), and a crash in a
    # native library (SimpleITK, onnxruntime) only survived there: cases run in a worker
    # unless asked otherwise.
    in_process = settings.cases_in_process and workers == 1
    if todo and not in_process:
        result = run_parallel(todo, settings, layout, workers, device,
                              adopt=prestart.take)
        return result.outcomes + _classify_skipped(layout, complete, result.fingerprint,
                                                   result.described, settings)
    # One process, or nothing to run (the model still tells done from stale).
    from itk_infer.backends import resolve_device
    from itk_infer.caseloop import run_cases
    from itk_infer.pipeline import load_model

    model = load_model(settings, resolve_device(settings.device))
    outcomes = _classify_skipped(layout, complete, model.fingerprint, model.describe(), settings)
    return outcomes + run_cases(todo, model, layout, settings.outputs,
                                overwrite=settings.overwrite, progress=settings.progress)


def run_batch(settings: Settings) -> RunSummary:
    """Run every case of ``settings.input_folder`` that is not done yet.

    The cases run in worker processes (one by default, ``--num-proc``/``--gpus`` more) fed
    from one queue, largest input first; a worker that crashes fails only the case it
    crashed on and is replaced. ``--in-process`` runs them in this process instead.

    Returns:
        The summary; its ``exit_code`` is 1 if any case failed.

    Raises:
        UsageError: bad settings, no inputs, colliding case names, or an unusable model;
            raised before any case runs.
        KeyboardInterrupt: Ctrl-C or SIGTERM; workers are stopped and temporaries removed.
    """
    t0 = time.perf_counter()
    settings.require_model()
    if settings.input_folder is None or settings.output_folder is None:
        raise ValueError("run_batch needs input_folder and output_folder")
    cases = discover_cases(settings.input_folder)
    layout = prepare_output(settings.output_folder)
    device = device_type(settings)
    todo = cases if settings.overwrite else [
        c for c in cases if complete_record(layout, c, settings.outputs) is None
    ]
    names = {c.name for c in todo}
    complete = [c for c in cases if c.name not in names]
    summary = RunSummary()
    _summarise(summary, _run(todo, complete, layout, settings, device))
    if settings.outputs.save_conf:
        write_confidences(layout.folder)
    summary.wall_seconds = time.perf_counter() - t0
    if settings.report_path is not None:
        write_json_atomic(Path(settings.report_path), summary.to_json())
    return summary
