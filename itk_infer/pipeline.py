"""One case, step by step: read → reorient (LPI) → window → sliding window → sinks → atomic
writes → record. The only module that knows the order of the steps."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from itk_infer import __version__
from itk_infer.backends.base import Backend
from itk_infer.cases import Case, OutputLayout
from itk_infer.config import (
    InferenceSettings,
    OutputOptions,
    Overrides,
    SlidingWindowSettings,
    WindowSettings,
    as_triple,
)
from itk_infer.engine import EngineStats, run_sliding_window
from itk_infer.errors import ModelError, UsageError
from itk_infer.imageio import Geometry, read_volume, write_label_map
from itk_infer.records import CaseRecord, outputs_intact, read_record, write_record
from itk_infer.sinks import ConfidenceSink, LabelSink, LogitsSink
from itk_infer.window import apply_window

log = logging.getLogger(__name__)


def resolve_inference_settings(
    overrides: Overrides, backend: Backend, fp16: bool = False
) -> InferenceSettings:
    """Merge the user's values over the model's defaults, field by field.

    Patch size: ``--patch-size``, else ``inference_config.patch_size``, else the model's static
    input shape. Stride: ``--patch-stride``, else ``inference_config.patch_stride``, else half
    the patch. Window: ``--wl``/``--ww``, else the model's ``window_level``/``window_width``.

    Raises:
        UsageError: no window anywhere, or a stride larger than the patch.
        ModelError: a requested patch that contradicts the model's static input shape.
    """
    defaults = backend.defaults
    config = dict(defaults.inference_config)
    source = f"{backend.name} model"
    level = overrides.window_level if overrides.window_level is not None else defaults.window_level
    width = overrides.window_width if overrides.window_width is not None else defaults.window_width
    if level is None or width is None:
        raise UsageError(
            f"The {source} carries no intensity window (window_level/window_width): "
            "this model requires --wl/--ww"
        )
    window = WindowSettings(float(level), float(width))
    try:
        config_patch = as_triple(config.get("patch_size"), "inference_config.patch_size")
        config_stride = as_triple(config.get("patch_stride"), "inference_config.patch_stride")
    except UsageError as error:
        raise ModelError(f"{source}: {error}") from None
    patch = overrides.patch_size or config_patch or backend.static_patch_size
    if backend.static_patch_size and patch and tuple(patch) != tuple(backend.static_patch_size):
        raise ModelError(
            f"patch size {list(patch)} differs from the model's static input shape "
            f"{list(backend.static_patch_size)}"
        )
    stride = overrides.patch_stride or config_stride
    batch = backend.static_batch_size or int(config.get("forward_batch_windows") or 1)
    sliding = SlidingWindowSettings(
        patch_size=patch,
        patch_stride=stride,
        batch_size=batch,
        blend=overrides.blend,
        accumulate_device=config.get("accumulate_device"),
        forward_device=config.get("forward_device"),
        argmax_batchsize=config.get("argmax_batchsize"),
    )
    return InferenceSettings(window=window, sliding=sliding, fp16=fp16 and backend.fp16)


def case_settings(backend: Backend, settings: InferenceSettings) -> dict[str, Any]:
    """The settings stored in records and compared on resume."""
    return {"backend": backend.name, **settings.describe()}


def complete_record(layout: OutputLayout, case: Case, outputs: OutputOptions) -> CaseRecord | None:
    """The case's record when every output the run asks for exists intact under it, whatever
    model made it; else ``None``."""
    record = read_record(layout.record(case))
    if record is None or not outputs_intact(layout, record):
        return None
    if outputs.save_logits and "logits" not in record.outputs:
        return None
    if outputs.save_conf and record.confidence is None:
        return None
    return record


def case_status(
    layout: OutputLayout,
    case: Case,
    fingerprint: str,
    settings: dict[str, Any],
    outputs: OutputOptions,
) -> str:
    """``"todo"``, ``"done"`` or ``"stale"`` (complete, but made by another model/settings)."""
    record = complete_record(layout, case, outputs)
    if record is None:
        return "todo"
    recorded = {k: v for k, v in record.settings.items() if k != "device"}  # not in the numbers
    if record.model_fingerprint != fingerprint or recorded != settings:
        return "stale"
    return "done"


@dataclass
class LoadedCase:
    """A case read, reoriented and windowed, ready for the model."""

    case: Case
    voxels: np.ndarray  # (Z, Y, X) float32 in [0, 1], LPI
    geometry: Geometry
    source_orientation: str
    input_size: int
    input_mtime: float
    read_seconds: float


def load_case(case: Case, window: WindowSettings) -> LoadedCase:
    """Read, reorient to LPI and window one case. Raises CaseError for unusable images."""
    t0 = time.perf_counter()
    stat = case.path.stat()
    volume = read_volume(case.path)
    voxels = apply_window(volume.voxels, window)
    return LoadedCase(
        case=case,
        voxels=voxels,
        geometry=volume.geometry,
        source_orientation=volume.source_orientation,
        input_size=stat.st_size,
        input_mtime=stat.st_mtime,
        read_seconds=time.perf_counter() - t0,
    )


@dataclass
class InferredCase:
    """The model's results for a case, not yet published."""

    loaded: LoadedCase
    labels: LabelSink
    logits: LogitsSink | None
    confidence: ConfidenceSink | None
    stats: EngineStats
    infer_seconds: float


def infer_case(
    loaded: LoadedCase,
    backend: Backend,
    settings: InferenceSettings,
    layout: OutputLayout,
    outputs: OutputOptions,
) -> InferredCase:
    """Run the sliding window; logits stream into a temporary zarr array if requested."""
    t0 = time.perf_counter()
    labels = LabelSink()
    confidence = ConfidenceSink() if outputs.save_conf else None
    logits = None
    if outputs.save_logits:
        patch, stride = settings.sliding.resolved(loaded.voxels.shape)  # type: ignore[arg-type]
        logits = LogitsSink(
            layout.logits(loaded.case),
            attributes={
                **loaded.geometry.as_dict(),
                "orientation": "LPI",
                "axes": ["class", "z", "y", "x"],
                "source_file": loaded.case.filename,
                "window_level": settings.window.level,
                "window_width": settings.window.width,
                "patch_size": list(patch),
                "patch_stride": list(stride),
                "blend": settings.sliding.blend,
                "model_fingerprint": backend.fingerprint,
                "itk_infer_version": __version__,
            },
        )
    sinks = [s for s in (labels, logits, confidence) if s is not None]
    try:
        stats = run_sliding_window(loaded.voxels, backend, settings.sliding, sinks)
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    return InferredCase(loaded, labels, logits, confidence, stats, time.perf_counter() - t0)


def write_case(
    inferred: InferredCase,
    backend: Backend,
    settings: InferenceSettings,
    layout: OutputLayout,
) -> CaseRecord:
    """Publish the outputs atomically, then the record (last: it marks the case complete)."""
    t0 = time.perf_counter()
    loaded, case = inferred.loaded, inferred.loaded.case
    if inferred.labels.labels is None:
        raise RuntimeError("the engine produced no slab")  # cannot happen for a 3-D volume
    outputs = {"labels": layout.labels(case).name}
    sizes = {}
    try:
        sizes["labels"] = write_label_map(
            inferred.labels.labels, loaded.geometry, layout.labels(case)
        )
        if inferred.logits is not None:
            sizes["logits"] = inferred.logits.finish()
            outputs["logits"] = layout.logits(case).name
    except BaseException:
        if inferred.logits is not None:
            inferred.logits.abort()
        raise
    write_seconds = time.perf_counter() - t0
    record = CaseRecord(
        case=case.name,
        input_path=str(case.path.resolve()),
        input_size=loaded.input_size,
        input_mtime=loaded.input_mtime,
        model_fingerprint=backend.fingerprint,
        settings=case_settings(backend, settings),
        outputs=outputs,
        output_sizes=sizes,
        voxels_per_label={str(k): v for k, v in inferred.labels.voxel_counts().items()},
        timings_s={
            "read": round(loaded.read_seconds, 4),
            "infer": round(inferred.infer_seconds, 4),
            "forward": round(inferred.stats.forward_seconds, 4),
            "write": round(write_seconds, 4),
        },
        confidence=inferred.confidence.confidence if inferred.confidence else None,
        num_classes=inferred.stats.num_classes,
        source_orientation=loaded.source_orientation,
    )
    record.settings["device"] = str(backend.device)
    write_record(layout, case, record)
    return record


def predict_case(
    case: Case,
    backend: Backend,
    settings: InferenceSettings,
    layout: OutputLayout,
    outputs: OutputOptions | None = None,
) -> CaseRecord:
    """Run one case end to end and return its record.

    Args:
        case: the input image.
        backend: a loaded model (see :func:`itk_infer.load_backend`).
        settings: resolved window and sliding-window settings.
        layout: the output folder.
        outputs: optional outputs (logits, confidence); labels are always written.

    Raises:
        CaseError: the image cannot be used or the model fails on it.
    """
    outputs = outputs or OutputOptions()
    layout.folder.mkdir(parents=True, exist_ok=True)
    loaded = load_case(case, settings.window)
    inferred = infer_case(loaded, backend, settings, layout, outputs)
    return write_case(inferred, backend, settings, layout)
