"""Faults of real runs (subprocesses): a worker killed on one case, a broken case, SIGTERM,
two runs on one output folder, and SIGKILL of a whole run at random moments followed by
resumes. Outputs are compared byte for byte with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from itk_infer.atomic import TMP_PREFIX
from tests.conftest import write_volume
from tests.models import default_metadata, write_pointwise_model

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "cli" / "fault_driver.py"


def command(inp: Path, out: Path, model: Path, *extra: object, device: str = "cpu") -> list[str]:
    # fault_driver.py is itk_infer's command line plus optional test faults (see its docstring).
    return [sys.executable, str(DRIVER), "-i", str(inp), "-o", str(out), "--onnx", str(model),
            "--device", device, "--no-progress", *map(str, extra)]


def env(**faults: object) -> dict[str, str]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("ITK_INFER_TEST_")}
    variables.update({f"ITK_INFER_TEST_{k.upper()}": str(v) for k, v in faults.items()})
    return variables


def run(inp, out, model, *extra, device="cpu", **faults) -> subprocess.CompletedProcess:
    return subprocess.run(command(inp, out, model, *extra, device=device), env=env(**faults),
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def report(path: Path) -> dict[str, tuple[str, str]]:
    return {c["case"]: (c["status"], c["reason"]) for c in json.loads(path.read_text())["cases"]}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Eight cases of different sizes, a model, and the outputs of an uninterrupted
    single-process run (the reference)."""
    root = tmp_path_factory.mktemp("batch")
    inp = root / "in"
    inp.mkdir()
    rng = np.random.default_rng(11)
    for i in range(8):
        hu = rng.uniform(-1.2, 1.2, size=(24 + 4 * i, 48, 64)).astype(np.float32)
        write_volume(inp / (f"case{i}.nii.gz" if i % 2 else f"case{i}.mha"), hu)
    model = write_pointwise_model(
        root / "model.onnx", 3,
        metadata=default_metadata(patch=(16, 32, 32), stride=(8, 16, 16), batch=4),
    )
    reference = root / "reference"
    done = run(inp, reference, model, "--save-logits")
    assert done.returncode == 0, done.stderr
    return inp, model, reference


def names(inp: Path) -> list[str]:
    return sorted(p.name for p in inp.iterdir())


def case_name(filename: str) -> str:
    return filename.removesuffix(".nii.gz").removesuffix(".mha")


def assert_matches_reference(out: Path, reference: Path, files: list[str],
                             complete_only: bool = False) -> int:
    """Every output present in ``out`` equals the reference (none truncated or partial);
    unless ``complete_only``, every output must be present. Returns how many cases have a
    record."""
    recorded = 0
    for filename in files:
        name = case_name(filename)
        seg, logits = out / filename, out / f"{name}.zarr"
        has_record = (out / ".itk_infer" / f"{name}.json").exists()
        recorded += has_record
        if not complete_only or has_record:
            assert seg.exists() and logits.exists(), filename
        if seg.exists():  # published atomically: whole, or not there at all
            assert seg.read_bytes() == (reference / filename).read_bytes(), filename
        if logits.exists():
            np.testing.assert_array_equal(
                zarr.open_array(str(logits), mode="r")[:],
                zarr.open_array(str(reference / f"{name}.zarr"), mode="r")[:],
            )
    return recorded


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.startswith(TMP_PREFIX) or p.suffix == ".lock")


def worker_pids(pid: int) -> list[int]:
    """The spawned worker processes of ``pid`` (not multiprocessing's resource tracker)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                found.append(int(child))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_case_timeout_fails_the_hung_case_and_the_batch_goes_on(tmp_path, batch):
    """--case-timeout with one process: the case runs in a worker, which is killed when it
    hangs; the case fails with the limit as its reason, the others match the reference."""
    inp, model, reference = batch
    folder = tmp_path / "in"
    folder.mkdir()
    chosen = names(inp)[:3]
    for name in chosen:
        os.link(inp / name, folder / name)
    hung = case_name(chosen[1])
    out = tmp_path / "out"
    started = time.monotonic()
    result = run(folder, out, model, "--save-logits", "--case-timeout", "4",
                 "--report", tmp_path / "r.json", hang_case=hung)
    assert time.monotonic() - started < 90
    assert result.returncode == 1, result.stderr
    outcomes = report(tmp_path / "r.json")
    assert outcomes.pop(hung) == ("failed", "timed out after 4 s")
    # A case whose write finished just before the kill, with its outcome not yet sent, is
    # found complete by the replacement worker: skipped, with its outputs intact.
    assert set(outcomes.values()) <= {("done", ""), ("skipped", "")}
    others = [n for n in chosen if case_name(n) != hung]
    assert assert_matches_reference(out, reference, others) == len(others)
    assert not (out / chosen[1]).exists() and leftovers(out) == []


def test_worker_killed_on_one_case_loses_only_that_case(tmp_path, batch):
    inp, model, reference = batch
    folder = tmp_path / "in"
    folder.mkdir()
    for name in names(inp):
        os.link(inp / name, folder / name)
    (folder / "broken.mha").write_bytes(b"\x00 truncated header")
    out = tmp_path / "out"
    result = run(folder, out, model, "--save-logits", "--num-proc", "2",
                 "--report", tmp_path / "r.json", kill_case="case5", show_threads=1)
    assert result.returncode == 1, result.stderr
    # Two workers split the cores: each runs its model with its share of them, and ONNX
    # Runtime's threads do not spin while the worker blends and writes.
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    threads = {line for line in result.stderr.splitlines() if line.startswith("threads ")}
    assert threads == {f"threads torch={share} onnxruntime={share} spinning=0"}
    outcomes = report(tmp_path / "r.json")
    assert outcomes.pop("case5") == ("failed", "worker exited with signal 9 (SIGKILL)")
    status, reason = outcomes.pop("broken")
    assert status == "failed" and reason and "signal" not in reason  # an ordinary failure
    assert outcomes == {case_name(n): ("done", "") for n in names(inp) if n != "case5.nii.gz"}
    assert "FAILED case5: worker exited with signal 9" in result.stderr
    assert "starting a replacement" in result.stderr
    others = [n for n in names(inp) if n != "case5.nii.gz"]
    assert assert_matches_reference(out, reference, others) == len(others)
    assert not (out / "case5.nii.gz").exists() and not (out / "case5.zarr").exists()
    assert leftovers(out) == []

    again = run(folder, out, model, "--save-logits", "--report", tmp_path / "r2.json")
    assert again.returncode == 1  # broken.mha still fails
    outcomes = report(tmp_path / "r2.json")
    assert outcomes["case5"] == ("done", "") and outcomes["broken"][0] == "failed"
    assert assert_matches_reference(out, reference, names(inp)) == len(names(inp))


@pytest.mark.parametrize("num_proc", [1, 2])
def test_sigterm_stops_cleans_up_and_rerunning_resumes(tmp_path, batch, num_proc):
    inp, model, reference = batch
    out = tmp_path / "out"
    proc = subprocess.Popen(command(inp, out, model, "--save-logits", "--num-proc", num_proc),
                            env=env(slow_s=0.5), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not list((out / ".itk_infer").glob("*.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        workers = worker_pids(proc.pid)
        assert len(workers) == num_proc  # one process: one worker too (native crash isolation)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Rerun the same command to resume" in stderr
    assert [pid for pid in workers if alive(pid)] == []
    assert leftovers(out) == []
    done_before = assert_matches_reference(out, reference, names(inp), complete_only=True)
    assert 1 <= done_before < len(names(inp))

    result = run(inp, out, model, "--save-logits", "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    skipped = [c for c, (status, _) in report(tmp_path / "r.json").items() if status == "skipped"]
    assert len(skipped) == done_before
    assert assert_matches_reference(out, reference, names(inp)) == len(names(inp))
    assert leftovers(out) == []


def test_two_runs_on_one_output_never_share_a_case(tmp_path, batch):
    inp, model, reference = batch
    out = tmp_path / "out"
    # The single-process run starts first (it starts faster) and goes through the cases in
    # name order; the two-worker run goes largest (= last) first: they meet in the middle.
    first = subprocess.Popen(
        command(inp, out, model, "--save-logits", "--report", tmp_path / "b.json"),
        env=env(slow_s=1.5), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    second = subprocess.Popen(
        command(inp, out, model, "--save-logits", "--num-proc", "2", "--report",
                tmp_path / "a.json"),
        env=env(slow_s=1.5), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    for proc in (first, second):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    a, b = report(tmp_path / "a.json"), report(tmp_path / "b.json")
    for name in names(inp):
        case = case_name(name)
        statuses = sorted([a[case][0], b[case][0]])
        assert statuses == ["done", "skipped"], (case, a[case], b[case])
    # Both really ran (the test is about overlap): each did part of the batch.
    assert any(s == "done" for s, _ in a.values()) and any(s == "done" for s, _ in b.values())
    assert assert_matches_reference(out, reference, names(inp)) == len(names(inp))
    assert leftovers(out) == []


@pytest.mark.slow
def test_sigkill_of_the_whole_run_at_random_moments_then_resume(tmp_path, batch):
    inp, model, reference = batch
    out = tmp_path / "out"
    files = names(inp)
    rng = np.random.default_rng(20240611)
    kills = 0

    def records() -> int:
        return len(list((out / ".itk_infer").glob("*.json")))

    for attempt in range(4):
        before = records()
        if before + 1 > len(files) - 2:
            break
        # Kill once the run has finished one or two further cases, plus a random fraction of
        # a case: the moment falls in reading, the model or writing (writes run
        # while the next case is in the model, which slow_s stretches to 0.2 s a case).
        target = int(rng.integers(before + 1, min(before + 2, len(files) - 2) + 1))
        delay = float(rng.uniform(0.0, 0.3))
        proc = subprocess.Popen(
            command(inp, out, model, "--save-logits", "--num-proc", 2 if attempt % 2 else 1),
            env=env(slow_s=0.2), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 90
            while records() < target and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(delay)
        finally:
            if proc.poll() is None:
                kills += 1
            os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers at once
            proc.wait()
        # Whatever is there is whole: nothing partial looks complete.
        assert_matches_reference(out, reference, files, complete_only=True)
    assert kills >= 3
    result = run(inp, out, model, "--save-logits", "--num-proc", "2")
    assert result.returncode == 0, result.stderr
    assert assert_matches_reference(out, reference, files) == len(files)
    assert leftovers(out) == []


def test_workers_die_with_the_main_process(tmp_path, batch):
    inp, model, _ = batch
    out = tmp_path / "out"
    proc = subprocess.Popen(command(inp, out, model, "--num-proc", "2"), env=env(slow_s=6.0),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        locks = out / ".itk_infer" / "locks"
        # Both workers hold a case (its lock) and sit in a 6-second model step.
        while len(workers := worker_pids(proc.pid)) < 2 or len(list(locks.glob("*"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()  # the main process only: an orphaned worker would keep its device busy
        proc.wait()
    # Well before their model steps end: the kernel kills them with their parent.
    deadline = time.monotonic() + 3
    while [pid for pid in workers if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in workers if alive(pid)] == []
    # The next run clears what the killed one left and finishes the batch.
    result = run(inp, out, model)
    assert result.returncode == 0, result.stderr
    assert leftovers(out) == []


def test_workers_that_cannot_start_end_the_run(tmp_path, batch):
    inp, model, _ = batch
    result = run(inp, tmp_path / "out", model, "--num-proc", "2", kill_workers_at_start=1)
    assert result.returncode == 1
    assert "worker processes could not start: worker exited with signal 9" in result.stderr
    assert leftovers(tmp_path / "out") == []


def test_model_errors_in_workers_are_usage_errors(tmp_path, batch):
    inp, _, _ = batch
    # No window in the model and none given: every worker finds it; one message, exit 2.
    model = write_pointwise_model(tmp_path / "bare.onnx", 3)
    result = run(inp, tmp_path / "out", model, "--num-proc", "2")
    assert result.returncode == 2
    assert result.stderr.count("requires --wl/--ww") == 1
    assert not list((tmp_path / "out").glob("*.mha"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA messages")
def test_devices_without_cuda(tmp_path, batch):
    inp, model, _ = batch
    result = run(inp, tmp_path / "out", model, device="cuda")
    assert result.returncode == 2 and "no CUDA device" in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.mha"))
    small = tmp_path / "small"
    small.mkdir()
    os.link(inp / "case0.mha", small / "case0.mha")
    result = run(small, tmp_path / "out2", model, "--gpus", "2", device="auto")
    assert result.returncode == 0, result.stderr
    assert "--gpus 2 ignored" in result.stderr
