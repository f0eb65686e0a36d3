"""itk_infer against ITKIT itself (PyPI ``itkit``): a ``SemSeg3D`` trained for a few iterations
by ITKIT's runner, its checkpoint written by MMEngine's ``CheckpointHook``, run through
``python -m itk_infer`` and compared voxel for voxel with ITKIT's own ``predict``.

Skipped unless ``itkit`` is installed; ``.ci/itkit.sh`` builds such an environment and runs
these tests in two phases: first without ``monai`` (which ITKIT's loss imports when the
model is built: the missing-package error), then with it (the comparison).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytest.importorskip("itkit", reason="ITKIT is not installed (see .ci/itkit.sh)")

from tests.itkit.synthetic import phantom

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "itkit" / "configs" / "semseg3d_mednext.py"
SHAPE = (32, 48, 64)
LPI = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # x left, y posterior, z inferior
HAS_MONAI = importlib.util.find_spec("monai") is not None
needs_monai = pytest.mark.skipif(not HAS_MONAI, reason="ITKIT's DiceCELoss_3D needs monai")


def run_itk_infer(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """The documented command, started from ``cwd`` (not the repository)."""
    env = {**os.environ, "PYTHONPATH": ""}  # the installed itk_infer, no help from paths
    return subprocess.run([sys.executable, "-m", "itk_infer", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def write_inputs(folder: Path) -> np.ndarray:
    """One phantom stored twice: LPI ``.mha`` and RAS ``.nii.gz``; returns the LPI voxels."""
    folder.mkdir(parents=True)
    hu, _ = phantom(np.random.default_rng(11), SHAPE)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin((12.0, -30.0, 45.0))
    image.SetDirection(LPI)
    sitk.WriteImage(image, str(folder / "lpi.mha"))
    sitk.WriteImage(sitk.DICOMOrient(image, "RAS"), str(folder / "ras.nii.gz"))
    return hu


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train with ITKIT's runner; the checkpoint is the one its CheckpointHook wrote."""
    if not HAS_MONAI:
        pytest.skip("training needs monai")
    from itkit.mm.mmeng_PlugIn import DynamicRunnerGenerator
    from mmengine.config import Config

    cfg = Config.fromfile(str(CONFIG))
    cfg.work_dir = str(tmp_path_factory.mktemp("work"))
    DynamicRunnerGenerator(cfg).train()
    last = Path(cfg.work_dir, "last_checkpoint").read_text().strip()
    return Path(last)


def itkit_predict(ckpt: Path, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and logits from ITKIT's own path: the model built and loaded as ITKIT's
    ``MMEngineInferBackend`` does, windowed by ITKIT's ``set_window``, ``SemSeg3D.predict``."""
    from itkit.process.itk_infer import set_window
    from mmengine.config import Config
    from mmengine.registry import MODELS
    from mmengine.runner import load_checkpoint

    cfg = Config.fromfile(str(CONFIG))
    model = MODELS.build(cfg.model)
    load_checkpoint(model, str(ckpt), map_location="cpu")
    model.eval()
    # The config names CUDA devices, as ITKIT's do; this machine has none.
    model.inference_config = model.inference_config.model_copy(
        update={"accumulate_device": "cpu", "forward_device": "cpu"})
    x = torch.from_numpy(set_window(hu, cfg.wl, cfg.ww).astype(np.float32))[None, None]
    sample = model.predict(x)[0]
    return sample.pred_sem_seg.data[0].numpy(), sample.seg_logits.data.float().numpy()


@needs_monai
def test_labels_equal_itkit_predict(trained: Path, tmp_path: Path) -> None:
    hu = write_inputs(tmp_path / "in")
    expected, logits = itkit_predict(trained, hu)
    top2 = np.sort(logits, axis=0)[-2:]
    # A meaningful comparison: several classes, decided by clear margins.
    assert len(np.unique(expected)) >= 2
    assert np.median(top2[1] - top2[0]) > 1e-3

    result = run_itk_infer("-i", tmp_path / "in", "-o", tmp_path / "out", "--backend",
                           "mmengine", "-cfg", CONFIG, "-ckpt", trained, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    for name in ("lpi.mha", "ras.nii.gz"):
        written = sitk.ReadImage(str(tmp_path / "out" / name))
        labels = sitk.GetArrayFromImage(written)
        assert labels.shape == SHAPE
        mismatch = labels != expected
        assert not mismatch.any(), (
            f"{name}: {mismatch.sum()} voxels differ; decision margins there: "
            f"{(top2[1] - top2[0])[mismatch][:10]}")
        np.testing.assert_allclose(written.GetSpacing(), (0.8, 0.7, 2.5))
        np.testing.assert_allclose(written.GetDirection(), LPI, atol=1e-6)


def test_missing_model_dependency_is_a_usage_error(tmp_path: Path) -> None:
    """Building ITKIT's loss imports monai; without it the run stops before any case with
    exit 2 and names the package (not a traceback)."""
    if HAS_MONAI:
        pytest.skip("monai is installed (.ci/itkit.sh runs this before installing it)")
    write_inputs(tmp_path / "in")
    ckpt = tmp_path / "weights.pth"
    torch.save({"state_dict": {"backbone.weight": torch.zeros(1)}}, ckpt)

    result = run_itk_infer("-i", tmp_path / "in", "-o", tmp_path / "out", "--backend",
                           "mmengine", "-cfg", CONFIG, "-ckpt", ckpt, cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert "no module named 'monai'" in result.stderr
    assert "(pip install monai)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "lpi.mha").exists()


def test_console_scripts_do_not_clash() -> None:
    """ITKIT really ships an ``itk_infer`` script; the alias is not one of its names, and
    both the alias and ``python -m itk_infer`` run this project's command."""
    itkit_scripts = {entry.name for entry in importlib.metadata.distribution("itkit")
                     .entry_points if entry.group == "console_scripts"}
    assert "itk_infer" in itkit_scripts
    assert "itk-infer-batch" not in itkit_scripts
    ours = {entry.name: entry.value for entry in importlib.metadata.distribution("itk_infer")
            .entry_points if entry.group == "console_scripts"}
    assert ours["itk-infer-batch"] == ours["itk_infer"] == "itk_infer.cli:console"

    from itk_infer import __version__

    alias = shutil.which("itk-infer-batch", path=str(Path(sys.executable).parent))
    assert alias is not None
    for command in ([alias, "--version"], [sys.executable, "-m", "itk_infer", "--version"]):
        shown = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0 and shown.stdout.strip() == f"itk_infer {__version__}"
