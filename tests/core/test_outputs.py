"""Logits zarr arrays (--save-logits) and confidences (--save-conf), checked against numpy."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import SimpleITK as sitk
import torch
from onnx import TensorProto, helper, numpy_helper

import itk_infer
from itk_infer import sinks
from itk_infer.atomic import TMP_PREFIX
from itk_infer.cli import main
from itk_infer.engine import Slab
from itk_infer.sinks import ConfidenceSink, confidence_map, logits_to_float16
from tests.models import default_metadata, pointwise_logits, pointwise_weights

REPO = Path(__file__).resolve().parents[2]
LPI_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
# Window of default_metadata(): level 0, width 2, i.e. [-1, 1] → [0, 1].
WL, WW = 0.0, 2.0


# ---------------------------------------------------------------------------------------------
# helpers


def window_reference(voxels: np.ndarray) -> np.ndarray:
    """Independent windowing for level 0 / width 2 in float64."""
    return (np.clip(voxels.astype(np.float64), -1.0, 1.0) + 1.0) / 2.0


def write_image(path: Path, voxels_zyx: np.ndarray, spacing=(0.8, 0.9, 2.5),
                origin=(-10.0, 20.0, 5.0), direction=None) -> Path:
    """A float32 image; identity direction (SimpleITK's default) is LPS."""
    image = sitk.GetImageFromArray(voxels_zyx.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def write_conv_model(path: Path, slope, offset, metadata: dict | None = None) -> Path:
    """1x1x1 Conv3d: logit_c = slope_c * x + offset_c (exact under any blending)."""
    slope = np.asarray(slope, dtype=np.float32)
    offset = np.asarray(offset, dtype=np.float32)
    classes = len(slope)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"])],
        "conv1",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "Z", "Y", "X"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["N", classes, "Z", "Y", "X"])],
        initializer=[numpy_helper.from_array(slope.reshape(classes, 1, 1, 1, 1), "w"),
                     numpy_helper.from_array(offset, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or default_metadata()).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def run(inputs: Path, output: Path, model: Path, *extra: str) -> int:
    # --in-process: tests patch the library in this process, which a worker would not see.
    return main(["-i", str(inputs), "-o", str(output), "--onnx", str(model),
                 "--device", "cpu", "--no-progress", "--in-process", *extra])


def read_labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def read_zarr(path: Path):
    import zarr

    return zarr.open_array(str(path), mode="r")


def confidence_reference(logits: np.ndarray) -> np.ndarray:
    """Float64 1 - H(p)/log C over axis 0 (binary entropy / log 2 for one channel)."""
    x = logits.astype(np.float64)
    if x.shape[0] == 1:
        # Probabilities of both outcomes from the stable form of the sigmoid.
        p = np.exp(-np.logaddexp(0.0, -x[0]))
        q = np.exp(-np.logaddexp(0.0, x[0]))
        probs = np.stack([p, q])
        norm = math.log(2.0)
    else:
        shifted = x - x.max(axis=0, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=0, keepdims=True)
        norm = math.log(x.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, probs * np.log(probs), 0.0)
    return 1.0 - (-terms.sum(axis=0)) / norm


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# the logits array


@pytest.fixture(scope="module")
def logits_run(tmp_path_factory):
    """One run with --save-logits on an LPS image, chunked small so the array has 3 chunks."""
    root = tmp_path_factory.mktemp("logits")
    inputs, output = root / "in", root / "out"
    inputs.mkdir()
    rng = np.random.default_rng(7)
    voxels = rng.uniform(-1.2, 1.2, size=(12, 14, 11)).astype(np.float32)
    write_image(inputs / "ct_01.nii.gz", voxels)
    model = write_conv_model(root / "model.onnx", *pointwise_weights(3),
                             metadata=default_metadata((4, 8, 8), (2, 4, 4)))
    classes, (_z, y, x) = 3, voxels.shape
    with pytest.MonkeyPatch.context() as patch:
        # 5 slices per chunk: slabs of 2 slices do not align with chunks, and the last is short.
        patch.setattr(sinks, "LOGITS_CHUNK_BYTES", 5 * classes * y * x * 2)
        assert run(inputs, output, model, "--save-logits") == 0
    return {"root": root, "output": output, "voxels": voxels, "model": model,
            "classes": classes}


def test_logits_metadata_codec_and_chunks(logits_run):
    out = logits_run["output"]
    z, y, x = logits_run["voxels"].shape
    meta = json.loads((out / "ct_01.zarr" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "array"
    assert meta["shape"] == [3, z, y, x]
    assert meta["data_type"] == "float16"
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [3, 5, y, x]
    blosc = [c for c in meta["codecs"] if c["name"] == "blosc"]
    assert len(blosc) == 1
    assert blosc[0]["configuration"]["cname"] == "lz4"
    assert blosc[0]["configuration"]["shuffle"] == "shuffle"

    # The stored bytes themselves: one chunk file per Z slab, each a Blosc frame compressed
    # with LZ4 and byte shuffle (header flags: bit 0 byte shuffle, bit 2 bit shuffle).
    import numcodecs
    from numcodecs.blosc import cbuffer_complib

    chunk_files = sorted((out / "ct_01.zarr" / "c" / "0").glob("*/0/0"))
    assert [p.parts[-3] for p in chunk_files] == ["0", "1", "2"]
    stored = read_zarr(out / "ct_01.zarr")[...]
    for index, chunk in enumerate(chunk_files):
        raw = chunk.read_bytes()
        assert cbuffer_complib(raw) == "LZ4"
        flags, typesize = raw[2], raw[3]
        assert flags & 0x1 and not flags & 0x4 and typesize == 2
        decoded = np.frombuffer(numcodecs.Blosc().decode(raw), dtype="<f2")
        z0, z1 = 5 * index, min(z, 5 * index + 5)
        # A regular grid stores the short last chunk padded to the full chunk shape.
        block = decoded.reshape(3, 5, y, x)[:, : z1 - z0]
        np.testing.assert_array_equal(block, stored[:, z0:z1])


def test_logits_values_attributes_and_argmax(logits_run):
    out, voxels = logits_run["output"], logits_run["voxels"]
    array = read_zarr(out / "ct_01.zarr")
    assert array.dtype == np.float16
    assert array.chunks == (3, 5, voxels.shape[1], voxels.shape[2])
    stored = array[...]

    # Identity direction is LPS; LPI flips Z only. Pointwise logits are exact under blending.
    lpi = voxels[::-1]
    reference = pointwise_logits(window_reference(lpi).astype(np.float32), 3)
    np.testing.assert_allclose(stored.astype(np.float32), reference, rtol=2**-10, atol=2e-3)

    labels_image = sitk.ReadImage(str(out / "ct_01.nii.gz"))
    labels = sitk.GetArrayFromImage(labels_image)
    np.testing.assert_array_equal(np.argmax(stored, axis=0), labels)
    # Slab-wise reads see the same values as the whole array.
    np.testing.assert_array_equal(array[:, 5:10], stored[:, 5:10])

    attrs = dict(array.attrs)
    assert attrs["direction"] == list(LPI_DIRECTION)
    assert attrs["direction"] == list(labels_image.GetDirection())
    np.testing.assert_allclose(attrs["spacing_mm"], labels_image.GetSpacing())
    np.testing.assert_allclose(attrs["spacing_mm"], (0.8, 0.9, 2.5))
    np.testing.assert_allclose(attrs["origin_mm"], labels_image.GetOrigin())
    # LPS → LPI moves the origin to the last slice: z + (Z - 1) * spacing_z.
    np.testing.assert_allclose(attrs["origin_mm"], (-10.0, 20.0, 5.0 + 11 * 2.5))
    assert attrs["num_classes"] == 3
    assert attrs["source_file"] == "ct_01.nii.gz"
    assert (attrs["window_level"], attrs["window_width"]) == (WL, WW)
    assert attrs["patch_size"] == [4, 8, 8] and attrs["patch_stride"] == [2, 4, 4]
    assert attrs["blend"] == "gaussian"
    assert attrs["model_fingerprint"] == sha16(logits_run["model"])
    assert attrs["itk_infer_version"] == itk_infer.__version__
    record = json.loads((out / ".itk_infer" / "ct_01.json").read_text())
    assert record["model_fingerprint"] == attrs["model_fingerprint"]
    assert record["outputs"]["logits"] == "ct_01.zarr"


def test_logits_readable_in_fresh_process(logits_run):
    out = logits_run["output"]
    code = (
        "import json, sys, zarr\n"
        "a = zarr.open_array(sys.argv[1], mode='r')\n"
        "slab = a[:, 5:10]\n"
        "print(json.dumps({'shape': list(a.shape), 'dtype': str(a.dtype),\n"
        "    'chunks': list(a.chunks), 'attrs': dict(a.attrs),\n"
        "    'slab': slab.astype('float64').tolist()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out / "ct_01.zarr")],
                          capture_output=True, text=True, timeout=120, check=True)
    seen = json.loads(done.stdout)
    z, y, x = logits_run["voxels"].shape
    assert seen["shape"] == [3, z, y, x] and seen["dtype"] == "float16"
    assert seen["chunks"] == [3, 5, y, x]
    assert seen["attrs"]["source_file"] == "ct_01.nii.gz"
    labels = read_labels(out / "ct_01.nii.gz")
    np.testing.assert_array_equal(np.argmax(np.array(seen["slab"]), axis=0), labels[5:10])


def test_argmax_equals_segmentation_on_near_ties(tmp_path):
    """Two classes closer than float16 resolution: a plain cast would tie them."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(3)
    write_image(inputs / "tie.mha", rng.uniform(-1, 1, size=(9, 10, 12)))
    # logit_1 - logit_0 = 1e-4 * (x - 0.5): sign changes at x = 0.5, |diff| <= 5e-5, while
    # float16 steps are 2.4e-4..4.9e-4 for x in [0.25, 1]. Class 2 never wins.
    model = write_conv_model(tmp_path / "tie.onnx", [1.0, 1.0001, 0.0], [0.0, -5e-5, -1.0])
    assert run(inputs, tmp_path / "out", model, "--save-logits") == 0
    stored = read_zarr(tmp_path / "out" / "tie.zarr")[...]
    labels = read_labels(tmp_path / "out" / "tie.mha")
    assert set(np.unique(labels)) == {0, 1}
    np.testing.assert_array_equal(np.argmax(stored, axis=0), labels)
    # The case is hard: the naive cast of the exact logits misses many voxels of class 1.
    x = window_reference(rng_voxels_lpi(tmp_path / "in" / "tie.mha"))
    exact = np.stack([x, 1.0001 * x - 5e-5, np.full_like(x, -1.0)])
    naive = exact.astype(np.float16)
    assert (np.argmax(naive, axis=0) != labels).sum() > 0.2 * labels.size
    # Every stored value is within rounding (half a step) plus one bump step of the truth.
    step = np.spacing(np.abs(naive)).astype(np.float64)
    assert np.all(np.abs(stored.astype(np.float64) - exact) <= 2 * step)


def rng_voxels_lpi(path: Path) -> np.ndarray:
    """Voxels of an identity-direction (LPS) image in LPI order: flipped along Z."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[::-1]


def test_logits_to_float16_near_ties_and_extremes():
    rng = np.random.default_rng(11)
    base = rng.normal(scale=100.0, size=(1, 4, 16, 16))
    # Noise far below the float16 step at |x| ~ 100 (0.06): most voxels tie after a cast.
    logits = torch.from_numpy((base + rng.uniform(-1e-3, 1e-3, size=(5, 4, 16, 16)))
                              .astype(np.float32))
    labels = torch.argmax(logits, dim=0)
    naive = logits.numpy().astype(np.float16)
    assert (np.argmax(naive, axis=0) != labels.numpy()).mean() > 0.5
    stored = logits_to_float16(logits, labels)
    assert stored.dtype == np.float16 and stored.shape == logits.shape
    np.testing.assert_array_equal(np.argmax(stored, axis=0), labels.numpy())
    assert np.all((stored == naive) | (stored == np.nextafter(naive, np.float16(np.inf))))

    # Beyond float16 range: both winners clamp to the same value; the result stays finite.
    # Beyond float16 range: classes 0 and 2 (or 3) clamp to the same value, the later one won
    # in float32, so it must be raised, and the raised value must stay finite.
    huge = torch.tensor([[70000.0, -1e5, 1e5, 3.0]], dtype=torch.float32).T[:, :, None, None]
    huge = huge.expand(4, 1, 1, 2).clone()
    huge[3, 0, 0, 1] = 1e6
    labels = torch.argmax(huge, dim=0)
    assert labels.numpy().ravel().tolist() == [2, 3]
    stored = logits_to_float16(huge, labels)
    assert np.isfinite(stored).all()
    np.testing.assert_array_equal(np.argmax(stored, axis=0), labels.numpy())
    assert stored.max() == np.float16(65504.0) and stored.min() == np.float16(-65504.0)

    # One sigmoid channel: tiny positive logits flush to 0 in float16 but stay foreground.
    sig = torch.tensor([1e-9, -1e-9, 0.0, 2.0, -3.0, 1e-30], dtype=torch.float32)
    sig = sig.reshape(1, 1, 1, 6)
    sig_labels = (sig[0] > 0).to(torch.uint8)
    stored = logits_to_float16(sig, sig_labels)
    np.testing.assert_array_equal((stored[0] > 0).astype(np.uint8), sig_labels.numpy())
    assert stored[0, 0, 0, 3] == np.float16(2.0) and stored[0, 0, 0, 4] == np.float16(-3.0)


def test_failed_run_leaves_no_zarr(tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(inputs / "a.nii", np.random.default_rng(1).uniform(-1, 1, (12, 9, 9)))
    model = write_conv_model(tmp_path / "m.onnx", *pointwise_weights(3))
    out = tmp_path / "out"
    calls = []

    def failing_flush(self, end):
        calls.append(end)
        raise OSError("disk full")

    monkeypatch.setattr(sinks.LogitsSink, "_flush", failing_flush)
    assert run(inputs, out, model, "--save-logits") == 1
    assert calls
    assert [p.name for p in out.iterdir() if p.name != ".itk_infer"] == []
    assert not list((out / ".itk_infer").glob("*.json"))  # no record (locks may remain)
    monkeypatch.undo()
    assert run(inputs, out, model, "--save-logits") == 0
    assert read_zarr(out / "a.zarr").shape == (3, 12, 9, 9)


KILL_SCRIPT = """
import os, signal, sys
import itk_infer.pipeline, itk_infer.sinks
from itk_infer.cli import main

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "before-publish":
    itk_infer.sinks.LogitsSink.finish = die
else:
    itk_infer.pipeline.write_record = die
main(sys.argv[2:])
"""


@pytest.mark.parametrize("moment", ["before-publish", "before-record"])
def test_killed_run_leaves_no_zarr_taken_as_done(tmp_path, moment):
    """SIGKILL while a case's zarr is still temporary, or published without its record."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(inputs / "k.nii.gz", np.random.default_rng(2).uniform(-1, 1, (10, 9, 9)))
    model = write_conv_model(tmp_path / "m.onnx", *pointwise_weights(3))
    out = tmp_path / "out"
    args = ["-i", str(inputs), "-o", str(out), "--onnx", str(model), "--device", "cpu",
            "--no-progress", "--save-logits", "--in-process"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, moment, *args], env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert not (out / ".itk_infer" / "k.json").exists()
    leftovers = [p for p in out.iterdir() if p.name.startswith(TMP_PREFIX)]
    if moment == "before-publish":
        assert not (out / "k.zarr").exists()
        assert [p.name.endswith("k.zarr") and p.is_dir() for p in leftovers] == [True]
    else:
        assert (out / "k.zarr").is_dir() and not leftovers

    report = tmp_path / "report.json"
    assert run(inputs, out, model, "--save-logits", "--report", str(report)) == 0
    assert json.loads(report.read_text())["done"] == 1  # redone, not taken as done
    assert not [p for p in out.iterdir() if p.name.startswith(TMP_PREFIX)]
    record = json.loads((out / ".itk_infer" / "k.json").read_text())
    assert record["outputs"]["logits"] == "k.zarr"
    stored = read_zarr(out / "k.zarr")[...]
    np.testing.assert_array_equal(np.argmax(stored, axis=0), read_labels(out / "k.nii.gz"))


# ---------------------------------------------------------------------------------------------
# confidence


def test_confidence_map_matches_float64_reference():
    rng = np.random.default_rng(5)
    for classes in (2, 3, 7):
        logits = rng.normal(scale=4.0, size=(classes, 6, 8, 9))
        extreme = rng.random(logits.shape) < 0.1
        logits[extreme] = rng.choice([-1e4, 1e4], size=int(extreme.sum()))
        logits[:, 0, 0, 0] = 0.0  # uniform: confidence 0
        logits[:, 0, 0, 1] = -1e4
        logits[0, 0, 0, 1] = 1e4  # p exactly one-hot in float32: confidence 1
        logits[:, 0, 0, 2] = 1e4  # all at the extreme: uniform again
        conf = confidence_map(torch.from_numpy(logits.astype(np.float32)))
        assert conf.dtype == torch.float32 and conf.shape == logits.shape[1:]
        assert not torch.isnan(conf).any()
        reference = confidence_reference(logits.astype(np.float32))
        np.testing.assert_allclose(conf.numpy(), reference, atol=2e-5)
        assert conf[0, 0, 1] == 1.0
        assert abs(float(conf[0, 0, 0])) < 1e-6 and abs(float(conf[0, 0, 2])) < 1e-6


def test_confidence_map_single_channel_binary_entropy():
    rng = np.random.default_rng(6)
    x = rng.normal(scale=5.0, size=(1, 5, 7, 7))
    x[0, 0, 0, :4] = [0.0, 1e4, -1e4, 1e-8]
    conf = confidence_map(torch.from_numpy(x.astype(np.float32)))
    assert not torch.isnan(conf).any()
    np.testing.assert_allclose(conf.numpy(), confidence_reference(x.astype(np.float32)),
                               atol=2e-5)
    # logit 0: p = 1/2, binary entropy log 2 → 0; ±1e4: p exactly 0 or 1 → 1.
    np.testing.assert_allclose(conf[0, 0, :4].numpy(), [0.0, 1.0, 1.0, 0.0], atol=1e-6)
    # by hand at logit 2: p = sigmoid(2), H = -(p ln p + q ln q), 1 - H / ln 2
    p = 1.0 / (1.0 + math.exp(-2.0))
    by_hand = 1.0 + (p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2.0)
    assert float(confidence_map(torch.tensor([[2.0]]))) == pytest.approx(by_hand, abs=1e-6)


def test_confidence_map_survives_infinite_logits():
    """An fp16 model can overflow to ±inf; the confidence must stay a number."""
    logits = torch.tensor([[math.inf, -math.inf, 0.0], [0.0, 0.0, -math.inf],
                           [-math.inf, 0.0, -math.inf]])
    conf = confidence_map(logits)
    assert not torch.isnan(conf).any()
    np.testing.assert_allclose(conf.numpy(), [1.0, 1 - math.log(2) / math.log(3), 1.0],
                               atol=1e-6)
    sig = confidence_map(torch.tensor([[math.inf, -math.inf]]))
    np.testing.assert_allclose(sig.numpy(), [1.0, 1.0])


def test_confidence_sink_running_mean_equals_reference():
    rng = np.random.default_rng(8)
    logits = rng.normal(scale=3.0, size=(4, 11, 6, 5)).astype(np.float32)
    sink = ConfidenceSink()
    sink.begin(4, (11, 6, 5))
    for z0, z1 in [(0, 3), (3, 4), (4, 11)]:  # uneven slabs, as the engine emits them
        part = torch.from_numpy(logits[:, z0:z1])
        sink.consume(Slab(z_start=z0, logits=part, labels=torch.argmax(part, dim=0)))
    assert sink.count == 11 * 6 * 5
    assert sink.confidence == pytest.approx(confidence_reference(logits).mean(), abs=1e-6)


def _confidence_through_cli(tmp_path: Path, model: Path, voxels: np.ndarray) -> float:
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(parents=True)
    write_image(inputs / "c.nii.gz", voxels)
    assert run(inputs, out, model, "--save-conf") == 0
    record = json.loads((out / ".itk_infer" / "c.json").read_text())
    import pandas as pd

    table = pd.read_excel(out / "confidences.xlsx", sheet_name="Confidences")
    assert table["Case"].tolist() == ["c"]
    assert table["Confidence"].iloc[0] == pytest.approx(record["confidence"], abs=1e-12)
    return float(record["confidence"])


def test_cli_confidence_matches_reference(tmp_path):
    voxels = np.random.default_rng(9).uniform(-1.1, 1.1, size=(10, 12, 9))
    model = write_conv_model(tmp_path / "m.onnx", *pointwise_weights(4))
    conf = _confidence_through_cli(tmp_path, model, voxels)
    logits = pointwise_logits(window_reference(voxels).astype(np.float32), 4)
    assert conf == pytest.approx(confidence_reference(logits).mean(), abs=1e-5)
    assert 0.05 < conf < 0.95  # an informative value, neither extreme


def test_cli_confidence_near_uniform_and_confident(tmp_path):
    slope, offset = pointwise_weights(3)
    # Voxels exactly at the class centres (windowed 0, 0.5, 1).
    centres = np.random.default_rng(4).choice([-1.0, 0.0, 1.0], size=(8, 10, 10))
    flat = write_conv_model(tmp_path / "flat.onnx", slope * 1e-4, offset * 1e-4)
    sharp = write_conv_model(tmp_path / "sharp.onnx", slope * 100, offset * 100)
    near_uniform = _confidence_through_cli(tmp_path / "flat", flat, centres)
    confident = _confidence_through_cli(tmp_path / "sharp", sharp, centres)
    assert 0.0 <= near_uniform < 1e-5
    assert confident == pytest.approx(1.0, abs=1e-6)  # margins of 500: p exactly one-hot


def test_cli_single_channel_sigmoid_model(tmp_path):
    """C = 1: labels are logit > 0, confidence uses binary entropy / log 2."""
    voxels = np.random.default_rng(12).uniform(-1, 1, size=(9, 8, 10))
    model = write_conv_model(tmp_path / "sig.onnx", [8.0], [-4.0])  # 8x - 4: boundary x=0.5
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    write_image(inputs / "s.nii.gz", voxels)
    assert run(inputs, out, model, "--save-conf", "--save-logits") == 0
    x = window_reference(voxels[::-1])
    exact = (8.0 * x - 4.0)[None]
    labels = read_labels(out / "s.nii.gz")
    stored = read_zarr(out / "s.zarr")[...]
    assert stored.shape == (1, *voxels.shape)
    np.testing.assert_array_equal((stored[0] > 0).astype(labels.dtype), labels)
    record = json.loads((out / ".itk_infer" / "s.json").read_text())
    assert record["num_classes"] == 1
    assert record["confidence"] == pytest.approx(confidence_reference(exact).mean(), abs=1e-5)
