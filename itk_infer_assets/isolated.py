"""A run's cases in a worker process, for ``case_timeout``: a case stuck in one step (reading,
the model, writing) can only be stopped by killing the process it runs in, so with a time
limit the step hands its cases to the core's worker pool (:func:`itk_infer.workers.run_parallel`,
one worker on the step's leased device) instead of its own case loop. The killed case fails
its partition with "timed out after S s"; the worker is replaced and the others go on.

Each done case is then logged from its record on disk (the worker keeps no arrays for the
step, so there is no preview in this mode; the QC checks read the label map back).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from itk_infer.cases import Case, OutputLayout
from itk_infer.config import Settings
from itk_infer.outfolder import prepare_output
from itk_infer.pipeline import CaseResult
from itk_infer.records import read_record
from itk_infer.workers import run_parallel

# (key, result, layout, described model) of a done case -> its materialisation events
LogDone = Callable[[str, CaseResult, OutputLayout, "DescribedModel"], None]


class DescribedModel:
    """What the step's metadata needs of a model that ran in a worker: its description."""

    def __init__(self, described: dict[str, Any]) -> None:
        self.described = described

    def describe(self) -> dict[str, Any]:
        return self.described


def run_isolated(settings: Settings, device: Any, groups: dict[Path, list[tuple[str, Case]]],
                 failed: dict[str, str], log_done: LogDone) -> list[str]:
    """Run each output folder's cases in one worker process on ``device`` with the limit of
    ``settings.case_timeout``; returns the done keys, and adds the others to ``failed``."""
    done: list[str] = []
    for folder, items in groups.items():
        layout = prepare_output(folder)
        key_of = {case.name: (key, case) for key, case in items}
        # A materialisation always redoes its cases (as the in-process loop does).
        run = settings.replace(output_folder=folder, overwrite=True)
        result = run_parallel([case for _, case in items], run, layout, 1, device.type,
                              gpu_index=device.index if device.type == "cuda" else None)
        for outcome in sorted(result.outcomes, key=lambda o: o.case):
            key, case = key_of[outcome.case]
            record = read_record(layout.record(case)) if outcome.status == "done" else None
            if record is None:
                failed[key] = outcome.reason or f"{outcome.status}, without a record"
                continue
            log_done(key, CaseResult(case, "done", seconds=outcome.seconds, record=record),
                     layout, DescribedModel(result.described))
            done.append(key)
    return done
