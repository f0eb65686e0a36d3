"""One case, step by step: read → reorient (LPI) → window → sliding window → sinks → atomic
writes → record. The only module that knows the order of the steps, and the home of the
public per-case API: :func:`load_model` once, then :func:`predict_case` per case (or the
pipelined loop of :mod:`itk_infer.caseloop`, which runs the same three steps)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itk_infer import __version__
from itk_infer.backends import load_backend
from itk_infer.backends.base import Backend, display_names
from itk_infer.cases import Case, OutputLayout, input_stamp
from itk_infer.config import InferenceSettings, OutputOptions, Settings, Triple, as_triple
from itk_infer.dicom.seg import segment_names, write_seg
from itk_infer.dicom.series import read_series
from itk_infer.engine import Attempt, EngineStats, fallback_attempts, is_out_of_memory, slide
from itk_infer.errors import CaseError, ModelError, UsageError
from itk_infer.imageio import (
    MODEL_ORIENTATION,
    Geometry,
    Volume,
    read_volume,
    reorient,
    write_label_map,
)
from itk_infer.inputspace import HoldLogits, slabs, to_input_grid
from itk_infer.integrity import check_input
from itk_infer.records import (
    CaseOutcome,
    CaseRecord,
    complete_record,
    label_summary,
    record_status,
    write_record,
)
from itk_infer.resample import BackToInputGrid, grid_spacing, needs_resampling, to_model_grid
from itk_infer.sinks import ConfidenceSink, LabelSink, LogitsSink
from itk_infer.startup import claim_result, file_key
from itk_infer.tta import mirrored
from itk_infer.window import apply_window

log = logging.getLogger(__name__)


def resolve_inference_settings(settings: Settings, backend: Backend) -> InferenceSettings:
    """Merge the user's values over the model's defaults, field by field.

    Patch size: ``--patch-size``, else ``inference_config.patch_size``, else the model's static
    input shape. Stride: ``--patch-stride``, else ``inference_config.patch_stride``, else half
    the patch. Window: ``--wl``/``--ww``, else the model's ``window_level``/``window_width``.
    ``--fp16`` holds only where the backend runs in half precision (CUDA).

    Raises:
        UsageError: no window anywhere.
        ModelError: a model default that breaks the schema's checks (a stride larger than
            the patch, say), or a patch that contradicts the model's static input shape.
    """
    defaults = backend.defaults
    config = dict(defaults.inference_config)
    source = f"{backend.name} model"
    level = settings.window_level if settings.window_level is not None else defaults.window_level
    width = settings.window_width if settings.window_width is not None else defaults.window_width
    if level is None or width is None:
        raise UsageError(
            f"The {source} carries no intensity window (window_level/window_width): "
            "this model requires --wl/--ww"
        )
    try:
        config_patch = as_triple(config.get("patch_size"), "inference_config.patch_size")
        config_stride = as_triple(config.get("patch_stride"), "inference_config.patch_stride")
        resolved = settings.replace(
            window_level=float(level),
            window_width=float(width),
            patch_size=settings.patch_size or config_patch or backend.static_patch_size,
            patch_stride=settings.patch_stride or config_stride,
            fp16=settings.fp16 and backend.fp16,
            tta=settings.tta or bool(config.get("tta", False)),
            spacing=settings.spacing or defaults.spacing,
        )
    except UsageError as error:
        raise ModelError(f"{source}: {error}") from None
    patch = resolved.patch_size
    if backend.static_patch_size and patch and tuple(patch) != tuple(backend.static_patch_size):
        raise ModelError(
            f"patch size {list(patch)} differs from the model's static input shape "
            f"{list(backend.static_patch_size)}"
        )
    return InferenceSettings(
        resolved,
        batch_size=backend.static_batch_size or int(config.get("forward_batch_windows") or 1),
        accumulate_device=config.get("accumulate_device"),
    )


@dataclass
class Model:
    """A loaded model and the settings resolved against its defaults: what a face loads once
    and keeps warm for all its cases."""

    backend: Backend
    inference: InferenceSettings
    cpu_backend: Backend | None = None  # loaded at the first case that needs the CPU fallback

    @property
    def fingerprint(self) -> str:
        return self.backend.fingerprint

    def describe(self) -> dict[str, Any]:
        """The settings stored in records and compared on resume."""
        return self.inference.describe()

    def run(self, voxels: np.ndarray, sinks: list[Any], attempt: Attempt | None = None
            ) -> EngineStats:
        """The sliding window over ``voxels`` with this model (mirrored with ``--tta``);
        ``attempt``: a fallback after an out-of-memory error (see :func:`infer_case`)."""
        backend, inference = self.backend, self.inference
        sliding = inference.sliding if attempt is None else attempt.sliding
        if attempt is not None and attempt.on_cpu:
            if self.cpu_backend is None:
                self.cpu_backend = load_backend(inference.settings, torch.device("cpu"))
            backend = self.cpu_backend
        predict = backend.forward
        if inference.settings.tta:
            predict = mirrored(predict, static_batch=backend.static_batch_size is not None)
        return slide(voxels, predict, sliding, sinks, device=backend.device,
                     static_batch_size=backend.static_batch_size,
                     num_classes_hint=backend.num_classes)


def load_model(
    settings: Settings, device: torch.device, *, intra_op_threads: int | None = None
) -> Model:
    """Load the model ``settings`` name onto ``device`` and resolve the settings against it.

    Raises:
        UsageError: model files not named, or no intensity window anywhere.
        ModelError: the model cannot be loaded or does not fit the tool's contract.
    """
    settings.require_model()
    backend = load_backend(settings, device, fp16=settings.fp16,
                           intra_op_threads=intra_op_threads)
    return Model(backend, resolve_inference_settings(settings, backend))


def case_status(layout: OutputLayout, case: Case, model: Model, outputs: OutputOptions) -> str:
    """``"todo"``, ``"done"`` or ``"stale"`` (complete, but made by another model/settings)."""
    return record_status(complete_record(layout, case, outputs), model.fingerprint,
                         model.describe())


@dataclass
class LoadedCase:
    """A case read, reoriented and windowed, ready for the model."""

    case: Case
    voxels: np.ndarray  # (Z, Y, X) float32 in [0, 1], LPI, on the model's grid
    geometry: Geometry  # of the input's LPI grid, where the outputs go
    source_orientation: str
    input_size: int
    input_mtime: float
    read_seconds: float
    # With a model spacing: the input's LPI shape and spacing (Z, Y, X) the outputs go back to.
    input_grid: tuple[Triple, tuple[float, float, float]] | None = None
    obliquity_deg: float = 0.0
    grid: str = "lpi"  # "lpi" (axes permuted/flipped) or "lpi-resampled" (an oblique input)
    source_geometry: Geometry | None = None  # the input file's own grid and array shape
    source_shape: Triple | None = None


def load_case(case: Case, inference: InferenceSettings) -> LoadedCase:
    """Read, reorient to LPI and window one case. Raises CaseError for unusable images."""
    t0 = time.perf_counter()
    size, mtime = input_stamp(case)
    if case.files:  # a DICOM series (pydicom checks each file as it parses it)
        volume = read_series(case.files, case.name)
    else:
        volume = _read_checked(case.path, _resamples_oblique(inference.settings))
    _warn_oblique(case, volume.obliquity_deg, volume.grid, inference.settings.oblique_warn_deg)
    geometry, orientation = volume.geometry, volume.source_orientation
    voxels = apply_window(volume.voxels, inference.window)
    _check_finite(case, volume.voxels, voxels, inference.settings.nonfinite)
    where = {"obliquity_deg": volume.obliquity_deg, "grid": volume.grid,
             "source_geometry": volume.source_geometry, "source_shape": volume.source_shape}
    del volume
    spacing = tuple(reversed(geometry.spacing_mm))
    model_spacing, input_grid = inference.settings.spacing, None
    if needs_resampling(spacing, model_spacing):
        input_grid = (voxels.shape, spacing)
        voxels = to_model_grid(voxels, spacing, model_spacing)  # type: ignore[arg-type]
    return LoadedCase(
        case=case,
        voxels=voxels,
        geometry=geometry,
        source_orientation=orientation,
        input_size=size,
        input_mtime=mtime,
        read_seconds=time.perf_counter() - t0,
        input_grid=input_grid,  # type: ignore[arg-type]
        **where,
    )


def _read_checked(path: Path, resample_oblique: bool) -> Volume:
    """``check_input`` then ``read_volume``, or that same read done while the command started
    (:mod:`itk_infer.warmstart`) if the file is unchanged since."""
    volume = claim_result(file_key("volume", path, resample_oblique))
    if volume is not None:
        return volume
    check_input(path)  # in the reader thread: overlapped with the model's work
    return read_volume(path, resample_oblique=resample_oblique)


def _resamples_oblique(settings: Settings) -> bool:
    """Oblique inputs go onto an axis-aligned LPI grid with --resample-oblique, and always
    with a model spacing (its grid is then axis-aligned millimetres, not tilted voxels)."""
    return settings.resample_oblique or settings.spacing is not None


def _warn_oblique(case: Case, angle: float, grid: str, threshold: float) -> None:
    if angle <= threshold:
        return
    if grid == "lpi-resampled":
        log.warning("%s: axes %.2f deg oblique; resampled onto an axis-aligned LPI grid",
                    case.filename, angle)
    else:
        log.warning("%s: axes %.2f deg oblique; the outputs keep its tilted direction with the "
                    "axes in the nearest LPI order (--resample-oblique for an axis-aligned grid)",
                    case.filename, angle)


def _check_finite(case: Case, raw: np.ndarray, windowed: np.ndarray, policy: str) -> None:
    """Apply ``--nonfinite`` to a case's voxels. Windowing already maps +-inf to the window's
    ends; NaN would pass through it into the logits, so it is refused or set to the low end."""
    if not np.issubdtype(raw.dtype, np.floating):
        return  # integer images cannot hold NaN or inf
    bad = ~np.isfinite(raw)
    count = int(np.count_nonzero(bad))
    if count == 0:
        return
    if policy == "fail":
        raise CaseError(f"{case.filename}: {count} voxel(s) are NaN or infinite "
                        "(--nonfinite replace to set them to the window's ends)")
    np.nan_to_num(windowed, copy=False, nan=0.0)
    log.warning("%s: %d NaN or infinite voxel(s) replaced by the window's ends", case.filename,
                count)


@dataclass
class InferredCase:
    """The model's results for a case, not yet published."""

    loaded: LoadedCase
    labels: LabelSink
    logits: LogitsSink | None
    confidence: ConfidenceSink | None
    stats: EngineStats
    infer_seconds: float
    held: HoldLogits | None = None  # the LPI logits, for outputs moved onto the input's grid
    fallback: list[str] = field(default_factory=list)  # what ran after out-of-memory errors


def infer_case(
    loaded: LoadedCase, model: Model, layout: OutputLayout, outputs: OutputOptions
) -> InferredCase:
    """Run the sliding window; logits stream into a temporary zarr array if requested."""
    t0 = time.perf_counter()
    backend, inference = model.backend, model.inference
    attempts = fallback_attempts(inference.sliding, backend.device, backend.static_batch_size,
                                 inference.settings.cpu_fallback)
    done: list[str] = []
    for number, attempt in enumerate(attempts):
        labels, logits, held, confidence = _case_sinks(loaded, model, layout, outputs)
        sinks = [s for s in (labels, logits, held, confidence) if s is not None]
        engine_sinks: list[Any] = sinks
        if loaded.input_grid is not None:
            shape, spacing = loaded.input_grid
            real = grid_spacing(shape, spacing, inference.settings.spacing)  # type: ignore[arg-type]
            engine_sinks = [BackToInputGrid(sinks, shape, spacing, real)]
        try:
            stats = model.run(loaded.voxels, engine_sinks, attempt if number else None)
        except BaseException as error:
            for sink in sinks:
                sink.abort()
            if not is_out_of_memory(error) or number + 1 == len(attempts):
                raise
            _release_device_memory(backend.device)
            log.warning("%s: out of memory (%s); retrying: %s", loaded.case.filename,
                        type(error).__name__, attempts[number + 1].label)
            continue
        done = [a.label for a in attempts[1 : number + 1]]
        break
    return InferredCase(loaded, labels, logits, confidence, stats, time.perf_counter() - t0,
                        held, done)


def _case_sinks(loaded: LoadedCase, model: Model, layout: OutputLayout, outputs: OutputOptions
                ) -> tuple[LabelSink, LogitsSink | None, HoldLogits | None,
                           ConfidenceSink | None]:
    """Fresh sinks for one pass of the model over a case."""
    labels = LabelSink()
    confidence = ConfidenceSink() if outputs.save_conf else None
    logits, held = None, None
    if _holds_logits(loaded, model, outputs):
        held = HoldLogits(save=outputs.save_logits, spill_dir=layout.folder)
    elif outputs.save_logits:
        logits = LogitsSink(layout.logits(loaded.case), _logits_attributes(loaded, model))
    return labels, logits, held, confidence


def _release_device_memory(device: torch.device) -> None:
    """Hand the cached blocks of a failed pass back before the next try."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _holds_logits(loaded: LoadedCase, model: Model, outputs: OutputOptions) -> bool:
    """--output-space input needs the logits moved: saved ones of an input not in LPI order,
    and all of a resampled oblique input (its labels come from them)."""
    if model.inference.settings.output_space != "input" or loaded.source_geometry is None:
        return False
    if loaded.grid == "lpi-resampled":
        return True
    return outputs.save_logits and loaded.source_orientation != MODEL_ORIENTATION


def _logits_attributes(loaded: LoadedCase, model: Model) -> dict[str, Any]:
    """What the zarr array says about itself: its grid and how it was made."""
    inference = model.inference
    patch, stride = inference.sliding.resolved(loaded.voxels.shape)  # type: ignore[arg-type]
    # The default LPI grid keeps its attributes as they were (no "grid" key): same bytes.
    name = _grid_name(loaded, model)
    grid = {} if name == "lpi" else {"grid": name,
                                     "obliquity_deg": round(loaded.obliquity_deg, 6)}
    return {
        **loaded.geometry.as_dict(),
        "orientation": "LPI",
        **grid,
        "axes": ["class", "z", "y", "x"],
        "source_file": loaded.case.filename,
        "window_level": inference.window.level,
        "window_width": inference.window.width,
        "patch_size": list(patch),
        "patch_stride": list(stride),
        "blend": inference.sliding.blend,
        "model_fingerprint": model.fingerprint,
        "itk_infer_version": __version__,
        # The array is on the input's LPI grid; the model ran at this spacing.
        **({"model_spacing_zyx": list(grid_spacing(*loaded.input_grid,  # type: ignore[arg-type]
                                                   inference.settings.spacing))}
           if loaded.input_grid is not None else {}),
    }


@dataclass
class CaseResult:
    """What happened to one case: the face-neutral answer of the per-case API.

    ``record`` is set for a done case. ``labels`` (the LPI label map), ``image`` (the windowed
    LPI input) and ``spacing_zyx`` are set only when the caller asked to keep the arrays
    (previews, the inference server); otherwise they are dropped as soon as written.
    """

    case: Case
    status: str  # "done", "skipped" or "failed"
    reason: str = ""
    seconds: float = 0.0
    record: CaseRecord | None = None
    labels: np.ndarray | None = None
    image: np.ndarray | None = None
    spacing_zyx: tuple[float, float, float] | None = None

    def outcome(self) -> CaseOutcome:
        """The summary line of this case (what crosses process boundaries)."""
        confidence = self.record.confidence if self.record is not None else None
        return CaseOutcome(self.case.name, self.status, reason=self.reason,
                           seconds=self.seconds, confidence=confidence)


def write_case(inferred: InferredCase, model: Model, layout: OutputLayout) -> CaseRecord:
    """Publish the outputs atomically, then the record (last: it marks the case complete)."""
    t0 = time.perf_counter()
    loaded, case = inferred.loaded, inferred.loaded.case
    if inferred.labels.labels is None:
        raise RuntimeError("the engine produced no slab")  # cannot happen for a 3-D volume
    outputs = {"labels": layout.labels(case).name}
    sizes = {}
    try:
        space = model.inference.settings.output_space
        if inferred.held is not None:  # --output-space input, logits moved first
            _write_input_space(inferred, model, layout, outputs, sizes)
        elif case.files:  # a DICOM series: a DICOM-SEG on the series' own grid
            sizes["labels"] = write_seg(
                inferred.labels.labels, loaded.geometry, case.files, layout.labels(case),
                names=segment_names(model.backend.defaults.labels,
                                    inferred.stats.num_classes),
                fingerprint=model.fingerprint, label=case.name)
        else:
            sizes["labels"] = write_label_map(
                inferred.labels.labels, loaded.geometry, layout.labels(case),
                loaded.source_orientation if space == "input" else MODEL_ORIENTATION,
            )
        if inferred.logits is not None:
            sizes["logits"] = inferred.logits.finish()
            outputs["logits"] = layout.logits(case).name
    except BaseException:
        if inferred.logits is not None:
            inferred.logits.abort()
        raise
    counts = inferred.labels.voxel_counts()
    volumes_ml, confidence_by_label = _label_fields(inferred, model, counts)
    record = CaseRecord(
        case=case.name,
        input_path=str(case.path.resolve()),
        input_size=loaded.input_size,
        input_mtime=loaded.input_mtime,
        model_fingerprint=model.fingerprint,
        settings={**model.describe(), "device": str(model.backend.device)},
        outputs=outputs,
        output_sizes=sizes,
        voxels_per_label={str(k): v for k, v in counts.items()},
        timings_s={
            "read": round(loaded.read_seconds, 4),
            "infer": round(inferred.infer_seconds, 4),
            "forward": round(inferred.stats.forward_seconds, 4),
            "write": round(time.perf_counter() - t0, 4),
        },
        confidence=inferred.confidence.confidence if inferred.confidence else None,
        num_classes=inferred.stats.num_classes,
        source_orientation=loaded.source_orientation,
        obliquity_deg=round(loaded.obliquity_deg, 6),
        grid=_grid_name(loaded, model),
        fallback=list(inferred.fallback),
        volumes_ml=volumes_ml,
        confidence_by_label=confidence_by_label,
    )
    write_record(layout, case, record)
    return record


def _label_fields(inferred: InferredCase, model: Model, counts: dict[int, int]
                  ) -> tuple[dict[str, float], dict[str, float | None]]:
    """Per-label volumes (mL) and confidences by name. Counts are of the label array written
    (``loaded.geometry``'s grid; reorienting to the input's axes keeps counts and volume)."""
    classes = inferred.stats.num_classes
    values = set(range(max(classes, 2))) | set(counts)  # one channel: 0 and 1
    names = display_names(model.backend.defaults.labels, values)
    voxel_mm3 = float(np.prod(inferred.loaded.geometry.spacing_mm))
    conf = inferred.confidence.confidence_by_value() if inferred.confidence else None
    return label_summary(counts, voxel_mm3, names, conf)


def _grid_name(loaded: LoadedCase, model: Model) -> str:
    """Where the outputs are: "lpi", "lpi-resampled" or "input" (the input file's grid)."""
    if model.inference.settings.output_space == "input" and not loaded.case.files:
        return "input"
    return loaded.grid


def _write_input_space(inferred: InferredCase, model: Model, layout: OutputLayout,
                       outputs: dict[str, str], sizes: dict[str, int]) -> None:
    """Labels (and logits) of --output-space input from the held LPI logits: reoriented, or
    resampled linearly for a resampled oblique input, then the argmax (see inputspace)."""
    loaded, case, held = inferred.loaded, inferred.loaded.case, inferred.held
    assert held is not None and loaded.source_geometry is not None
    assert loaded.source_shape is not None
    resampled, save = loaded.grid == "lpi-resampled", held.save
    logits, labels = to_input_grid(held, loaded.geometry, loaded.source_geometry,
                                   loaded.source_shape, loaded.source_orientation, resampled)
    if not resampled:  # the engine's float32 argmax, reoriented exactly like the logits
        assert inferred.labels.labels is not None
        labels = reorient(inferred.labels.labels, loaded.geometry, loaded.source_orientation)
    inferred.labels.labels = labels  # the record's counts are of the written map
    sizes["labels"] = write_label_map(labels, loaded.source_geometry, layout.labels(case), None)
    if not save:
        return
    # _logits_attributes already names the grid ("input") and the obliquity.
    attributes = {**_logits_attributes(loaded, model), **loaded.source_geometry.as_dict(),
                  "orientation": loaded.source_orientation}
    sink = LogitsSink(layout.logits(case), attributes)
    sink.begin(logits.shape[0], loaded.source_shape)
    try:
        for slab in slabs(logits, labels):
            sink.consume(slab)
        sizes["logits"] = sink.finish()
    except BaseException:
        sink.abort()
        raise
    outputs["logits"] = layout.logits(case).name


def done_result(inferred: InferredCase, record: CaseRecord, started: float,
                keep_arrays: bool) -> CaseResult:
    """The result of a case whose outputs are published."""
    loaded = inferred.loaded
    result = CaseResult(loaded.case, "done", seconds=time.perf_counter() - started,
                        record=record)
    if keep_arrays:
        result.labels = inferred.labels.labels
        # The windowed input, when the model ran on its grid (not a resampled copy) and the
        # labels are on it too (not moved to the input's grid, see _write_input_space).
        same = loaded.input_grid is None and inferred.held is None
        result.image = loaded.voxels if same else None
        result.spacing_zyx = tuple(reversed(loaded.geometry.spacing_mm))  # type: ignore[assignment]
    return result


def predict_case(
    case: Case,
    model: Model,
    layout: OutputLayout,
    outputs: OutputOptions | None = None,
    *,
    keep_arrays: bool = False,
) -> CaseResult:
    """Run one case end to end: read, infer, publish its outputs and record.

    Args:
        case: the input image.
        model: a loaded model (see :func:`load_model`).
        layout: the output folder.
        outputs: optional outputs (logits, confidence); labels are always written.
        keep_arrays: return the label map and the windowed input in the result.

    Raises:
        CaseError: the image cannot be used or the model fails on it.
    """
    started = time.perf_counter()
    outputs = outputs or OutputOptions()
    layout.folder.mkdir(parents=True, exist_ok=True)
    loaded = load_case(case, model.inference)
    inferred = infer_case(loaded, model, layout, outputs)
    record = write_case(inferred, model, layout)
    return done_result(inferred, record, started, keep_arrays)
