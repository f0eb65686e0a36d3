"""What a run shows while it works: an overall bar and a status line per worker on a
terminal, one log line per finished case elsewhere; and how many cores it may use."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from itk_infer.records import CaseOutcome

log = logging.getLogger(__name__)


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


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset / cgroup CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
