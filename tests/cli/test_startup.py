"""Start-up: what ``--help`` and the warm start import, and that running the first batches
ahead (itk_infer.warmstart) uses exactly the engine's batches and leaves the outputs unchanged."""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from itk_infer.config import SlidingWindowSettings
from itk_infer.engine import _volume_tensor, _WindowBatcher, _WindowGrid
from itk_infer.spawn import collections_paused
from itk_infer.warmstart import RunAhead, batches, same_bits
from tests.golden.digest import BACKEND_ARGS, DEMO, differences, digest_folder

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = json.loads((ROOT / "tests" / "golden" / "demo_outputs.json").read_text())


def _loaded_after(code: str) -> set[str]:
    """Top-level modules loaded in a fresh interpreter after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    return set(result.stdout.split())


def test_help_imports_no_torch_onnxruntime_or_pandas() -> None:
    loaded = _loaded_after("from itk_infer.cli import main\ntry:\n    main(['--help'])\n"
                           "except SystemExit:\n    pass")
    assert "itk_infer" in loaded
    assert not loaded & {"torch", "onnxruntime", "pandas", "SimpleITK", "zarr", "dagster"}


def test_default_cpu_run_loads_torch_only_in_its_worker(tmp_path: Path) -> None:
    """The command's process hands the cases to its worker without importing torch (the
    worker imports it while running its first batches): the demo is done all the same."""
    out = tmp_path / "out"
    loaded = _loaded_after(
        "from itk_infer.cli import main\n"
        f"assert main(['-i', {str(DEMO / 'images')!r}, '-o', {str(out)!r}, "
        f"'--onnx', {str(DEMO / 'model.onnx')!r}, '--device', 'cpu', '--no-progress']) == 0")
    assert "itk_infer" in loaded and "torch" not in loaded
    assert sorted(p.name for p in out.glob("case_0*")) == [
        "case_01.mha", "case_02.nii.gz", "case_03.nii"]


def test_warm_start_path_imports_no_torch() -> None:
    loaded = _loaded_after("import itk_infer.warmstart, itk_infer.backends.onnx, "
                           "itk_infer.imageio, itk_infer.integrity, itk_infer.grid, "
                           "itk_infer.window, itk_infer.cases\nimport onnxruntime")
    assert "onnxruntime" in loaded and "SimpleITK" in loaded
    assert "torch" not in loaded


def _engine_batches(volume: np.ndarray, sliding: SlidingWindowSettings,
                    static: int | None) -> list[np.ndarray]:
    grid = _WindowGrid.plan(volume.shape, sliding)
    size = static or sliding.batch_size
    batcher = _WindowBatcher(_volume_tensor(volume, grid, torch.device("cpu")), grid.patch,
                             size, torch.device("cpu"), static is not None)
    return [x.numpy().copy() for _z, row in grid.rows for x, _ in batcher.batches(row)]


def test_batches_are_the_engines_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    volume = rng.random((37, 50, 45), dtype=np.float32)  # padded on every axis
    for batch, static in ((2, None), (3, 3), (4, None)):
        sliding = SlidingWindowSettings((16, 32, 32), (8, 16, 32), batch)
        ours = list(batches(volume, sliding, static is not None))
        theirs = _engine_batches(volume, sliding, static)
        assert len(ours) == len(theirs) > 1
        assert all(same_bits(a.astype(np.float32), b) for a, b in zip(ours, theirs, strict=True))


def test_run_ahead_gives_outputs_only_for_the_same_bits() -> None:
    ahead = RunAhead()
    x1, x2 = np.zeros((1, 1, 2, 2, 2), np.float32), np.ones((1, 1, 2, 2, 2), np.float32)
    for x in (x1, x2):
        assert ahead.run(lambda a: a * 2 + 1, x)
    y = ahead.take(x1.copy())
    assert y is not None and np.array_equal(y, x1 * 2 + 1)
    assert ahead.take(-x2) is None  # another input: the rest is dropped ...
    assert ahead.take(x2) is None  # ... for good
    assert not ahead.run(lambda a: a, x1)  # and nothing more is run ahead
    assert not same_bits(np.float32([0.0]), np.float32([-0.0]))


def test_demo_outputs_unchanged_through_a_warm_start(tmp_path: Path) -> None:
    """A fresh process (no torch yet) runs the demo with every output: the batches run ahead
    are used and the outputs match the golden digests."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "itk_infer", "-i", str(DEMO / "images"), "-o", str(out),
         *BACKEND_ARGS["onnx"], "--save-logits", "--save-conf", "--device", "cpu",
         "--no-progress", "--in-process", "-vv"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    used = re.search(r"warm start: (\d+) of (\d+) batch\(es\) run ahead used", result.stderr)
    assert used is not None and int(used[1]) == int(used[2]) > 0, result.stderr
    assert "first model forward (onnx, warm start)" in result.stderr
    assert differences(MANIFEST["onnx"], digest_folder(out)) == []


def test_default_run_adopts_the_worker_started_before_its_imports(tmp_path: Path) -> None:
    """A fresh default run (cases in a worker process) starts that worker before importing
    the runner and hands it the cases; the worker runs the largest case's first batches while
    it imports torch: same outputs as the golden digests."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "itk_infer", "-i", str(DEMO / "images"), "-o", str(out),
         *BACKEND_ARGS["onnx"], "--save-logits", "--save-conf", "--device", "cpu",
         "--no-progress", "-vv"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "worker 0: the one started before the runner's imports" in result.stderr
    # The worker ran its first case's first batches while importing torch, and used them.
    used = re.search(r"warm start: (\d+) of (\d+) batch\(es\) run ahead used", result.stderr)
    assert used is not None and int(used[1]) == int(used[2]) > 0, result.stderr
    assert differences(MANIFEST["onnx"], digest_folder(out)) == []


def test_an_early_worker_not_taken_as_started_is_stopped(tmp_path: Path) -> None:
    from itk_infer import prestart
    from itk_infer.config import Settings
    from itk_infer.spawn import worker_args

    settings = Settings(input_folder=tmp_path, output_folder=tmp_path / "out",
                        onnx_path=DEMO / "model.onnx", device="cpu")
    assert prestart.eligible(settings)
    assert not prestart.eligible(settings.replace(in_process=True))
    assert not prestart.eligible(settings.replace(num_proc=2))
    assert not prestart.eligible(settings.replace(device="cuda"))

    prestart.begin(settings)
    early = prestart._early
    assert early is not None and early.process.is_alive()
    other = worker_args(settings, 0, 0, threads=early.args[3] + 1)
    assert prestart.take(other) is None  # other arguments: stopped, not handed out
    assert early.process.exitcode is not None and not Path(early.crash_log).exists()

    prestart.begin(settings)
    early = prestart._early
    assert early is not None
    prestart.close()  # the run ended without taking it
    assert early.process.exitcode is not None and prestart._early is None
    assert prestart.take(early.args) is None


def test_first_case_is_the_one_each_kind_of_run_takes_first(tmp_path: Path) -> None:
    """In-process runs take cases in discovery order, the worker pool the largest input
    first; cases with a record are skipped unless ``--overwrite``."""
    from itk_infer.cases import OutputLayout, discover_cases, largest_first
    from itk_infer.config import Settings
    from itk_infer.warmstart import first_case

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name, size in (("a", 10), ("b", 30), ("c", 20)):
        (inputs / f"{name}.mha").write_bytes(b"x" * size)
    settings = Settings(input_folder=inputs, output_folder=out, onnx_path=DEMO / "model.onnx")
    cases = discover_cases(inputs)
    assert first_case(settings).name == cases[0].name == "a"
    assert first_case(settings, by_size=True).name == sorted(cases, key=largest_first)[0].name
    assert first_case(settings, by_size=True).name == "b"
    record = OutputLayout(out).record(cases[1])
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    assert first_case(settings, by_size=True).name == "c"
    assert first_case(settings.replace(overwrite=True), by_size=True).name == "b"


def test_collections_paused_leaves_the_collector_as_it_found_it() -> None:
    assert gc.isenabled()
    with collections_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    try:
        with collections_paused():
            raise KeyError("inside")
    except KeyError:
        pass
    assert gc.isenabled()
    gc.disable()  # a caller that had turned it off keeps it off
    try:
        with collections_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
