"""MMEngine backend: configs and custom_imports, safe checkpoint loading, override semantics,
error messages, and agreement with the ONNX backend on the demo model."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import zarr

from itk_infer.backends import Backend, load_backend
from itk_infer.backends.checkpoint import LoggedHistory, _history_statistic, load_checkpoint
from itk_infer.backends.mmengine import MMEngineBackend, import_roots
from itk_infer.cli import main
from itk_infer.config import Settings
from itk_infer.errors import ModelError, UsageError
from itk_infer.pipeline import resolve_inference_settings
from tests.backends.mm_custom_model import ItkTestTensorModeModel, PointwiseHead
from tests.models import pointwise_logits, pointwise_weights

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
CUSTOM = "tests.backends.mm_custom_model"
CPU = torch.device("cpu")
C = 3
WL, WW = 20.0, 300.0
PATCHED = {"patch_size": [8, 16, 16], "patch_stride": [4, 8, 8], "forward_batch_windows": 2}
LPI = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


# ---------------------------------------------------------------------------- helpers


def write_config(path: Path, model: dict, *, imports=(CUSTOM,), wl=WL, ww=WW,
                 header: str = "") -> Path:
    lines = [header] if header else []
    if imports:
        lines.append(f"custom_imports = dict(imports={list(imports)!r})")
    if wl is not None:
        lines.append(f"wl = {wl!r}")
    if ww is not None:
        lines.append(f"ww = {ww!r}")
    lines.append(f"model = {model!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def segmentor(inference_config: dict | None = PATCHED, **extra) -> dict:
    model = {"type": "ItkTestPointwiseSegmentor", "num_classes": C, **extra}
    if inference_config is not None:
        model["inference_config"] = inference_config
    return model


def pointwise_state(prefix: str = "backbone.") -> OrderedDict:
    """Weights that make the 1x1x1 backbone equal to tests.models' pointwise reference."""
    slope, offset = pointwise_weights(C)
    return OrderedDict([
        (f"{prefix}weight", torch.from_numpy(slope).reshape(C, 1, 1, 1, 1)),
        (f"{prefix}bias", torch.from_numpy(offset)),
    ])


def save_checkpoint(path: Path, state: dict | None = None, **extra) -> Path:
    torch.save({"meta": {"epoch": 1, "iter": 10, **extra},
                "state_dict": pointwise_state() if state is None else state}, path)
    return path


def write_images(folder: Path, shapes, seed: int = 0) -> dict[str, np.ndarray]:
    """Random int16 HU volumes stored in LPI (so the tool's voxels are the array as is)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = {}
    for i, shape in enumerate(shapes):
        hu = rng.integers(-200, 260, size=shape).astype(np.int16)
        image = sitk.GetImageFromArray(hu)
        image.SetDirection(LPI)
        image.SetSpacing((0.9, 0.8, 2.0))
        sitk.WriteImage(image, str(folder / f"case_{i}.mha"))
        images[f"case_{i}"] = hu
    return images


def reference(hu: np.ndarray, wl: float = WL, ww: float = WW) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise logits (numpy) of the windowed image and the labels' decision margin."""
    x = np.clip((hu.astype(np.float64) - (wl - ww / 2)) / ww, 0.0, 1.0).astype(np.float32)
    logits = pointwise_logits(x, C)
    top2 = np.sort(logits, axis=0)[-2:]
    return logits, top2[1] - top2[0]


def assert_labels_match_reference(out: Path, images: dict[str, np.ndarray], **window) -> None:
    for name, hu in images.items():
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}.mha")))
        logits, margin = reference(hu, **window)
        clear = margin > 1e-3  # voxels on a decision boundary may go either way
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(labels[clear], logits.argmax(0)[clear])


def cli(*args) -> int:
    """Run the command in-process; the logger setup it makes is undone afterwards."""
    logger = logging.getLogger("itk_infer")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        # --in-process: tests read what the model saw in this process.
        return main([*map(str, args), "--device", "cpu", "--no-progress", "--in-process"])
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def simple_model(tmp_path) -> tuple[Path, Path]:
    cfg = write_config(tmp_path / "model" / "config.py", segmentor())
    return cfg, save_checkpoint(tmp_path / "model" / "ckpt.pth")


# ------------------------------------------------------------ config and custom_imports


def test_custom_imports_next_to_config_end_to_end(tmp_path, monkeypatch, capsys):
    name = f"itk_mm_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / f"{name}.py").write_text(
        "from mmengine.model import BaseModel\n"
        "from mmengine.registry import MODELS\n"
        "from torch import nn\n\n"
        f"@MODELS.register_module(name='{name}')\n"
        "class Segmentor(BaseModel):\n"
        "    def __init__(self, num_classes, inference_config=None):\n"
        "        super().__init__()\n"
        "        self.num_classes = num_classes\n"
        "        self.backbone = nn.Conv3d(1, num_classes, 1)\n\n"
        "    def forward(self, inputs, data_samples=None, mode='tensor'):\n"
        "        return self.backbone(inputs)\n"
    )
    cfg = write_config(tmp_path / "model" / "config.py", segmentor(type=name),
                       imports=(name,))
    ckpt = save_checkpoint(tmp_path / "model" / "ckpt.pth")
    images = write_images(tmp_path / "in", [(13, 30, 21), (8, 16, 16)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert importlib.util.find_spec(name) is None  # only findable next to the config
    path_before = list(sys.path)

    code = cli("-i", tmp_path / "in", "-o", tmp_path / "out", "--backend", "mmengine",
               "-cfg", cfg, "-ckpt", ckpt, "--save-logits")

    assert code == 0, capsys.readouterr().err
    assert sys.path == path_before
    assert_labels_match_reference(tmp_path / "out", images)
    for case, hu in images.items():
        logits = zarr.open_array(str(tmp_path / "out" / f"{case}.zarr"), mode="r")[:]
        expected, _ = reference(hu)
        np.testing.assert_allclose(logits.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
        record = json.loads((tmp_path / "out" / ".itk_infer" / f"{case}.json").read_text())
        assert record["settings"]["backend"] == "mmengine"
        assert record["settings"]["patch_size"] == PATCHED["patch_size"]
        assert record["settings"]["window_width"] == WW


def test_package_above_config_is_found(tmp_path):
    package = f"itk_mm_pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "models.py").write_text(
        "from mmengine.registry import MODELS\n"
        f"from {CUSTOM} import ItkTestPointwiseSegmentor\n"
        f"MODELS.register_module(name='{package}', module=ItkTestPointwiseSegmentor)\n"
    )
    cfg = write_config(tmp_path / package / "configs" / "deep" / "config.py",
                       segmentor(type=package), imports=(f"{package}.models",))
    assert import_roots(cfg, [f"{package}.models"]) == [str(tmp_path)]
    assert import_roots(cfg, ["numpy", "no_such_module_anywhere"]) == []

    backend = MMEngineBackend(cfg, save_checkpoint(tmp_path / "ckpt.pth"), CPU)

    assert backend.convention == "model.backbone(x)"
    assert backend.num_classes == C
    assert str(tmp_path) not in sys.path


def test_lazy_import_config(tmp_path):
    """Pure-Python config: the model class is imported by the config itself."""
    name = f"itk_mm_lazy_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(f"from {CUSTOM} import ItkTestPointwiseSegmentor\n")
    cfg = tmp_path / "config.py"
    cfg.write_text(
        f"from {name} import ItkTestPointwiseSegmentor\n\n"
        f"wl = {WL}\nww = {WW}\n"
        f"model = dict(type=ItkTestPointwiseSegmentor, num_classes={C},\n"
        "             inference_config=dict(patch_size=[8, 16, 16]))\n"
    )
    backend = MMEngineBackend(cfg, save_checkpoint(tmp_path / "ckpt.pth"), CPU)

    assert backend.defaults.inference_config == {"patch_size": [8, 16, 16]}
    x = torch.rand(2, 1, 4, 6, 5)
    expected = pointwise_logits(x[:, 0].numpy(), C).transpose(1, 0, 2, 3, 4)
    np.testing.assert_allclose(backend.forward(x).numpy(), expected, rtol=1e-6, atol=1e-5)


def test_backend_contract(simple_model):
    cfg, ckpt = simple_model
    backend = MMEngineBackend(cfg, ckpt, CPU)

    assert isinstance(backend, Backend)
    assert backend.name == "mmengine"
    assert (backend.defaults.window_level, backend.defaults.window_width) == (WL, WW)
    assert backend.defaults.inference_config == PATCHED
    assert backend.static_patch_size is None and backend.static_batch_size is None
    assert backend.num_classes == C and backend.fp16 is False
    assert not backend.model.training
    x = torch.rand(3, 1, 5, 7, 9)
    out = backend.forward(x)
    assert out.dtype == torch.float32 and out.device == CPU
    expected = pointwise_logits(x[:, 0].numpy(), C).transpose(1, 0, 2, 3, 4)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-5)

    # The fingerprint covers the config text as well as the weights.
    before = backend.fingerprint
    cfg.write_text(cfg.read_text() + "# edited\n")
    assert MMEngineBackend(cfg, ckpt, CPU).fingerprint != before


def test_tensor_mode_model_without_inference_config_parameter(tmp_path):
    cfg = write_config(tmp_path / "config.py", {"type": "ItkTestTensorModeModel",
                                                "num_classes": C, "inference_config": PATCHED})
    state = pointwise_state("head.")
    ItkTestTensorModeModel.modes.clear()
    backend = MMEngineBackend(cfg, save_checkpoint(tmp_path / "ckpt.pth", state), CPU)

    assert backend.convention == "model(x, mode='tensor')"
    assert backend.num_classes is None
    assert backend.defaults.inference_config == PATCHED  # read by the tool, not the model
    x = torch.rand(1, 1, 4, 4, 4)
    expected = pointwise_logits(x[0, 0].numpy(), C)[None]
    np.testing.assert_allclose(backend.forward(x).numpy(), expected, rtol=1e-6, atol=1e-5)
    assert ItkTestTensorModeModel.modes == ["tensor"]


def test_fp16_is_ignored_on_cpu_with_one_warning(simple_model, itk_logs):
    cfg, ckpt = simple_model
    backend = load_backend(Settings(backend="mmengine", cfg_path=cfg, ckpt_path=ckpt), CPU,
                           fp16=True)

    assert backend.fp16 is False
    assert [r.getMessage() for r in itk_logs.records].count(
        "--fp16 is ignored on the CPU (half precision needs CUDA)") == 1
    assert backend.forward(torch.rand(1, 1, 2, 2, 2)).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_autocast_returns_float32(simple_model):
    cfg, ckpt = simple_model
    cuda = torch.device("cuda", 0)
    full = MMEngineBackend(cfg, ckpt, cuda)
    half = MMEngineBackend(cfg, ckpt, cuda, fp16=True)
    assert half.fp16 and not full.fp16
    x = torch.rand(2, 1, 8, 16, 16, device=cuda)
    out = half.forward(x)
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    torch.testing.assert_close(out, full.forward(x), rtol=1e-2, atol=2e-2)


# ------------------------------------------------------------------- safe checkpoints


def _runner_checkpoints(work_dir: Path) -> list[Path]:
    from mmengine.runner import Runner
    from torch.utils.data import Dataset

    class Windows(Dataset):
        # The Runner copies this into meta["dataset_meta"]: numpy values in meta.
        metainfo = {"classes": ("air", "tissue", "bone"),  # noqa: RUF012
                    "class_weights": np.array([0.2, 1.0, 1.5], dtype=np.float32),
                    "spacing_mm": np.float64(1.5)}

        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> dict:
            generator = torch.Generator().manual_seed(index)
            x = torch.rand(1, 4, 4, 4, generator=generator)
            return {"inputs": x, "labels": (x[0] * C).long().clamp(max=C - 1)}

    loader = {"dataset": Windows(), "batch_size": 2, "collate_fn": {"type": "default_collate"},
              "sampler": {"type": "DefaultSampler", "shuffle": False}}
    runner = Runner(
        model=segmentor(),
        work_dir=str(work_dir),
        experiment_name=f"itk_test_{uuid.uuid4().hex[:8]}",
        train_dataloader=loader,
        train_cfg={"by_epoch": False, "max_iters": 2, "val_interval": 2},
        val_dataloader=loader,
        val_cfg={},
        val_evaluator={"type": "ItkTestAccuracy"},
        optim_wrapper={"optimizer": {"type": "AdamW", "lr": 1e-3}},
        param_scheduler=[{"type": "LinearLR", "start_factor": 0.5, "by_epoch": False,
                          "begin": 0, "end": 2}],
        default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 2,
                                      "by_epoch": False, "save_best": "accuracy",
                                      "rule": "greater"},
                       "logger": {"type": "LoggerHook", "interval": 1}},
        randomness={"seed": 0},
    )
    runner.train()
    return sorted(work_dir.glob("*.pth"))


def test_runner_checkpoint_loads_without_trust(tmp_path, capsys):
    import tests.backends.mm_custom_model  # noqa: F401  (registers the model and metric)

    checkpoints = _runner_checkpoints(tmp_path / "work")
    assert {p.name for p in checkpoints} >= {"iter_2.pth", "best_accuracy_iter_2.pth"}
    cfg = write_config(tmp_path / "config.py", segmentor())
    images = write_images(tmp_path / "in", [(6, 10, 12)])
    for path in checkpoints:
        trusted = torch.load(path, map_location="cpu", weights_only=False)
        # The file really needs the allow-list: plain weights-only loading refuses it.
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, map_location="cpu", weights_only=True)

        loaded = load_checkpoint(path)

        assert set(loaded) >= {"meta", "state_dict", "message_hub"}
        dataset_meta = loaded["meta"]["dataset_meta"]
        assert type(dataset_meta["spacing_mm"]) is np.float64
        np.testing.assert_array_equal(dataset_meta["class_weights"],
                                      np.array([0.2, 1.0, 1.5], dtype=np.float32))
        info = loaded["message_hub"]["runtime_info"]
        assert type(info["eta"]) is np.float64
        assert isinstance(loaded["message_hub"]["log_scalars"]["train/loss"], LoggedHistory)
        np.testing.assert_array_equal(
            loaded["message_hub"]["log_scalars"]["train/loss"]._log_history,
            trusted["message_hub"]["log_scalars"]["train/loss"]._log_history)
        if path.name == "iter_2.pth":
            assert set(loaded) >= {"optimizer", "param_schedulers"}
            assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (C, 1, 1, 1, 1)
        else:
            assert type(info["best_score"]) is np.float32
        backend = MMEngineBackend(cfg, path, CPU)
        for key, value in trusted["state_dict"].items():
            torch.testing.assert_close(backend.model.state_dict()[key], value, rtol=0, atol=0)

    # Checkpoints saved under numpy 1.x name numpy.core.multiarray instead of numpy._core.
    numpy1 = tmp_path / "numpy1.pth"
    with zipfile.ZipFile(checkpoints[-1]) as source, zipfile.ZipFile(numpy1, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(item.filename, data)
    assert type(load_checkpoint(numpy1)["message_hub"]["runtime_info"]["eta"]) is np.float64

    out = tmp_path / "out"
    code = cli("-i", tmp_path / "in", "-o", out, "--backend", "mmengine", "-cfg", cfg,
               "-ckpt", checkpoints[0])
    assert code == 0, capsys.readouterr().err
    assert (out / "case_0.mha").is_file() and images


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_malicious_checkpoint_is_refused_before_it_runs(simple_model, tmp_path, capsys):
    cfg, _ = simple_model
    marker = tmp_path / "pwned"
    ckpt = save_checkpoint(tmp_path / "evil.pth", note=_Payload(marker))
    legacy = tmp_path / "evil_legacy.pth"  # the pre-zip torch.save format
    torch.save({"meta": {"note": _Payload(marker)}, "state_dict": pointwise_state()}, legacy,
               _use_new_zipfile_serialization=False)
    images = write_images(tmp_path / "in", [(4, 8, 8)])

    for path in (ckpt, legacy):
        with pytest.raises(ModelError) as refused:
            load_checkpoint(path)
        assert re.search(r"it needs (builtins\.)?exec\b", str(refused.value))
        assert "--trust-checkpoint" in str(refused.value)
        assert not marker.exists()

    code = cli("-i", tmp_path / "in", "-o", tmp_path / "out", "--backend", "mmengine",
               "-cfg", cfg, "-ckpt", ckpt)
    assert code == 2
    assert "refusing to load checkpoint" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out" / "case_0.mha").exists()

    # The payload is live: with --trust-checkpoint the file is unpickled and it runs.
    MMEngineBackend(cfg, ckpt, CPU, trust_checkpoint=True)
    assert marker.exists() and images


def test_object_arrays_and_other_lookups_are_refused(tmp_path):
    ckpt = save_checkpoint(tmp_path / "objects.pth", table=np.array(["a", 1], dtype=object))
    with pytest.raises(ModelError, match="refusing"):
        load_checkpoint(ckpt)
    assert _history_statistic(LoggedHistory, "mean") == "HistoryBuffer.mean"
    for obj, name in ((LoggedHistory, "__init__"), (os, "system"), (LoggedHistory, "mro")):
        with pytest.raises(pickle.UnpicklingError):
            _history_statistic(obj, name)


def test_state_dict_forms(tmp_path, itk_logs):
    cfg = write_config(tmp_path / "config.py", segmentor())
    x = torch.rand(1, 1, 3, 4, 5)
    expected = pointwise_logits(x[0, 0].numpy(), C)[None]

    bare = tmp_path / "bare.pth"
    torch.save(pointwise_state("module.backbone."), bare)  # DataParallel names, no wrapper
    np.testing.assert_allclose(MMEngineBackend(cfg, bare, CPU).forward(x).numpy(), expected,
                               rtol=1e-6, atol=1e-5)

    extra = pointwise_state()
    extra["aux_head.weight"] = torch.zeros(2)
    backend = MMEngineBackend(cfg, save_checkpoint(tmp_path / "extra.pth", extra), CPU)
    np.testing.assert_allclose(backend.forward(x).numpy(), expected, rtol=1e-6, atol=1e-5)
    assert any("aux_head.weight" in r.getMessage() for r in itk_logs.records
               if r.levelno == logging.WARNING)


# ------------------------------------------------------------ windows and overrides


def test_override_semantics(tmp_path, itk_logs, capsys, monkeypatch):
    from itk_infer.backends import base

    monkeypatch.setattr(base, "_warned", set())  # the warning is once per process
    config = {"patch_size": [8, 16, 16], "patch_stride": [4, 8, 8], "forward_batch_windows": 3,
              "accumulate_device": "cpu", "forward_device": "cpu", "argmax_batchsize": 5,
              "legacy_option": True}
    cfg = write_config(tmp_path / "config.py", segmentor(config))
    ckpt = save_checkpoint(tmp_path / "ckpt.pth")
    backend = MMEngineBackend(cfg, ckpt, CPU)
    assert any("legacy_option" in r.getMessage() for r in itk_logs.records)

    settings = resolve_inference_settings(Settings(patch_size=(6, 12, 12)), backend)
    sliding = settings.sliding
    assert sliding.patch_size == (6, 12, 12)
    assert sliding.patch_stride == (4, 8, 8)
    assert sliding.batch_size == 3
    assert sliding.accumulate_device == "cpu"
    # The original tool's keys that change nothing here still load, with one warning each.
    ignored = [r.getMessage() for r in itk_logs.records if "is ignored" in r.getMessage()]
    assert len(ignored) == 2 and any("forward_device" in m for m in ignored)
    MMEngineBackend(cfg, ckpt, CPU)
    assert len([r for r in itk_logs.records if "is ignored" in r.getMessage()]) == 2
    assert (settings.window.level, settings.window.width) == (WL, WW)

    only_level = resolve_inference_settings(Settings(window_level=-5.0), backend)
    assert (only_level.window.level, only_level.window.width) == (-5.0, WW)
    assert only_level.sliding.patch_size == (8, 16, 16)
    only_stride = resolve_inference_settings(Settings(patch_stride=(2, 4, 4)), backend)
    assert (only_stride.sliding.patch_size, only_stride.sliding.patch_stride) == (
        (8, 16, 16), (2, 4, 4))

    # Through the command line: the model sees the new patch in batches of the config's 3.
    images = write_images(tmp_path / "in", [(10, 20, 20)])
    PointwiseHead.calls.clear()
    code = cli("-i", tmp_path / "in", "-o", tmp_path / "out", "--backend", "mmengine",
               "-cfg", cfg, "-ckpt", ckpt, "--patch-size", 6, 12, 12)
    assert code == 0, capsys.readouterr().err
    assert {shape[1:] for shape in PointwiseHead.calls} == {(1, 6, 12, 12)}
    batches = [shape[0] for shape in PointwiseHead.calls]
    assert max(batches) == 3 and set(batches) <= {1, 2, 3}
    record = json.loads((tmp_path / "out" / ".itk_infer" / "case_0.json").read_text())
    assert record["settings"]["patch_size"] == [6, 12, 12]
    assert record["settings"]["patch_stride"] == [4, 8, 8]
    assert_labels_match_reference(tmp_path / "out", images)


def test_no_patch_size_anywhere_is_one_forward_pass(tmp_path, capsys):
    cfg = write_config(tmp_path / "config.py", segmentor(inference_config=None))
    images = write_images(tmp_path / "in", [(7, 11, 13)])
    PointwiseHead.calls.clear()

    code = cli("-i", tmp_path / "in", "-o", tmp_path / "out", "--backend", "mmengine",
               "-cfg", cfg, "-ckpt", save_checkpoint(tmp_path / "ckpt.pth"))

    assert code == 0, capsys.readouterr().err
    assert PointwiseHead.calls == [(1, 1, 7, 11, 13)]
    assert_labels_match_reference(tmp_path / "out", images)


def test_window_from_command_line_when_config_has_none(tmp_path, capsys):
    cfg = write_config(tmp_path / "config.py", segmentor(), wl=None, ww=None)
    ckpt = save_checkpoint(tmp_path / "ckpt.pth")
    images = write_images(tmp_path / "in", [(5, 9, 9)])
    base = ["-i", tmp_path / "in", "-o", tmp_path / "out", "--backend", "mmengine",
            "-cfg", cfg, "-ckpt", ckpt]

    assert cli(*base) == 2
    assert "requires --wl/--ww" in capsys.readouterr().err
    assert cli(*base, "--wl", 10) == 2
    assert "requires --wl/--ww" in capsys.readouterr().err

    assert cli(*base, "--wl", 10, "--ww", 100) == 0
    assert_labels_match_reference(tmp_path / "out", images, wl=10.0, ww=100.0)


# --------------------------------------------------------------------------- errors


def test_unknown_model_type(tmp_path, capsys):
    cfg = write_config(tmp_path / "config.py", segmentor(type="NoSuchSegmentor3D"))
    ckpt = save_checkpoint(tmp_path / "ckpt.pth")
    with pytest.raises(ModelError, match=r"NoSuchSegmentor3D.*custom_imports"):
        MMEngineBackend(cfg, ckpt, CPU)

    # A nested type (the backbone of a registered segmentor) is named too.
    nested = write_config(
        tmp_path / "nested.py",
        {"type": "DemoSegmentor", "num_classes": C, "backbone": {"type": "NoSuchBackbone"}},
        imports=("examples.mmengine_model",))
    with pytest.raises(ModelError, match="'NoSuchBackbone' is not registered"):
        MMEngineBackend(nested, ckpt, CPU)

    write_images(tmp_path / "in", [(4, 4, 4)])
    assert cli("-i", tmp_path / "in", "-o", tmp_path / "out", "--backend", "mmengine",
               "-cfg", cfg, "-ckpt", ckpt) == 2
    assert "NoSuchSegmentor3D" in capsys.readouterr().err


def test_missing_files_and_modules(tmp_path, simple_model, capsys):
    cfg, ckpt = simple_model
    write_images(tmp_path / "in", [(4, 4, 4)])
    base = ["-i", tmp_path / "in", "-o", tmp_path / "out", "--backend", "mmengine"]

    assert cli(*base, "-cfg", cfg, "-ckpt", tmp_path / "missing.pth") == 2
    assert "MMEngine checkpoint (-ckpt) not found" in capsys.readouterr().err
    assert cli(*base, "-cfg", tmp_path / "missing.py", "-ckpt", ckpt) == 2
    assert "MMEngine config (-cfg) not found" in capsys.readouterr().err
    assert cli(*base, "-cfg", cfg) == 2
    assert "requires -cfg CONFIG.py and -ckpt CHECKPOINT.pth" in capsys.readouterr().err

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match=r"refusing.*weights-only unpickler cannot read it"):
        MMEngineBackend(cfg, garbage, CPU)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        MMEngineBackend(cfg, truncated, CPU)
    no_module = write_config(tmp_path / "nomodule.py", segmentor(),
                             imports=("itk_no_such_module_xyz",))
    with pytest.raises(ModelError, match="custom_imports cannot import 'itk_no_such_module_xyz'"):
        MMEngineBackend(no_module, ckpt, CPU)


def test_missing_keys_are_an_error(tmp_path, simple_model, capsys):
    cfg, _ = simple_model
    state = pointwise_state()
    del state["backbone.bias"]
    ckpt = save_checkpoint(tmp_path / "half.pth", state)

    with pytest.raises(ModelError, match=r"lacks 1 weight\(s\).*backbone\.bias"):
        MMEngineBackend(cfg, ckpt, CPU)
    write_images(tmp_path / "in", [(4, 4, 4)])
    assert cli("-i", tmp_path / "in", "-o", tmp_path / "out", "--backend", "mmengine",
               "-cfg", cfg, "-ckpt", ckpt) == 2
    assert "backbone.bias" in capsys.readouterr().err

    wrong_shape = pointwise_state()
    wrong_shape["backbone.bias"] = torch.zeros(C + 1)
    with pytest.raises(ModelError, match="does not fit the model"):
        MMEngineBackend(cfg, save_checkpoint(tmp_path / "wrong.pth", wrong_shape), CPU)


def test_wrong_output_shape_names_both_shapes(tmp_path, capsys):
    cfg = write_config(tmp_path / "config.py",
                       {"type": "ItkTestWrongShapeSegmentor", "num_classes": C,
                        "inference_config": PATCHED})
    state = {"backbone.weight": torch.zeros(C, 1, 2, 2, 2), "backbone.bias": torch.zeros(C)}
    ckpt = save_checkpoint(tmp_path / "ckpt.pth", state)
    backend = MMEngineBackend(cfg, ckpt, CPU)

    with pytest.raises(ModelError) as error:
        backend.forward(torch.zeros(2, 1, 8, 16, 16))
    assert "[2, 3, 4, 8, 8]" in str(error.value) and "[2, 1, 8, 16, 16]" in str(error.value)

    write_images(tmp_path / "in", [(8, 16, 16)])
    code = cli("-i", tmp_path / "in", "-o", tmp_path / "out", "--backend", "mmengine",
               "-cfg", cfg, "-ckpt", ckpt)
    err = capsys.readouterr().err
    assert code != 0
    assert "[1, 3, 4, 8, 8]" in err and "[1, 1, 8, 16, 16]" in err
    assert not (tmp_path / "out" / "case_0.mha").exists()


def test_bad_window_values_in_config(tmp_path):
    cfg = write_config(tmp_path / "config.py", segmentor(), wl="soft tissue")
    with pytest.raises(ModelError, match="wl must be a number"):
        MMEngineBackend(cfg, save_checkpoint(tmp_path / "ckpt.pth"), CPU)
    assert issubclass(ModelError, UsageError)  # exit 2


# --------------------------------------------------------- the demo model, both backends

DEMO_FILES = [DEMO / "model.onnx", DEMO / "mmengine_checkpoint.pth", DEMO / "mmengine_config.py"]
needs_demo = pytest.mark.skipif(
    not all(p.is_file() for p in DEMO_FILES),
    reason="demo model not built (examples/train.py, export_onnx.py, make_mmengine_checkpoint.py)",
)


@needs_demo
def test_demo_config_matches_onnx_metadata():
    from itk_infer.backends.onnx import OnnxBackend

    onnx = OnnxBackend(DEMO / "model.onnx", CPU)
    mm = MMEngineBackend(DEMO / "mmengine_config.py", DEMO / "mmengine_checkpoint.pth", CPU)
    assert mm.defaults.window_level == onnx.defaults.window_level
    assert mm.defaults.window_width == onnx.defaults.window_width
    assert dict(mm.defaults.inference_config) == dict(onnx.defaults.inference_config)
    assert mm.num_classes == onnx.num_classes

    x = torch.rand((2, 1, 32, 64, 64), generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(mm.forward(x).numpy(), onnx.forward(x).numpy(),
                               rtol=0, atol=1e-4)


@needs_demo
def test_same_model_both_backends_on_phantoms(tmp_path, capsys):
    from examples.phantoms import make_phantom

    (tmp_path / "in").mkdir()
    for seed, orientation in ((21, "LPI"), (22, "RAS")):
        image, _ = make_phantom(seed, size_zyx=(36, 80, 88), orientation=orientation)
        sitk.WriteImage(image, str(tmp_path / "in" / f"phantom_{seed}.nii.gz"))
    common = ["-i", tmp_path / "in", "--save-logits"]

    assert cli(*common, "-o", tmp_path / "onnx", "--onnx", DEMO / "model.onnx") == 0, \
        capsys.readouterr().err
    assert cli(*common, "-o", tmp_path / "mm", "--backend", "mmengine",
               "-cfg", DEMO / "mmengine_config.py",
               "-ckpt", DEMO / "mmengine_checkpoint.pth") == 0, capsys.readouterr().err

    for seed in (21, 22):
        name = f"phantom_{seed}"
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "onnx" / f"{name}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mm" / f"{name}.nii.gz")))
        assert a.shape == b.shape == (36, 80, 88)
        assert len(np.unique(a)) > 3  # a real segmentation, not one label everywhere
        assert (a == b).mean() >= 0.999
        la = zarr.open_array(str(tmp_path / "onnx" / f"{name}.zarr"), mode="r")[:]
        lb = zarr.open_array(str(tmp_path / "mm" / f"{name}.zarr"), mode="r")[:]
        # Both were stored as float16: agree to float16 resolution.
        np.testing.assert_allclose(la.astype(np.float32), lb.astype(np.float32),
                                   rtol=2e-3, atol=2e-3)


@needs_demo
def test_demo_config_runs_from_another_folder(tmp_path):
    """The console script, started elsewhere, finds ``examples`` for custom_imports."""
    from examples.phantoms import make_phantom

    (tmp_path / "in").mkdir()
    image, _ = make_phantom(5, size_zyx=(32, 64, 64))
    sitk.WriteImage(image, str(tmp_path / "in" / "small.mha"))
    # Only itk_infer itself is importable in the child, not the repository root.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "itk_infer").symlink_to(ROOT / "itk_infer", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    probe = [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('examples'))"]
    assert subprocess.run(probe, cwd=tmp_path, env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "None"

    result = subprocess.run(
        [sys.executable, "-m", "itk_infer", "-i", "in", "-o", "out", "--backend", "mmengine",
         "-cfg", str(DEMO / "mmengine_config.py"),
         "-ckpt", str(DEMO / "mmengine_checkpoint.pth"), "--device", "cpu", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "small.mha").is_file()


def test_config_spacing_is_the_models_spacing(tmp_path):
    cfg = write_config(tmp_path / "config.py", segmentor(), header="spacing = [2.0, 1.0, 1.5]")
    backend = MMEngineBackend(cfg, save_checkpoint(tmp_path / "ckpt.pth"), CPU)
    assert backend.defaults.spacing == (2.0, 1.0, 1.5)
    bad = write_config(tmp_path / "bad.py", segmentor(), header="spacing = [2.0, -1.0]")
    with pytest.raises(ModelError, match="spacing"):
        MMEngineBackend(bad, save_checkpoint(tmp_path / "ckpt2.pth"), CPU)
