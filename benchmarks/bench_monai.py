"""Our streaming engine against MONAI's ``sliding_window_inference``: agreement, speed, memory.

Both run the same model through the same onnxruntime session (our ``OnnxBackend``; MONAI gets
its ``forward`` as the predictor, timed inside), on the same window grid (checked: the window
starts MONAI visits are recorded and compared with ``plan_windows``) and the same Gaussian sigma
(patch / 8, MONAI's ``sigma_scale=0.125``).

1. agreement (constant blending, and Gaussian with our importance map given to MONAI):
   max |logits ours - logits MONAI|, labels equal;
2. speed on a 160 x 256 x 256 phantom with the demo model, runs interleaved (ours, MONAI,
   ours, MONAI, ...), medians: wall time and overhead (wall - time inside the model);
3. memory: peak RSS of a 512 x 512 x 400 volume, 32-class random 1x1x1 conv model, patch
   64 x 128 x 128, each tool in its own subprocess (VmHWM from /proc).

MONAI is a benchmark-only dependency (``pip install monai==1.6.1``). Run from the repository
root, e.g. ``python benchmarks/bench_monai.py`` (about 15 minutes on 2 cores) or with
``--quick`` (smaller volumes, a minute or two: a smoke test, not figures to report).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `itk_infer` and `examples` importable
    sys.path.insert(0, str(ROOT))

from itk_infer.backends.onnx import OnnxBackend  # noqa: E402
from itk_infer.blending import importance_map  # noqa: E402
from itk_infer.config import SlidingWindowSettings, Triple  # noqa: E402
from itk_infer.engine import Sink, Slab, run_sliding_window  # noqa: E402
from itk_infer.grid import plan_windows  # noqa: E402
from itk_infer.sinks import LabelSink  # noqa: E402

DEMO_MODEL = ROOT / "examples" / "demo" / "model.onnx"
MEMORY_PATCH: Triple = (64, 128, 128)
MEMORY_STRIDE: Triple = (32, 64, 64)
MEMORY_CLASSES = 32


# ----------------------------------------------------------------------------- helpers


def machine_info() -> dict:
    """What the figures were measured on."""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        info["mem_total_gb"] = round(int(mem["MemTotal"].split()[0]) / 2**20, 1)
        info["mem_available_gb"] = round(int(mem["MemAvailable"].split()[0]) / 2**20, 1)
        info["load_avg"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    try:
        import monai
        import onnxruntime

        info["monai"] = monai.__version__
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM), in GB (2**30 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_random_conv_model(path: Path, num_classes: int, seed: int = 0,
                            metadata: dict[str, str] | None = None) -> Path:
    """A 1x1x1 Conv3d 1 -> ``num_classes`` with random weights, dynamic N/Z/Y/X: cheap to run,
    so the sliding window's own cost and memory dominate."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(num_classes, 1, 1, 1, 1)).astype(np.float32)
    b = rng.normal(size=num_classes).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"])],
        "random_conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "Z", "Y", "X"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["N", num_classes, "Z", "Y", "X"])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def monai_overlap(patch: Triple, stride: Triple) -> tuple[float, ...]:
    """The overlap for which MONAI's scan interval, int(patch * (1 - overlap)), is our stride."""
    overlap = tuple(1.0 - s / p for p, s in zip(patch, stride, strict=True))
    for p, s, o in zip(patch, stride, overlap, strict=True):
        if int(p * (1.0 - o)) != s:
            raise SystemExit(f"no MONAI overlap gives stride {s} for patch {p}; pick another")
    return overlap


class TimedPredictor:
    """MONAI's predictor: our backend's forward (same session), timed; records window starts."""

    def __init__(self, backend: OnnxBackend) -> None:
        self.backend = backend
        self.seconds = 0.0
        self.starts: list[tuple[int, int, int]] = []

    def __call__(self, x: torch.Tensor, coords=None) -> torch.Tensor:
        t0 = time.perf_counter()
        y = self.backend.forward(x)
        self.seconds += time.perf_counter() - t0
        for window in coords or ():
            self.starts.append(tuple(int(s.start) for s in window[2:]))  # type: ignore[arg-type]
        return y


def run_monai(volume: np.ndarray, backend: OnnxBackend, patch: Triple, stride: Triple,
              batch: int, mode: str, weight_map: torch.Tensor | None = None,
              record: bool = False) -> tuple[torch.Tensor, float, float, TimedPredictor]:
    """(logits (C, Z, Y, X), wall seconds, model seconds, predictor)."""
    from monai.inferers import sliding_window_inference

    predictor = TimedPredictor(backend)
    t0 = time.perf_counter()
    # Like ours, the input goes to the model's device once, and the output stays there.
    inputs = torch.from_numpy(volume)[None, None].to(backend.device)
    with torch.no_grad():
        out = sliding_window_inference(
            inputs, patch, batch, predictor, overlap=monai_overlap(patch, stride), mode=mode,
            sigma_scale=0.125, roi_weight_map=weight_map, with_coord=record, progress=False,
        )
    _sync(backend.device)
    wall = time.perf_counter() - t0
    return out[0], wall, predictor.seconds, predictor


class FullLogits(Sink):
    """Collects the streamed logits into one array (only for the agreement check)."""

    def begin(self, num_classes: int, shape_zyx: Triple) -> None:
        self.logits = np.zeros((num_classes, *shape_zyx), dtype=np.float32)
        self.labels = np.zeros(shape_zyx, dtype=np.int64)

    def consume(self, slab: Slab) -> None:
        dz = slab.labels.shape[0]
        self.logits[:, slab.z_start : slab.z_start + dz] = slab.logits.cpu().numpy()
        self.labels[slab.z_start : slab.z_start + dz] = slab.labels.cpu().numpy()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(volume: np.ndarray, backend: OnnxBackend, patch: Triple, stride: Triple,
             batch: int, blend: str, sinks: list[Sink]) -> tuple[float, float]:
    """(wall seconds, model seconds)."""
    sliding = SlidingWindowSettings(patch, stride, batch, blend)
    t0 = time.perf_counter()
    stats = run_sliding_window(volume, backend, sliding, sinks)
    return time.perf_counter() - t0, stats.forward_seconds


def phantom_volume(shape: Triple, backend: OnnxBackend, seed: int) -> np.ndarray:
    """A CT-like phantom (examples/phantoms.py), windowed with the model's level and width."""
    import SimpleITK as sitk

    from examples.phantoms import make_phantom

    image, _labels = make_phantom(seed, size_zyx=shape)
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    level = backend.defaults.window_level if backend.defaults.window_level is not None else 0.0
    width = backend.defaults.window_width or 2000.0
    lo = level - width / 2
    return ((np.clip(hu, lo, lo + width) - lo) / width).astype(np.float32)


def model_grid(backend: OnnxBackend) -> tuple[Triple, Triple, int]:
    config = backend.defaults.inference_config
    patch = tuple(config.get("patch_size", (32, 64, 64)))
    stride = tuple(config.get("patch_stride", [p // 2 for p in patch]))
    return patch, stride, int(config.get("forward_batch_windows", 2))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- 1. agreement


def bench_agreement(backend: OnnxBackend, shape: Triple) -> list[dict]:
    patch, stride, batch = model_grid(backend)
    volume = phantom_volume(shape, backend, seed=1)
    expected = plan_windows(shape, patch, stride)
    rows = []
    gaussian = torch.from_numpy(importance_map(patch, "gaussian").copy())
    for label, blend, monai_mode, weight in (
        ("constant", "constant", "constant", None),
        ("gaussian, our map given to MONAI", "gaussian", "gaussian", gaussian),
        ("gaussian, MONAI's own map (sigma 0.125)", "gaussian", "gaussian", None),
    ):
        sink = FullLogits()
        run_ours(volume, backend, patch, stride, batch, blend, [sink])
        theirs, _wall, _model, predictor = run_monai(volume, backend, patch, stride, batch,
                                                     monai_mode, weight, record=True)
        if sorted(predictor.starts) != sorted(expected):
            raise SystemExit(f"MONAI visited other windows than plan_windows for {shape}")
        theirs_np = theirs.numpy()
        diff = np.abs(sink.logits - theirs_np)
        their_labels = theirs_np.argmax(0)
        rows.append({
            "blend": label,
            "shape": shape,
            "windows": len(expected),
            "same_windows": True,
            "max_abs_diff": float(diff.max()),
            "max_rel_diff": float((diff / np.maximum(np.abs(theirs_np), 1.0)).max()),
            "labels_equal_pct": 100.0 * float((sink.labels == their_labels).mean()),
        })
        print(f"agreement {label}: {rows[-1]}", flush=True)
    return rows


# ----------------------------------------------------------------------------- 2. speed


def bench_speed(backend: OnnxBackend, shape: Triple, repeats: int,
                single_thread_variant: bool) -> dict:
    patch, stride, batch = model_grid(backend)
    volume = phantom_volume(shape, backend, seed=0)
    # Warm up the session at the batch shape (the first calls plan memory and kernels).
    window = torch.from_numpy(volume[None, None, : patch[0], : patch[1], : patch[2]].copy())
    for _ in range(3):
        backend.forward(window.expand(batch, -1, -1, -1, -1).contiguous())
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "monai": [], "monai_argmax": []}
    if single_thread_variant:
        runs["monai_1t"] = []
    threads = torch.get_num_threads()

    def ours(rep: int) -> None:
        wall, model = run_ours(volume, backend, patch, stride, batch, "gaussian", [LabelSink()])
        runs["ours"].append((wall, model))
        print(f"speed rep {rep} ours: wall {wall:.2f} s, model {model:.2f} s", flush=True)

    def monai(rep: int) -> None:
        out, wall, model, _ = run_monai(volume, backend, patch, stride, batch, "gaussian")
        t0 = time.perf_counter()
        labels = torch.argmax(out, dim=0).to(torch.uint8)  # what a MONAI user does next
        argmax = time.perf_counter() - t0
        del out, labels
        runs["monai"].append((wall, model))
        runs["monai_argmax"].append((wall + argmax, model))
        print(f"speed rep {rep} MONAI: wall {wall:.2f} s (+argmax {argmax:.2f} s), "
              f"model {model:.2f} s", flush=True)

    def monai_1t(rep: int) -> None:
        torch.set_num_threads(1)
        try:
            out, wall, model, _ = run_monai(volume, backend, patch, stride, batch, "gaussian")
        finally:
            torch.set_num_threads(threads)
        del out
        runs["monai_1t"].append((wall, model))
        print(f"speed rep {rep} MONAI (torch 1 thread): wall {wall:.2f} s, model {model:.2f} s",
              flush=True)

    order = [ours, monai] + ([monai_1t] if single_thread_variant else [])
    for rep in range(repeats):
        # A B C, then C B A: a drift in the machine's load favours no tool.
        for run in order if rep % 2 == 0 else order[::-1]:
            run(rep)
    summary = {"shape": shape, "patch": patch, "stride": stride, "batch": batch,
               "windows": len(plan_windows(shape, patch, stride)), "repeats": repeats}
    # The model's own time swings with the load of a shared machine; the work in it is the
    # same for every tool, so walls are also compared at the pooled median model time.
    pooled_model = statistics.median(m for values in runs.values() for _, m in values)
    summary["pooled_model_s"] = pooled_model
    for name, values in runs.items():
        walls = [w for w, _ in values]
        overheads = [w - m for w, m in values]
        summary[name] = {
            "wall_s": statistics.median(walls),
            "model_s": statistics.median([m for _, m in values]),
            "overhead_s": statistics.median(overheads),
            "normalised_wall_s": pooled_model + statistics.median(overheads),
            "paired_wall_ratio": statistics.median(
                o / w for (o, _), w in zip(runs["ours"], walls, strict=True)
            ),
            "walls": walls,
            "overheads": overheads,
        }
    return summary


# ----------------------------------------------------------------------------- 3. memory


def memory_child(tool: str, z: int, model: Path) -> None:
    """Runs in a subprocess: one tool on a (z, 512, 512) volume; prints JSON with its peak."""
    backend = OnnxBackend(model, torch.device("cpu"))
    volume = np.random.default_rng(0).random((z, 512, 512), dtype=np.float32)
    base = peak_rss_gb()
    t0 = time.perf_counter()
    if tool == "ours":
        wall, model_s = run_ours(volume, backend, MEMORY_PATCH, MEMORY_STRIDE, 1, "gaussian",
                                 [LabelSink()])
        after_swi = peak_rss_gb()
    else:
        # Its own ops on one torch thread: the memory is the same, and it finishes in minutes.
        torch.set_num_threads(1)
        out, wall, model_s, _ = run_monai(volume, backend, MEMORY_PATCH, MEMORY_STRIDE, 1,
                                          "gaussian")
        after_swi = peak_rss_gb()
        labels = torch.max(out, dim=0).indices.to(torch.uint8)
        del out, labels
    print(json.dumps({
        "tool": tool, "z": z, "wall_s": time.perf_counter() - t0, "swi_s": wall,
        "model_s": model_s, "peak_gb": peak_rss_gb(), "peak_after_swi_gb": after_swi,
        "peak_before_gb": base,
    }), flush=True)


def run_memory_child(tool: str, z: int, model: Path, timeout: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", tool,
               "--memory-z", str(z), "--memory-model", str(model)]
    print(f"memory: {tool} at z={z} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"memory child {tool} z={z} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Cross-check: the largest child waited for so far, as the kernel counted it.
    result["children_maxrss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"memory: {result}", flush=True)
    return result


def monai_estimate_gb(z: int) -> float:
    """MONAI keeps the whole output and a count map: (C + 2) float32 volumes, plus the argmax."""
    voxels = z * 512 * 512
    return ((MEMORY_CLASSES + 2) * 4 + 8) * voxels / 2**30 + 1.0


def bench_memory(z: int, workdir: Path, timeout: float, force_monai: bool) -> dict:
    model = write_random_conv_model(workdir / "random32.onnx", MEMORY_CLASSES)
    result = {"z": z, "ours": run_memory_child("ours", z, model, timeout)}
    need = monai_estimate_gb(z) + 3.0
    if force_monai or mem_available_gb() > need:
        result["monai"] = run_memory_child("monai", z, model, timeout)
        result["monai_extrapolated"] = False
    else:
        # Not enough free memory to let MONAI allocate its full output next to the other
        # engineers' jobs: measure two smaller depths and extrapolate (memory is linear in Z).
        print(f"memory: only {mem_available_gb():.1f} GB available, MONAI at z={z} needs "
              f"~{need:.1f} GB; extrapolating from z={z // 4} and z={z // 2}", flush=True)
        small = run_memory_child("monai", z // 4, model, timeout)
        half = run_memory_child("monai", z // 2, model, timeout)
        slope = (half["peak_gb"] - small["peak_gb"]) / (z // 2 - z // 4)
        result["monai"] = {**half, "z": z, "peak_gb": half["peak_gb"] + slope * (z - z // 2),
                           "measured": [small, half]}
        result["monai_extrapolated"] = True
    return result


# ----------------------------------------------------------------------------- CUDA


def bench_cuda(model: Path, shape: Triple, batch: int, repeats: int) -> dict:
    """Throughput on the GPU, fp32 and --fp16, ours and MONAI interleaved; plus agreement."""
    device = torch.device("cuda")
    result: dict = {"card": torch.cuda.get_device_name(device), "shape": shape, "batch": batch,
                    "rows": []}
    volume = None
    for fp16 in (False, True):
        backend = OnnxBackend(model, device, fp16=fp16)
        patch, stride, _ = model_grid(backend)
        if volume is None:
            volume = phantom_volume(shape, backend, seed=0)
        windows = len(plan_windows(shape, patch, stride))
        window = torch.rand((batch, 1, *patch), device=device)
        for _ in range(5):
            backend.forward(window)
        if not fp16:  # agreement on the GPU (constant blending), on a corner of the volume
            corner = np.ascontiguousarray(volume[:72, :150, :170])
            sink = FullLogits()
            run_ours(corner, backend, patch, stride, batch, "constant", [sink])
            theirs = run_monai(corner, backend, patch, stride, batch, "constant")[0]
            result["agreement_max_abs_diff"] = float(
                np.abs(sink.logits - theirs.cpu().numpy()).max()
            )
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "monai": []}
        for _ in range(repeats):
            runs["ours"].append(run_ours(volume, backend, patch, stride, batch, "gaussian",
                                         [LabelSink()]))
            # MONAI's wall excludes making labels (ours includes them, copied to the host).
            out, wall, model_s, _ = run_monai(volume, backend, patch, stride, batch, "gaussian")
            del out
            runs["monai"].append((wall, model_s))
            print(f"cuda fp16={fp16}: ours {runs['ours'][-1]}, MONAI {runs['monai'][-1]}",
                  flush=True)
        for tool, values in runs.items():
            wall = statistics.median(w for w, _ in values)
            model_s = statistics.median(m for _, m in values)
            result["rows"].append({
                "precision": "fp16" if fp16 else "fp32", "tool": tool, "wall_s": wall,
                "model_s": model_s, "overhead_s": statistics.median(w - m for w, m in values),
                "windows_per_s": windows / wall,
                "mvoxels_per_s": float(np.prod(shape)) / wall / 1e6,
            })
        del backend
        torch.cuda.empty_cache()
    return result


def print_cuda_table(result: dict) -> None:
    print(f"\n## CUDA throughput on {result['card']} (volume {list(result['shape'])}, batch "
          f"{result['batch']}, demo model, Gaussian, median of interleaved runs)\n")
    print("| precision | tool | wall s | in model s | overhead s | windows/s | Mvoxel/s |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['precision']} | {r['tool']} | {r['wall_s']:.2f} | {r['model_s']:.2f} | "
              f"{r['overhead_s']:.2f} | {r['windows_per_s']:.0f} | {r['mvoxels_per_s']:.1f} |")
    print(f"\nAgreement on the GPU, constant blending: max abs diff "
          f"{result.get('agreement_max_abs_diff', float('nan')):.2e}")


# ----------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b > 0 else "n/a"


def print_tables(info: dict, agreement: list[dict] | None, speed: dict | None,
                 memory: dict | None) -> None:
    print("\n## Machine\n")
    print("| key | value |\n|---|---|")
    for key, value in info.items():
        print(f"| {key} | {value} |")
    if agreement:
        print(f"\n## 1. Agreement with MONAI (volume {list(agreement[0]['shape'])}, "
              f"{agreement[0]['windows']} windows, same window starts checked)\n")
        print("| blending | max abs diff | max rel diff | labels equal |")
        print("|---|---|---|---|")
        for row in agreement:
            print(f"| {row['blend']} | {row['max_abs_diff']:.2e} | {row['max_rel_diff']:.2e} "
                  f"| {row['labels_equal_pct']:.4f} % |")
    if speed:
        ours = speed["ours"]
        print(f"\n## 2. Speed (volume {list(speed['shape'])}, patch {list(speed['patch'])}, "
              f"stride {list(speed['stride'])}, batch {speed['batch']}, {speed['windows']} "
              f"windows, Gaussian; median of {speed['repeats']} interleaved runs, order "
              "alternating)\n")
        print("| run | wall s | in model s | overhead s | wall ours/it (medians) "
              "| wall ours/it (paired runs) | wall ours/it (at equal model time) "
              "| overhead ours/it |")
        print("|---|---|---|---|---|---|---|---|")
        names = {"ours": "itk_infer (labels included)", "monai": "MONAI sliding_window_inference",
                 "monai_argmax": "MONAI + argmax to labels",
                 "monai_1t": "MONAI, torch limited to 1 thread"}
        for key, name in names.items():
            if key not in speed:
                continue
            r = speed[key]
            print(f"| {name} | {r['wall_s']:.2f} | {r['model_s']:.2f} | {r['overhead_s']:.2f} "
                  f"| {ratio(ours['wall_s'], r['wall_s'])} | {r['paired_wall_ratio']:.3f} "
                  f"| {ratio(ours['normalised_wall_s'], r['normalised_wall_s'])} "
                  f"| {ratio(ours['overhead_s'], r['overhead_s'])} |")
        print("\nTargets: wall ours/MONAI <= 1.0, overhead ours/MONAI <= 0.5, against plain "
              "sliding_window_inference (it does not even produce labels; ours does). "
              "Overhead = wall - time inside the model's forward. 'At equal model time' = "
              f"pooled median model time ({speed['pooled_model_s']:.2f} s) + each tool's "
              "median overhead.")
        print("Individual walls: " + "; ".join(
            f"{k}: {', '.join(f'{w:.2f}' for w in speed[k]['walls'])}" for k in names
            if k in speed))
    if memory:
        z = memory["z"]
        print(f"\n## 3. Peak memory (512 x 512 x {z}, {MEMORY_CLASSES} classes, patch "
              f"{list(MEMORY_PATCH)}, stride {list(MEMORY_STRIDE)}, batch 1)\n")
        print("| tool | peak RSS GB | sliding window s | in model s | note |")
        print("|---|---|---|---|---|")
        o, m = memory["ours"], memory["monai"]
        print(f"| itk_infer | {o['peak_gb']:.2f} | {o['swi_s']:.1f} | {o['model_s']:.1f} | "
              f"target <= 3.5 GB: {'met' if o['peak_gb'] <= 3.5 else 'MISSED'} |")
        note = ("extrapolated linearly from z=" + ", ".join(str(r["z"]) for r in m["measured"])
                if memory.get("monai_extrapolated") else "measured; its ops on 1 torch thread")
        print(f"| MONAI | {m['peak_gb']:.2f} | {m['swi_s']:.1f} | {m['model_s']:.1f} | {note} |")
        print("\nGB = 2^30 bytes; peak = VmHWM of a subprocess running only that tool.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL, help="ONNX model for 1 and 2")
    parser.add_argument("--speed-shape", type=int, nargs=3, default=(160, 256, 256))
    parser.add_argument("--agree-shape", type=int, nargs=3, default=(72, 150, 170),
                        help="deliberately not a multiple of the stride")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved speed runs per tool")
    parser.add_argument("--no-single-thread-variant", action="store_true",
                        help="skip the MONAI run with torch limited to one thread")
    parser.add_argument("--memory-z", type=int, default=400)
    parser.add_argument("--memory-timeout", type=float, default=1800.0)
    parser.add_argument("--force-monai-memory", action="store_true",
                        help="run MONAI at full size even if free memory looks short")
    parser.add_argument("--only", choices=("agreement", "speed", "memory"), action="append")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cuda", action="store_true",
                        help="only the GPU throughput check (fp32 and fp16), see gpu_check.sh")
    parser.add_argument("--cuda-shape", type=int, nargs=3, default=(256, 512, 512))
    parser.add_argument("--cuda-batch", type=int, default=8)
    parser.add_argument("--memory-child", choices=("ours", "monai"), help=argparse.SUPPRESS)
    parser.add_argument("--memory-model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        memory_child(args.memory_child, args.memory_z, args.memory_model)
        return 0
    if args.quick:
        args.speed_shape, args.agree_shape, args.repeats = (64, 128, 128), (40, 70, 90), 1
        args.memory_z = 64
    only = set(args.only or ("agreement", "speed", "memory"))
    info = machine_info()
    print(json.dumps(info), flush=True)
    if args.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda: no CUDA device")
        result = bench_cuda(args.model, tuple(args.cuda_shape), args.cuda_batch, args.repeats)
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "cuda": result}, indent=2,
                                            default=str))
        print_cuda_table(result)
        return 0
    backend = OnnxBackend(args.model, torch.device("cpu"))
    info["model"] = f"{args.model.name} ({backend.num_classes} classes)"
    agreement = speed = memory = None
    if "agreement" in only:
        agreement = bench_agreement(backend, tuple(args.agree_shape))
    if "speed" in only:
        speed = bench_speed(backend, tuple(args.speed_shape), args.repeats,
                            not args.no_single_thread_variant)
    if "memory" in only:
        with tempfile.TemporaryDirectory(prefix="itk_infer-bench-") as tmp:
            memory = bench_memory(args.memory_z, Path(tmp), args.memory_timeout,
                                  args.force_monai_memory)
    info["load_avg_end"] = machine_info().get("load_avg")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "agreement": agreement,
                                         "speed": speed, "memory": memory}, indent=2,
                                        default=str))
    print_tables(info, agreement, speed, memory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
