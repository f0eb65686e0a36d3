"""ONNX Runtime backend: CUDA provider with device-bound I/O on GPUs, CPU provider elsewhere."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itk_infer.backends.base import (
    ModelDefaults,
    fingerprint_files,
    parse_inference_config_json,
    parse_spacing,
    require_file,
)
from itk_infer.errors import ModelError

log = logging.getLogger(__name__)

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _parse_float(meta: dict[str, str], key: str, source: str) -> float | None:
    if key not in meta:
        return None
    try:
        return float(meta[key])
    except ValueError:
        raise ModelError(f"{source}: metadata {key}={meta[key]!r} is not a number") from None


def _session_options(ort: Any, intra_op_threads: int | None) -> Any:
    """Quiet session options; ``intra_op_threads`` caps the session's thread pool."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if intra_op_threads is not None:
        # Several CPU workers share the cores: each gets its own slice, not all of them.
        options.intra_op_num_threads = max(1, int(intra_op_threads))
    return options


def _providers(device: torch.device) -> list:
    """Execution providers for ``device``: CUDA first on a GPU, the CPU always."""
    if device.type == "cuda":
        return [
            ("CUDAExecutionProvider", {"device_id": device.index or 0}),
            "CPUExecutionProvider",
        ]
    return ["CPUExecutionProvider"]


def _open_session(ort: Any, model_bytes: bytes, options: Any, providers: list,
                  source: str) -> Any:
    try:
        return ort.InferenceSession(model_bytes, options, providers=providers)
    except Exception as error:  # onnxruntime raises several unrelated types
        raise ModelError(f"{source}: cannot load ONNX model: {error}") from None


def _check_signature(session: Any, source: str) -> tuple[Any, Any]:
    """The model's one input and one output, both 5-D float, one input channel."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"{source}: needs exactly one input and one output, has {len(inputs)} "
            f"input(s) {[i.name for i in inputs]} and {len(outputs)} output(s) "
            f"{[o.name for o in outputs]}"
        )
    inp, out = inputs[0], outputs[0]
    for role, arg in (("input", inp), ("output", out)):
        if len(arg.shape) != 5:
            raise ModelError(
                f"{source}: {role} {arg.name!r} has shape {arg.shape} ({len(arg.shape)}-D); "
                "expected 5-D (N, C, Z, Y, X)"
            )
        if arg.type not in _ORT_TO_NUMPY:
            raise ModelError(f"{source}: {role} {arg.name!r} is {arg.type}; expected float")
    if _static(inp.shape[1]) not in (None, 1):
        raise ModelError(f"{source}: input has {inp.shape[1]} channels; expected 1")
    return inp, out


def _read_defaults(session: Any, source: str) -> ModelDefaults:
    """Window and ``inference_config`` from the model's custom metadata map."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    config = (
        parse_inference_config_json(meta["inference_config"], source)
        if "inference_config" in meta
        else {}
    )
    return ModelDefaults(
        window_level=_parse_float(meta, "window_level", source),
        window_width=_parse_float(meta, "window_width", source),
        inference_config=config,
        spacing=parse_spacing(meta.get("spacing"), source),
    )


class OnnxBackend:
    """An ONNX model with one input and one output, both (N, C, Z, Y, X).

    Metadata read from the model's custom metadata map (string values): ``window_level``,
    ``window_width`` and ``inference_config`` (JSON with ``patch_size``, ``patch_stride``,
    ``forward_batch_windows``).
    """

    name = "onnx"

    def __init__(
        self,
        path: Path,
        device: torch.device,
        fp16: bool = False,
        *,
        intra_op_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = require_file(path, "ONNX model (--onnx)")
        self.device = device
        source = self.path.name
        options = _session_options(ort, intra_op_threads)
        providers = _providers(device)
        model_bytes = self.path.read_bytes()
        session = _open_session(ort, model_bytes, options, providers, source)
        inp, out = _check_signature(session, source)
        if device.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            log.warning("%s: onnxruntime has no CUDA provider here; running on the CPU", source)
            self.device = torch.device("cpu")

        self.defaults = _read_defaults(session, source)
        spatial = tuple(_static(d) for d in inp.shape[2:])
        self.static_patch_size = spatial if all(spatial) else None  # type: ignore[assignment]
        self.static_batch_size = _static(inp.shape[0])
        self.num_classes = _static(out.shape[1])
        self.fingerprint = fingerprint_files([self.path])

        self.fp16 = False
        if fp16 and self.device.type == "cuda":
            self.fp16 = True
            if inp.type == "tensor(float)":
                session = self._half_session(ort, model_bytes, options, providers, source)
        self._session = session
        self._input_name, self._output_name = inp.name, out.name
        self._input_dtype = _ORT_TO_NUMPY[session.get_inputs()[0].type]
        self._output_dtype = _ORT_TO_NUMPY[session.get_outputs()[0].type]

    @staticmethod
    def _half_session(ort, model_bytes: bytes, options, providers, source: str):
        """Convert an fp32 model to fp16 inside, keeping fp32 inputs and outputs."""
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        try:
            half = convert_float_to_float16(onnx.load_from_string(model_bytes), keep_io_types=True)
            return ort.InferenceSession(half.SerializeToString(), options, providers=providers)
        except Exception as error:
            raise ModelError(f"{source}: cannot convert the model to fp16: {error}") from None

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Run (N, 1, Z, Y, X) windows; returns (N, C, Z, Y, X) logits on ``self.device``."""
        if self.device.type == "cuda":
            return self._forward_cuda(batch)
        x = batch.detach().to("cpu", torch.float32).numpy().astype(self._input_dtype, copy=False)
        (y,) = self._session.run([self._output_name], {self._input_name: x})
        return torch.from_numpy(np.asarray(y))

    def _forward_cuda(self, batch: torch.Tensor) -> torch.Tensor:
        # Bind device memory on both sides so no window makes a round trip through the host.
        in_dtype = torch.float16 if self._input_dtype == np.float16 else torch.float32
        out_dtype = torch.float16 if self._output_dtype == np.float16 else torch.float32
        x = batch.to(self.device, in_dtype).contiguous()
        index = self.device.index or 0
        binding = self._session.io_binding()
        binding.bind_input(
            self._input_name, "cuda", index, self._input_dtype, tuple(x.shape), x.data_ptr()
        )
        if self.num_classes is None:
            # First call with a dynamic class count: let onnxruntime size the output once.
            binding.bind_output(self._output_name, "cpu")
            torch.cuda.current_stream(self.device).synchronize()
            self._session.run_with_iobinding(binding)
            y = torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(self.device)
            self.num_classes = int(y.shape[1])
            return y
        y = torch.empty((x.shape[0], self.num_classes, *x.shape[2:]), dtype=out_dtype,
                        device=self.device)
        binding.bind_output(
            self._output_name, "cuda", index, self._output_dtype, tuple(y.shape), y.data_ptr()
        )
        torch.cuda.current_stream(self.device).synchronize()
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return y
