"""Consumers of finished slabs: the label map, the zarr logits and the confidence sum.

Each ``consume`` runs on the engine's thread between model calls, so its cost adds to the
case's wall time. The logits sink therefore only rounds the slab into a float16 chunk buffer
there and leaves the argmax repair, Blosc and the chunk file to one background thread, which
works while the engine goes on; the confidence reuses its buffers. No slab-sized array is
allocated per slab, and memory stays bounded (pools of a few buffers). Stored bytes and
confidences are bit for bit those of the plain slab-by-slab computation; measured in
BENCHMARKS.md ("Output sinks", ``benchmarks/bench_sinks.py``).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
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
# Chunk buffers of the logits writer: one being filled, one queued, one being written. The
# engine waits for a free one, so a disk slower than the engine bounds memory, not a queue.
WRITER_BUFFERS = 3


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


class _Background:
    """One thread that runs ``work`` on buffers in the order they are submitted.

    At most ``WRITER_BUFFERS`` buffers (made by ``make``) exist; :meth:`take` waits for a
    free one. The first error stops the work, and :meth:`take`, :meth:`submit` and
    :meth:`close` raise it on the engine's thread. After :meth:`end` the thread finishes the
    queue, drops the buffers and exits. Its torch ops must not depend on the thread count
    (the writer's are exact): their count is whatever the thread got when it started.
    """

    def __init__(self, work: Callable[[Any], None], make: Callable[[], Any], name: str) -> None:
        self._work, self._make, self._made = work, make, 0
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._free: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None
        self._cancelled = self._ended = False
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True,
                                        name=f"itk_infer-{name}")
        self._thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        # The first torch call fixes this thread's count (OpenMP keeps one per thread): the
        # engine's, in ``begin``, rather than the model's that may be in force later.
        torch.get_num_threads()
        started.set()
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None and not self._cancelled:
                    self._work(job)
            except BaseException as error:  # raised again on the engine's thread
                self._error = error
            finally:
                self._free.put(job)
        while not self._free.empty():  # the memory goes with the thread, not with the sink
            self._free.get()

    def take(self) -> Any:
        """A free buffer: a new one while fewer than ``WRITER_BUFFERS`` exist."""
        self.raise_error()
        if self._made < WRITER_BUFFERS and self._free.empty():
            self._made += 1
            return self._make()
        while True:
            try:
                job = self._free.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(f"{self._thread.name} has stopped") from None
        self.raise_error()
        return job

    def submit(self, job: Any) -> None:
        self.raise_error()
        self._jobs.put(job)

    def end(self) -> None:
        """No more jobs: the thread exits once the queue is done."""
        if not self._ended:
            self._ended = True
            self._jobs.put(None)

    def close(self) -> None:
        """Wait until every submitted job is done; raise the first error."""
        self.end()
        self._thread.join()
        self.raise_error()

    def cancel(self) -> None:
        """Drop the jobs not yet started and wait for the one in progress."""
        self._cancelled = True
        self.end()
        self._thread.join()

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error


# On the CPU a slice larger than this goes through the confidence in blocks of rows of about
# CONFIDENCE_BLOCK_BYTES (float32): the five passes then read a core's cache, not memory.
# Measured on a 2-core Xeon, 32 classes: 512 x 512 31 -> 23 ms, 640 x 640 56 -> 36 ms; at
# 8 MiB and below whole slices were as fast or faster (BENCHMARKS.md, "Output sinks").
CONFIDENCE_WHOLE_BYTES = 16 << 20
CONFIDENCE_BLOCK_BYTES = 512 << 10
# Blocks start at, and span, multiples of this many voxels (the last takes the remainder),
# so that torch's vectorised kernels leave the same voxels to their scalar tails as on the
# whole slice: same bits per voxel (tested). A short block would also sum in another order.
CONFIDENCE_BLOCK_ALIGN = 64


class EntropyScratch:
    """float32 buffers that :func:`confidence_map` reuses from slice to slice, one per role.

    A fresh buffer of a slice's size costs more in page faults than the arithmetic done in it.
    """

    def __init__(self) -> None:
        self._kept: dict[str, torch.Tensor] = {}

    def buffer(self, role: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """A float32 tensor of ``shape`` on ``device`` for ``role``: the same while it fits."""
        kept = self._kept.get(role)
        if kept is None or tuple(kept.shape) != tuple(shape) or kept.device != device:
            kept = self._kept[role] = torch.empty(shape, dtype=torch.float32, device=device)
        return kept


def confidence_map(logits: torch.Tensor, scratch: EntropyScratch | None = None) -> torch.Tensor:
    """Per-voxel confidence 1 - H(p)/log C in float32, p = softmax over the class axis 0.

    A single channel is a sigmoid model: binary entropy over log 2. Never NaN for non-NaN
    logits: log-probabilities come from log_softmax / logsigmoid on logits clamped to a finite
    bound, so p = 0 gives 0 * finite. ``scratch`` only spares allocations, and on the CPU
    the voxels go through the softmax in cache-sized blocks: the ops on each voxel, and so
    the bits of the result, are the same either way (tested).
    """
    if logits.shape[0] == 1:
        x = logits[0].float().clamp(-CONFIDENCE_LOGIT_BOUND, CONFIDENCE_LOGIT_BOUND)
        log_p, log_q = torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
        entropy = -(log_p.exp() * log_p + log_q.exp() * log_q)
        return (1.0 - entropy / math.log(2.0)).clamp_(0.0, 1.0)
    scratch = scratch or EntropyScratch()
    rows = _confidence_block_rows(logits)
    if rows is None:
        return whole_slice_confidence(logits, scratch)
    classes, height, width = logits.shape
    starts = range(0, height - rows + 1, rows)  # the last block takes the remainder too
    widest = classes * (rows + height % rows) * width
    work, spare = (scratch.buffer(role, (widest,), logits.device) for role in ("work", "spare"))
    result = torch.empty((height, width), dtype=torch.float32)
    for start, end in zip(starts, [*starts[1:], height], strict=True):
        size = classes * (end - start) * width
        block = work[:size].view(classes, -1)
        torch.clamp(logits[:, start:end].float(), -CONFIDENCE_LOGIT_BOUND,
                    CONFIDENCE_LOGIT_BOUND, out=block.view(classes, end - start, width))
        result[start:end] = _confidence_of(block, spare[:size].view(classes, -1),
                                           block).view(end - start, width)
    return result


def whole_slice_confidence(logits: torch.Tensor, scratch: EntropyScratch) -> torch.Tensor:
    """:func:`confidence_map` of (C, ...) logits, C > 1, in one block: the clamped copy and the
    log-probabilities in two buffers of the slice's size."""
    classes, voxels, device = logits.shape[0], logits[0].numel(), logits.device
    clamped = scratch.buffer("clamped", (classes, voxels), device)
    torch.clamp(logits.float(), -CONFIDENCE_LOGIT_BOUND, CONFIDENCE_LOGIT_BOUND,
                out=clamped.view(logits.shape))
    log_p = scratch.buffer("log_p", (classes, voxels), device)
    return _confidence_of(clamped, log_p, clamped).view(logits.shape[1:])


def _confidence_block_rows(logits: torch.Tensor) -> int | None:
    """Rows of a (C, Y, X) CPU slice per block of :func:`confidence_map`, or ``None`` for one
    block: a multiple of the rows that make ``CONFIDENCE_BLOCK_ALIGN`` voxels, about
    ``CONFIDENCE_BLOCK_BYTES`` of float32 per block, at least two blocks."""
    if (logits.device.type != "cpu" or logits.dim() != 3
            or 4 * logits.numel() <= CONFIDENCE_WHOLE_BYTES):
        return None
    classes, height, width = logits.shape
    unit = CONFIDENCE_BLOCK_ALIGN // math.gcd(width, CONFIDENCE_BLOCK_ALIGN)
    rows = unit * max(1, CONFIDENCE_BLOCK_BYTES // (4 * classes * width * unit))
    return rows if height >= 2 * rows else None


def _confidence_of(clamped: torch.Tensor, log_p: torch.Tensor, spare: torch.Tensor
                   ) -> torch.Tensor:
    """Confidence of (C, n) clamped logits, C > 1, through contiguous (C, n) ``log_p`` and
    ``spare`` (which may be ``clamped`` itself, read before it is written)."""
    torch.log_softmax(clamped, 0, out=log_p)
    p_log_p = torch.exp(log_p, out=spare).mul_(log_p)
    entropy = -p_log_p.sum(dim=0)
    return (1.0 - entropy / math.log(clamped.shape[0])).clamp_(0.0, 1.0)


class ConfidenceSink(Sink):
    """Running sum of per-voxel confidence, so the mean needs no full logits volume.

    Computed in ``consume``, on the engine's thread count: a background thread would run on
    whatever count the engine set for the model meanwhile, and the float64 sums could round
    differently (records store the confidence exactly).
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self._scratch = EntropyScratch()
        # Per label value: float64 sum of confidence and voxel count over the voxels given
        # that label, from the same per-voxel map (the global mean is mostly background).
        self.label_total = torch.zeros(0, dtype=torch.float64)
        self.label_count = torch.zeros(0, dtype=torch.int64)

    def begin(self, num_classes: int, shape_zyx: Triple) -> None:
        values = max(num_classes, 2)  # a one-channel model labels 0 and 1
        self.label_total = torch.zeros(values, dtype=torch.float64)
        self.label_count = torch.zeros(values, dtype=torch.int64)

    def consume(self, slab: Slab) -> None:
        for k in range(slab.logits.shape[1]):  # one slice at a time keeps temporaries small
            conf = confidence_map(slab.logits[:, k], self._scratch)
            self.total += float(conf.sum(dtype=torch.float64))
            self.count += conf.numel()
            self._add_by_label(conf, slab.labels[k])

    def _add_by_label(self, conf: torch.Tensor, labels: torch.Tensor) -> None:
        values, size = labels.reshape(-1).to(torch.int64), len(self.label_total)
        self.label_total += torch.bincount(
            values, weights=conf.reshape(-1).to(torch.float64), minlength=size).cpu()
        self.label_count += torch.bincount(values, minlength=size).cpu()

    def confidence_by_value(self) -> dict[int, float]:
        """Mean confidence over the voxels of each label value that has voxels."""
        return {v: float(self.label_total[v]) / int(n)
                for v, n in enumerate(self.label_count.tolist()) if n}

    @property
    def confidence(self) -> float:
        """Mean confidence over all voxels: 1.0 certain, 0.0 uniform."""
        return self.total / self.count if self.count else float("nan")


def logits_to_float16(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(C, dz, Y, X) float16 copy whose argmax over C still equals ``labels``.

    Rounding to float16 can tie two close classes or flush a tiny positive sigmoid logit to
    zero; there the stored value of the chosen class is raised one float16 step above the
    largest value of the voxel, so that ``argmax(stored) == labels`` always holds (for one
    channel: ``stored > 0`` equals ``labels``). Values are clamped to
    [-FLOAT16_MAX, FLOAT16_CLAMP] first.
    """
    half = torch.empty(logits.shape, dtype=torch.float16)
    round_to_float16(half, logits)
    repair_float16(half, labels.cpu())
    return half.numpy()


def round_to_float16(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Round float32 ``src`` (any device) into the host float16 view ``dst``, unclamped.

    :func:`repair_float16` clamps afterwards: rounding is monotonic and both bounds are
    float16 values, so clamping after rounding gives the bits of clamping before.
    """
    if src.device.type != "cpu":
        src = src.to(torch.float16)  # convert on the device: half the bytes cross the bus
    dst.copy_(src)


def repair_float16(half: torch.Tensor, labels: torch.Tensor) -> None:
    """Clamp (C, dz, Y, X) float16 ``half`` in place and mend the voxels whose argmax the
    rounding changed (see :func:`logits_to_float16`); CPU tensors, ``half`` may be a view.
    """
    if half.shape[0] == 1:
        half.clamp_(-FLOAT16_MAX, FLOAT16_CLAMP)
        bad: torch.Tensor | None = (labels == 1) & (half[0] <= 0)
    else:
        bad = _argmax_changed(half, labels)
    if bad is None or not bool(bad.any()):
        return
    # The few voxels to fix are mended in numpy, through a view of the same memory.
    stored, bad_np = half.numpy(), bad.numpy()
    if stored.shape[0] == 1:
        stored[0][bad_np] = np.finfo(np.float16).smallest_normal
        return
    by_voxel = np.moveaxis(stored, 0, -1)  # view (dz, Y, X, C)
    plane = by_voxel[bad_np]  # copy (n, C)
    # fmax skips a NaN (an fp16 model's inf - inf): a NaN class after the label never wins,
    # and a NaN top would make the label's own value NaN, which loses to the classes before.
    top = np.fmax.reduce(plane, axis=1)
    winners = labels.numpy()[bad_np].astype(np.intp)
    plane[np.arange(len(winners)), winners] = np.nextafter(top, np.float16(np.inf))
    by_voxel[bad_np] = plane


def _argmax_changed(half: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Clamp ``half`` (C > 1) and find where ``labels_from_logits(half) != labels``
    (``None``: nowhere).

    A voxel surely keeps its label when the label's value is non-zero (+0 and -0 tie) and
    greater than every other class's (:func:`_own_and_others`); the full argmax runs only on
    the few voxels that fail this test, or on all of them if there is a NaN. The clamp, a pass
    with writes, runs only when a value lies outside its bounds, which the logits of a
    float32 model seldom reach; the maximum needs no pass of its own.
    """
    if not float(half.amin()) >= -FLOAT16_MAX:  # -inf or NaN
        half.clamp_(-FLOAT16_MAX, FLOAT16_CLAMP)
    own, others = _own_and_others(half, labels)
    high = float(torch.maximum(own.max(), others.max()))  # NaN if either has one
    if not high <= FLOAT16_CLAMP:  # inf, float16's largest value or NaN
        half.clamp_(-FLOAT16_MAX, FLOAT16_CLAMP)
        if math.isnan(high):
            return labels_from_logits(half).long() != labels.long()
        own, others = _own_and_others(half, labels)
    suspect = ((others >= own) | (own == 0)).reshape(labels.shape)
    if not bool(suspect.any()):
        return None
    bad = torch.zeros_like(suspect)
    bad[suspect] = labels_from_logits(half[:, suspect]).long() != labels[suspect].long()
    return bad


def _own_and_others(half: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per voxel, flat: the value of its label's class, and the largest value of the others.

    The others' maximum is one reduction over ``half`` with each voxel's own entry set to -inf
    for the moment and then put back, bit for bit: about 4 passes in all, against 5 per
    class for a full argmax.
    """
    if not half[0].is_contiguous():
        half = half.contiguous()  # the entries are put back: a copy serves as well
    # Offsets of each voxel's own entry in a flat view from the first class's start; torch's
    # scatter along the class axis is 25x slower than indexing this view.
    voxels = half[0].numel()
    flat = half.as_strided(((half.shape[0] - 1) * half.stride(0) + voxels,), (1,))
    own_at = torch.arange(voxels).add_(labels.reshape(-1), alpha=half.stride(0))
    own = flat[own_at]
    flat[own_at] = -math.inf
    others = half.amax(0).reshape(-1)
    flat[own_at] = own
    return own, others


def _chunk_encoder(array: Any) -> Callable[[np.ndarray], bytes]:
    """The bytes zarr would store for one full chunk of ``array``: raw little-endian values,
    Blosc-compressed with the array's own settings (the codecs ``LogitsSink`` creates)."""
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec

    codecs = array.metadata.codecs
    if (len(codecs) != 2 or not isinstance(codecs[0], BytesCodec)
            or not isinstance(codecs[1], BloscCodec)):
        raise RuntimeError(f"unexpected zarr codecs for the logits: {codecs}")
    blosc = codecs[1]
    shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
               "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[blosc.shuffle.value]
    codec = numcodecs.Blosc(cname=blosc.cname.value, clevel=blosc.clevel, shuffle=shuffle,
                            blocksize=blosc.blocksize)

    def encode(data: np.ndarray) -> bytes:
        # Blosc's type size comes from the buffer: float16 gives the array's 2.
        return bytes(codec.encode(np.ascontiguousarray(data, dtype="<f2")))

    return encode


@dataclass
class _Chunk:
    """Host memory for one zarr chunk: float16 logits (C, cz, Y, X) and labels (cz, Y, X);
    slices ``z_start .. z_end`` of the volume are in its first ``z_end - z_start`` slices."""

    half: torch.Tensor
    labels: torch.Tensor
    z_start: int = 0
    z_end: int = 0


class LogitsSink(Sink):
    """Streams blended logits into a Zarr v3 array (C, Z, Y, X), float16, Blosc LZ4 + shuffle.

    The array is built under a temporary name and published by :meth:`finish`; chunks are
    whole (C, cz, Y, X) slabs so it is written, and can be read, a slab at a time. ``consume``
    rounds the slab into a chunk buffer; a background thread mends ties, compresses and
    writes each full chunk (:class:`_Background`), at most ``WRITER_BUFFERS`` chunks in
    memory. The slab that completes the volume returns once every chunk is written, so that
    write errors are raised inside the engine's run. Slabs must come in Z order without gaps,
    as the engine hands them.
    """

    def __init__(self, path: Path, attributes: dict[str, Any]) -> None:
        self.path = Path(path)
        self.tmp = temporary_path(self.path)
        self.attributes = attributes
        self._array: Any = None
        self._writer: _Background | None = None
        self._chunk: _Chunk | None = None
        self._next_z = 0

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
            # _store_chunk skips all-zero chunks itself, 10x faster than zarr's test; this
            # run-time setting is not stored in zarr.json.
            config={"write_empty_chunks": True},
        )
        self._encode = _chunk_encoder(self._array)
        label_type = torch.uint8 if num_classes <= 256 else torch.int32
        self._writer = _Background(self._store_chunk, lambda: _Chunk(
            torch.empty((num_classes, self.chunk_z, y, x), dtype=torch.float16),
            torch.empty((self.chunk_z, y, x), dtype=label_type)), "logits-writer")

    def consume(self, slab: Slab) -> None:
        if self._writer is None:
            raise RuntimeError("consume before begin")
        if slab.z_start != self._next_z:
            raise ValueError(f"slab at z={slab.z_start}, expected z={self._next_z}")
        logits, labels, done = slab.logits, slab.labels, 0
        while done < logits.shape[1]:
            if self._chunk is None:
                self._chunk = self._writer.take()
                self._chunk.z_start = self._chunk.z_end = self._next_z
            chunk = self._chunk
            at = chunk.z_end - chunk.z_start
            n = min(logits.shape[1] - done, self.chunk_z - at)
            round_to_float16(chunk.half[:, at : at + n], logits[:, done : done + n])
            chunk.labels[at : at + n].copy_(labels[done : done + n])
            chunk.z_end += n
            self._next_z += n
            done += n
            if at + n == self.chunk_z or self._next_z == self._array.shape[1]:
                self._flush(self._next_z)

    def _flush(self, end: int) -> None:
        """Hand the chunk being filled, slices up to ``end``, to the writer thread; after the
        last chunk, wait until all are written."""
        chunk, self._chunk = self._chunk, None
        if chunk is not None and self._writer is not None:
            chunk.z_end = end
            self._writer.submit(chunk)
            if end == self._array.shape[1]:
                # Any write error is raised here, inside the engine's run, where the pipeline
                # aborts the sinks; a case whose run ended could be dropped unwritten (a full
                # disk stops the loop) and leave its temporary behind.
                self._writer.close()

    def _store_chunk(self, chunk: _Chunk) -> None:
        """Mend, compress and write one chunk (on the writer thread)."""
        n = chunk.z_end - chunk.z_start
        repair_float16(chunk.half[:, :n], chunk.labels[:n])
        data = chunk.half.numpy()
        # All +0.0 is the fill value: zarr keeps no such chunk (it compares bit patterns too).
        if not data[:, :n].view(np.uint16).any():
            return
        if n < self.chunk_z:  # zarr stores a short chunk at full size, filled with +0.0
            data[:, n:] = 0
        self._write_chunk(chunk.z_start // self.chunk_z, data)

    def _write_chunk(self, index: int, data: np.ndarray) -> None:
        """Write chunk ``index`` (along Z) of the array: the file zarr would write (same codec,
        same key; tested byte for byte), without zarr's copies, a third of the writer's time."""
        key = self._array.metadata.encode_chunk_key((0, index, 0, 0))
        target = self.tmp / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self._encode(data))

    def finish(self) -> int:
        """Publish the array under its final name (after the writer, if a short volume left it
        running); returns its size in bytes. Raises the writer's error, if it had one."""
        if self._array is None or self._writer is None:
            raise RuntimeError("no logits were written")
        if self._chunk is not None:
            self._flush(self._next_z)
        self._writer.close()
        size = output_size(self.tmp)  # the same measure resume checks it against
        publish(self.tmp, self.path)
        return size

    def abort(self) -> None:
        """Stop the writer (dropping what it has not written) and remove the temporary."""
        if self._writer is not None:
            self._writer.cancel()
        remove_path(self.tmp)
