"""Out-of-memory fallback of a case (issue 14), on the CPU: no GPU runs these tests, so the
out-of-memory error is a mock: a real ONNX model whose forward raises torch's
``OutOfMemoryError`` while its batch holds more than one window (what a too-large batch does on
a card). The retry must give the labels and logits of an undisturbed run, and the record says
what ran. ``tests/core/test_oom_cuda.py`` provokes a real one on a GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from itk_infer.backends.onnx import OnnxBackend
from itk_infer.caseloop import run_cases
from itk_infer.cases import OutputLayout, discover_cases
from itk_infer.config import OutputOptions, Settings, SlidingWindowSettings
from itk_infer.engine import fallback_attempts, is_out_of_memory
from itk_infer.pipeline import load_model
from tests.conftest import write_volume
from tests.models import default_metadata, write_pointwise_model

CPU = torch.device("cpu")


class BatchLimit:
    """The backend's forward, failing with torch's CUDA out-of-memory error for batches of
    more than ``limit`` windows (``limit`` 0: always)."""

    def __init__(self, forward, limit: int) -> None:
        self.forward, self.limit, self.refused = forward, limit, 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] > self.limit:
            self.refused += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.forward(batch)


@pytest.fixture
def setup(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        write_volume(inp / f"case{i}.nii.gz",
                     rng.uniform(-1.2, 1.2, size=(20 + 4 * i, 40, 36)).astype(np.float32))
    model = write_pointwise_model(tmp_path / "model.onnx", 3,
                                  metadata=default_metadata(patch=(8, 16, 16), stride=(4, 8, 8),
                                                            batch=4))
    return inp, model


def run(inp, model_path, out, limit=None, **settings):
    model = load_model(Settings(onnx_path=model_path, device="cpu", **settings), CPU)
    assert isinstance(model.backend, OnnxBackend) and model.inference.batch_size == 4
    fault = None
    if limit is not None:
        fault = BatchLimit(model.backend.forward, limit)
        model.backend.forward = fault  # type: ignore[method-assign]
    layout = OutputLayout(out)
    out.mkdir()
    outcomes = run_cases(discover_cases(inp), model, layout,
                         OutputOptions(save_logits=True, save_conf=True))
    return outcomes, layout, fault


def test_out_of_memory_retries_with_one_window_per_batch_and_same_results(tmp_path, setup):
    inp, model = setup
    _, reference, _ = run(inp, model, tmp_path / "reference")
    outcomes, layout, fault = run(inp, model, tmp_path / "out", limit=1)
    assert [(o.case, o.status) for o in outcomes] == [("case0", "done"), ("case1", "done")]
    assert fault.refused == 2  # the first batch of each case, then batches of one window
    for case in discover_cases(inp):
        record = json.loads(layout.record(case).read_text())
        assert record["fallback"] == ["host accumulation, batch 1"]
        assert json.loads(reference.record(case).read_text())["fallback"] == []
        # Labels: byte for byte; logits: float16 of the same blend, in another batch order.
        assert layout.labels(case).read_bytes() == reference.labels(case).read_bytes()
        np.testing.assert_allclose(zarr.open_array(str(layout.logits(case)), mode="r")[:],
                                   zarr.open_array(str(reference.logits(case)), mode="r")[:],
                                   rtol=1e-3, atol=1e-3)


def test_out_of_memory_on_every_try_fails_the_case_with_the_error(tmp_path, setup,
                                                                  itk_logs):
    inp, model = setup
    outcomes, layout, fault = run(inp, model, tmp_path / "out", limit=0)
    assert [o.status for o in outcomes] == ["failed", "failed"]
    assert all(o.reason.startswith("OutOfMemoryError: CUDA out of memory") for o in outcomes)
    assert fault.refused == 4  # as planned, then one window per batch; no CPU: already there
    assert "out of memory (OutOfMemoryError); retrying: host accumulation, batch 1" in itk_logs.text
    assert not any(layout.folder.glob("*.nii.gz")) and not any(layout.folder.glob("*.zarr"))


def test_other_errors_are_not_retried(tmp_path, setup):
    inp, model = setup
    loaded = load_model(Settings(onnx_path=model, device="cpu"), CPU)
    calls = []

    def broken(batch):
        calls.append(batch.shape[0])
        raise RuntimeError("shape mismatch")

    loaded.backend.forward = broken  # type: ignore[method-assign]
    out = tmp_path / "out"
    out.mkdir()
    outcomes = run_cases(discover_cases(inp)[:1], loaded, OutputLayout(out), OutputOptions())
    assert outcomes[0].reason == "RuntimeError: shape mismatch" and calls == [4]


def test_fallback_order_on_a_gpu():
    sliding = SlidingWindowSettings((8, 16, 16), None, 4, "gaussian", None)
    cuda = torch.device("cuda", 0)  # only a name here: nothing is allocated
    steps = fallback_attempts(sliding, cuda, None, allow_cpu=True)
    assert [s.label for s in steps] == ["", "host accumulation, batch 1", "cpu"]
    assert steps[1].sliding.accumulate_device == "cpu" and steps[1].sliding.batch_size == 1
    assert steps[2].on_cpu and steps[2].sliding.batch_size == 4
    assert [s.label for s in fallback_attempts(sliding, cuda, None, allow_cpu=False)] == [
        "", "host accumulation, batch 1"]
    # A static batch size cannot shrink; the slab still moves to the host.
    assert fallback_attempts(sliding, cuda, 4, allow_cpu=False)[1].label == (
        "host accumulation, batch 4")
    assert not any(s.on_cpu for s in fallback_attempts(sliding, CPU, None, allow_cpu=True))


@pytest.mark.parametrize(("error", "expected"), [
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory"),
     True),
    (MemoryError("out of memory"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory in the config"), False),
])
def test_what_counts_as_out_of_memory(error, expected):
    assert is_out_of_memory(error) is expected
