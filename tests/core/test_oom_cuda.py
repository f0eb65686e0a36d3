"""A real CUDA out-of-memory error in a case, and the fallback (needs a GPU; skipped without
one): a batch far larger than the card fails, the retry with the slab on the host and one
window per batch succeeds; with the card full, the case runs on the CPU (if allowed). The
labels equal a CPU run's; the record says what ran."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from itk_infer.caseloop import run_cases
from itk_infer.cases import OutputLayout, discover_cases
from itk_infer.config import OutputOptions, Settings
from itk_infer.pipeline import load_model
from tests.conftest import write_volume
from tests.models import default_metadata, write_pointwise_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def inputs(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(5)
    write_volume(inp / "case0.nii.gz", rng.uniform(-1.2, 1.2, (24, 48, 40)).astype(np.float32))
    model = write_pointwise_model(tmp_path / "model.onnx", 3,
                                  metadata=default_metadata(patch=(8, 16, 16), stride=(4, 8, 8),
                                                            batch=2))
    return inp, model


def run(inp, model_path, out, device, batch=None, **settings):
    model = load_model(Settings(onnx_path=model_path, device=device.type, **settings), device)
    if batch is not None:  # padded up to this on CUDA: a batch no card holds
        model.inference = dataclasses.replace(model.inference, batch_size=batch)
    out.mkdir()
    layout = OutputLayout(out)
    outcomes = run_cases(discover_cases(inp), model, layout, OutputOptions(save_conf=True))
    return outcomes, layout


def _record(layout, inp):
    return json.loads(layout.record(discover_cases(inp)[0]).read_text())


def test_too_large_a_batch_falls_back_to_one_window(tmp_path, inputs):
    inp, model = inputs
    _, reference = run(inp, model, tmp_path / "cpu", torch.device("cpu"))
    free, _total = torch.cuda.mem_get_info()
    windows = int(2 * free // (8 * 16 * 16 * 4)) + 1  # the input batch alone: twice the free
    outcomes, layout = run(inp, model, tmp_path / "cuda", torch.device("cuda", 0),
                           batch=windows)
    assert outcomes[0].status == "done", outcomes[0].reason
    assert _record(layout, inp)["fallback"] == ["host accumulation, batch 1"]
    case = discover_cases(inp)[0]
    assert layout.labels(case).read_bytes() == reference.labels(case).read_bytes()


def _fill_the_card() -> list[torch.Tensor]:
    """Hold all but a few kB of the card's memory, in ever smaller blocks."""
    hog, size = [], 1 << 34
    while size >= 1 << 12:
        try:
            hog.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            size //= 2
    return hog


@pytest.mark.parametrize("allowed", [True, False])
def test_a_full_card_runs_the_case_on_the_cpu_if_allowed(tmp_path, inputs, allowed):
    inp, model = inputs
    _, reference = run(inp, model, tmp_path / "cpu", torch.device("cpu"))
    loaded = load_model(Settings(onnx_path=model, device="cuda", cpu_fallback=allowed),
                        torch.device("cuda", 0))
    (tmp_path / "cuda").mkdir()
    layout = OutputLayout(tmp_path / "cuda")
    hog = _fill_the_card()
    try:
        outcomes = run_cases(discover_cases(inp), loaded, layout, OutputOptions(save_conf=True))
    finally:
        del hog
        torch.cuda.empty_cache()
    if not allowed:
        assert outcomes[0].status == "failed" and "memory" in outcomes[0].reason.lower()
        return
    assert outcomes[0].status == "done", outcomes[0].reason
    assert _record(layout, inp)["fallback"] == ["host accumulation, batch 1", "cpu"]
    case = discover_cases(inp)[0]
    assert layout.labels(case).read_bytes() == reference.labels(case).read_bytes()
