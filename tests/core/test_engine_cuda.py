"""CUDA path of the engine: equals the CPU path, fp16 close, device-bound I/O (needs a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from itk_infer.config import SlidingWindowSettings
from itk_infer.engine import run_sliding_window, slide
from tests.core.test_engine import (
    TIE_GAP,
    CaptureSink,
    ConvBackend,
    affine_predictor,
    top_two_gap,
)
from tests.models import write_pointwise_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEMO_MODEL = Path(__file__).resolve().parents[2] / "examples" / "demo" / "model.onnx"


class CudaConvBackend(ConvBackend):
    """The engine test's fake model, on the GPU; records where its inputs live."""

    def __init__(self, num_classes: int, seed: int = 0) -> None:
        super().__init__(num_classes, seed)
        self.device = torch.device("cuda")
        self.weight, self.bias, self.offset = (
            t.to(self.device) for t in (self.weight, self.bias, self.offset)
        )
        self.input_devices: set[str] = set()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.input_devices.add(batch.device.type)
        return super().forward(batch)


def run(volume, backend, sliding):
    sink = CaptureSink()
    stats = run_sliding_window(volume, backend, sliding, [sink])
    logits, labels = sink.assembled(volume.shape)
    return stats, sink, logits, labels


def assert_same_labels(labels, ref_labels, ref_logits, max_fraction=1e-4):
    differ = labels != ref_labels
    assert np.all(top_two_gap(ref_logits)[differ] < TIE_GAP), "labels differ away from a tie"
    assert differ.mean() <= max_fraction


@pytest.mark.parametrize(("num_classes", "batch", "blend"),
                         [(1, 1, "gaussian"), (5, 3, "constant"), (40, 2, "gaussian")])
def test_cuda_engine_equals_cpu_engine(num_classes, batch, blend):
    shape, patch, stride = (23, 30, 27), (8, 12, 10), (5, 7, 6)
    volume = np.random.default_rng(num_classes).random(shape, dtype=np.float32)
    sliding = SlidingWindowSettings(patch, stride, batch, blend)
    _, _, cpu_logits, cpu_labels = run(volume, ConvBackend(num_classes, seed=4), sliding)
    gpu = CudaConvBackend(num_classes, seed=4)
    stats, sink, logits, labels = run(volume, gpu, sliding)
    assert gpu.input_devices == {"cuda"}, "windows must be gathered on the device"
    assert sink.devices == {"cuda"}, "blending and argmax must run on the device"
    assert stats.placement is not None
    assert stats.placement.volume_device.startswith("cuda")
    assert stats.placement.accumulate_device.startswith("cuda")
    assert len(set(gpu.batch_sizes)) == 1, "batches must have one static size on CUDA"
    np.testing.assert_allclose(logits, cpu_logits, rtol=1e-5, atol=1e-5)
    assert_same_labels(labels, cpu_labels, cpu_logits)


def test_slab_on_host_when_asked():
    """accumulate_device='cpu' keeps the slab on the host; results are unchanged."""
    shape, patch, stride = (20, 24, 24), (8, 8, 8), (4, 4, 4)
    volume = np.random.default_rng(1).random(shape, dtype=np.float32)
    on_device = run(volume, CudaConvBackend(5, seed=2),
                    SlidingWindowSettings(patch, stride, 2))
    on_host = run(volume, CudaConvBackend(5, seed=2),
                  SlidingWindowSettings(patch, stride, 2, accumulate_device="cpu"))
    assert on_host[0].placement.accumulate_device == "cpu"
    assert on_host[1].devices == {"cpu"}
    np.testing.assert_allclose(on_host[2], on_device[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_slide_with_a_plain_function_on_cuda_equals_the_cpu(dtype):
    """``slide`` with a plain function and ``device="cuda"``: same placement rules as a
    backend, static batches, and the CPU's results."""
    shape, patch, stride = (21, 26, 19), (8, 10, 8), (5, 6, 5)
    volume = np.random.default_rng(3).random(shape, dtype=np.float32)
    sliding = SlidingWindowSettings(patch, stride, 3, "gaussian")
    cpu_predict = affine_predictor(5, seed=3, dtype=dtype)
    gpu_sizes: list[int] = []
    plain = affine_predictor(5, seed=3, dtype=dtype, batch_sizes=gpu_sizes)
    devices: set[str] = set()

    def gpu_predict(x: torch.Tensor) -> torch.Tensor:
        devices.add(x.device.type)
        return plain(x.cpu()).cuda()

    cpu_sink, gpu_sink = CaptureSink(), CaptureSink()
    slide(volume, cpu_predict, sliding, [cpu_sink])
    stats = slide(volume, gpu_predict, sliding, [gpu_sink], device="cuda")
    assert devices == {"cuda"} and len(set(gpu_sizes)) == 1
    assert stats.placement is not None
    assert stats.placement.volume_device.startswith("cuda")
    assert stats.placement.accumulate_device.startswith("cuda")
    assert gpu_sink.devices == {"cuda"}
    cpu_logits, cpu_labels = cpu_sink.assembled(shape)
    logits, labels = gpu_sink.assembled(shape)
    np.testing.assert_allclose(logits, cpu_logits, rtol=1e-5, atol=1e-5)
    assert_same_labels(labels, cpu_labels, cpu_logits)


def _onnx_backend(path, device, fp16=False):
    ort = pytest.importorskip("onnxruntime")
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here")
    from itk_infer.backends.onnx import OnnxBackend

    backend = OnnxBackend(path, device, fp16=fp16)
    if device.type == "cuda" and backend.device.type != "cuda":
        pytest.skip("the ONNX backend fell back to the CPU")
    return backend


def test_onnx_cuda_forward_is_device_bound(tmp_path):
    """Input and output stay on the GPU (I/O binding): a CUDA tensor in, a CUDA tensor out."""
    model = write_pointwise_model(tmp_path / "m.onnx", 4,
                                  output_shape=["N", 4, "Z", "Y", "X"])
    backend = _onnx_backend(model, torch.device("cuda"))
    x = torch.rand((3, 1, 8, 16, 16), device="cuda")
    for _ in range(2):  # the first call may size a dynamic output once
        y = backend.forward(x)
        assert y.is_cuda and y.shape == (3, 4, 8, 16, 16)
    cpu = _onnx_backend(model, torch.device("cpu"))
    ref = cpu.forward(x.cpu()).numpy()
    # The CUDA provider may run convolutions in TF32 (10-bit mantissa) on Ampere and later.
    np.testing.assert_allclose(y.cpu().numpy(), ref, rtol=0, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("fp16", [False, True])
def test_onnx_cuda_engine_matches_cpu(fp16):
    if not DEMO_MODEL.is_file():
        pytest.skip("examples/demo/model.onnx is missing")
    cpu = _onnx_backend(DEMO_MODEL, torch.device("cpu"))
    gpu = _onnx_backend(DEMO_MODEL, torch.device("cuda"), fp16=fp16)
    assert gpu.fp16 == fp16
    volume = np.random.default_rng(0).random((40, 72, 80), dtype=np.float32)
    sliding = SlidingWindowSettings((32, 64, 64), (16, 32, 32), 2)
    _, _, cpu_logits, cpu_labels = run(volume, cpu, sliding)
    stats, sink, logits, labels = run(volume, gpu, sliding)
    assert sink.devices == {"cuda"}
    assert stats.placement.volume_device.startswith("cuda")
    if fp16:
        # Half precision inside the model: logits within fp16 resolution, labels nearly equal.
        scale = np.abs(cpu_logits).max()
        np.testing.assert_allclose(logits, cpu_logits, rtol=0, atol=2e-2 * scale)
        assert (labels == cpu_labels).mean() > 0.995
    else:
        # Only summation order and, on Ampere and later, TF32 convolutions may differ.
        scale = np.abs(cpu_logits).max()
        np.testing.assert_allclose(logits, cpu_logits, rtol=0, atol=5e-3 * scale)
        assert (labels == cpu_labels).mean() > 0.999
