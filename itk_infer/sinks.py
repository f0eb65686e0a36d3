"""Consumers of finished slabs: the label map, the zarr logits and the confidence sum."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itk_infer.atomic import publish, remove_path, temporary_path
from itk_infer.config import Triple
from itk_infer.engine import Sink, Slab, label_dtype, labels_from_logits
from itk_infer.records import output_size

FLOAT16_MAX = 65504.0
# Stored logits are clamped one float16 step below the maximum, so that raising a tied winner
# by one step (see logits_to_float16) never overflows to inf.
FLOAT16_CLAMP = 65472.0
# Confidence clamps infinite logits (an fp16 model can overflow) to this finite bound, so that
# softmax sees no inf - inf and p * log p no 0 * inf; float32 holds 2x this without overflow.
CONFIDENCE_LOGIT_BOUND = 1e30
# Target size of one zarr chunk: big enough for good compression, small enough to buffer.
LOGITS_CHUNK_BYTES = 16 << 20


class LabelSink(Sink):
    """Collects labels into a (Z, Y, X) uint8/uint16 array, and voxel counts per label."""

    def __init__(self) -> None:
        self.labels: np.ndarray | None = None

    def begin(self, num_classes: int, shape_zyx: Triple) -> None:
        self.num_classes = num_classes
        self.labels = np.zeros(shape_zyx, dtype=label_dtype(num_classes))

    def consume(self, slab: Slab) -> None:
        assert self.labels is not None
        dz = slab.labels.shape[0]
        self.labels[slab.z_start : slab.z_start + dz] = slab.labels.cpu().numpy()

    def voxel_counts(self) -> dict[int, int]:
        """Voxels per label present, e.g. ``{0: 1000, 3: 12}``."""
        if self.labels is None:
            return {}
        counts = np.bincount(self.labels.ravel())
        return {int(k): int(v) for k, v in enumerate(counts) if v}


def confidence_map(logits: torch.Tensor) -> torch.Tensor:
    """Per-voxel confidence 1 - H(p)/log C in float32, p = softmax over the class axis 0.

    A single channel is a sigmoid model: binary entropy over log 2. Never NaN for non-NaN
    logits: log-probabilities come from log_softmax / logsigmoid on logits clamped to a finite
    bound, so p = 0 gives 0 * finite.
    """
    logits = logits.float().clamp(-CONFIDENCE_LOGIT_BOUND, CONFIDENCE_LOGIT_BOUND)
    if logits.shape[0] == 1:
        x = logits[0]
        log_p, log_q = torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
        entropy = -(log_p.exp() * log_p + log_q.exp() * log_q)
        norm = math.log(2.0)
    else:
        log_p = torch.log_softmax(logits, dim=0)
        entropy = -(log_p.exp() * log_p).sum(dim=0)
        norm = math.log(logits.shape[0])
    return (1.0 - entropy / norm).clamp_(0.0, 1.0)


class ConfidenceSink(Sink):
    """Running sum of per-voxel confidence, so the mean needs no full logits volume."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def consume(self, slab: Slab) -> None:
        for k in range(slab.logits.shape[1]):  # one slice at a time keeps temporaries small
            conf = confidence_map(slab.logits[:, k])
            self.total += float(conf.sum(dtype=torch.float64))
            self.count += conf.numel()

    @property
    def confidence(self) -> float:
        """Mean confidence over all voxels: 1.0 certain, 0.0 uniform."""
        return self.total / self.count if self.count else float("nan")


def logits_to_float16(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(C, dz, Y, X) float16 copy whose argmax over C still equals ``labels``.

    Rounding to float16 can tie two close classes or flush a tiny positive sigmoid logit to
    zero; there the stored value of the chosen class is raised one float16 step above the
    largest value of the voxel, so that ``argmax(stored) == labels`` always holds (for one
    channel: ``stored > 0`` equals ``labels``).
    """
    half = logits.clamp(-FLOAT16_MAX, FLOAT16_CLAMP).to(torch.float16)
    if half.shape[0] == 1:
        bad = (labels == 1) & (half[0] <= 0)
    else:
        # Same first-wins rule as torch.argmax, several times faster on the CPU.
        bad = labels_from_logits(half).long() != labels.long()
    stored = half.cpu().numpy()
    if not bool(bad.any()):
        return stored
    # The few voxels to fix are mended in numpy on the host, after the copy that is made anyway.
    bad_np = bad.cpu().numpy()
    if stored.shape[0] == 1:
        stored[0][bad_np] = np.finfo(np.float16).smallest_normal
        return stored
    by_voxel = np.moveaxis(stored, 0, -1)  # view (dz, Y, X, C)
    plane = by_voxel[bad_np]  # copy (n, C)
    top = plane.max(axis=1)
    winners = labels.cpu().numpy()[bad_np].astype(np.intp)
    plane[np.arange(len(winners)), winners] = np.nextafter(top, np.float16(np.inf))
    by_voxel[bad_np] = plane
    return stored


class LogitsSink(Sink):
    """Streams blended logits into a Zarr v3 array (C, Z, Y, X), float16, Blosc LZ4 + shuffle.

    The array is built under a temporary name and published by :meth:`finish`; chunks are
    whole (C, cz, Y, X) slabs so it is written, and can be read, a slab at a time.
    """

    def __init__(self, path: Path, attributes: dict[str, Any]) -> None:
        self.path = Path(path)
        self.tmp = temporary_path(self.path)
        self.attributes = attributes
        self._array: Any = None
        self._buffer: list[np.ndarray] = []
        self._buffer_start = 0

    def begin(self, num_classes: int, shape_zyx: Triple) -> None:
        import zarr
        from zarr.codecs import BloscCodec, BloscShuffle

        z, y, x = shape_zyx
        self.chunk_z = max(1, min(z, LOGITS_CHUNK_BYTES // (num_classes * y * x * 2)))
        self._array = zarr.create_array(
            store=str(self.tmp),
            shape=(num_classes, z, y, x),
            chunks=(num_classes, self.chunk_z, y, x),
            dtype="float16",
            compressors=BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle),
            fill_value=0.0,
            zarr_format=3,
            attributes={**self.attributes, "num_classes": num_classes},
        )

    def consume(self, slab: Slab) -> None:
        self._buffer.append(logits_to_float16(slab.logits, slab.labels))
        buffered = sum(b.shape[1] for b in self._buffer)
        end = self._buffer_start + buffered
        # Write whole chunks only, so no chunk is ever read back and rewritten.
        if (end - self._buffer_start) >= self.chunk_z or end == self._array.shape[1]:
            self._flush(end)

    def _flush(self, end: int) -> None:
        whole = end if end == self._array.shape[1] else end - end % self.chunk_z
        if whole <= self._buffer_start:
            return
        data = np.concatenate(self._buffer, axis=1)
        n = whole - self._buffer_start
        self._array[:, self._buffer_start : whole] = data[:, :n]
        rest = data[:, n:]
        self._buffer = [rest] if rest.shape[1] else []
        self._buffer_start = whole

    def finish(self) -> int:
        """Publish the array under its final name; returns its size in bytes."""
        if self._array is None:
            raise RuntimeError("no logits were written")
        if self._buffer:
            self._flush(self._array.shape[1])
        size = output_size(self.tmp)  # the same measure resume checks it against
        publish(self.tmp, self.path)
        return size

    def abort(self) -> None:
        remove_path(self.tmp)
