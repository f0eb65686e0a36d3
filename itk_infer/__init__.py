"""itk_infer: batch sliding-window inference of 3-D segmentation models over image folders.

The core (this package) reads images, reorients them to LPI, windows intensities, runs a
model over sliding windows with overlap blending and writes label maps, logits, confidences
and per-case records atomically. The command line (:mod:`itk_infer.cli`) and the Dagster
assets (``itk_infer_assets``) are thin faces over :func:`run_batch`, :func:`load_model` and
:func:`predict_case` (see the README's "Architecture").
Heavy modules are imported lazily so that ``import itk_infer`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "CaseResult",
    "InferenceSettings",
    "Model",
    "OutputOptions",
    "Settings",
    "SlidingWindowSettings",
    "WindowSettings",
    "__version__",
    "load_model",
    "predict_case",
    "run_batch",
    "slide",
]

_LAZY = {
    "CaseResult": "itk_infer.pipeline",
    "InferenceSettings": "itk_infer.config",
    "Model": "itk_infer.pipeline",
    "OutputOptions": "itk_infer.config",
    "Settings": "itk_infer.config",
    "SlidingWindowSettings": "itk_infer.config",
    "WindowSettings": "itk_infer.config",
    "load_model": "itk_infer.pipeline",
    "predict_case": "itk_infer.pipeline",
    "run_batch": "itk_infer.runner",
    "slide": "itk_infer.engine",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'itk_infer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
