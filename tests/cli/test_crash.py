"""Native crashes (SIGSEGV through ctypes, ``abort()``) inside reading, the model or writing of
one case, with the default ``--num-proc 1`` and no time limit: that case fails with the signal
and the step as its reason, the worker is replaced, every other case matches an uninterrupted
run byte for byte, nothing half-written is left, and the exit code is 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from itk_infer.cases import RECORDS_DIRNAME
from itk_infer.engine import engine_part
from itk_infer.workers import crashed_step
from tests.cli.test_faults import (
    assert_matches_reference,
    batch,  # noqa: F401  (the module fixture: cases, model, reference outputs)
    case_name,
    leftovers,
    names,
    report,
    run,
)

CASES = 4  # case0 .. case3 of the fault tests' batch, distinct sizes


def first_cases(inp: Path, folder: Path) -> tuple[Path, list[str]]:
    """``folder`` with links to the batch's first ``CASES`` inputs, and their file names."""
    folder.mkdir()
    chosen = names(inp)[:CASES]
    for name in chosen:
        (folder / name).hardlink_to(inp / name)
    return folder, chosen


@pytest.mark.parametrize(("step", "how", "reason"), [
    ("read", "segv", "worker exited with signal 11 (SIGSEGV) while reading it"),
    ("model", "abort", "worker exited with signal 6 (SIGABRT) in the model"),
    ("write", "segv", "worker exited with signal 11 (SIGSEGV) while writing it"),
])
def test_native_crash_fails_only_its_case_with_one_process(tmp_path, batch, step, how,  # noqa: F811
                                                           reason):
    inp, model, reference = batch
    folder, chosen = first_cases(inp, tmp_path / "in")
    # The run takes the largest input first: crash on a middle one, so that another case is
    # being read or written at the same moment in the worker's pipeline.
    victim = case_name(chosen[1])
    out = tmp_path / "out"
    result = run(folder, out, model, "--save-logits", "--report", tmp_path / "r.json",
                 crash=f"{step}:{victim}:{how}")
    assert result.returncode == 1, result.stderr
    outcomes = report(tmp_path / "r.json")
    assert outcomes.pop(victim) == ("failed", reason)
    assert outcomes == {case_name(n): ("done", "") for n in chosen if case_name(n) != victim}
    assert f"FAILED {victim}: {reason}" in result.stderr
    others = [n for n in chosen if case_name(n) != victim]
    assert assert_matches_reference(out, reference, others) == len(others)
    assert not (out / chosen[1]).exists() and leftovers(out) == []


def test_a_case_written_just_before_a_crash_counts_as_done(tmp_path, batch):  # noqa: F811
    """The worker reports a written case after the next case's model step. A crash in that
    step, once the first case's record is published, must leave the first case "done" (the
    report died with the worker), not "skipped" as if another run had made it."""
    inp, model, reference = batch
    folder, chosen = first_cases(inp, tmp_path / "in")
    first, victim = sorted(chosen, key=lambda n: -(folder / n).stat().st_size)[:2]
    out = tmp_path / "out"
    record = out / RECORDS_DIRNAME / f"{case_name(first)}.json"
    result = run(folder, out, model, "--save-logits", "--report", tmp_path / "r.json",
                 crash=f"model:{case_name(victim)}:abort", crash_after=record)
    assert result.returncode == 1, result.stderr
    outcomes = report(tmp_path / "r.json")
    assert outcomes.pop(case_name(victim)) == (
        "failed", "worker exited with signal 6 (SIGABRT) in the model")
    assert outcomes == {case_name(n): ("done", "") for n in chosen if n != victim}
    others = [n for n in chosen if n != victim]
    assert assert_matches_reference(out, reference, others) == len(others)
    assert leftovers(out) == []


def test_in_process_is_not_isolated(tmp_path, batch):  # noqa: F811
    """--in-process runs the cases in the command's own process: a native crash ends it (the
    reason the default is a worker)."""
    inp, model, _reference = batch
    folder = tmp_path / "in"
    folder.mkdir()
    for name in names(inp)[:2]:
        (folder / name).hardlink_to(inp / name)
    victim = case_name(names(inp)[1])
    result = run(folder, tmp_path / "out", model, "--in-process", crash=f"read:{victim}:segv")
    assert result.returncode == -11, result.stderr


def test_crashed_step_reads_the_current_threads_stack():
    dump = (
        "Fatal Python error: Segmentation fault\n\n"
        "Thread 0x00007f01 (most recent call first):\n"
        '  File "x/pipeline.py", line 250 in infer_case\n'
        '  File "x/caseloop.py", line 210 in _infer\n\n'
        "Current thread 0x00007f02 (most recent call first):\n"
        '  File "ctypes/__init__.py", line 519 in string_at\n'
        '  File "x/fault_driver.py", line 40 in _crashing_read_volume\n'
        '  File "x/pipeline.py", line 194 in load_case\n'
        '  File "x/thread.py", line 58 in run\n\n'
        "Thread 0x00007f03 (most recent call first):\n"
        '  File "x/pipeline.py", line 340 in write_case\n'
    )
    assert crashed_step(dump) == "read"
    assert crashed_step(dump.replace("in load_case", "in other")) is None
    assert crashed_step("") is None
    # Only a thread marked current counts: the writer's frames above are another thread's.
    assert crashed_step(dump.replace("Current thread", "Thread")) is None
    # A part of the engine's blending, on one of its helper threads, is the model step.
    part = dump.replace("in load_case", f"in {engine_part.__name__}")
    assert crashed_step(part) == "model"
