"""Model backends behind one small interface; :func:`load_backend` picks one."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from itk_infer.backends.base import Backend, ModelDefaults
from itk_infer.config import Settings
from itk_infer.errors import UsageError

if TYPE_CHECKING:  # imported where used: the ONNX backend opens its session before torch
    import torch

__all__ = ["Backend", "ModelDefaults", "cpu_for_certain", "load_backend", "resolve_device",
           "visible_gpus"]
log = logging.getLogger(__name__)


def resolve_device(requested: str, gpu_index: int = 0) -> torch.device:
    """``auto`` → CUDA when visible, else CPU; ``cuda`` without CUDA is a usage error."""
    import torch

    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", gpu_index % torch.cuda.device_count())
    if requested == "cuda":
        raise UsageError("--device cuda was requested but no CUDA device is visible")
    return torch.device("cpu")


def visible_gpus() -> int:
    """How many CUDA devices this process sees (imports torch)."""
    import torch

    return torch.cuda.device_count()


# Device files of a GPU that torch's "cuda" device can use: NVIDIA's driver, ROCm's (HIP).
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd")


def cpu_for_certain(requested: str) -> bool:
    """Whether :func:`resolve_device` gives the CPU for ``requested``, known without
    importing torch: ``cpu``, or ``auto`` on a host without GPU device files."""
    import os

    return requested == "cpu" or (
        requested == "auto" and not any(os.path.exists(f) for f in GPU_DEVICE_FILES))


def load_backend(
    spec: Settings,
    device: torch.device,
    fp16: bool = False,
    *,
    intra_op_threads: int | None = None,
) -> Backend:
    """Load the model that ``spec`` names (backend and model files) onto ``device``.

    ``fp16`` only takes effect on CUDA; on the CPU it is ignored with one warning.
    ``intra_op_threads`` caps the CPU threads of one ONNX Runtime session (None: its default,
    all cores); torch-based backends follow ``torch.set_num_threads`` instead.

    Raises:
        ModelError: missing files or a model that does not fit the contract.
    """
    if fp16 and device.type != "cuda":
        log.warning("--fp16 is ignored on the CPU (half precision needs CUDA)")
        fp16 = False
    if spec.backend == "onnx":
        from itk_infer.backends.onnx import OnnxBackend

        return OnnxBackend(
            spec.onnx_path,  # type: ignore[arg-type]
            device=device,
            fp16=fp16,
            intra_op_threads=intra_op_threads,
        )
    from itk_infer.backends.mmengine import MMEngineBackend

    return MMEngineBackend(
        spec.cfg_path,  # type: ignore[arg-type]
        spec.ckpt_path,  # type: ignore[arg-type]
        device=device,
        fp16=fp16,
        trust_checkpoint=spec.trust_checkpoint,
    )
