"""Warm start: the first model forwards of a one-process ONNX run on the CPU start while torch
is still importing.

``import torch`` costs about 2 s of one core, and the engine, the sinks and the runner need
it; onnxruntime, SimpleITK and numpy do not, and the model's forwards are most of a run. So
the command calls :func:`begin` before it imports the runner, which starts one thread that

1. opens the ONNX session exactly as :class:`~itk_infer.backends.onnx.OnnxBackend` opens it
   on the CPU, and offers it to the backend, which adopts it instead of opening the file;
2. checks and reads the first case the run will take and offers that read to
   ``pipeline.load_case`` (which takes it instead of reading the file again, if unchanged);
3. windows it, cuts it into the engine's first batches of windows (as ``engine.slide`` does)
   and runs them through that session, keeping inputs and outputs (one case at most, and at
   most ``MAX_BYTES``).

When the engine then hands the backend a batch, the backend uses a kept output only if the
batch is bit for bit the kept input; at the first difference (another first case, a setting
resolved otherwise than here) all kept outputs are dropped and the model runs as usual. An
output is what the same session gives for the same input, so the results do not change
(tests/cli/test_startup.py checks the demo's golden digests through a warm start). Nothing
more is run ahead once the engine has asked for its first batch.

Only where it can pay: backend ``onnx`` on the CPU (``--device cpu``, or ``auto`` with an
onnxruntime that has no CUDA provider), one process running the cases, no TTA, no model
spacing, and torch not yet imported (a process that has it, such as a test or a Dagster run,
gains nothing). That process is the command itself with ``--in-process``, or else the one
worker the command starts early (:mod:`itk_infer.prestart`), where the thread runs while the
worker imports torch: there the session gets the worker's thread count and the first case
is the one the pool hands out first (the largest input).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

from itk_infer.config import Settings, SlidingWindowSettings, WindowSettings, as_triple
from itk_infer.errors import ItkInferError
from itk_infer.startup import file_key, model_key, note_first_forward, offer, withdraw

if TYPE_CHECKING:  # numpy and the backend load in the thread, not on the command's path
    import numpy as np

    from itk_infer.backends.onnx import PreparedSession
    from itk_infer.cases import Case
    from itk_infer.imageio import Volume

log = logging.getLogger(__name__)

# Outputs kept ahead of the engine: beyond this the thread stops (the engine catches up).
MAX_BYTES = 512 << 20


class RunAhead:
    """Batches run ahead of the engine: the thread :meth:`run` s them, the backend
    :meth:`take` s them in order (see :class:`itk_infer.backends.onnx.Prefetched`)."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self._cond = threading.Condition()
        self._kept: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._stopped = False  # set by the engine's first batch, or by close()
        self._busy = False  # a forward is running
        self._bytes = 0
        self._max_bytes = max_bytes
        self.ran = 0
        self.used = 0

    def run(self, forward: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> bool:
        """Run ``forward(x)`` and keep the result, unless stopped or full; False then."""
        with self._cond:
            if self._stopped or self._bytes >= self._max_bytes:
                return False
            self._busy = True
        y = None
        try:
            note_first_forward("onnx, warm start")
            y = forward(x)
        finally:
            with self._cond:
                self._busy = False
                if y is not None and not self._stopped:
                    self._kept.append((x, y))
                    self._bytes += x.nbytes + y.nbytes
                    self.ran += 1
                self._cond.notify_all()
        return True

    def take(self, x: np.ndarray) -> np.ndarray | None:
        """The kept output for ``x`` if ``x`` is bit for bit the next kept input, else None
        (and None ever after). Stops the thread's work; waits for a forward in flight."""
        with self._cond:
            self._stopped = True
            while self._busy:
                self._cond.wait()
            if not self._kept:
                return None
            kept_x, y = self._kept.popleft()
        if same_bits(kept_x, x):
            self.used += 1
            if not self._kept:
                log.debug("warm start: %d of %d batch(es) run ahead used", self.used, self.ran)
            return y
        log.debug("warm start: batch %d differs from the one run ahead; %d output(s) dropped",
                  self.used + 1, len(self._kept) + 1)
        self.close()
        return None

    def close(self) -> None:
        """Stop and drop everything kept."""
        with self._cond:
            self._stopped = True
            self._kept.clear()
            self._bytes = 0


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (so -0.0 differs from 0.0 and NaN equals itself)."""
    import numpy as np

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def eligible(settings: Settings, in_worker: bool = False) -> bool:
    """Whether a warm start can pay for ``settings`` (the module's last paragraph), in the
    command's process or (``in_worker``) in the run's one worker process."""
    return (
        "torch" not in sys.modules
        and settings.backend == "onnx"
        and settings.onnx_path is not None
        and settings.input_folder is not None
        and settings.output_folder is not None
        and settings.device in ("cpu", "auto")
        and settings.num_proc == 1
        # The cases run in this process: the command's, or the worker's.
        and (settings.cases_in_process or in_worker)
        and not settings.tta
        and not settings.spacing
    )


class WarmStart:
    """The start-up thread (see the module docstring); :meth:`close` when the run ends.

    ``intra_op_threads``: the session's thread count, as the backend will ask for it;
    ``largest_first``: the run takes its cases in the worker pool's order."""

    def __init__(self, settings: Settings, intra_op_threads: int | None = None,
                 largest_first: bool = False) -> None:
        self.settings = settings
        self.intra_op_threads = intra_op_threads
        self.largest_first = largest_first
        self.ahead = RunAhead()
        self.prepared: Future[PreparedSession | None] = Future()
        self.offered = [model_key("onnx", settings.onnx_path)]  # type: ignore[arg-type]
        offer(self.offered[0], self.prepared)
        # numpy first, on this thread: both threads import it next (onnxruntime there; torch,
        # SimpleITK here), and two threads importing numpy at once can meet in its internal
        # circular import and get it half initialised (seen as an ImportError).
        import numpy  # noqa: F401

        self.thread = threading.Thread(target=self._work, name="itk-warm-start", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop running ahead, wait for the thread (at most one forward or the read) and
        drop what nobody took."""
        self.ahead.close()
        self.thread.join()
        withdraw(self.offered)

    def _work(self) -> None:
        try:
            prepared = self._open()
        except BaseException as error:  # the backend opens the model again and reports it
            self.prepared.set_exception(error)
            return
        self.prepared.set_result(prepared)
        if prepared is None:
            return
        try:
            self._run_ahead(prepared)
        except (ItkInferError, OSError, RuntimeError, ValueError) as error:
            # The run reads the case itself and reports what is wrong with it.
            log.debug("warm start: nothing run ahead (%s)", error)

    def _open(self) -> PreparedSession | None:
        import onnxruntime as ort

        from itk_infer.backends.onnx import PreparedSession

        if self.settings.device == "auto" and (
                "CUDAExecutionProvider" in ort.get_available_providers()):
            return None  # the model may well run on a GPU
        prepared = PreparedSession(Path(self.settings.onnx_path),  # type: ignore[arg-type]
                                   self.intra_op_threads)
        prepared.prefetched = self.ahead
        return prepared

    def _run_ahead(self, prepared: PreparedSession) -> None:
        plan = resolve(self.settings, prepared)
        if plan is None:
            return
        window, sliding, pad_batches = plan
        case = first_case(self.settings, self.largest_first)
        if case is None or case.files:  # nothing to run, or a DICOM series
            return
        voxels = windowed(self._read(case), window)
        if voxels is None:
            return
        session, names = prepared.session, [prepared.output_name]

        def forward(x: np.ndarray) -> np.ndarray:
            return session.run(names, {prepared.input_name: x})[0]

        for x in batches(voxels, sliding, pad_batches):
            if not self.ahead.run(forward, x.astype(prepared.input_dtype, copy=False)):
                break

    def _read(self, case: Case) -> Volume:
        """``check_input`` and ``read_volume`` as ``pipeline.load_case`` calls them (no model
        spacing here), offered to it."""
        from itk_infer.imageio import read_volume
        from itk_infer.integrity import check_input

        resample_oblique = self.settings.resample_oblique
        key = file_key("volume", case.path, resample_oblique)
        if key is None:
            raise OSError(f"cannot stat {case.path}")
        read: Future[Volume] = Future()
        self.offered.append(key)
        offer(key, read)
        try:
            check_input(case.path)
            volume = read_volume(case.path, resample_oblique=resample_oblique)
        except BaseException as error:
            read.set_exception(error)
            raise
        read.set_result(volume)
        return volume


def begin(settings: Settings) -> WarmStart | None:
    """Start a warm start for ``settings`` in the command's process if it can pay (see the
    module docstring)."""
    return WarmStart(settings) if eligible(settings) else None


def begin_in_worker(settings: Settings, intra_op_threads: int | None) -> WarmStart | None:
    """Start a warm start in the run's one worker process, before it imports torch."""
    if not eligible(settings, in_worker=True):
        return None
    return WarmStart(settings, intra_op_threads, largest_first=True)


def resolve(settings: Settings, prepared: PreparedSession
            ) -> tuple[WindowSettings, SlidingWindowSettings, bool] | None:
    """Window, sliding-window settings and whether short batches are filled up, as the run
    will resolve them against the model (``pipeline.resolve_inference_settings``); None where
    this cannot run ahead (no window, model spacing or TTA) or a value does not parse."""
    defaults, config = prepared.defaults, prepared.defaults.inference_config
    level = settings.window_level if settings.window_level is not None else defaults.window_level
    width = settings.window_width if settings.window_width is not None else defaults.window_width
    if level is None or width is None or defaults.spacing or config.get("tta"):
        return None
    try:
        patch = (settings.patch_size or as_triple(config.get("patch_size"), "patch_size")
                 or prepared.static_patch_size)
        stride = settings.patch_stride or as_triple(config.get("patch_stride"), "patch_stride")
        batch = prepared.static_batch_size or int(config.get("forward_batch_windows") or 1)
    except (ItkInferError, TypeError, ValueError):
        return None
    sliding = SlidingWindowSettings(patch, stride, batch, settings.blend)
    pad_batches = prepared.static_batch_size is not None  # the engine's rule on the CPU
    return WindowSettings(float(level), float(width)), sliding, pad_batches


def first_case(settings: Settings, by_size: bool = False) -> Case | None:
    """The case the run takes first: the first one found without a record (any, with
    ``--overwrite``); with ``by_size``, the largest of those (the worker pool's order)."""
    from itk_infer.cases import OutputLayout, discover_cases, largest_first

    layout = OutputLayout(Path(settings.output_folder))  # type: ignore[arg-type]
    todo = (case for case in discover_cases(Path(settings.input_folder))  # type: ignore[arg-type]
            if settings.overwrite or not layout.record(case).exists())
    if by_size:
        return min(todo, key=largest_first, default=None)
    return next(todo, None)


def windowed(volume: Volume, window: WindowSettings) -> np.ndarray | None:
    """The volume windowed as the run does; None if it holds NaN or inf (the run's
    ``--nonfinite`` policy decides about those)."""
    import numpy as np

    from itk_infer.window import apply_window

    raw = volume.voxels
    if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
        return None
    return apply_window(raw, window)


def batches(volume: np.ndarray, sliding: SlidingWindowSettings,
            pad_batches: bool) -> Iterator[np.ndarray]:
    """(N, 1, pz, py, px) float32 batches in the engine's order: the volume padded by edge
    replication, windows row by row (same Z start), ``sliding.batch_size`` at a time, a short
    last batch of a row filled up with copies of its last window when ``pad_batches``."""
    import numpy as np

    from itk_infer.grid import padded_shape, plan_windows

    shape = tuple(int(s) for s in volume.shape)
    patch, stride = sliding.resolved(shape)  # type: ignore[arg-type]
    padded = padded_shape(shape, patch)  # type: ignore[arg-type]
    if padded != shape:
        volume = np.pad(volume, [(0, p - s) for s, p in zip(shape, padded, strict=True)], "edge")
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    pz, py, px = patch
    size = sliding.batch_size
    for _z, group in groupby(plan_windows(padded, patch, stride), key=lambda w: w[0]):
        row = list(group)
        for start in range(0, len(row), size):
            chunk = row[start : start + size]
            x = np.stack([volume[z : z + pz, y : y + py, x_ : x_ + px] for z, y, x_ in chunk])
            x = x[:, None]
            if pad_batches and len(chunk) < size:
                x = np.concatenate([x, np.repeat(x[-1:], size - len(chunk), axis=0)])
            yield x
