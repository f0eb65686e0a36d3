"""Streaming sliding-window inference: windows in Z order, a ring-buffered slab, finished
slices handed to sinks as soon as no later window touches them.

Peak memory is about C x patch_z x Y x X x 4 bytes for the slab, plus the input volume and
the label map; never the whole (C, Z, Y, X) logits volume. Weight sums are not accumulated per
window: they come from a per-shape profile of one row of windows (see :func:`weight_profile`).

:func:`slide` runs any predictor function; :func:`run_sliding_window` runs a loaded backend.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import groupby, pairwise

import numpy as np
import torch

from itk_infer.backends.base import Backend
from itk_infer.blending import importance_map
from itk_infer.config import SlidingWindowSettings, Triple
from itk_infer.errors import CaseError
from itk_infer.grid import axis_starts, padded_shape, plan_windows

log = logging.getLogger(__name__)

# Slabs go to sinks in pieces of at most this many bytes of float32 logits, so that what sinks
# derive from them (softmax, fp16 copies) stays small next to the slab itself.
EMIT_BYTES = 64 << 20
# Each torch op of the engine's own CPU work (gather, blend, normalise, argmax) and of the
# sinks runs on this many torch threads; the model keeps the caller's setting. With one
# thread, no result depends on the thread count (the confidence's sums, where a kernel's
# vector loop hands over to its scalar tail), and no op waits at a barrier for threads that
# ONNX Runtime still holds (10-20x slower per op on 2 cores when its idle threads spun).
CPU_BLEND_THREADS = 1
# The engine's own work is instead cut into up to this many parts (no more than the model's
# threads), run at once on Python threads: torch releases the GIL inside its ops. Parts are
# whole classes or whole slices and start at multiples of SPLIT_ALIGN elements, so each voxel
# takes the kernel path it takes in one op: the same bits (tests/core/test_engine.py). More
# than 2 parts is not measured (BENCHMARKS.md, "Output sinks").
CPU_ENGINE_PARTS = 4
SPLIT_ALIGN = 64

# What the engine runs on each batch: (N, 1, pz, py, px) float32 windows to (N, C, pz, py, px)
# float16 or float32 logits; a backend's ``forward`` or any plain function.
Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Slab:
    """Finished slices ``z_start .. z_start + dz`` of a case, cropped to the volume.

    ``logits``: (C, dz, Y, X) float32, blended; ``labels``: (dz, Y, X) integer; both on the
    engine's accumulation device. Valid only during the sink's ``consume`` call.
    """

    z_start: int
    logits: torch.Tensor
    labels: torch.Tensor


class Sink:
    """Consumes finished slabs; subclasses write labels, logits or confidence.

    On the CPU, ``consume`` runs with torch limited to ``CPU_BLEND_THREADS`` threads, like the
    engine's own blending (measured no slower for the bundled sinks, see that constant).
    """

    def begin(self, num_classes: int, shape_zyx: Triple) -> None:
        """Called once, before the first slab, when the class count is known."""

    def consume(self, slab: Slab) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Called when the case fails: remove anything temporary."""


@dataclass(frozen=True)
class Placement:
    """Where the volume and the blending slab live for one case."""

    volume_device: str
    accumulate_device: str


@dataclass
class EngineStats:
    """What one pass over a volume did: class count, windows, model calls and time in them."""

    num_classes: int = 0
    windows: int = 0
    forward_calls: int = 0
    forward_seconds: float = 0.0
    placement: Placement | None = None


def labels_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Labels from (C, ...) logits: argmax over C (first wins on ties); one channel is a
    sigmoid (logit > 0). uint8 up to 256 classes, int32 above.
    """
    num_classes = logits.shape[0]
    if num_classes == 1:
        return (logits[0] > 0).to(torch.uint8)
    dtype = torch.uint8 if num_classes <= 256 else torch.int32
    if logits.device.type != "cpu":
        return torch.max(logits, dim=0).indices.to(dtype)
    # On the CPU a running maximum over the class planes is 3-5x faster than a reduction
    # over the outer axis, and takes only a few (Z, Y, X)-sized temporaries.
    best = logits[0].clone()
    labels = torch.zeros(logits.shape[1:], dtype=dtype)
    better = torch.empty(logits.shape[1:], dtype=torch.bool)
    flag = better.view(torch.uint8)  # 0/1, so that labels += flag * (c - labels) is integer math
    scratch = torch.empty_like(labels)
    for c in range(1, num_classes):
        torch.gt(logits[c], best, out=better)
        # Arithmetic instead of masked_fill_, which is ~20x slower on CPU integer tensors.
        torch.mul(labels, flag, out=scratch)
        labels.sub_(scratch).add_(flag, alpha=c)
        torch.maximum(best, logits[c], out=best)
    return labels


def label_dtype(num_classes: int) -> np.dtype:
    """uint8 up to 256 classes, uint16 above."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


def plan_placement(
    device: torch.device,
    padded: Triple,
    patch: Triple,
    num_classes: int,
    batch_size: int,
    accumulate_device: str | None,
) -> Placement:
    """Decide from a memory estimate (not by catching out-of-memory) where data lives."""
    if device.type != "cuda":
        return Placement("cpu", "cpu")
    free, _total = torch.cuda.mem_get_info(device)
    budget = 0.8 * free
    voxels = int(np.prod(padded))
    slab = (num_classes + 1) * patch[0] * padded[1] * padded[2] * 4
    # Model activations are unknown; reserve a generous multiple of one output batch.
    batch = 8 * batch_size * (num_classes + 1) * int(np.prod(patch)) * 4
    volume_bytes = voxels * 4
    acc = str(device) if accumulate_device not in ("cpu",) and slab + batch < budget else "cpu"
    remaining = budget - (slab if acc != "cpu" else 0) - batch
    vol = str(device) if volume_bytes < remaining else "cpu"
    return Placement(vol, acc)


@lru_cache(maxsize=2)
def weight_profile(padded_yx: tuple[int, int], patch: Triple, stride_yx: tuple[int, int],
                   blend: str) -> torch.Tensor:
    """Weight sums of one row of windows: (patch_z, Y, X) float32 on the CPU, all > 0.

    Every row of windows (same Z start) has the same Y-X grid, so the weight sum of slice z is
    ``sum(profile[z - z0] for each row start z0 with z0 <= z < z0 + patch_z)``: computed once
    per shape, never per window, and no larger than one slab. Do not modify the result.
    """
    weight = importance_map(patch, blend)
    pz, py, px = patch
    profile = np.zeros((pz, *padded_yx), dtype=np.float32)
    for y in axis_starts(padded_yx[0], py, stride_yx[0]):
        for x in axis_starts(padded_yx[1], px, stride_yx[1]):
            profile[:, y : y + py, x : x + px] += weight
    if not profile.min() > 0:
        raise RuntimeError("the window grid leaves voxels uncovered")
    return torch.from_numpy(profile)


def engine_part(work: Callable[[int, int], object], start: int, stop: int) -> None:
    """One part on a helper thread; by this name a worker's crash dump of that thread reads
    as the model step (:func:`itk_infer.workers.crashed_step`)."""
    work(start, stop)


class _Parts:
    """Runs the engine's CPU work in parts at once (see ``CPU_ENGINE_PARTS``)."""

    def __init__(self, parts: int) -> None:
        self.parts = max(1, parts)
        self._pool = (ThreadPoolExecutor(self.parts - 1, thread_name_prefix="itk_infer-engine")
                      if self.parts > 1 else None)

    def run(self, n: int, work: Callable[[int, int], object], unit: int | None = None) -> None:
        """``work(start, stop)`` over spans that cover ``0 .. n``, at once.

        ``unit``: for work whose rounding may differ between torch's vectorised and scalar
        loops (addcmul may fuse its multiply-add), the elements of one index; the work is then
        split only where every span starts at a multiple of ``SPLIT_ALIGN`` elements. Exact
        work (division, maxima, integers, zeroing) passes None.
        """
        parts = min(self.parts, n)
        if unit is not None and unit % SPLIT_ALIGN:
            parts = 1
        if self._pool is None or parts < 2:
            work(0, n)
            return
        first, *rest = pairwise([n * k // parts for k in range(parts + 1)])
        futures = [self._pool.submit(engine_part, work, a, b) for a, b in rest]
        try:
            work(*first)
        finally:
            wait(futures)  # no part may still write into the slab when this returns
        for future in futures:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


class _SlabRing:
    """Weighted logits for ``patch_z`` consecutive slices, indexed z % patch_z.

    Any live range of unfinished slices is at most one patch deep (stride <= patch), so a ring
    of that depth holds them all and finished slices are reused for the next ones.
    """

    def __init__(self, num_classes: int, patch: Triple, padded: Triple, weight: np.ndarray,
                 device: torch.device, parts: _Parts) -> None:
        depth = patch[0]
        self.depth = depth
        # Zeroed in parts: the first touch of a slab of GiBs is page faults, seconds of them.
        self.acc = torch.empty((num_classes, depth, padded[1], padded[2]), device=device)
        parts.run(num_classes, lambda c0, c1: self.acc[c0:c1].zero_())
        self.weight = torch.from_numpy(weight.copy()).to(device)

    def add(self, window_logits: torch.Tensor, z: int, ys: slice, xs: slice,
            classes: slice = slice(None)) -> None:
        """Add one window's (C, pz, py, px) logits, weighted, at slice ``z``; or only the
        ``classes`` of both."""
        r = z % self.depth
        head = self.depth - r
        w = self.weight
        acc, window_logits = self.acc[classes], window_logits[classes]
        acc[:, r:, ys, xs].addcmul_(window_logits[:, :head], w[:head])
        if r:
            acc[:, :r, ys, xs].addcmul_(window_logits[:, head:], w[head:])


class _Threads:
    """Switches torch's intra-op threads between the model's setting and the engine's own."""

    def __init__(self, active: bool) -> None:
        self.caller = torch.get_num_threads()
        self.active = active and self.caller != CPU_BLEND_THREADS

    def engine(self) -> None:
        if self.active:
            torch.set_num_threads(CPU_BLEND_THREADS)

    def model(self) -> None:
        if self.active:
            torch.set_num_threads(self.caller)


@dataclass(frozen=True)
class _WindowGrid:
    """The windows of one volume, grouped in rows (windows with the same Z start)."""

    shape: Triple
    padded: Triple
    patch: Triple
    stride: Triple
    rows: list[tuple[int, list[Triple]]]
    windows: int

    @classmethod
    def plan(cls, shape_zyx: Sequence[int], sliding: SlidingWindowSettings) -> _WindowGrid:
        """Patch, stride, padding and windows for a volume of ``shape_zyx``."""
        shape: Triple = tuple(int(s) for s in shape_zyx)  # type: ignore[assignment]
        if len(shape) != 3:
            raise ValueError(f"volume must be (Z, Y, X), got shape {shape}")
        patch, stride = sliding.resolved(shape)
        padded = padded_shape(shape, patch)
        windows = plan_windows(padded, patch, stride)
        rows = [(z, list(group)) for z, group in groupby(windows, key=lambda w: w[0])]
        return cls(shape, padded, patch, stride, rows, len(windows))

    def row_end(self, index: int) -> int:
        """Slices below this are final once row ``index`` is blended: the next row's start."""
        return self.rows[index + 1][0] if index + 1 < len(self.rows) else self.padded[0]


def _volume_tensor(volume: np.ndarray, grid: _WindowGrid, device: torch.device) -> torch.Tensor:
    """The padded volume as a float32 tensor on ``device``; a padded copy dies on return."""
    if grid.padded != grid.shape:
        # Edge replication keeps the model's input statistics; the padding is cropped away.
        pad = [(0, p - s) for s, p in zip(grid.shape, grid.padded, strict=True)]
        volume = np.pad(volume, pad, "edge")
    return torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).to(device)


class _WindowBatcher:
    """Cuts batches of windows out of the padded volume, row by row."""

    def __init__(self, volume: torch.Tensor, patch: Triple, batch_size: int,
                 device: torch.device, pad_batches: bool) -> None:
        self.volume = volume
        self.patch = patch
        self.batch_size = batch_size
        self.device = device
        self.pad_batches = pad_batches

    def batches(self, row: list[Triple]) -> Iterator[tuple[torch.Tensor, list[Triple]]]:
        """(N, 1, pz, py, px) inputs on the model's device, and the N windows' starts.

        N is ``batch_size`` except for the last batch of a row, which is filled up with copies
        of its last window when ``pad_batches``; those extra outputs are never used.
        """
        for start in range(0, len(row), self.batch_size):
            chunk = row[start : start + self.batch_size]
            # Built in the yield so that this frame keeps no reference to a finished batch.
            yield self._stack(chunk), chunk

    def _stack(self, chunk: list[Triple]) -> torch.Tensor:
        pz, py, px = self.patch
        vol = self.volume
        x = torch.stack([vol[z : z + pz, y : y + py, x_ : x_ + px] for z, y, x_ in chunk])
        x = x[:, None].to(self.device, non_blocking=True)
        if self.pad_batches and len(chunk) < self.batch_size:
            x = torch.cat([x, x[-1:].expand(self.batch_size - len(chunk), *x.shape[1:])])
        return x


class _SlabAccumulator:
    """Blends window logits into the ring and hands finished slices to the sinks."""

    def __init__(self, grid: _WindowGrid, blend: str, sinks: Sequence[Sink], num_classes: int,
                 device: torch.device, parts: int = 1) -> None:
        self.grid = grid
        self.sinks = sinks
        # On a GPU the device runs the ops in parallel already.
        self.parts = _Parts(parts if torch.device(device).type == "cpu" else 1)
        try:
            self.ring = _SlabRing(num_classes, grid.patch, grid.padded,
                                  importance_map(grid.patch, blend), device, self.parts)
        except BaseException:  # e.g. out of memory: the caller never gets this to close
            self.parts.close()
            raise
        self.device = self.ring.acc.device  # with its index, where ``device`` may lack one
        profile = weight_profile(grid.padded[1:], grid.patch, grid.stride[1:], blend)
        self.profile = profile.to(device)
        self.row_starts = [z for z, _ in grid.rows]
        self.done = 0  # slices below this were handed over
        for sink in sinks:
            sink.begin(num_classes, grid.shape)

    def add(self, out: torch.Tensor, windows: list[Triple]) -> None:
        """Add (N, C, pz, py, px) float32 logits on ``device`` of the N windows at ``windows``."""
        _pz, py, px = self.grid.patch

        def blend(c0: int, c1: int) -> None:
            for i, (z, y, x) in enumerate(windows):
                self.ring.add(out[i], z, slice(y, y + py), slice(x, x + px), slice(c0, c1))

        self.parts.run(self.ring.acc.shape[0], blend, unit=py * px)

    def emit_until(self, z_to: int) -> None:
        """Normalise, hand to sinks and clear the slices from the last call's end to ``z_to``."""
        shape, pz = self.grid.shape, self.grid.patch[0]
        acc = self.ring.acc
        step = max(1, EMIT_BYTES // (acc.shape[0] * self.grid.padded[1] * self.grid.padded[2] * 4))
        z = self.done
        while z < z_to:
            r = z % pz
            n = min(z_to - z, pz - r, step)
            part = acc[:, r : r + n]
            keep = min(n, shape[0] - z)  # slices past the volume are padding
            if keep > 0:
                wsum = self._weight_sum(z, keep)
                logits = part[:, :keep, : shape[1], : shape[2]]
                self.parts.run(len(logits), lambda c0, c1, t=logits, d=wsum: t[c0:c1].div_(d))
                del wsum
                slab = Slab(z_start=z, logits=logits, labels=self._labels(logits))
                for sink in self.sinks:
                    sink.consume(slab)
            self.parts.run(len(part), lambda c0, c1, t=part: t[c0:c1].zero_())
            z += n
        self.done = z_to

    def _labels(self, logits: torch.Tensor) -> torch.Tensor:
        """:func:`labels_from_logits`, in parts of whole slices (or rows, for one slice)."""
        if self.parts.parts < 2:
            return labels_from_logits(logits)
        axis = 1 if logits.shape[1] > 1 else 2
        pieces: dict[int, torch.Tensor] = {}

        def label(a: int, b: int) -> None:
            pieces[a] = labels_from_logits(logits.narrow(axis, a, b - a))

        self.parts.run(logits.shape[axis], label)
        return torch.cat([pieces[a] for a in sorted(pieces)], dim=axis - 1)

    def close(self) -> None:
        self.parts.close()

    def _weight_sum(self, z: int, keep: int) -> torch.Tensor:
        """Weight sums of slices ``z .. z + keep``, cropped to the volume, from the profile."""
        shape, pz = self.grid.shape, self.grid.patch[0]
        wsum = torch.zeros((keep, shape[1], shape[2]), device=self.device)
        # Rows whose windows cover slices z .. z + keep (row starts are sorted).
        for z0 in self.row_starts[bisect_right(self.row_starts, z - pz) :]:
            if z0 >= z + keep:
                break
            lo, hi = max(z, z0), min(z + keep, z0 + pz)
            wsum[lo - z : hi - z] += self.profile[lo - z0 : hi - z0, : shape[1], : shape[2]]
        return wsum


def _timed_forward(predict: Predictor, x: torch.Tensor, device: torch.device,
                   threads: _Threads, stats: EngineStats) -> torch.Tensor:
    """``predict(x)`` on the caller's threads, timed to the end of its CUDA work.

    Raises:
        CaseError: the output is not (N, C, pz, py, px) for an (N, 1, pz, py, px) input.
    """
    threads.model()
    t0 = time.perf_counter()
    out = predict(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.forward_seconds += time.perf_counter() - t0
    stats.forward_calls += 1
    threads.engine()
    pz, py, px = x.shape[2:]
    if out.ndim != 5 or out.shape[0] != x.shape[0] or tuple(out.shape[2:]) != (pz, py, px):
        raise CaseError(
            f"model output has shape {list(out.shape)} for input {list(x.shape)}; "
            f"expected (N, C, {pz}, {py}, {px})"
        )
    return out


def _blending_device(num_classes: int, grid: _WindowGrid, sliding: SlidingWindowSettings,
                     device: torch.device, volume_device: torch.device, batch_size: int,
                     threads: _Threads, stats: EngineStats) -> torch.device:
    """Where the slab lives, decided once the class count is known; records the plan."""
    planned = plan_placement(device, grid.padded, grid.patch, num_classes, batch_size,
                             sliding.accumulate_device)
    placement = Placement(str(volume_device), planned.accumulate_device)
    stats.placement = placement
    stats.num_classes = num_classes
    slab_bytes = num_classes * grid.patch[0] * grid.padded[1] * grid.padded[2] * 4
    log.debug("plan for %s on %s: %s; %d windows in %d rows, batch %d, slab %.0f MB",
              grid.shape, device, placement, grid.windows, len(grid.rows), batch_size,
              slab_bytes / 2**20)
    acc_device = torch.device(placement.accumulate_device)
    if acc_device.type != "cpu":  # blending runs on the device: keep threads
        threads.model()
        threads.active = False
    return acc_device


def slide(
    volume: np.ndarray,
    predict: Predictor,
    sliding: SlidingWindowSettings,
    sinks: Sequence[Sink],
    *,
    device: torch.device | str = "cpu",
    static_batch_size: int | None = None,
    num_classes_hint: int | None = None,
) -> EngineStats:
    """Run ``predict`` over ``volume`` window by window and stream blended slabs to ``sinks``.

    Args:
        volume: (Z, Y, X) float32, already windowed, LPI.
        predict: any callable from (N, 1, pz, py, px) float32 on ``device`` to
            (N, C, pz, py, px) float16 or float32 logits.
        sliding: patch, stride, batch size, blend mode and accumulation device.
        sinks: receive every slice exactly once, in increasing Z.
        device: where ``predict`` takes its input; on CUDA the volume and the slab go there
            too when the memory estimate allows.
        static_batch_size: the only batch size ``predict`` takes (short batches are filled
            up); it replaces ``sliding.batch_size``.
        num_classes_hint: the class count if known before the first output; it only sizes
            the CUDA memory estimate for the volume.

    Returns:
        Counts, placement and the time spent inside ``predict``.

    Raises:
        CaseError: ``predict``'s output does not have the expected shape.
    """
    device = torch.device(device)
    grid = _WindowGrid.plan(volume.shape, sliding)
    batch_size = static_batch_size or sliding.batch_size
    vol_device = device
    if device.type == "cuda":
        probe = plan_placement(device, grid.padded, grid.patch, num_classes_hint or 1,
                               batch_size, sliding.accumulate_device)
        vol_device = torch.device(probe.volume_device)
    # Static shapes on CUDA spare the provider a new algorithm search per batch size.
    pad_batches = static_batch_size is not None or device.type == "cuda"
    batcher = _WindowBatcher(_volume_tensor(volume, grid, vol_device), grid.patch, batch_size,
                             device, pad_batches)
    del volume  # only the tensor is needed from here on
    return _stream(predict, batcher, grid, sliding, sinks, vol_device)


def _stream(predict: Predictor, batcher: _WindowBatcher, grid: _WindowGrid,
            sliding: SlidingWindowSettings, sinks: Sequence[Sink],
            volume_device: torch.device) -> EngineStats:
    """The loop: batches to ``predict``, its outputs into the slab, finished rows to sinks."""
    device, batch_size = batcher.device, batcher.batch_size
    stats = EngineStats(windows=grid.windows)
    threads = _Threads(active=True)
    acc: _SlabAccumulator | None = None
    try:
        threads.engine()  # gathering windows is the engine's work; each forward switches back
        for index, (_z0, row) in enumerate(grid.rows):
            for x, chunk in batcher.batches(row):
                out = _timed_forward(predict, x, device, threads, stats)
                if acc is None:
                    num_classes = int(out.shape[1])
                    acc_device = _blending_device(num_classes, grid, sliding, device,
                                                  volume_device, batch_size, threads, stats)
                    acc = _SlabAccumulator(grid, sliding.blend, sinks, num_classes, acc_device,
                                           min(CPU_ENGINE_PARTS, threads.caller))
                # Rebinding frees the model's own output (when converted) before blending.
                out = out[: len(chunk)].to(acc.device, torch.float32)
                acc.add(out, chunk)
                del out, x
            if acc is not None:
                acc.emit_until(grid.row_end(index))
    finally:
        if acc is not None:
            acc.close()
        threads.model()
    return stats


def run_sliding_window(
    volume: np.ndarray,
    backend: Backend,
    sliding: SlidingWindowSettings,
    sinks: Sequence[Sink],
) -> EngineStats:
    """:func:`slide` with a loaded model: ``backend.forward`` on ``backend.device``.

    See :class:`itk_infer.backends.base.Backend`; its static batch size and class count (when
    known) are passed on.
    """
    return slide(volume, backend.forward, sliding, sinks, device=backend.device,
                 static_batch_size=backend.static_batch_size,
                 num_classes_hint=backend.num_classes)


# --------------------------------------------------------------------------- out of memory


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device allocation failure: torch's CUDA out-of-memory error, or
    onnxruntime's (a runtime error that says it failed to allocate)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    said = "out of memory" in text or "failed to allocate" in text
    return said and (isinstance(error, RuntimeError | MemoryError)
                     or type(error).__module__.startswith("onnxruntime"))


@dataclass(frozen=True)
class Attempt:
    """One way to run a case after an out-of-memory error: ``label`` is what is recorded."""

    label: str
    sliding: SlidingWindowSettings
    on_cpu: bool = False


def fallback_attempts(sliding: SlidingWindowSettings, device: torch.device,
                      static_batch_size: int | None, allow_cpu: bool) -> list[Attempt]:
    """The runs to try in turn when the previous one ran out of memory: as planned; then the
    slab on the host with one window per batch (a static batch size cannot shrink); then,
    where allowed and the model is not on the CPU already, the model on the CPU."""
    attempts = [Attempt("", sliding)]
    batch = static_batch_size or 1
    host = replace(sliding, accumulate_device="cpu", batch_size=batch)
    if host != sliding or device.type == "cuda":
        attempts.append(Attempt(f"host accumulation, batch {batch}", host))
    if allow_cpu and device.type != "cpu":
        attempts.append(Attempt("cpu", replace(sliding, accumulate_device="cpu"), on_cpu=True))
    return attempts
