"""Cost of the output sinks (issue 16): stage by stage on synthetic slabs, and end to end,
"labels only" against "labels + logits + confidence".

1. Stages: one synthetic slab of the size the engine hands to sinks (``EMIT_BYTES`` of
   float32 logits: C = 32, 2 x 512 x 512) through each step, before (the sinks as they were
   up to issue 16, kept below as ``Before*``), as of 2026-12-03 (chunks written through
   zarr, ``ZarrWriteLogitsSink``), as of 2026-12-07 (whole-slice confidence and a tie test
   of one op per class, ``dec07_*``) and now; torch on ``CPU_BLEND_THREADS``, as inside the
   engine; stages interleaved, best of ``--repeats``.
2. Engine: ``itk_infer.engine.slide`` over a 96 x 512 x 512 phantom (the issue's patch
   64 x 128 x 128, stride 32 x 64 x 64, batch 1) with a 1x1x1 conv in torch as the model, so
   that the sinks dominate; ``--model-ms N`` adds a stand-in model (float32 matmuls on
   torch's threads, calibrated to about N ms per window). Only the sinks differ between its
   variants: the engine is this tree's in all of them.
3. CLI, the issue's setup: ``itk_infer`` in a subprocess per run on bench_memory's smooth CT
   (``--cli-z`` x 512 x 512) with a random 32-class 1x1x1 conv ONNX model (ONNX Runtime),
   wall time, CPU time and peak RSS; ``--writer-buffers N`` adds a run with N chunk buffers.
   The cases run in the command's process (``--in-process``), where the sinks are swapped.
   Every dated variant also runs the engine as it was up to 2026-12-08: ONNX Runtime's idle
   threads spin and the engine's own work runs on one thread; "labels only, 12-08" is labels
   only so, the base of those variants' ratios.
   ``--cli-variants A,B`` runs only the named variants (labels only always).

Variants run interleaved (A B C, C B A, ...); each figure is the best of ``--e2e-repeats``,
and ratios compare figures of the same run. Run from the repository root:
``python benchmarks/bench_sinks.py`` (15-25 minutes on 2 cores, ~2 GB of disk in the
temporary folder), ``--only stages|e2e|cli`` for one part, or ``--quick`` (256 x 256 slices,
short volumes: a smoke test, not figures to report).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `itk_infer` importable
    sys.path.insert(0, str(ROOT))

from itk_infer import engine, sinks  # noqa: E402
from itk_infer.atomic import publish  # noqa: E402
from itk_infer.config import SlidingWindowSettings, Triple  # noqa: E402
from itk_infer.engine import Sink, Slab, labels_from_logits  # noqa: E402
from itk_infer.records import output_size  # noqa: E402

# ----------------------------------------------------------------------------- before


def before_logits_to_float16(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """``sinks.logits_to_float16`` up to issue 16: fresh tensors, a full float16 argmax."""
    half = logits.clamp(-sinks.FLOAT16_MAX, sinks.FLOAT16_CLAMP).to(torch.float16)
    if half.shape[0] == 1:
        bad = (labels == 1) & (half[0] <= 0)
    else:
        bad = labels_from_logits(half).long() != labels.long()
    stored = half.cpu().numpy()
    if not bool(bad.any()):
        return stored
    bad_np = bad.cpu().numpy()
    if stored.shape[0] == 1:
        stored[0][bad_np] = np.finfo(np.float16).smallest_normal
        return stored
    by_voxel = np.moveaxis(stored, 0, -1)
    plane = by_voxel[bad_np]
    top = plane.max(axis=1)
    winners = labels.cpu().numpy()[bad_np].astype(np.intp)
    plane[np.arange(len(winners)), winners] = np.nextafter(top, np.float16(np.inf))
    by_voxel[bad_np] = plane
    return stored


class BeforeLogitsSink(sinks.LogitsSink):
    """The logits sink up to issue 16: everything on the engine's thread, list + concatenate
    buffering, zarr's own empty-chunk test."""

    def begin(self, num_classes: int, shape_zyx: Triple) -> None:
        import zarr
        from zarr.codecs import BloscCodec, BloscShuffle

        z, y, x = shape_zyx
        self.chunk_z = max(1, min(z, sinks.LOGITS_CHUNK_BYTES // (num_classes * y * x * 2)))
        self._array = zarr.create_array(
            store=str(self.tmp), shape=(num_classes, z, y, x),
            chunks=(num_classes, self.chunk_z, y, x), dtype="float16",
            compressors=BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle),
            fill_value=0.0, zarr_format=3,
            attributes={**self.attributes, "num_classes": num_classes})
        self._buffer: list[np.ndarray] = []
        self._buffer_start = 0

    def consume(self, slab: Slab) -> None:
        self._buffer.append(before_logits_to_float16(slab.logits, slab.labels))
        end = self._buffer_start + sum(b.shape[1] for b in self._buffer)
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
        if self._buffer:
            self._flush(self._array.shape[1])
        size = output_size(self.tmp)
        publish(self.tmp, self.path)
        return size


class ZarrWriteLogitsSink(sinks.LogitsSink):
    """The logits sink of 2026-12-03: as now, but each chunk written through zarr's
    ``array[...] = data`` instead of its own Blosc encode and file write."""

    def _write_chunk(self, index: int, data: np.ndarray) -> None:
        start = index * self.chunk_z
        end = min(start + self.chunk_z, self._array.shape[1])
        self._array[:, start:end] = data[:, : end - start]


def before_confidence_map(logits: torch.Tensor) -> torch.Tensor:
    """``sinks.confidence_map`` up to issue 16 (C > 1): fresh (C, Y, X) temporaries."""
    bound = sinks.CONFIDENCE_LOGIT_BOUND
    log_p = torch.log_softmax(logits.float().clamp(-bound, bound), dim=0)
    entropy = -(log_p.exp() * log_p).sum(dim=0)
    return (1.0 - entropy / math.log(logits.shape[0])).clamp_(0.0, 1.0)


class BeforeConfidenceSink(sinks.ConfidenceSink):
    """The confidence sink up to issue 16: fresh (C, Y, X) temporaries for every slice (the
    per-label sums, added since, as now)."""

    def consume(self, slab: Slab) -> None:
        for k in range(slab.logits.shape[1]):
            conf = before_confidence_map(slab.logits[:, k])
            self.total += float(conf.sum(dtype=torch.float64))
            self.count += conf.numel()
            self._add_by_label(conf, slab.labels[k])


def dec07_confidence_map(logits: torch.Tensor,
                         scratch: sinks.EntropyScratch | None = None) -> torch.Tensor:
    """``sinks.confidence_map`` of 2026-12-07 (C > 1): the same ops on whole (C, Y, X)
    slices in two reused buffers, no blocks (today's path for small slices)."""
    return sinks.whole_slice_confidence(logits, scratch or sinks.EntropyScratch())


def dec07_repair_float16(half: torch.Tensor, labels: torch.Tensor) -> None:
    """``sinks.repair_float16`` of 2026-12-07 (C > 1): a clamp pass, then a running maximum
    and a count of bit-equal classes, one op per class each; the mending as then (its
    maximum not yet skipping NaN, the same cost)."""
    half.clamp_(-sinks.FLOAT16_MAX, sinks.FLOAT16_CLAMP)
    top = half[0].clone()
    for c in range(1, half.shape[0]):
        torch.maximum(top, half[c], out=top)
    own = torch.gather(half, 0, labels.long().unsqueeze(0))[0]
    ties = torch.zeros(top.shape, dtype=torch.uint8)
    equal = torch.empty(top.shape, dtype=torch.bool)
    bits, top_bits = half.view(torch.int16), top.view(torch.int16)
    for c in range(half.shape[0]):
        torch.eq(bits[c], top_bits, out=equal)
        ties.add_(equal.view(torch.uint8))
    suspect = (ties > 1) | (top == 0) | (own != top)
    bad = torch.zeros_like(suspect)
    bad[suspect] = labels_from_logits(half[:, suspect]).long() != labels[suspect].long()
    if bool(bad.any()):
        mend = bad.numpy()
        by_voxel = np.moveaxis(half.numpy(), 0, -1)
        plane = by_voxel[mend]
        top_np = plane.max(axis=1)
        plane[np.arange(len(plane)), labels.numpy()[mend].astype(np.intp)] = np.nextafter(
            top_np, np.float16(np.inf))
        by_voxel[mend] = plane


@contextlib.contextmanager
def sinks_of_dec07(swap: bool = True) -> Iterator[None]:
    """The sinks as of 2026-12-07, before blocks and the one-reduction tie test: the module's
    functions swapped while the block runs (the sink classes look them up at each call).
    ``swap=False``: today's, untouched."""
    if not swap:
        yield
        return
    kept = sinks.repair_float16, sinks.confidence_map
    sinks.repair_float16, sinks.confidence_map = dec07_repair_float16, dec07_confidence_map
    try:
        yield
    finally:
        sinks.repair_float16, sinks.confidence_map = kept


def fused_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Confidence as log S - sum(e * d) / S per voxel, d = x - max, e = exp(d), S = sum(e):
    one exp per value and plane-sized temporaries. Not adopted: its last bits differ from
    log_softmax's (within the 1e-6 the issue allows) for 5 % less time on one machine
    (BENCHMARKS.md, 2026-12-07) and 40 % less on another (2026-12-03)."""
    bound = sinks.CONFIDENCE_LOGIT_BOUND
    top = logits[0].clamp(-bound, bound)
    for c in range(1, logits.shape[0]):
        torch.maximum(top, logits[c].clamp(-bound, bound), out=top)
    d, e = torch.empty_like(top), torch.empty_like(top)
    total, weighted = torch.zeros_like(top), torch.zeros_like(top)
    for c in range(logits.shape[0]):
        torch.clamp(logits[c], -bound, bound, out=d).sub_(top)
        torch.exp(d, out=e)
        total.add_(e)
        weighted.addcmul_(e, d)
    entropy = torch.log(total).sub_(weighted.div_(total))
    return (1.0 - entropy / math.log(logits.shape[0])).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------- data


def synthetic_logits(classes: int, shape: Triple, seed: int = 0) -> torch.Tensor:
    """(C, Z, Y, X) float32: smooth per-class fields plus small noise, so that argmax regions,
    near ties and Blosc's compression ratio are like a trained model's, not white noise's."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.linspace(0, 1, n, dtype=np.float32) for n in shape)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    out = np.empty((classes, *shape), dtype=np.float32)
    for c in range(classes):
        fy, fx, phase = rng.uniform(1, 6, size=3)
        out[c] = 4 * np.sin(fy * 6.28 * yy + phase) * np.cos(fx * 6.28 * xx) + 2 * zz
        out[c] += rng.normal(scale=0.05, size=shape).astype(np.float32) - c * 0.05
    return torch.from_numpy(out)


def phantom_volume(shape: Triple, seed: int = 0) -> np.ndarray:
    """(Z, Y, X) float32 in [0, 1]: a smooth body-like phantom with mild noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape),
                          indexing="ij")
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    vol = np.where(body, 0.5 + 0.2 * np.sin(4 * x) * np.cos(3 * y + z), 0.05)
    return (vol + rng.normal(scale=0.02, size=shape)).astype(np.float32)


def machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs ({cpu}), torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), load average {load}")


# ----------------------------------------------------------------------------- stages


def best_of(stages: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Seconds per call of each stage: best of ``repeats``, stages interleaved per round."""
    best = dict.fromkeys(stages, math.inf)
    for fn in stages.values():  # warm-up: page faults, caches, lazy imports
        fn()
    for _ in range(repeats):
        for name, fn in stages.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def zarr_chunk_writer(folder: Path, chunk: np.ndarray, own_empty_test: bool
                      ) -> Callable[[], None]:
    """Writes ``chunk`` as chunk 0 of a fresh-enough array (same codec as the sink)."""
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    array = zarr.create_array(
        store=str(folder / f"stage-{own_empty_test}.zarr"), shape=chunk.shape,
        chunks=chunk.shape, dtype="float16", fill_value=0.0, zarr_format=3,
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle),
        config={"write_empty_chunks": own_empty_test}, overwrite=True)

    def write() -> None:
        if not own_empty_test or chunk.view(np.uint16).any():
            array[...] = chunk
    return write


def own_chunk_writer(folder: Path, chunk: np.ndarray) -> Callable[[], None]:
    """Writes ``chunk`` as the sink now does: its own zero test, the array's Blosc settings
    (``sinks._chunk_encoder``), one file write."""
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    array = zarr.create_array(
        store=str(folder / "stage-own.zarr"), shape=chunk.shape, chunks=chunk.shape,
        dtype="float16", fill_value=0.0, zarr_format=3, overwrite=True,
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle))
    encode = sinks._chunk_encoder(array)
    target = folder / "stage-own.zarr" / array.metadata.encode_chunk_key((0, 0, 0, 0))
    target.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        if chunk.view(np.uint16).any():
            target.write_bytes(encode(chunk))
    return write


def stage_functions(slab: torch.Tensor, folder: Path) -> tuple[dict[str, Callable], dict]:
    """The stages of one slab (C, dz, Y, X), by table row, and facts for the table."""
    import numcodecs

    classes, dz, y, x = slab.shape
    labels = labels_from_logits(slab)
    chunk_z = max(1, sinks.LOGITS_CHUNK_BYTES // (classes * y * x * 2))
    chunks_per_slab = dz / chunk_z
    half = torch.empty(slab.shape, dtype=torch.float16)
    chunk = sinks.logits_to_float16(slab[:, :chunk_z], labels[:chunk_z])
    blosc = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=1, typesize=2)
    scratch = sinks.EntropyScratch()
    before_write = zarr_chunk_writer(folder, chunk, own_empty_test=False)
    after_write = zarr_chunk_writer(folder, chunk, own_empty_test=True)
    own_write = own_chunk_writer(folder, chunk)

    def per_slab(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(max(1, round(chunks_per_slab))):
                fn()
        return run

    def repair(function: Callable[[torch.Tensor, torch.Tensor], None]) -> Callable[[], None]:
        def run() -> None:
            sinks.round_to_float16(half, slab)  # fresh input; bench_stages subtracts its time
            function(half, labels)
        return run

    stages = {
        "label argmax (engine; reference)": lambda: labels_from_logits(slab),
        "float16 before: clamp, round, full argmax check": lambda: before_logits_to_float16(
            slab, labels),
        "float16 after, engine thread: round into chunk buffer": lambda: sinks.round_to_float16(
            half, slab),
        "float16 12-07, writer thread: clamp, tie check, mend": repair(dec07_repair_float16),
        "float16 now, writer thread: clamp, tie check, mend": repair(sinks.repair_float16),
        "Blosc LZ4 compress (1 thread)": per_slab(lambda: blosc.encode(chunk)),
        "chunk write before: zarr incl. its fill-value test": per_slab(before_write),
        "chunk write 12-03: own zero test + zarr": per_slab(after_write),
        "chunk write now: own zero test, Blosc encode, file write": per_slab(own_write),
        "confidence before: fresh temporaries": lambda: [
            before_confidence_map(slab[:, k]) for k in range(dz)],
        "confidence 12-07: reused slice buffers (same bits)": lambda: [
            dec07_confidence_map(slab[:, k], scratch) for k in range(dz)],
        "confidence now: blocks of rows (same bits)": lambda: [
            sinks.confidence_map(slab[:, k], scratch) for k in range(dz)],
        "confidence fused logsumexp (not adopted)": lambda: [
            fused_confidence(slab[:, k]) for k in range(dz)],
    }
    facts = {"ratio": chunk.nbytes / len(blosc.encode(chunk)), "chunk_z": chunk_z,
             "labels": labels}
    return stages, facts


def sink_runs(slab: torch.Tensor, labels: torch.Tensor, folder: Path, slabs: int,
              in_consume: dict[str, float]) -> dict[str, Callable[[], Any]]:
    """Whole sinks over ``slabs`` copies of ``slab`` (a (C, slabs*dz, Y, X) volume), finish
    included; the best time spent inside ``consume`` (the engine's thread) goes to
    ``in_consume``. Tables divide both by ``slabs``."""
    classes, dz, y, x = slab.shape
    shape = (slabs * dz, y, x)

    def run(name: str, make: Callable[[], Sink], dec07: bool = False) -> Callable[[], None]:
        def go() -> None:
            with sinks_of_dec07(dec07):
                whole_sink(make)

        def whole_sink(make: Callable[[], Sink]) -> None:
            sink, consuming = make(), 0.0
            sink.begin(classes, shape)
            for i in range(slabs):
                t0 = time.perf_counter()
                sink.consume(Slab(z_start=i * dz, logits=slab, labels=labels))
                consuming += time.perf_counter() - t0
            in_consume[name] = min(in_consume.get(name, math.inf), consuming)
            if isinstance(sink, sinks.LogitsSink):
                sink.finish()
                shutil.rmtree(sink.path, ignore_errors=True)
            if isinstance(sink, sinks.ConfidenceSink | BeforeConfidenceSink):
                _ = sink.confidence  # waits for the background thread
        return go

    return {
        "LogitsSink before": run("LogitsSink before", lambda: BeforeLogitsSink(
            folder / "before.zarr", {})),
        "LogitsSink 12-03 (chunks through zarr)": run(
            "LogitsSink 12-03 (chunks through zarr)",
            lambda: ZarrWriteLogitsSink(folder / "zarrwrite.zarr", {}), dec07=True),
        "LogitsSink 12-07": run("LogitsSink 12-07", lambda: sinks.LogitsSink(
            folder / "dec07.zarr", {}), dec07=True),
        "LogitsSink now": run("LogitsSink now", lambda: sinks.LogitsSink(
            folder / "after.zarr", {})),
        "ConfidenceSink before": run("ConfidenceSink before", BeforeConfidenceSink),
        "ConfidenceSink 12-07": run("ConfidenceSink 12-07", sinks.ConfidenceSink, dec07=True),
        "ConfidenceSink now": run("ConfidenceSink now", sinks.ConfidenceSink),
    }


def bench_stages(classes: int, slab_yx: tuple[int, int], repeats: int, folder: Path
                 ) -> list[tuple[str, float, float | None]]:
    """(row, ms per slab, ms of it on the engine's thread) for every stage and whole sink;
    the slab is ``EMIT_BYTES`` of float32 logits, as the engine hands them over."""
    y, x = slab_yx
    dz = max(1, engine.EMIT_BYTES // (classes * y * x * 4))
    slab = synthetic_logits(classes, (dz, y, x))
    stages, facts = stage_functions(slab, folder)
    slabs = max(4, 2 * facts["chunk_z"] // dz)
    in_consume: dict[str, float] = {}
    whole = sink_runs(slab, facts["labels"], folder, slabs, in_consume)
    threads = torch.get_num_threads()
    torch.set_num_threads(engine.CPU_BLEND_THREADS)  # as inside the engine's sink calls
    try:
        best = best_of(stages, repeats)
        best_whole = best_of(whole, max(2, repeats // 2))
    finally:
        torch.set_num_threads(threads)
    engine_round = best["float16 after, engine thread: round into chunk buffer"]
    for name in ("float16 12-07, writer thread: clamp, tie check, mend",
                 "float16 now, writer thread: clamp, tie check, mend"):
        best[name] -= engine_round
    rows: list[tuple[str, float, float | None]] = [(n, 1000 * s, None) for n, s in best.items()]
    rows += [(f"{n}: whole sink incl. finish", 1000 * s / slabs, 1000 * in_consume[n] / slabs)
             for n, s in best_whole.items()]
    print(f"\nslab (C, dz, Y, X) = {tuple(slab.shape)}, {slab.numel() * 4 / 2**20:.0f} MiB "
          f"float32; chunk_z {facts['chunk_z']}; Blosc ratio {facts['ratio']:.2f}; "
          f"whole sinks over {slabs} slabs; best of {repeats}")
    print("| stage | ms per slab | of which in consume (engine thread) |\n|---|---|---|")
    for name, ms, engine_ms in rows:
        print(f"| {name} | {ms:.1f} | {'' if engine_ms is None else f'{engine_ms:.1f}'} |")
    return rows


# ----------------------------------------------------------------------------- end to end


class TimedCall:
    """A predictor: the 1x1x1 conv ``x * w + b`` (N, 1, ...) -> (N, C, ...), optionally after
    ``burn`` matmuls that stand in for a real model's compute."""

    def __init__(self, classes: int, burn: int = 0) -> None:
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(1, classes, 1, 1, 1, generator=gen) * 4
        self.b = torch.randn(1, classes, 1, 1, 1, generator=gen)
        self.burn = burn
        self.matrix = torch.randn(512, 512, generator=gen) / 512**0.5

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.matrix
        for _ in range(self.burn):
            m = m @ self.matrix
        return x * self.w + self.b


def calibrate_burn(model_ms: float) -> int:
    """Matmuls of 512 x 512 that take about ``model_ms`` on torch's current threads."""
    call = TimedCall(1, burn=20)
    x = torch.zeros(1, 1, 1, 1, 1)
    seconds = min(_timed(lambda: call(x)) for _ in range(9)) / 20  # the quietest moment
    return max(1, round(model_ms / 1000 / seconds))


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_variant(variant: str, volume: np.ndarray, predict: TimedCall,
                sliding: SlidingWindowSettings, folder: Path) -> tuple[float, float, float]:
    """(wall, inside the predictor, CPU of all threads) seconds of one pass with
    ``variant``'s sinks, the logits' ``finish`` included."""
    kinds: dict[str, tuple[type[Sink], ...]] = {
        "labels only": (),
        "labels + logits + conf, before": (BeforeLogitsSink, BeforeConfidenceSink),
        "labels + logits + conf, 12-03": (ZarrWriteLogitsSink, sinks.ConfidenceSink),
        "labels + logits + conf, 12-07": (sinks.LogitsSink, sinks.ConfidenceSink),
        "labels + logits + conf, now": (sinks.LogitsSink, sinks.ConfidenceSink),
    }
    with sinks_of_dec07(variant.endswith(("12-03", "12-07"))):
        return run_sinks(kinds[variant], volume, predict, sliding, folder)


def run_sinks(kinds: tuple[type[Sink], ...], volume: np.ndarray, predict: TimedCall,
              sliding: SlidingWindowSettings, folder: Path) -> tuple[float, float, float]:
    """:func:`run_variant` with the sinks of ``kinds`` besides the label map."""
    chosen: list[Sink] = [sinks.LabelSink()]
    for kind in kinds:
        chosen.append(kind(folder / "e2e.zarr", {}) if issubclass(kind, sinks.LogitsSink)
                      else kind())
    logits = [s for s in chosen if isinstance(s, sinks.LogitsSink)]
    t0, cpu0 = time.perf_counter(), time.process_time()
    stats = engine.slide(volume, predict, sliding, chosen)
    for sink in chosen:  # what the pipeline reads after the engine
        if isinstance(sink, sinks.LogitsSink):
            sink.finish()
        if isinstance(sink, sinks.ConfidenceSink | BeforeConfidenceSink):
            _ = sink.confidence
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for sink in logits:
        shutil.rmtree(sink.path, ignore_errors=True)
    return wall, stats.forward_seconds, cpu


def bench_end_to_end(classes: int, shape: Triple, patch: Triple, stride: Triple, repeats: int,
                     model_ms: float, folder: Path) -> list[dict[str, Any]]:
    """Best wall (and CPU) time of each variant and predictor; ratios to labels only."""
    volume = phantom_volume(shape)
    sliding = SlidingWindowSettings(patch, stride, 1)
    variants = ["labels only", "labels + logits + conf, before",
                "labels + logits + conf, 12-03", "labels + logits + conf, 12-07",
                "labels + logits + conf, now"]
    predictors = {"1x1x1 conv": TimedCall(classes)}
    if model_ms > 0:
        burn = calibrate_burn(model_ms)
        predictors[f"conv + {burn} matmuls/window"] = TimedCall(classes, burn)
    rows = []
    for label, predict in predictors.items():
        best = {v: (math.inf, 0.0, math.inf) for v in variants}
        for rep in range(repeats):
            for variant in variants if rep % 2 == 0 else variants[::-1]:
                wall, model, cpu = run_variant(variant, volume, predict, sliding, folder)
                best[variant] = (*min(best[variant][:2], (wall, model)),
                                 min(best[variant][2], cpu))
                print(f"  {label} | {variant} | {wall:.2f} s (model {model:.2f} s, "
                      f"CPU {cpu:.2f} s)", flush=True)
        (base, _, base_cpu) = best["labels only"]
        rows += [{"predictor": label, "variant": v, "wall": w, "model": m, "ratio": w / base,
                  "cpu": c, "cpu_ratio": c / base_cpu} for v, (w, m, c) in best.items()]
    print(f"\nvolume {shape}, C = {classes}, patch {patch}, stride {stride}, batch 1; "
          f"best of {repeats}")
    print("| predictor | variant | wall, s | in model, s | wall / labels only | CPU, s "
          "| CPU / labels only |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['predictor']} | {r['variant']} | {r['wall']:.2f} | {r['model']:.2f} | "
              f"{r['ratio']:.2f} | {r['cpu']:.1f} | {r['cpu_ratio']:.2f} |")
    return rows


# ----------------------------------------------------------------------------- the CLI


def cli_inputs(folder: Path, z: int) -> tuple[Path, Path]:
    """The issue's setup at ``z`` slices: bench_memory's smooth int16 CT (512 x 512) and a
    random 1x1x1 conv ONNX model with 32 classes, patch 64 x 128 x 128, stride 32 x 64 x 64."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_memory import PATCH, STRIDE, write_ct
    from bench_monai import write_random_conv_model

    inputs = folder / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    write_ct(inputs / "ct.mha", (z, 512, 512), "LPS")
    config = {"patch_size": list(PATCH), "patch_stride": list(STRIDE),
              "forward_batch_windows": 1}
    model = write_random_conv_model(folder / "random32.onnx", 32, seed=0, metadata={
        "window_level": "40", "window_width": "400", "inference_config": json.dumps(config)})
    return inputs, model


def cli_child(sink_set: str, cli_args: list[str]) -> int:
    """Run ``itk_infer`` in this process with the sinks of ``sink_set``: "before", "12-03",
    "12-07", "12-08", "now" or "now:N" (N chunk buffers for the logits writer); every set but
    "now" with the engine of 12-08. The command gets ``--in-process``: the swapped classes
    live in this process, a worker would not see them."""
    from itk_infer import cli, pipeline

    if sink_set == "before":
        pipeline.LogitsSink = BeforeLogitsSink  # type: ignore[misc]
        pipeline.ConfidenceSink = BeforeConfidenceSink  # type: ignore[misc]
    elif sink_set == "12-03":
        pipeline.LogitsSink = ZarrWriteLogitsSink  # type: ignore[misc]
    elif sink_set.startswith("now:"):
        sinks.WRITER_BUFFERS = int(sink_set.split(":")[1])
    if not sink_set.startswith("now"):
        _engine_of_dec08()
    with sinks_of_dec07(sink_set in ("12-03", "12-07")):
        return cli.main([*cli_args, "--in-process"])


def _engine_of_dec08() -> None:
    """The engine as up to 2026-12-08: its own work in one part, and ONNX Runtime sessions
    whose idle pool threads spin."""
    from itk_infer import engine
    from itk_infer.backends import onnx

    engine.CPU_ENGINE_PARTS = 1

    plain = onnx._session_options

    def spinning(ort: Any, intra_op_threads: int | None) -> Any:
        options = plain(ort, intra_op_threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        return options

    onnx._session_options = spinning  # type: ignore[assignment]


def _sink_set(variant: str) -> str:
    """The ``cli_child`` sink set of a CLI variant's name."""
    if variant.endswith("chunk buffers"):
        return f"now:{variant.split()[-3]}"
    return variant.rsplit(", ", 1)[-1] if variant != "labels only" else "now"


def run_cli_variant(variant: str, inputs: Path, model: Path, out: Path) -> dict[str, float]:
    """One CLI subprocess: wall, peak RSS and the record's timings."""
    import json
    import subprocess

    extra = [] if variant.startswith("labels only") else ["--save-logits", "--save-conf"]
    sink_set = _sink_set(variant)
    command = [sys.executable, __file__, "--cli-child", sink_set, "--", "-i", str(inputs),
               "-o", str(out), "--onnx", str(model), "--device", "cpu", "--no-progress",
               *extra]
    log = out.with_name("cli.log")
    t0 = time.perf_counter()
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{variant}: itk_infer failed: {log.read_text()[-2000:]}")
    record = json.loads((out / ".itk_infer" / "ct.json").read_text())
    shutil.rmtree(out)
    return {"wall": wall, "peak_gb": usage.ru_maxrss / 2**20,
            "cpu": usage.ru_utime + usage.ru_stime, **record["timings_s"]}


CLI_VARIANTS = ["labels only", "labels only, 12-08", "labels + logits + conf, before",
                "labels + logits + conf, 12-03", "labels + logits + conf, 12-07",
                "labels + logits + conf, 12-08", "labels + logits + conf, now"]


def bench_cli(z: int, repeats: int, folder: Path, writer_buffers: int | None,
              only: list[str] | None = None) -> list[dict[str, Any]]:
    """The whole CLI, each variant in its own process, interleaved; best wall of each."""
    inputs, model = cli_inputs(folder, z)
    variants = [v for v in CLI_VARIANTS if v == "labels only" or only is None
                or v.rsplit(", ", 1)[-1] in only or v in only]
    if writer_buffers:
        variants.append(f"labels + logits + conf, now, {writer_buffers} chunk buffers")
    best: dict[str, dict[str, float]] = {}
    rounds: list[dict[str, float]] = []
    for rep in range(repeats):
        rounds.append({})
        for variant in variants if rep % 2 == 0 else variants[::-1]:
            result = run_cli_variant(variant, inputs, model, folder / "out")
            print(f"  CLI | {variant} | " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()),
                  flush=True)
            rounds[-1][variant] = result["wall"]
            if variant not in best or result["wall"] < best[variant]["wall"]:
                best[variant] = result

    def base(variant: str) -> dict[str, float]:
        # A dated variant's own labels only, when it ran: the same session settings.
        spun = not _sink_set(variant).startswith("now")
        return best.get("labels only, 12-08", best["labels only"]) if spun else (
            best["labels only"])

    print(f"\nitk_infer CLI, {z} x 512 x 512 CT, 32-class random 1x1x1 conv (ONNX Runtime, "
          f"CPU), patch 64 x 128 x 128, stride 32 x 64 x 64; best wall of {repeats}")
    print("| variant | wall, s | infer, s | in model, s | write, s | CPU, s | peak RSS, GB "
          "| wall / labels only (a) |\n|---|---|---|---|---|---|---|---|")
    for variant, r in best.items():
        print(f"| {variant} | {r['wall']:.1f} | {r['infer']:.1f} | {r['forward']:.1f} | "
              f"{r['write']:.1f} | {r['cpu']:.1f} | {r['peak_gb']:.2f} | "
              f"{r['wall'] / base(variant)['wall']:.2f} |")
    print("(a): the dated variants' ratio is to \"labels only, 12-08\" where it ran.\n")
    for variant in best:
        base_name = next(v for v in best if best[v] is base(variant))
        if variant != base_name:
            print(f"round by round, {variant} / {base_name}: " + ", ".join(
                f"{r[variant] / r[base_name]:.2f}" for r in rounds))
    return [{"variant": v, **r} for v, r in best.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 x 256 slices, small volume")
    parser.add_argument("--repeats", type=int, default=5, help="stage rounds (default 5)")
    parser.add_argument("--e2e-repeats", type=int, default=3, help="end-to-end rounds")
    parser.add_argument("--model-ms", type=float, default=0.0,
                        help="end-to-end part: also a stand-in model of this many ms per "
                             "window (matmuls on torch's threads; 0: none)")
    parser.add_argument("--cli-z", type=int, default=128, help="slices of the CLI's CT")
    parser.add_argument("--writer-buffers", type=int,
                        help="CLI part: also run with this many chunk buffers for the writer")
    parser.add_argument("--only", choices=["stages", "e2e", "cli"], help="run one part")
    parser.add_argument("--cli-variants", help="CLI part: run only these variants, by name "
                        "or date (e.g. \"12-08,now\"); labels only always runs")
    parser.add_argument("--cli-child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.cli_child:
        return cli_child(args.cli_child, [a for a in rest if a != "--"])
    classes = 32
    yx = (256, 256) if args.quick else (512, 512)
    shape: Triple = (48, *yx) if args.quick else (96, *yx)  # type: ignore[assignment]
    patch: Triple = (32, 64, 64) if args.quick else (64, 128, 128)
    stride: Triple = tuple(p // 2 for p in patch)  # type: ignore[assignment]
    model_ms = args.model_ms / 4 if args.quick else args.model_ms
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench_sinks-") as tmp:
        if args.only in (None, "stages"):
            bench_stages(classes, yx, args.repeats, Path(tmp))
        if args.only in (None, "e2e"):
            bench_end_to_end(classes, shape, patch, stride, args.e2e_repeats, model_ms,
                             Path(tmp))
        if args.only in (None, "cli"):
            bench_cli(32 if args.quick else args.cli_z, args.e2e_repeats, Path(tmp),
                      args.writer_buffers,
                      args.cli_variants.split(",") if args.cli_variants else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
