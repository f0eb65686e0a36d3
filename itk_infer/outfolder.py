"""The output folder as a run finds it: created if missing, and cleared of the temporaries and
lock files that dead runs left (each temporary only under its case's lock, so a live run in
another process, container or host keeps its own). Imports no torch: the parent of worker
processes prepares the folder too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from itk_infer.atomic import final_name, remove_path
from itk_infer.cases import SEG_SUFFIX, Case, OutputLayout, case_name
from itk_infer.locks import remove_stale_locks, try_lock

log = logging.getLogger(__name__)


def prepare_output(folder: Path) -> OutputLayout:
    """Create the output folder and clear temporaries and lock files that dead runs left."""
    layout = OutputLayout(Path(folder))
    layout.folder.mkdir(parents=True, exist_ok=True)
    remove_temporaries(layout)
    remove_stale_locks(layout)
    return layout


def remove_temporaries(layout: OutputLayout) -> int:
    """Remove leftover temporaries: each only while holding the lock of the case it belongs
    to, so a run working on that case (in any process, container or host sharing the folder)
    keeps its own. Returns how many were removed."""
    removed = 0
    for folder in (layout.folder, layout.records_folder):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            final = final_name(entry)
            if final is None:
                continue
            lock = try_lock(layout, Case(lock_key(final, folder == layout.records_folder),
                                         entry))
            if lock is None:
                continue  # its case is being worked on
            try:
                remove_path(entry)
                removed += 1
            finally:
                lock.release()
    if removed:
        log.info("removed %d leftover temporary file(s) in %s", removed, layout.folder)
    return removed


def lock_key(final: str, in_records: bool) -> str:
    """The name of the lock that guards the output named ``final``: its case's name; the
    confidences table has its own."""
    if in_records and final.endswith(".json"):
        return final[: -len(".json")]
    if final.endswith(".zarr"):
        return final[: -len(".zarr")]
    if final.endswith(SEG_SUFFIX):  # a DICOM series case's segmentation
        return final[: -len(SEG_SUFFIX)]
    return case_name(final) or final
