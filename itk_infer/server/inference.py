"""The model behind the server: its label names, one inference at a time behind a bounded
queue, and the result file in the format and type the client asked for.

Each request runs :func:`itk_infer.pipeline.predict_case` (the same steps as the command
line) on the uploaded file, with a fresh output folder; the label map the core wrote is
then rewritten with SimpleITK in the requested extension and type, geometry unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from itk_infer.cases import Case, OutputLayout
from itk_infer.errors import CaseError, DiskFullError, is_disk_full
from itk_infer.pipeline import Model, predict_case
from itk_infer.server.imagecheck import SUFFIXES, BadUpload
from itk_infer.server.store import Entry, UploadStore

log = logging.getLogger(__name__)

RESULT_SUFFIXES = (".nii.gz", ".nrrd", ".mha", ".nii")
RESULT_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32")


class Busy(Exception):
    """The queue is full; ``retry_after`` seconds is the estimate of when it has room."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the server is busy")
        self.retry_after = retry_after


# --------------------------------------------------------------------------- label names


def declared_labels(model: Model) -> dict[str, int] | None:
    """The label names the model carries (``defaults.labels``, read once by the backend),
    background excluded; ``None`` when it names none."""
    labels = model.backend.defaults.labels or {}
    return {name: value for name, value in labels.items() if value > 0} or None


def label_names(model: Model) -> dict[str, int]:
    """``{name: value}`` of the model's labels, background excluded: the model's own names,
    else ``label_1 .. label_{C-1}`` (a single-channel sigmoid model has ``label_1``)."""
    return declared_labels(model) or generic_labels(model.backend.num_classes)


def generic_labels(classes: int | None) -> dict[str, int]:
    """``label_1 .. label_{C-1}`` for ``C`` classes (``None``, not known yet: two)."""
    classes = classes or 2
    count = 1 if classes == 1 else classes - 1
    return {f"label_{value}": value for value in range(1, count + 1)}


# --------------------------------------------------------------------------- queue


class InferenceGate:
    """At most one running request and ``queue_length`` waiting; more are refused with an
    estimate of the wait (the mean duration so far times the requests ahead)."""

    def __init__(self, queue_length: int) -> None:
        self.capacity = queue_length + 1
        self.pending = 0
        self.mean_seconds = 5.0  # until the first request is measured
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.pending >= self.capacity:
                raise Busy(max(1, math.ceil(self.mean_seconds * self.pending)))
            self.pending += 1

    def leave(self, seconds: float | None = None) -> None:
        with self._lock:
            self.pending -= 1
            if seconds is not None:
                self.mean_seconds = 0.7 * self.mean_seconds + 0.3 * seconds


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ResultOptions:
    """The client's ``result_extension``, ``result_dtype`` and ``result_compress``."""

    suffix: str = ".nii.gz"
    dtype: str | None = None  # None: the label map's own (uint8, uint16 above 256 classes)
    compress: bool = True

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ResultOptions:
        suffix = str(params.get("result_extension") or ".nii.gz").lower()
        if not suffix.startswith("."):
            suffix = "." + suffix
        if suffix not in RESULT_SUFFIXES:
            raise BadUpload(400, "result_extension must be one of " + ", ".join(RESULT_SUFFIXES))
        dtype = params.get("result_dtype") or None
        if dtype is not None and dtype not in RESULT_DTYPES:
            raise BadUpload(400, "result_dtype must be one of " + ", ".join(RESULT_DTYPES))
        return cls(suffix, dtype, bool(params.get("result_compress", True)))


@dataclass
class InferResult:
    """A result file in its private folder; the caller removes the folder once sent."""

    folder: Path
    path: Path
    params: dict[str, Any]


def write_result(label_file: Path, max_label: int, options: ResultOptions,
                 folder: Path) -> tuple[Path, str]:
    """The label map the core wrote, as ``options`` ask: same voxels and geometry. Returns
    the new file and its voxel type."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(label_file))
    array = sitk.GetArrayViewFromImage(image)
    dtype = np.dtype(options.dtype or array.dtype)
    if np.issubdtype(dtype, np.integer) and max_label > np.iinfo(dtype).max:
        raise BadUpload(400, f"result_dtype {dtype} cannot hold label {max_label}")
    result = sitk.GetImageFromArray(np.asarray(array).astype(dtype, copy=False))
    result.CopyInformation(image)  # geometry only: no metadata dictionary carried over
    path = folder / f"{uuid.uuid4().hex}{options.suffix}"
    sitk.WriteImage(result, str(path), useCompression=options.compress)
    return path, str(dtype)


def scrub(message: str, entry: Entry, store: UploadStore) -> str:
    """A core error message without server paths or scratch names."""
    message = message.replace(str(store.root), "<scratch>").replace(entry.path.name, "image")
    return re.sub(r"/[^\s'\"]*", "<path>", message)


class InferenceService:
    """The loaded model, serving one request at a time on its own thread."""

    def __init__(self, model: Model, name: str, store: UploadStore, queue_length: int) -> None:
        self.model = model
        self.name = name
        self.store = store
        self._declared = declared_labels(model)
        # A model with a dynamic class count tells it with its first answer.
        self._classes = model.backend.num_classes
        self.gate = InferenceGate(queue_length)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="itk_infer-model")

    @property
    def labels(self) -> dict[str, int]:
        """``{name: value}`` of the model's labels, background excluded."""
        return self._declared or generic_labels(self._classes)

    async def infer(self, entry: Entry, options: ResultOptions) -> InferResult:
        """Run the model on ``entry`` (pinned by the caller).

        Raises:
            Busy: the queue is full. CaseError: the image cannot be used (message scrubbed).
        """
        self.gate.enter()
        queued = time.perf_counter()
        seconds = None
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, self._run, entry, options,
                                                queued)
            seconds = result.params["latencies"]["total"] - result.params["latencies"]["queue"]
            return result
        finally:
            self.gate.leave(seconds)

    def _run(self, entry: Entry, options: ResultOptions, queued: float) -> InferResult:
        started = time.perf_counter()
        folder = self.store.work_folder()
        try:
            case = Case(entry.path.name[: -len(_suffix(entry.path))], entry.path)
            done = predict_case(case, self.model, OutputLayout(folder), keep_arrays=True)
            t0 = time.perf_counter()
            max_label = int(done.labels.max()) if done.labels is not None else 0
            path, dtype = write_result(OutputLayout(folder).labels(case), max_label, options,
                                       folder)
        except CaseError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise CaseError(scrub(str(error), entry, self.store)) from None
        except BaseException as error:
            shutil.rmtree(folder, ignore_errors=True)
            if is_disk_full(error):
                raise DiskFullError("no space left in the scratch folder") from None
            raise
        finished = time.perf_counter()
        record = done.record
        if record is not None and record.num_classes:
            self._classes = record.num_classes
        timings = dict(record.timings_s) if record is not None else {}
        params = {
            "label_names": self.labels,
            "model": self.name,
            "result_extension": options.suffix,
            "result_dtype": dtype,
            "source_orientation": record.source_orientation if record is not None else "",
            "voxels_per_label": dict(record.voxels_per_label) if record is not None else {},
            "latencies": {"queue": round(started - queued, 4), **timings,
                          "result": round(finished - t0, 4),
                          "total": round(finished - queued, 4)},
        }
        return InferResult(folder, path, params)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next(s for s in SUFFIXES if name.endswith(s))
