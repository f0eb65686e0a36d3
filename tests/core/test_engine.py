"""Streaming engine vs a one-shot numpy reference: labels, blended logits, slab delivery; with a
backend (``run_sliding_window``) and with a plain function (``slide``)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

import itk_infer.engine as engine
from itk_infer.blending import importance_map
from itk_infer.config import SlidingWindowSettings
from itk_infer.engine import (
    Sink,
    Slab,
    label_dtype,
    plan_placement,
    run_sliding_window,
    slide,
)
from itk_infer.errors import CaseError
from itk_infer.grid import padded_shape, plan_windows

# Near-ties between the two best classes may round either way in float32; such voxels are
# allowed to differ (and must be rare). Logits are compared with this tolerance.
TIE_GAP = 1e-4
RTOL, ATOL = 1e-5, 1e-5


class ConvBackend:
    """A fake model whose logits depend on where the window is.

    A fixed random 3x3x3 convolution with zero padding (window borders differ from the same
    voxels seen inside another window) plus a per-window offset proportional to the window's
    mean intensity (every voxel differs from window to window), so any blending error shows.
    """

    name = "fake-conv"
    fingerprint = "fake"
    static_patch_size = None
    num_classes = None
    fp16 = False

    def __init__(self, num_classes: int, seed: int = 0, static_batch_size: int | None = None):
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn((num_classes, 1, 3, 3, 3), generator=gen, dtype=torch.float64)
        self.bias = torch.randn(num_classes, generator=gen, dtype=torch.float64)
        self.offset = 3.0 * torch.randn(num_classes, generator=gen, dtype=torch.float64)
        self.device = torch.device("cpu")
        self.static_batch_size = static_batch_size
        self.batch_sizes: list[int] = []

    def window_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 1, z, y, x) → (N, C, z, y, x) float32; computed in float64, so batch-invariant."""
        x = batch.to(torch.float64)
        y = torch.nn.functional.conv3d(x, self.weight, self.bias, padding=1)
        mean = x.mean(dim=(1, 2, 3, 4)).reshape(-1, 1, 1, 1, 1)
        y += mean * self.offset.reshape(1, -1, 1, 1, 1)
        return y.to(torch.float32)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        assert batch.dtype == torch.float32 and batch.ndim == 5 and batch.shape[1] == 1
        self.batch_sizes.append(int(batch.shape[0]))
        return self.window_logits(batch)


class CaptureSink(Sink):
    """Keeps copies of everything the engine hands over, in order."""

    def __init__(self) -> None:
        self.began: list[tuple[int, tuple]] = []
        self.slabs: list[tuple[int, np.ndarray, np.ndarray]] = []

    def begin(self, num_classes, shape_zyx) -> None:
        self.began.append((num_classes, tuple(shape_zyx)))

    def consume(self, slab: Slab) -> None:
        assert slab.logits.dtype == torch.float32
        assert slab.logits.shape[1:] == slab.labels.shape
        self.devices = {slab.logits.device.type, slab.labels.device.type}
        self.slabs.append((slab.z_start, slab.logits.cpu().numpy().copy(),
                           slab.labels.cpu().numpy().copy()))

    def assembled(self, shape) -> tuple[np.ndarray, np.ndarray]:
        """Full logits and labels; asserts every slice came exactly once, in increasing Z."""
        z = 0
        for z_start, _logits, labels in self.slabs:
            assert z_start == z, "slabs must arrive in increasing Z, without gaps or repeats"
            assert labels.shape[1:] == tuple(shape[1:])
            z += labels.shape[0]
        assert z == shape[0], "every slice must be delivered"
        return (np.concatenate([s[1] for s in self.slabs], axis=1),
                np.concatenate([s[2] for s in self.slabs], axis=0))


def one_shot_reference(volume, window_logits, patch, stride, blend):
    """Pad (edge), accumulate all windows into a full float64 (C, Z, Y, X) array, crop, divide."""
    shape = volume.shape
    padded = padded_shape(shape, patch)
    vol = np.pad(volume, [(0, p - s) for s, p in zip(shape, padded, strict=True)], mode="edge")
    weight = importance_map(patch, blend).astype(np.float64)
    acc = None
    wsum = np.zeros(padded, dtype=np.float64)
    for z, y, x in plan_windows(padded, patch, stride):
        region = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
        window = torch.from_numpy(np.ascontiguousarray(vol[region]))[None, None]
        out = window_logits(window)[0].numpy().astype(np.float64)
        if acc is None:
            acc = np.zeros((out.shape[0], *padded), dtype=np.float64)
        acc[(slice(None), *region)] += out * weight
        wsum[region] += weight
    crop = tuple(slice(0, s) for s in shape)
    logits = acc[(slice(None), *crop)] / wsum[crop]
    labels = (logits[0] > 0).astype(np.int64) if logits.shape[0] == 1 else logits.argmax(0)
    return logits, labels


def top_two_gap(logits: np.ndarray) -> np.ndarray:
    """Distance between the best and second best class (|logit| for a sigmoid model)."""
    if logits.shape[0] == 1:
        return np.abs(logits[0])
    part = np.sort(logits, axis=0)
    return part[-1] - part[-2]


def check_against_reference(shape, patch, stride, num_classes, batch, blend, seed):
    rng = np.random.default_rng(seed)
    volume = rng.random(shape, dtype=np.float32)
    backend = ConvBackend(num_classes, seed=seed)
    sink = CaptureSink()
    sliding = SlidingWindowSettings(patch, stride, batch_size=batch, blend=blend)
    stats = run_sliding_window(volume, backend, sliding, [sink])

    padded = padded_shape(shape, patch)
    windows = plan_windows(padded, patch, stride)
    assert sink.began == [(num_classes, shape)]
    assert stats.num_classes == num_classes
    assert stats.windows == len(windows)
    assert sum(backend.batch_sizes) == len(windows)
    assert max(backend.batch_sizes) <= batch
    assert stats.forward_calls == len(backend.batch_sizes)
    assert stats.placement is not None and stats.placement.accumulate_device == "cpu"

    logits, labels = sink.assembled(shape)
    ref_logits, ref_labels = one_shot_reference(volume, backend.window_logits, patch, stride,
                                                blend)
    assert logits.shape == ref_logits.shape and logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref_logits, rtol=RTOL, atol=ATOL)
    assert labels.dtype == label_dtype(num_classes) == np.uint8
    differ = labels != ref_labels
    # Only genuine near-ties may round differently, and there must be very few of them.
    assert np.all(top_two_gap(ref_logits)[differ] < TIE_GAP), "labels differ away from a tie"
    assert differ.sum() <= max(1, labels.size // 10000)
    # The engine's labels are exactly the argmax of the logits it hands over.
    own = (logits[0] > 0) if num_classes == 1 else logits.argmax(0)
    np.testing.assert_array_equal(labels, own)
    return stats


def random_cases(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        patch = tuple(int(v) for v in rng.integers(2, 9, size=3))
        # some axes shorter than the patch, most longer, some not a multiple of anything
        shape = tuple(int(rng.integers(max(1, p - 3), 3 * p + 4)) for p in patch)
        kind = i % 4
        if kind == 0:
            stride = patch  # no overlap
        elif kind == 1:
            stride = tuple(max(1, p // 2) for p in patch)
        else:
            stride = tuple(int(rng.integers(1, p + 1)) for p in patch)
        num_classes = (1, 2, 5, 40)[i % 4 if i % 8 < 4 else (i + 1) % 4]
        batch = (1, 3)[(i // 3) % 2]
        blend = ("gaussian", "constant")[(i // 4) % 2]
        yield pytest.param(shape, patch, stride, num_classes, batch, blend, 1000 + i,
                           id=f"{i}-{shape}-{patch}-{stride}-C{num_classes}-b{batch}-{blend}")


@pytest.mark.parametrize(
    ("shape", "patch", "stride", "num_classes", "batch", "blend", "seed"),
    list(random_cases(32, seed=7)),
)
def test_streamed_equals_one_shot_random(shape, patch, stride, num_classes, batch, blend, seed):
    check_against_reference(shape, patch, stride, num_classes, batch, blend, seed)


@pytest.mark.parametrize(
    ("shape", "patch", "stride", "num_classes", "batch", "blend"),
    [
        # smaller than the patch on every axis: one padded window
        ((3, 5, 2), (4, 8, 6), (2, 4, 3), 5, 1, "gaussian"),
        # smaller than the patch on one axis only
        ((17, 3, 11), (6, 6, 6), (3, 3, 3), 2, 3, "constant"),
        # stride 1 on a small case: every voxel blended from up to 64 windows
        ((7, 9, 8), (4, 4, 4), (1, 1, 1), 5, 3, "gaussian"),
        ((6, 5, 7), (3, 4, 2), (1, 1, 1), 1, 1, "constant"),
        # strides that do not divide the volume: flush last windows, ring wrap-around
        ((23, 13, 19), (7, 5, 6), (3, 4, 5), 40, 3, "gaussian"),
        ((29, 10, 10), (8, 10, 10), (5, 10, 10), 2, 1, "gaussian"),
        # stride == patch with a remainder: the last window overlaps its neighbour
        ((21, 12, 9), (5, 4, 4), (5, 4, 4), 5, 3, "constant"),
        # a single window along Z
        ((6, 20, 20), (6, 8, 8), (6, 3, 5), 2, 3, "gaussian"),
    ],
)
def test_streamed_equals_one_shot_edge_cases(shape, patch, stride, num_classes, batch, blend):
    check_against_reference(shape, patch, stride, num_classes, batch, blend, seed=sum(shape))


def test_small_emit_pieces_give_the_same_result(monkeypatch):
    """Slabs split into one-slice pieces (as for huge slices) change nothing but the pieces."""
    args = ((19, 11, 13), (6, 5, 5), (4, 3, 2), 5, 3, "gaussian")
    whole = check_against_reference(*args, seed=3)
    monkeypatch.setattr(engine, "EMIT_BYTES", 1)
    pieces = check_against_reference(*args, seed=3)
    assert whole.windows == pieces.windows


@pytest.mark.parametrize(
    ("shape", "patch", "stride", "num_classes", "emit_bytes", "blend_split"),
    [
        # py * px = 256: blending is split too; stride 5 of 8 wraps the ring
        ((37, 40, 44), (8, 16, 16), (5, 7, 9), 5, None, True),
        # py * px = 99: blending stays whole (its parts would not start at a multiple of 64
        # elements); division, labels and zeroing are split
        ((23, 19, 21), (7, 9, 11), (3, 4, 5), 3, None, False),
        # one-slice pieces: the labels are split by rows; two classes
        ((12, 33, 30), (4, 8, 8), (3, 8, 8), 2, 1, True),
    ],
)
def test_engine_work_in_parts_gives_the_same_bits(monkeypatch, shape, patch, stride,
                                                  num_classes, emit_bytes, blend_split):
    """The engine's CPU work split over threads hands the sinks exactly the bits of one thread."""
    volume = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    if emit_bytes is not None:
        monkeypatch.setattr(engine, "EMIT_BYTES", emit_bytes)
    threads: dict[str, set[int]] = {"blend": set(), "labels": set()}
    ring_add, labels_of = engine._SlabRing.add, engine.labels_from_logits

    def spied_add(*args, **kwargs):
        threads["blend"].add(threading.get_ident())
        return ring_add(*args, **kwargs)

    def spied_labels(logits):
        threads["labels"].add(threading.get_ident())
        return labels_of(logits)

    monkeypatch.setattr(engine._SlabRing, "add", spied_add)
    monkeypatch.setattr(engine, "labels_from_logits", spied_labels)

    def run(parts: int) -> list:
        monkeypatch.setattr(engine, "CPU_ENGINE_PARTS", parts)
        for seen in threads.values():
            seen.clear()
        sink = CaptureSink()
        before = torch.get_num_threads()
        torch.set_num_threads(4)  # the model's threads bound the parts
        try:
            slide(volume, ConvBackend(num_classes, seed=4).forward,
                  SlidingWindowSettings(patch, stride, batch_size=3), [sink])
        finally:
            torch.set_num_threads(before)
        sink.assembled(shape)
        return sink.slabs

    whole = run(1)
    assert len(threads["blend"]) == len(threads["labels"]) == 1
    parted = run(3)
    assert len(threads["labels"]) > 1
    assert (len(threads["blend"]) > 1) == blend_split
    assert len(parted) == len(whole)
    for (z0, logits0, labels0), (z1, logits1, labels1) in zip(whole, parted, strict=True):
        assert z0 == z1
        np.testing.assert_array_equal(logits1.view(np.uint32), logits0.view(np.uint32))
        np.testing.assert_array_equal(labels1, labels0)


def test_engine_parts_pass_on_a_failure_and_finish_every_part():
    done: list[tuple[int, int]] = []

    def work(a: int, b: int) -> None:
        if a > 0:
            raise ValueError(f"part {a}")
        done.append((a, b))

    parts = engine._Parts(3)
    try:
        with pytest.raises(ValueError, match="part"):
            parts.run(10, work)
        assert done == [(0, 3)]
        covered: list[tuple[int, int]] = []
        parts.run(10, lambda a, b: covered.append((a, b)))
        assert sorted(covered) == [(0, 3), (3, 6), (6, 10)]
        covered.clear()
        parts.run(10, lambda a, b: covered.append((a, b)), unit=65)  # not aligned: whole
        assert covered == [(0, 10)]
    finally:
        parts.close()


def test_sigmoid_labels_are_positive_logits():
    shape, patch, stride = (12, 10, 14), (4, 6, 6), (3, 4, 5)
    volume = np.random.default_rng(5).random(shape, dtype=np.float32)
    backend = ConvBackend(1, seed=5)
    sink = CaptureSink()
    run_sliding_window(volume, backend, SlidingWindowSettings(patch, stride, 2), [sink])
    logits, labels = sink.assembled(shape)
    assert logits.shape == (1, *shape)
    assert set(np.unique(labels)) <= {0, 1}
    np.testing.assert_array_equal(labels, (logits[0] > 0).astype(labels.dtype))
    assert 0 < labels.sum() < labels.size, "the fake model should give both classes here"
    ref_logits, _ = one_shot_reference(volume, backend.window_logits, patch, stride, "gaussian")
    clear = np.abs(ref_logits[0]) > TIE_GAP
    np.testing.assert_array_equal(labels[clear], (ref_logits[0] > 0)[clear])


def test_slices_are_streamed_before_the_last_window():
    """A slab is handed over while later rows are still to come: memory follows the patch."""
    events: list[str] = []

    class Recording(ConvBackend):
        def forward(self, batch):
            events.append("forward")
            return super().forward(batch)

    class RecordingSink(CaptureSink):
        def consume(self, slab):
            events.append(f"slab {slab.z_start}")
            super().consume(slab)

    shape, patch, stride = (40, 8, 8), (8, 8, 8), (4, 8, 8)
    volume = np.random.default_rng(0).random(shape, dtype=np.float32)
    sink = RecordingSink()
    run_sliding_window(volume, Recording(2), SlidingWindowSettings(patch, stride, 1), [sink])
    sink.assembled(shape)
    first_slab = events.index("slab 0")
    assert events[:first_slab] == ["forward"] * 1, "slices 0..3 are final after the first row"
    assert events[-1].startswith("slab"), "the tail is emitted after the last row"
    assert events.count("forward") == len(plan_windows(shape, patch, stride)) == 9
    # Rows 1..8 each finish the 4 slices before the next row starts.
    assert [e for e in events if e.startswith("slab")] == [f"slab {z}" for z in range(0, 33, 4)]


def test_wrong_output_shape_raises_case_error_naming_both_shapes():
    class Cropping(ConvBackend):
        def forward(self, batch):
            return super().forward(batch)[:, :, 1:]

    volume = np.zeros((10, 10, 10), dtype=np.float32)
    with pytest.raises(CaseError) as info:
        run_sliding_window(volume, Cropping(3), SlidingWindowSettings((4, 6, 6), None, 2),
                           [CaptureSink()])
    message = str(info.value)
    assert "[2, 3, 3, 6, 6]" in message, message  # what the model returned
    assert "[2, 1, 4, 6, 6]" in message, message  # what it was given
    assert "(N, C, 4, 6, 6)" in message, message


def test_static_batch_is_padded_and_padding_never_contributes():
    """A fixed-batch model always gets its batch size; padding rows return NaN, unused."""
    shape, patch, stride = (13, 9, 11), (5, 4, 6), (3, 3, 4)
    total = len(plan_windows(shape, patch, stride))

    class NanPadding(ConvBackend):
        """Counts the windows of each row; anything beyond them in a batch is padding."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.remaining = list(rows)

        def forward(self, batch):
            assert batch.shape[0] == 4, "a static-batch model must always get its batch size"
            out = super().forward(batch)
            real = min(4, self.remaining[0])
            self.remaining[0] -= real
            if self.remaining[0] == 0:
                self.remaining.pop(0)
            out[real:] = float("nan")
            return out

    windows = plan_windows(shape, patch, stride)
    rows = [sum(1 for w in windows if w[0] == z) for z in sorted({w[0] for w in windows})]
    assert all(r % 4 for r in rows), "every row's last batch needs padding"
    backend = NanPadding(5, seed=9, static_batch_size=4)
    sink = CaptureSink()
    stats = run_sliding_window(np.random.default_rng(9).random(shape, dtype=np.float32),
                               backend, SlidingWindowSettings(patch, stride, 2, "gaussian"),
                               [sink])
    assert not backend.remaining, "every real window went to the model exactly once"
    assert stats.forward_calls == sum(math.ceil(r / 4) for r in rows)
    assert stats.windows == total
    logits, _ = sink.assembled(shape)
    assert np.isfinite(logits).all(), "a padding window leaked into the blend"


def test_cpu_placement_and_label_dtype():
    placement = plan_placement(torch.device("cpu"), (64, 64, 64), (32, 32, 32), 4, 2, None)
    assert placement == engine.Placement("cpu", "cpu")
    assert label_dtype(2) == np.uint8 and label_dtype(256) == np.uint8
    assert label_dtype(257) == np.uint16


@pytest.mark.parametrize("num_classes", [2, 5, 40, 300])
def test_labels_from_logits_is_first_argmax_even_with_ties(num_classes):
    """Integer logits tie often: the first best class must win, as in numpy's argmax."""
    logits = np.random.default_rng(num_classes).integers(-3, 3, size=(num_classes, 3, 7, 9))
    labels = engine.labels_from_logits(torch.from_numpy(logits.astype(np.float32)))
    assert labels.dtype == (torch.uint8 if num_classes <= 256 else torch.int32)
    np.testing.assert_array_equal(labels.numpy(), logits.argmax(0))
    sigmoid = engine.labels_from_logits(torch.from_numpy(logits[:1].astype(np.float32)))
    np.testing.assert_array_equal(sigmoid.numpy(), (logits[0] > 0).astype(np.uint8))


def test_model_keeps_the_callers_threads_and_they_are_restored():
    """The engine's own ops run on CPU_BLEND_THREADS; the model and the caller keep theirs."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []

    class Recording(ConvBackend):
        def forward(self, batch):
            seen.append(torch.get_num_threads())
            return super().forward(batch)

    class ThreadSink(CaptureSink):
        def consume(self, slab):
            seen.append(-torch.get_num_threads())
            super().consume(slab)

    try:
        volume = np.random.default_rng(2).random((12, 10, 10), dtype=np.float32)
        run_sliding_window(volume, Recording(3), SlidingWindowSettings((4, 6, 6), None, 2),
                           [ThreadSink()])
        assert torch.get_num_threads() == 2
        assert {s for s in seen if s > 0} == {2}
        assert {-s for s in seen if s < 0} == {engine.CPU_BLEND_THREADS}

        class Failing(ConvBackend):
            def forward(self, batch):
                raise RuntimeError("model failed")

        with pytest.raises(RuntimeError, match="model failed"):
            run_sliding_window(volume, Failing(3), SlidingWindowSettings((4, 6, 6)), [])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --- the engine with a plain function as the model


def affine_predictor(num_classes: int, seed: int, dtype: torch.dtype = torch.float32,
                     batch_sizes: list[int] | None = None):
    """A model as a plain function: logits are an affine function of the window's voxels.

    ``a_c * v + b_c + d_c * mean(window)``: the mean term makes every window's logits differ
    for the same voxel, so a blending error shows. Computed in float64 (batch-invariant), then
    cast to ``dtype``; the batch sizes it sees go to ``batch_sizes``.
    """
    gen = torch.Generator().manual_seed(seed)
    a, b, d = (torch.randn(num_classes, generator=gen, dtype=torch.float64).reshape(1, -1, 1, 1, 1)
               for _ in range(3))
    seen = [] if batch_sizes is None else batch_sizes

    def predict(x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and x.ndim == 5 and x.shape[1] == 1
        seen.append(int(x.shape[0]))
        v = x.to(torch.float64)
        mean = v.mean(dim=(1, 2, 3, 4), keepdim=True)
        return (a * v + b + 3.0 * d * mean).to(dtype)

    return predict


def rows_of(shape, patch, stride) -> list[int]:
    """How many windows each row (same Z start) has."""
    windows = plan_windows(padded_shape(shape, patch), patch, stride)
    return [sum(1 for w in windows if w[0] == z) for z in sorted({w[0] for w in windows})]


@pytest.mark.parametrize(
    ("shape", "patch", "stride", "num_classes", "batch", "blend", "dtype"),
    [
        # smaller than the patch on every axis: a single, edge-padded window
        ((3, 5, 2), (4, 8, 6), (2, 4, 3), 3, 2, "gaussian", torch.float32),
        ((2, 3, 4), (5, 5, 5), None, 1, 1, "constant", torch.float32),
        # smaller than the patch on one axis; batch 2 against 5 rows of 3 windows
        ((17, 3, 11), (6, 6, 6), (3, 3, 3), 4, 2, "gaussian", torch.float32),
        # float16 logits; batch 4 against 4 rows of 6, batch 5 against 5 rows of 12
        ((13, 9, 11), (5, 4, 6), (3, 3, 5), 5, 4, "constant", torch.float16),
        ((20, 14, 15), (6, 5, 7), (4, 3, 4), 2, 5, "gaussian", torch.float16),
    ],
)
def test_slide_with_a_plain_function_equals_the_reference(shape, patch, stride, num_classes,
                                                          batch, blend, dtype):
    volume = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    sizes: list[int] = []
    predict = affine_predictor(num_classes, seed=len(shape) + num_classes, dtype=dtype,
                               batch_sizes=sizes)
    sink = CaptureSink()
    sliding = SlidingWindowSettings(patch, stride, batch_size=batch, blend=blend)
    stats = slide(volume, predict, sliding, [sink])

    rows = rows_of(shape, patch, sliding.resolved(shape)[1])
    assert sink.began == [(num_classes, shape)]
    assert stats.num_classes == num_classes and stats.windows == sum(rows)
    # Every row is cut into batches of its own; on the CPU short batches stay short.
    assert sizes == [min(batch, r - i) for r in rows for i in range(0, r, batch)]
    assert stats.forward_calls == len(sizes)
    assert stats.placement == engine.Placement("cpu", "cpu")
    logits, labels = sink.assembled(shape)
    ref_logits, ref_labels = one_shot_reference(volume, predict, patch,
                                                sliding.resolved(shape)[1], blend)
    np.testing.assert_allclose(logits, ref_logits, rtol=RTOL, atol=ATOL)
    differ = labels != ref_labels
    assert np.all(top_two_gap(ref_logits)[differ] < TIE_GAP), "labels differ away from a tie"


def test_slide_batches_not_dividing_the_windows_with_a_static_batch():
    """A fixed batch size the window count is no multiple of: short batches are filled up."""
    shape, patch, stride = (10, 10, 9), (4, 4, 4), (3, 3, 3)
    rows = rows_of(shape, patch, stride)
    assert rows == [9, 9, 9]  # 27 windows: neither a row nor the whole is a multiple of 4
    sizes: list[int] = []
    predict = affine_predictor(2, seed=1, batch_sizes=sizes)
    volume = np.random.default_rng(1).random(shape, dtype=np.float32)
    sink = CaptureSink()
    stats = slide(volume, predict, SlidingWindowSettings(patch, stride, 1, "gaussian"), [sink],
                  device="cpu", static_batch_size=4, num_classes_hint=2)
    assert set(sizes) == {4} and stats.forward_calls == sum(math.ceil(r / 4) for r in rows)
    logits, _ = sink.assembled(shape)
    ref_logits, _ = one_shot_reference(volume, predict, patch, stride, "gaussian")
    np.testing.assert_allclose(logits, ref_logits, rtol=RTOL, atol=ATOL)


def test_slide_with_a_pointwise_lambda_returns_it_unchanged():
    """Windows that agree on every voxel blend to that value, whatever the weights."""
    shape = (9, 7, 12)
    volume = np.random.default_rng(4).random(shape, dtype=np.float32)
    sink = CaptureSink()
    slide(volume, lambda x: torch.cat([2 * x - 1, 0.5 - x], dim=1),
          SlidingWindowSettings((4, 4, 5), (2, 3, 3), 3), [sink])
    logits, labels = sink.assembled(shape)
    np.testing.assert_allclose(logits, np.stack([2 * volume - 1, 0.5 - volume]), atol=1e-6)
    np.testing.assert_array_equal(labels, (volume < 0.5).astype(np.uint8))  # 2v - 1 < 0.5 - v


def test_run_sliding_window_is_slide_with_the_backend_forward():
    shape, patch, stride = (19, 11, 13), (6, 5, 5), (4, 3, 2)
    volume = np.random.default_rng(8).random(shape, dtype=np.float32)
    sinks = CaptureSink(), CaptureSink()
    run_sliding_window(volume, ConvBackend(5, seed=8, static_batch_size=3),
                       SlidingWindowSettings(patch, stride, 2), [sinks[0]])
    slide(volume, ConvBackend(5, seed=8).forward, SlidingWindowSettings(patch, stride, 2),
          [sinks[1]], device=torch.device("cpu"), static_batch_size=3)
    for (z0, logits0, labels0), (z1, logits1, labels1) in zip(*(s.slabs for s in sinks),
                                                              strict=True):
        assert z0 == z1
        assert logits0.tobytes() == logits1.tobytes() and labels0.tobytes() == labels1.tobytes()
