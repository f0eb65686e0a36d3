"""Streaming sliding-window inference: windows in Z order, a ring-buffered slab, finished
slices handed to sinks as soon as no later window touches them.

Peak memory is about C x patch_z x Y x X x 4 bytes for the slab, plus the input volume and
the label map; never the whole (C, Z, Y, X) logits volume. Weight sums are not accumulated per
window: they come from a per-shape profile of one row of windows (see :func:`weight_profile`).
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import groupby

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
# The engine's own CPU work (gather, blend, normalise, argmax) runs on this many torch threads;
# the model keeps the caller's setting. These ops are memory-bound, and right after an ONNX
# Runtime call its pool threads still hold the cores, so a multi-threaded torch op stalls at
# its barrier: measured 10-20x slower per op on a 2-core machine than on one thread.
CPU_BLEND_THREADS = 1


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

    forward_device: str
    volume_device: str
    accumulate_device: str


@dataclass
class EngineStats:
    num_classes: int = 0
    windows: int = 0
    forward_calls: int = 0
    forward_seconds: float = 0.0
    placement: Placement | None = None
    extra: dict = field(default_factory=dict)


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
        return Placement("cpu", "cpu", "cpu")
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
    return Placement(str(device), vol, acc)


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


class _SlabRing:
    """Weighted logits for ``patch_z`` consecutive slices, indexed z % patch_z.

    Any live range of unfinished slices is at most one patch deep (stride <= patch), so a ring
    of that depth holds them all and finished slices are reused for the next ones.
    """

    def __init__(self, num_classes: int, patch: Triple, padded: Triple, weight: np.ndarray,
                 device: torch.device) -> None:
        depth = patch[0]
        self.depth = depth
        self.acc = torch.zeros((num_classes, depth, padded[1], padded[2]), device=device)
        self.weight = torch.from_numpy(weight.copy()).to(device)

    def add(self, window_logits: torch.Tensor, z: int, ys: slice, xs: slice) -> None:
        """Add one window's (C, pz, py, px) logits, weighted, at slice ``z``."""
        r = z % self.depth
        head = self.depth - r
        w = self.weight
        self.acc[:, r:, ys, xs].addcmul_(window_logits[:, :head], w[:head])
        if r:
            self.acc[:, :r, ys, xs].addcmul_(window_logits[:, head:], w[head:])


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


def run_sliding_window(
    volume: np.ndarray,
    backend: Backend,
    sliding: SlidingWindowSettings,
    sinks: Sequence[Sink],
) -> EngineStats:
    """Run ``backend`` over ``volume`` window by window and stream blended slabs to ``sinks``.

    Args:
        volume: (Z, Y, X) float32, already windowed, LPI.
        backend: the model; see :class:`itk_infer.backends.base.Backend`.
        sliding: patch, stride, batch size and blend mode.
        sinks: receive every slice exactly once, in increasing Z.

    Returns:
        Counts and the time spent inside the model.

    Raises:
        CaseError: the model's output does not have the expected shape.
    """
    shape: Triple = tuple(int(s) for s in volume.shape)  # type: ignore[assignment]
    if len(shape) != 3:
        raise ValueError(f"volume must be (Z, Y, X), got shape {shape}")
    patch, stride = sliding.resolved(shape)
    padded = padded_shape(shape, patch)
    if padded != shape:
        # Edge replication keeps the model's input statistics; the padding is cropped away.
        volume = np.pad(volume, [(0, p - s) for s, p in zip(shape, padded, strict=True)], "edge")
    windows = plan_windows(padded, patch, stride)
    rows = [(z, list(group)) for z, group in groupby(windows, key=lambda w: w[0])]
    row_starts = [z for z, _ in rows]
    device = backend.device
    batch_size = backend.static_batch_size or sliding.batch_size
    # Static shapes on CUDA spare the provider a new algorithm search per batch size.
    pad_batches = backend.static_batch_size is not None or device.type == "cuda"
    stats = EngineStats(windows=len(windows))

    vol_device = device
    if device.type == "cuda":
        probe = plan_placement(device, padded, patch, backend.num_classes or 1, batch_size,
                               sliding.accumulate_device)
        vol_device = torch.device(probe.volume_device)
    vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).to(vol_device)
    del volume
    pz, py, px = patch
    ring: _SlabRing | None = None
    profile = torch.empty(0)
    done = 0

    def emit(ring: _SlabRing, z_from: int, z_to: int) -> None:
        """Normalise, hand to sinks and clear the ring slices of z in [z_from, z_to)."""
        num_classes = ring.acc.shape[0]
        step = max(1, EMIT_BYTES // (num_classes * padded[1] * padded[2] * 4))
        z = z_from
        while z < z_to:
            r = z % pz
            n = min(z_to - z, pz - r, step)
            part = ring.acc[:, r : r + n]
            keep = min(n, shape[0] - z)  # slices past the volume are padding
            if keep > 0:
                wsum = torch.zeros((keep, shape[1], shape[2]), device=part.device)
                # Rows whose windows cover slices z .. z + keep (row starts are sorted).
                for z0 in row_starts[bisect_right(row_starts, z - pz) :]:
                    if z0 >= z + keep:
                        break
                    lo, hi = max(z, z0), min(z + keep, z0 + pz)
                    wsum[lo - z : hi - z] += profile[lo - z0 : hi - z0, : shape[1], : shape[2]]
                logits = part[:, :keep, : shape[1], : shape[2]]
                logits.div_(wsum)
                del wsum
                slab = Slab(z_start=z, logits=logits, labels=labels_from_logits(logits))
                for sink in sinks:
                    sink.consume(slab)
            part.zero_()
            z += n

    threads = _Threads(active=True)
    try:
        for index, (_z0, row) in enumerate(rows):
            for start in range(0, len(row), batch_size):
                threads.engine()
                chunk = row[start : start + batch_size]
                x = torch.stack([vol[z : z + pz, y : y + py, x_ : x_ + px] for z, y, x_ in chunk])
                x = x[:, None].to(device, non_blocking=True)
                if pad_batches and len(chunk) < batch_size:
                    x = torch.cat([x, x[-1:].expand(batch_size - len(chunk), *x.shape[1:])])
                threads.model()
                t0 = time.perf_counter()
                out = backend.forward(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                stats.forward_seconds += time.perf_counter() - t0
                stats.forward_calls += 1
                threads.engine()
                if out.ndim != 5 or out.shape[0] != x.shape[0] or tuple(out.shape[2:]) != patch:
                    raise CaseError(
                        f"model output has shape {list(out.shape)} for input {list(x.shape)}; "
                        f"expected (N, C, {pz}, {py}, {px})"
                    )
                if ring is None:
                    num_classes = int(out.shape[1])
                    placement = plan_placement(device, padded, patch, num_classes, batch_size,
                                               sliding.accumulate_device)
                    placement = Placement(placement.forward_device, str(vol_device),
                                          placement.accumulate_device)
                    stats.placement = placement
                    stats.num_classes = num_classes
                    slab_bytes = num_classes * pz * padded[1] * padded[2] * 4
                    stats.extra["slab_bytes"] = slab_bytes
                    log.debug("plan for %s: %s; %d windows in %d rows, batch %d, slab %.0f MB",
                              shape, placement, len(windows), len(rows), batch_size,
                              slab_bytes / 2**20)
                    acc_device = torch.device(placement.accumulate_device)
                    if acc_device.type != "cpu":  # blending runs on the device: keep threads
                        threads.model()
                        threads.active = False
                    ring = _SlabRing(num_classes, patch, padded,
                                     importance_map(patch, sliding.blend), acc_device)
                    profile = weight_profile(padded[1:], patch, stride[1:], sliding.blend)
                    profile = profile.to(acc_device)
                    for sink in sinks:
                        sink.begin(num_classes, shape)
                out = out[: len(chunk)].to(ring.acc.device, torch.float32)
                for i, (z, y, x_) in enumerate(chunk):
                    ring.add(out[i], z, slice(y, y + py), slice(x_, x_ + px))
                del out, x
            next_z = rows[index + 1][0] if index + 1 < len(rows) else padded[0]
            if ring is not None:
                emit(ring, done, next_z)
            done = next_z
    finally:
        threads.model()
    return stats
