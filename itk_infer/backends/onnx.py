"""ONNX Runtime backend: CUDA provider with device-bound I/O on GPUs, CPU provider elsewhere.

Importing this module does not import torch: on the CPU the session can be opened (and the
first batches run, see :mod:`itk_infer.warmstart`) while torch is still loading.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from itk_infer.backends.base import (
    ModelDefaults,
    fingerprint_files,
    parse_inference_config_json,
    parse_labels,
    parse_spacing,
    require_file,
)
from itk_infer.errors import ModelError
from itk_infer.startup import claim_result, file_key, model_key, note_first_forward

if TYPE_CHECKING:
    import torch

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
    # The pool's threads would otherwise spin for work after each op, taking the cores from
    # what runs beside the model (blending, sinks, reading the next case, imports); the
    # forward itself is no slower without (benchmarks/bench_startup.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _providers(device: torch.device | None) -> list:
    """Execution providers for ``device`` (``None``: the CPU): CUDA first on a GPU, the CPU
    always."""
    if device is not None and device.type == "cuda":
        return [("CUDAExecutionProvider", _cuda_options(device)), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# Share of the device's free memory (when the session opens) its arena may hold.
ARENA_SHARE = 0.6


def _cuda_options(device: torch.device) -> dict[str, Any]:
    """The CUDA provider's options: an arena that grows only by what is asked and is capped,
    so that the memory torch reports free (the engine plans its slab from it) stays free."""
    import torch

    index = device.index or 0
    options: dict[str, Any] = {"device_id": index, "arena_extend_strategy": "kSameAsRequested"}
    try:
        free, _total = torch.cuda.mem_get_info(index)
        options["gpu_mem_limit"] = int(free * ARENA_SHARE)
    except Exception:  # no way to ask: leave the provider's default limit
        pass
    return options


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
    """Window, ``inference_config``, spacing and label names (key ``labels``, JSON
    ``{name: value}``) from the model's custom metadata map."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    classes = _static(session.get_outputs()[0].shape[1])
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
        labels=parse_labels(meta.get("labels"), source, classes),
    )


class Prefetched(Protocol):
    """Outputs the session already gave for the batches a warm start expects first."""

    def take(self, x: np.ndarray) -> np.ndarray | None:
        """The stored output for ``x`` if ``x`` is bit for bit the next stored input; else
        ``None`` (from then on always ``None``)."""

    def close(self) -> None:
        """Stop and drop whatever is stored."""


class PreparedSession:
    """The model opened for the CPU exactly as :class:`OnnxBackend` opens it there with
    ``intra_op_threads``, without torch: a warm start prepares one and the backend adopts it
    instead of opening the file a second time. ``prefetched``: outputs of the first batches,
    if any."""

    def __init__(self, path: Path, intra_op_threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = require_file(path, "ONNX model (--onnx)")
        self.key = file_key("onnx", self.path)  # the file as it was opened
        self.intra_op_threads = intra_op_threads
        source = self.path.name
        self.session = _open_session(ort, self.path.read_bytes(),
                                     _session_options(ort, intra_op_threads),
                                     _providers(None), source)
        inp, out = _check_signature(self.session, source)
        self.input_name, self.output_name = inp.name, out.name
        self.input_dtype = _ORT_TO_NUMPY[inp.type]
        self.defaults = _read_defaults(self.session, source)
        spatial = tuple(_static(d) for d in inp.shape[2:])
        self.static_patch_size = spatial if all(spatial) else None
        self.static_batch_size = _static(inp.shape[0])
        self.prefetched: Prefetched | None = None


def _adopt(path: Path, device: torch.device, fp16: bool,
           intra_op_threads: int | None) -> PreparedSession | None:
    """The session prepared for ``path`` if it was opened as this backend would open it and
    the file is unchanged since; waits for one still being opened."""
    prepared = claim_result(model_key("onnx", path))
    if prepared is None:
        return None
    if device.type != "cpu" or fp16 or intra_op_threads != prepared.intra_op_threads or (
            prepared.key != file_key("onnx", path)):
        if prepared.prefetched is not None:
            prepared.prefetched.close()
        return None
    return prepared


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
        import torch

        self.path = require_file(path, "ONNX model (--onnx)")
        self.device = device
        source = self.path.name
        options = _session_options(ort, intra_op_threads)
        providers = _providers(device)
        prepared = _adopt(self.path, device, fp16, intra_op_threads)
        self._prefetched = prepared.prefetched if prepared is not None else None
        if prepared is not None:  # the same session as below, opened during start-up
            session, model_bytes = prepared.session, b""
        else:
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
        import torch

        if self.device.type == "cuda":
            return self._forward_cuda(batch)
        x = batch.detach().to("cpu", torch.float32).numpy().astype(self._input_dtype, copy=False)
        if self._prefetched is not None:
            y = self._prefetched.take(x)  # this session's output for this very input
            if y is not None:
                return torch.from_numpy(y)
            self._prefetched = None
        note_first_forward("onnx")
        (y,) = self._session.run([self._output_name], {self._input_name: x})
        return torch.from_numpy(np.asarray(y))

    def _forward_cuda(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

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
