"""Output sinks against references: zarr bytes, float16 ties, confidence, the writer thread."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from itk_infer import sinks
from itk_infer.atomic import TMP_PREFIX
from itk_infer.engine import Slab, labels_from_logits
from itk_infer.sinks import ConfidenceSink, EntropyScratch, LogitsSink, confidence_map

# ---------------------------------------------------------------------------------------------
# references


def float16_reference(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Plain numpy statement of the stored values: clamp, round, then raise the label's class
    one float16 step above the voxel's maximum wherever the rounded argmax is not the label
    (one channel: smallest normal where the label is 1 but the value is not positive)."""
    half = np.clip(logits, -sinks.FLOAT16_MAX, sinks.FLOAT16_CLAMP).astype(np.float16)
    if half.shape[0] == 1:
        half[0][(labels == 1) & (half[0] <= 0)] = np.finfo(np.float16).smallest_normal
        return half
    for index in zip(*np.nonzero(np.argmax(half, axis=0) != labels), strict=True):
        column = half[(slice(None), *index)]
        column[labels[index]] = np.nextafter(column.max(), np.float16(np.inf))
    return half


def confidence_float64(logits: np.ndarray) -> np.ndarray:
    """1 - H(p)/log C per voxel in float64, p = softmax over axis 0 (C > 1)."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(axis=0, keepdims=True))
    p /= p.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return 1.0 + terms.sum(axis=0) / math.log(x.shape[0])


def confidence_before(logits: torch.Tensor) -> torch.Tensor:
    """The confidence map as computed before issue 16 (fresh tensors), C > 1."""
    bound = sinks.CONFIDENCE_LOGIT_BOUND
    log_p = torch.log_softmax(logits.float().clamp(-bound, bound), dim=0)
    entropy = -(log_p.exp() * log_p).sum(dim=0)
    return (1.0 - entropy / math.log(logits.shape[0])).clamp_(0.0, 1.0)


def hard_logits(rng: np.random.Generator, classes: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 logits with what float16 rounding gets wrong: near ties (most voxels tie after
    rounding), values beyond the float16 range, infinities, signed zeros, subnormals."""
    base = rng.normal(scale=100.0, size=(1, *shape))
    x = base + rng.uniform(-1e-3, 1e-3, size=(classes, *shape))
    special = rng.random(x.shape) < 0.15
    x[special] = rng.choice([0.0, -0.0, 1e-8, -1e-8, 3e-5, 65500.0, 65520.0, -65520.0, 7e4,
                             -7e4, np.inf, -np.inf, 1e31], size=int(special.sum()))
    return x.astype(np.float32)


def stream(sink: sinks.Sink, logits: np.ndarray, cuts: list[int]) -> None:
    """Feed ``logits`` (C, Z, Y, X) to ``sink`` in slabs ending at ``cuts``, labels as the
    engine makes them."""
    sink.begin(logits.shape[0], logits.shape[1:])
    start = 0
    for end in cuts:
        part = torch.from_numpy(logits[:, start:end])
        sink.consume(Slab(z_start=start, logits=part, labels=labels_from_logits(part)))
        start = end


def plain_zarr(path: Path, data: np.ndarray, chunk_z: int, attributes: dict) -> None:
    """``data`` written by zarr itself with the sink's settings, in one assignment."""
    from zarr.codecs import BloscCodec, BloscShuffle

    c, _z, y, x = data.shape
    array = zarr.create_array(
        store=str(path), shape=data.shape, chunks=(c, chunk_z, y, x), dtype="float16",
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle),
        fill_value=0.0, zarr_format=3, attributes={**attributes, "num_classes": c})
    array[...] = data


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# logits


@pytest.mark.parametrize(("classes", "chunk_z", "cuts"), [
    (3, 5, [2, 4, 6, 8, 10, 12, 13]),  # slabs smaller than chunks, short last chunk
    (4, 2, [5, 9, 13]),  # slabs spanning several chunks
    (1, 3, [1, 7, 8, 13]),  # one sigmoid channel
    (300, 1, [4, 13]),  # above 256 classes: int32 labels
])
def test_logits_zarr_bytes_equal_zarr_writing_the_reference(tmp_path, monkeypatch, classes,
                                                            chunk_z, cuts):
    rng = np.random.default_rng(classes)
    logits = hard_logits(rng, classes, (13, 6, 7))
    logits[:, 6:9] = 0.0  # an all-zero chunk is not stored, as zarr does
    labels = labels_from_logits(torch.from_numpy(logits)).numpy()
    monkeypatch.setattr(sinks, "LOGITS_CHUNK_BYTES", chunk_z * classes * 6 * 7 * 2)
    sink = LogitsSink(tmp_path / "sink.zarr", {"case": "a"})
    stream(sink, logits, cuts)
    size = sink.finish()

    reference = float16_reference(logits, labels)
    plain_zarr(tmp_path / "plain.zarr", reference, chunk_z, {"case": "a"})
    written = folder_bytes(tmp_path / "sink.zarr")
    assert written == folder_bytes(tmp_path / "plain.zarr")
    assert size == sum(len(b) for b in written.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    stored = np.asarray(zarr.open_array(tmp_path / "sink.zarr", mode="r")[...])
    if classes == 1:
        np.testing.assert_array_equal(stored[0] > 0, labels == 1)
    else:
        np.testing.assert_array_equal(np.argmax(stored, axis=0), labels)


def test_large_chunks_are_the_bytes_zarr_writes(tmp_path, monkeypatch):
    """Chunks of several MiB, which Blosc splits into many blocks, smooth like real logits
    (they compress), one short last chunk: the sink's own chunk files are zarr's bytes."""
    z, y, x = 5, 256, 384
    grid = np.linspace(0.0, 6.0, y * x).reshape(y, x)
    logits = np.stack([np.sin(grid + c) * 8.0 + np.cos(grid * 0.5 + 0.1 * k)
                       for c in range(4) for k in range(z)]).reshape(4, z, y, x)
    logits = logits.astype(np.float32)
    labels = labels_from_logits(torch.from_numpy(logits)).numpy()
    monkeypatch.setattr(sinks, "LOGITS_CHUNK_BYTES", 2 * 4 * y * x * 2)
    sink = LogitsSink(tmp_path / "sink.zarr", {})
    stream(sink, logits, [3, 5])
    sink.finish()
    plain_zarr(tmp_path / "plain.zarr", float16_reference(logits, labels), 2, {})
    written = folder_bytes(tmp_path / "sink.zarr")
    assert len(written) == 4 and written == folder_bytes(tmp_path / "plain.zarr")
    assert all(len(b) < 2 * 4 * y * x * 2 for k, b in written.items() if k.startswith("c/"))


def test_logits_to_float16_equals_reference_on_random_slabs():
    rng = np.random.default_rng(3)
    for classes in (1, 2, 5, 32):
        for trial in range(4):
            shape = (int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(1, 9)))
            if trial % 2:
                logits = hard_logits(rng, classes, shape)
            else:
                logits = rng.normal(scale=3.0, size=(classes, *shape)).astype(np.float32)
            labels = labels_from_logits(torch.from_numpy(logits))
            stored = sinks.logits_to_float16(torch.from_numpy(logits), labels)
            expected = float16_reference(logits, labels.numpy())
            np.testing.assert_array_equal(stored.view(np.uint16), expected.view(np.uint16))


def test_float16_labels_survive_nan_logits():
    """NaNs (an fp16 model's inf - inf) in classes after the label, on near-ties that rounding
    breaks: the stored argmax is still the label, by ``labels_from_logits``'s rule (a NaN
    class never wins and stops later ones), and every NaN stays where it was."""
    rng = np.random.default_rng(6)
    logits = hard_logits(rng, 5, (2, 16, 16))
    logits[:3] = np.nan_to_num(logits[:3], posinf=1e4, neginf=-1e4)  # finite before the NaNs
    logits[:3] = logits[1] + rng.uniform(-1e-3, 1e-3, size=logits[:3].shape)  # near ties
    nan_at = rng.random(logits.shape[1:]) < 0.5
    logits[3][nan_at] = np.nan
    labels = labels_from_logits(torch.from_numpy(logits))
    stored = sinks.logits_to_float16(torch.from_numpy(logits), labels)
    assert torch.equal(labels_from_logits(torch.from_numpy(stored)), labels)
    assert np.array_equal(np.isnan(stored), np.isnan(logits))
    assert int((np.argmax(stored[:3], axis=0) != labels.numpy())[nan_at].sum()) == 0


def test_float16_repair_takes_any_labels_and_strided_views():
    """Labels that are not the argmax at all are enforced too, on a view into a buffer."""
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=2.0, size=(6, 3, 5, 4)).astype(np.float32)
    labels = torch.from_numpy(rng.integers(0, 6, size=(3, 5, 4)).astype(np.uint8))
    buffer = torch.zeros((6, 5, 5, 4), dtype=torch.float16)
    view = buffer[:, 1:4]
    sinks.round_to_float16(view, torch.from_numpy(logits))
    sinks.repair_float16(view, labels)
    expected = float16_reference(logits, labels.numpy())
    np.testing.assert_array_equal(view.numpy().view(np.uint16), expected.view(np.uint16))
    assert not buffer[:, 0].any() and not buffer[:, 4].any()
    # A view that is not contiguous within a class, too (the tie test works on a copy).
    wide = torch.zeros((6, 3, 7, 4), dtype=torch.float16)
    rows = wide[:, :, 1:6]
    sinks.round_to_float16(rows, torch.from_numpy(logits))
    sinks.repair_float16(rows, labels)
    np.testing.assert_array_equal(rows.numpy().view(np.uint16), expected.view(np.uint16))
    assert not wide[:, :, 0].any() and not wide[:, :, 6].any()


def test_logits_sink_refuses_a_gap_between_slabs(tmp_path):
    sink = LogitsSink(tmp_path / "a.zarr", {})
    sink.begin(2, (4, 3, 3))
    part = torch.zeros((2, 1, 3, 3))
    with pytest.raises(ValueError, match="expected z=0"):
        sink.consume(Slab(z_start=1, logits=part, labels=labels_from_logits(part)))
    sink.abort()
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# the writer thread


class FailingWrite:
    """Stands in for the sink's chunk write: every write fails like a full disk."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay
        self.failed = threading.Event()

    def __call__(self, index, data) -> None:
        self.calls += 1
        time.sleep(self.delay)
        self.failed.set()
        raise OSError(28, "No space left on device")


def test_writer_error_surfaces_from_consume_and_abort_removes_the_temporary(tmp_path):
    logits = np.random.default_rng(1).normal(size=(3, 8, 4, 4)).astype(np.float32)
    sink = one_slice_per_chunk(tmp_path, 3, (8, 4, 4))  # the first slab is a whole chunk
    failing = sink._write_chunk = FailingWrite()
    first = torch.from_numpy(logits[:, :1])
    sink.consume(Slab(z_start=0, logits=first, labels=labels_from_logits(first)))
    assert failing.failed.wait(10)
    deadline = time.monotonic() + 10
    while sink._writer is not None and sink._writer._error is None:  # recorded after raising
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = torch.from_numpy(logits[:, 1:2])
    with pytest.raises(OSError, match="No space"):
        sink.consume(Slab(z_start=1, logits=second, labels=labels_from_logits(second)))
    assert sink.tmp.exists()
    sink.abort()  # what the pipeline does when a sink raises
    assert not sink.tmp.exists() and not (tmp_path / "a.zarr").exists()
    assert failing.calls == 1  # nothing was written after the first error


def test_writer_error_of_the_last_chunk_surfaces_inside_the_engine_run(tmp_path):
    """The last slab waits for the writer: a case whose engine run ended has its logits
    written, so a loop that drops it unwritten (a full disk stops it) leaves no writes."""
    logits = np.random.default_rng(2).normal(size=(3, 5, 4, 4)).astype(np.float32)
    sink = LogitsSink(tmp_path / "a.zarr", {})
    sink.begin(3, (5, 4, 4))
    sink._write_chunk = FailingWrite(delay=0.2)  # still writing when consume returns
    part = torch.from_numpy(logits)
    with pytest.raises(OSError, match="No space"):
        sink.consume(Slab(z_start=0, logits=part, labels=labels_from_logits(part)))
    sink.abort()
    assert not list(tmp_path.iterdir())


def test_writer_error_surfaces_from_finish(tmp_path):
    logits = np.random.default_rng(2).normal(size=(3, 5, 4, 4)).astype(np.float32)
    sink = LogitsSink(tmp_path / "a.zarr", {})
    sink.begin(3, (5, 4, 4))
    sink._write_chunk = FailingWrite(delay=0.2)
    part = torch.from_numpy(logits[:, :3])  # finish writes the short rest itself
    sink.consume(Slab(z_start=0, logits=part, labels=labels_from_logits(part)))
    with pytest.raises(OSError, match="No space"):
        sink.finish()
    assert not (tmp_path / "a.zarr").exists()  # not published
    sink.abort()
    assert not list(tmp_path.iterdir())


class GatedWrite:
    """Writes through to the sink's own chunk write once ``gate`` is open: a disk slower than
    the engine."""

    def __init__(self, write) -> None:
        self.write = write
        self.gate = threading.Event()
        self.entered = threading.Event()  # a write is waiting at the gate
        self.writes = 0

    def __call__(self, index, data) -> None:
        self.entered.set()
        assert self.gate.wait(30)
        self.write(index, data)
        self.writes += 1


def one_slice_per_chunk(tmp_path: Path, classes: int, shape: tuple[int, int, int]
                        ) -> LogitsSink:
    """A begun sink whose chunks hold one slice each."""
    mp = pytest.MonkeyPatch()
    mp.setattr(sinks, "LOGITS_CHUNK_BYTES", classes * shape[1] * shape[2] * 2)
    try:
        sink = LogitsSink(tmp_path / "a.zarr", {})
        sink.begin(classes, shape)
    finally:
        mp.undo()
    assert sink.chunk_z == 1
    return sink


def one_slice_chunks(tmp_path: Path, depth: int) -> tuple[LogitsSink, GatedWrite, np.ndarray]:
    logits = np.random.default_rng(5).normal(size=(2, depth, 4, 4)).astype(np.float32)
    sink = one_slice_per_chunk(tmp_path, 2, (depth, 4, 4))  # every slab hands a chunk over
    gated = sink._write_chunk = GatedWrite(sink._write_chunk)
    return sink, gated, logits


def consume_slice(sink: LogitsSink, logits: np.ndarray, z: int) -> None:
    part = torch.from_numpy(logits[:, z : z + 1])
    sink.consume(Slab(z_start=z, logits=part, labels=labels_from_logits(part)))


def test_writer_holds_at_most_three_chunks_then_consume_waits(tmp_path):
    sink, gated, logits = one_slice_chunks(tmp_path, 12)
    for z in range(sinks.WRITER_BUFFERS):  # one being written (held at the gate), two queued
        consume_slice(sink, logits, z)
    waiting = threading.Thread(target=consume_slice, args=(sink, logits, 3))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and gated.writes == 0  # no fourth buffer: consume waits
    assert sink._writer is not None and sink._writer._made == sinks.WRITER_BUFFERS
    gated.gate.set()
    waiting.join(30)
    assert not waiting.is_alive() and sink._writer._made == sinks.WRITER_BUFFERS
    for z in range(4, 12):
        consume_slice(sink, logits, z)
    sink.finish()
    assert gated.writes == 12
    stored = zarr.open_array(tmp_path / "a.zarr", mode="r")[...]
    np.testing.assert_array_equal(np.argmax(stored, axis=0), labels_from_logits(
        torch.from_numpy(logits)).numpy())


def test_abort_drops_queued_chunks_and_nothing_is_written_after_it(tmp_path):
    sink, gated, logits = one_slice_chunks(tmp_path, 12)
    for z in range(sinks.WRITER_BUFFERS):
        consume_slice(sink, logits, z)
    # The writer holds the first chunk at the gate before abort begins; that write ends after.
    assert gated.entered.wait(30)
    threading.Timer(0.2, gated.gate.set).start()
    sink.abort()  # waits for that write, drops the two queued chunks, removes the temporary
    assert gated.writes == 1
    time.sleep(0.2)
    assert gated.writes == 1 and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# confidence


@pytest.mark.parametrize("classes", [2, 5, 32])
def test_confidence_sink_matches_float64_reference_and_the_previous_bits(classes):
    rng = np.random.default_rng(classes)
    logits = rng.normal(scale=3.0, size=(classes, 9, 40, 33)).astype(np.float32)
    logits[:, 0, 0, 0] = 0.0  # uniform
    logits[0, 0, 0, 1] = 1e4  # certain
    logits[1, 0, 0, 2] = -math.inf
    sink = ConfidenceSink()
    stream(sink, logits, [2, 3, 9])
    assert sink.count == logits[0].size
    assert sink.confidence == pytest.approx(confidence_float64(np.clip(
        logits, -1e30, 1e30)).mean(), abs=1e-6)
    # Bit for bit the per-slice float64 sums of the maps computed before (records hash it).
    total = sum(float(confidence_before(torch.from_numpy(logits[:, k])).sum(
        dtype=torch.float64)) for k in range(logits.shape[1]))
    assert sink.total == total


def test_confidence_map_scratch_changes_no_bit_and_is_reused():
    rng = np.random.default_rng(9)
    scratch = EntropyScratch()
    ring = torch.from_numpy(rng.normal(scale=4.0, size=(7, 4, 12, 15)).astype(np.float32))
    kept = []
    for k in range(ring.shape[1]):
        view = ring[:, k, 2:10, 1:13]  # strided, as the engine's ring slices are
        got = confidence_map(view, scratch)
        assert torch.equal(got, confidence_before(view))
        kept.append(scratch.buffer("clamped", (7, 8 * 12), view.device).data_ptr())
    assert len(set(kept)) == 1
    np.testing.assert_allclose(confidence_map(ring[:, 0], scratch).numpy(),
                               confidence_float64(ring[:, 0].numpy()), atol=2e-6)


@pytest.mark.parametrize("classes", [2, 3, 17, 32, 33])
def test_confidence_in_blocks_has_the_bits_of_the_whole_slice(monkeypatch, classes):
    """Blocks of about 64 voxels (so that most slices split, remainders included), slices of
    odd sizes, strided views: every voxel's bits equal the one-pass map's."""
    monkeypatch.setattr(sinks, "CONFIDENCE_BLOCK_BYTES", 64 * 4 * classes)
    monkeypatch.setattr(sinks, "CONFIDENCE_WHOLE_BYTES", 0)
    rng = np.random.default_rng(classes)
    scratch = EntropyScratch()
    blocked = 0
    for y, x in [(9, 64), (17, 32), (33, 48), (15, 96), (5, 512), (130, 129), (3, 5), (1, 127)]:
        padded = torch.from_numpy(
            rng.normal(scale=4.0, size=(classes, y + 2, x + 3)).astype(np.float32))
        padded[0, 0, :3] = torch.tensor([math.inf, -math.inf, 1e4])
        for view in (padded[:, :y, :x], padded[:, 2:, 3:].contiguous()):
            blocked += sinks._confidence_block_rows(view) is not None
            assert torch.equal(confidence_map(view, scratch), confidence_before(view))
    assert blocked == 12  # all but the last two shapes go in blocks
