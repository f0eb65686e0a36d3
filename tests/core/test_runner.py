"""The runner: per-case locks, the read-ahead/write-behind pipeline, resume checks under the
lock, worker counts, and worker processes giving the same bytes as one process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import zarr

from itk_infer import caseloop, outfolder, records, runner
from itk_infer.cases import Case, OutputLayout, discover_cases, largest_first
from itk_infer.config import Settings
from itk_infer.locks import lock_path, remove_stale_locks, try_lock
from itk_infer.records import read_record
from itk_infer.workers import describe_exit
from tests.conftest import write_volume
from tests.models import pointwise_logits

REPO = Path(__file__).resolve().parents[2]


def expected_labels(hu: np.ndarray, wl: float = 0.0, ww: float = 2.0) -> np.ndarray:
    """Numpy reference of the pointwise model after windowing."""
    x = (np.clip(hu.astype(np.float64), wl - ww / 2, wl + ww / 2) - (wl - ww / 2)) / ww
    return pointwise_logits(x.astype(np.float32), 3).argmax(axis=0)


def make_inputs(folder: Path, count: int, seed: int = 3) -> dict[str, np.ndarray]:
    """``count`` LPI volumes of different sizes (so "largest first" has an order)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    volumes = {}
    for i in range(count):
        hu = rng.uniform(-1.2, 1.2, size=(9 + 2 * i, 17, 20)).astype(np.float32)
        suffix = ".nii.gz" if i % 2 else ".mha"
        write_volume(folder / f"case{i}{suffix}", hu)
        volumes[f"case{i}"] = hu
    return volumes


def settings_for(inp: Path, out: Path, model: Path, **kw) -> Settings:
    kw.setdefault("progress", False)
    return Settings(input_folder=inp, output_folder=out, backend="onnx", onnx_path=model,
                    device="cpu", **kw)


def by_case(summary) -> dict[str, tuple[str, str]]:
    return {o.case: (o.status, o.reason) for o in summary.outcomes}


# --------------------------------------------------------------------------- locks


def test_lock_is_exclusive_and_release_removes_the_file(tmp_path):
    layout = OutputLayout(tmp_path)
    case = Case("ct_01", tmp_path / "ct_01.mha")
    first = try_lock(layout, case)
    assert first is not None and lock_path(layout, case).exists()
    # flock conflicts between open file descriptions, even within one process.
    assert try_lock(layout, case) is None
    assert try_lock(layout, Case("ct_02", tmp_path / "ct_02.mha")) is not None
    first.release()
    assert not lock_path(layout, case).exists()
    again = try_lock(layout, case)
    assert again is not None
    again.release()
    again.release()  # twice is harmless


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    layout = OutputLayout(tmp_path)
    case = Case("ct_01", tmp_path / "ct_01.mha")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from itk_infer.cases import Case, OutputLayout
            from itk_infer.locks import try_lock
            lock = try_lock(OutputLayout(Path({str(tmp_path)!r})),
                            Case("ct_01", Path("ct_01.mha")))
            print("locked" if lock else "busy", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert try_lock(layout, case) is None
        assert str(holder.pid) in lock_path(layout, case).read_text()
        # A live holder's file is not "stale".
        assert remove_stale_locks(layout) == 0 and lock_path(layout, case).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the lock with the process; only the file is left.
    assert lock_path(layout, case).exists()
    assert remove_stale_locks(layout) == 1 and not lock_path(layout, case).exists()
    taken = try_lock(layout, case)
    assert taken is not None
    taken.release()


# --------------------------------------------------------------------------- in-process


def test_in_process_batch_matches_reference_and_a_bad_case_does_not_stop_it(
        tmp_path, pointwise_model):
    volumes = make_inputs(tmp_path / "in", 4)
    (tmp_path / "in" / "broken.mha").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    summary = runner.run_batch(settings_for(tmp_path / "in", out, pointwise_model))
    outcomes = by_case(summary)
    assert outcomes["broken"][0] == "failed" and outcomes["broken"][1]
    assert {k: v[0] for k, v in outcomes.items() if k != "broken"} == dict.fromkeys(volumes,
                                                                                    "done")
    assert summary.exit_code == 1
    for name, hu in volumes.items():
        case = next(c for c in discover_cases(tmp_path / "in") if c.name == name)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case.filename)))
        np.testing.assert_array_equal(seg, expected_labels(hu))
    assert not (out / "broken.mha").exists()
    assert read_record(OutputLayout(out).record(Case("broken", Path("broken.mha")))) is None
    assert not list((out / ".itk_infer" / "locks").glob("*.lock"))


def test_case_locked_by_another_run_is_skipped_in_progress_then_done(tmp_path, pointwise_model):
    make_inputs(tmp_path / "in", 3)
    out = tmp_path / "out"
    layout = outfolder.prepare_output(out)
    busy = next(c for c in discover_cases(tmp_path / "in") if c.name == "case1")
    other_run = try_lock(layout, busy)
    assert other_run is not None
    summary = runner.run_batch(settings_for(tmp_path / "in", out, pointwise_model))
    status, reason = by_case(summary)["case1"]
    assert status == "skipped" and reason.startswith(records.SKIP_IN_PROGRESS)
    assert str(os.getpid()) in reason  # names the holder
    assert summary.exit_code == 0 and summary.count("done") == 2
    assert not (out / busy.filename).exists()
    other_run.release()

    summary = runner.run_batch(settings_for(tmp_path / "in", out, pointwise_model))
    assert by_case(summary) == {"case0": ("skipped", ""), "case1": ("done", ""),
                                "case2": ("skipped", "")}


def test_case_finished_by_another_run_meanwhile_is_not_redone(tmp_path, pointwise_model):
    make_inputs(tmp_path / "in", 2)
    out = tmp_path / "out"
    settings = settings_for(tmp_path / "in", out, pointwise_model)
    runner.run_batch(settings)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    # As if this run had listed the cases before another run finished them.
    from itk_infer.pipeline import load_model

    model = load_model(settings, torch.device("cpu"))
    outcomes = caseloop.run_cases(discover_cases(tmp_path / "in"), model, OutputLayout(out),
                                  settings.outputs)
    assert [(o.status, o.reason) for o in outcomes] == [("skipped", "")] * 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before


def test_pipeline_reads_ahead_one_case_and_keeps_one_write_in_flight(
        tmp_path, pointwise_model, monkeypatch):
    make_inputs(tmp_path / "in", 5)
    cases = discover_cases(tmp_path / "in")
    settings = settings_for(tmp_path / "in", tmp_path / "out", pointwise_model)
    from itk_infer.pipeline import load_model

    model = load_model(settings, torch.device("cpu"))
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_write = caseloop.write_case

    def slow_write(inferred, *args):
        time.sleep(0.3)  # the model must not wait for this
        record = real_write(inferred, *args)
        with lock:
            events.append(("written", inferred.loaded.case.name))
        return record

    monkeypatch.setattr(caseloop, "write_case", slow_write)
    pending = iter(cases)
    outcomes = []

    def phase(case, name):
        with lock:
            events.append((name, case.name))

    caseloop.CaseLoop(lambda: next(pending, None), model,
                      outfolder.prepare_output(tmp_path / "out"), settings.outputs,
                      lambda result: outcomes.append(result.outcome()), phase=phase).run()
    assert [o.status for o in outcomes] == ["done"] * 5
    names = [c.name for c in cases]
    position = {event: i for i, event in enumerate(events)}
    for i in range(len(names) - 1):
        # Read-ahead: case i+1 is being read before case i enters the model…
        assert position[("read", names[i + 1])] < position[("model", names[i])]
        # …and write-behind: case i+1 is in the model while case i is still being written.
        assert position[("model", names[i + 1])] < position[("written", names[i])]
    # Bounded: never more than two cases read but not yet in the model, nor two writes
    # submitted and unfinished.
    reading, writing = set(), set()
    for name, case in events:
        if name == "read":
            reading.add(case)
        elif name == "model":
            reading.discard(case)
        elif name == "write":
            writing.add(case)
        elif name == "written":
            writing.discard(case)
        assert len(reading) <= 2 and len(writing) <= 1, events


# --------------------------------------------------------------------------- processes


def test_worker_count_and_exit_descriptions(tmp_path, caplog, monkeypatch):
    # cli.main (run by other tests) stops "itk_infer" records from reaching caplog's handler.
    monkeypatch.setattr(logging.getLogger("itk_infer"), "propagate", True)
    settings = settings_for(tmp_path, tmp_path, tmp_path / "m.onnx", num_proc=3, gpus=2)
    with caplog.at_level(logging.WARNING, logger="itk_infer"):
        assert runner.worker_count(settings, "cpu") == 3
    assert "--gpus 2 ignored" in caplog.text
    assert describe_exit(-9) == "worker exited with signal 9 (SIGKILL)"
    assert describe_exit(-11) == "worker exited with signal 11 (SIGSEGV)"
    assert describe_exit(3) == "worker exited with code 3"


def test_largest_file_first(tmp_path):
    for name, size in (("a.mha", 10), ("b.mha", 300), ("c.mha", 30), ("d.mha", 300)):
        (tmp_path / name).write_bytes(b"x" * size)
    cases = discover_cases(tmp_path)
    assert [c.name for c in sorted(cases, key=largest_first)] == ["b", "d", "c", "a"]


def test_two_workers_write_the_same_bytes_as_one_process(tmp_path, pointwise_model):
    volumes = make_inputs(tmp_path / "in", 5)
    one, two = tmp_path / "one", tmp_path / "two"
    opts = {"save_logits": True, "save_conf": True}
    s1 = runner.run_batch(settings_for(tmp_path / "in", one, pointwise_model, **opts))
    s2 = runner.run_batch(settings_for(tmp_path / "in", two, pointwise_model, **opts,
                                       num_proc=2))
    assert s1.count("done") == s2.count("done") == len(volumes)
    assert [(o.case, o.confidence) for o in s1.outcomes] == \
        [(o.case, o.confidence) for o in s2.outcomes]
    for case in discover_cases(tmp_path / "in"):
        assert (one / case.filename).read_bytes() == (two / case.filename).read_bytes()
        a = zarr.open_array(str(one / f"{case.name}.zarr"), mode="r")[:]
        b = zarr.open_array(str(two / f"{case.name}.zarr"), mode="r")[:]
        np.testing.assert_array_equal(a, b)
        record = read_record(OutputLayout(two).record(case))
        assert record is not None and record.settings["device"] == "cpu"
    leftovers = [p for p in two.rglob("*") if p.name.startswith(".itk_infer-tmp")
                 or p.suffix == ".lock"]
    assert leftovers == []
    # Resume with workers: nothing to do, and "done" is told from "stale" by the model.
    again = runner.run_batch(settings_for(tmp_path / "in", two, pointwise_model, **opts,
                                          num_proc=2))
    assert {o.status for o in again.outcomes} == {"skipped"} and again.stale == []
