"""What a config needs but cannot import (lazy imports, ``custom_imports``, dotted type
strings, imports made while the model is built) is a usage error: exit 2 before any case,
naming the missing module and the package to install. Also the ``mmengine`` check."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import mmengine
import pytest

from itk_infer.backends import mmengine as backend_module
from itk_infer.backends.mmengine import MMEngineBackend, install_hint, require_mmengine
from itk_infer.errors import ModelError
from tests.backends.test_mmengine import CPU, cli, save_checkpoint, write_config, write_images

ROOT = Path(__file__).resolve().parents[2]
HEADER = "wl = 40\nww = 400\n"


@pytest.fixture
def case(tmp_path: Path) -> dict[str, Path]:
    """An input folder with one image, a checkpoint and an output folder."""
    write_images(tmp_path / "in", [(4, 6, 5)])
    return {"in": tmp_path / "in", "out": tmp_path / "out",
            "ckpt": save_checkpoint(tmp_path / "ckpt.pth")}


@pytest.fixture
def no_itkit() -> None:
    """The packages these tests miss are really missing (a stand-in finder would not give
    the errors MMEngine and importlib give for an absent package)."""
    installed = [top for top in ("itkit", "monai") if importlib.util.find_spec(top)]
    if installed:
        pytest.skip(f"{installed} installed here")


def run(case: dict[str, Path], cfg: Path) -> int:
    return cli("-i", case["in"], "-o", case["out"], "--backend", "mmengine", "-cfg", cfg,
               "-ckpt", case["ckpt"])


def assert_usage_error_before_any_case(code: int, err: str, case: dict[str, Path]) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert not list(case["out"].glob("case_*"))


def test_lazy_import_of_itkit(tmp_path, case, no_itkit, capsys):
    """The reported failure: ITKIT's lazy-import config without ITKIT installed."""
    cfg = tmp_path / "semseg.py"
    cfg.write_text("from itkit.mm.task_models import SemSeg3D\n" + HEADER
                   + "model = dict(type=SemSeg3D, num_classes=3)\n")

    code = run(case, cfg)

    err = capsys.readouterr().err
    assert_usage_error_before_any_case(code, err, case)
    assert "no module named 'itkit'" in err
    assert "this config needs the package `itkit` (pip install itkit)" in err


def test_lazy_import_in_a_read_base_file_and_nested_dict(tmp_path, case, no_itkit, capsys):
    """ITKIT's layout: the model config reads a base file with ``read_base()``; the missing
    import is used only in a nested dict (the backbone)."""
    (tmp_path / "base.py").write_text("from itkit.models.MedNeXt import MedNeXt\n" + HEADER)
    cfg = tmp_path / "model.py"
    cfg.write_text(
        "from mmengine.config import read_base\n\n"
        "with read_base():\n    from .base import *  # noqa\n\n"
        "from tests.backends.mm_custom_model import ItkTestPointwiseSegmentor\n\n"
        "model = dict(type=ItkTestPointwiseSegmentor, num_classes=3,\n"
        "             extra=dict(backbone=dict(type=MedNeXt)))\n")

    with pytest.raises(ModelError, match=r"model\.extra\.backbone\.type: cannot import "
                                         r"'itkit\.models\.MedNeXt'.*\(pip install itkit\)"):
        MMEngineBackend(cfg, case["ckpt"], CPU)


def test_custom_imports_of_a_missing_module(tmp_path, case, capsys):
    missing = f"itk_absent_{uuid.uuid4().hex[:8]}"
    cfg = write_config(tmp_path / "config.py", {"type": "ItkTestPointwiseSegmentor"},
                       imports=(f"{missing}.models",))

    code = run(case, cfg)

    err = capsys.readouterr().err
    assert_usage_error_before_any_case(code, err, case)
    assert f"custom_imports cannot import '{missing}.models'" in err
    assert f"no module named '{missing}'" in err
    assert f"(pip install {missing})" in err


@pytest.mark.parametrize(("type_name", "module", "package"), [
    ("itkit.models.SemSeg3D", "itkit", "`itkit` (pip install itkit)"),
    ("monai.networks.nets.UNet", "monai", "`monai` (pip install monai)"),
])
def test_dotted_type_of_a_missing_module(tmp_path, case, no_itkit, capsys,
                                         type_name, module, package):
    cfg = write_config(tmp_path / "config.py", {"type": type_name, "num_classes": 3},
                       imports=())

    code = run(case, cfg)

    err = capsys.readouterr().err
    assert_usage_error_before_any_case(code, err, case)
    assert f"model.type '{type_name}': cannot import module '{module}'" in err
    assert package in err
    assert "is not registered" not in err


def test_missing_dependency_of_an_installed_module_is_named(tmp_path, case):
    """The module the config imports is there, but one it imports is not: the message names
    the one that is missing, not the config's module."""
    name = f"itk_needs_dep_{uuid.uuid4().hex[:8]}"
    dependency = f"itk_dep_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(f"import {dependency}\n")
    cfg = tmp_path / "config.py"
    cfg.write_text(f"from {name} import Segmentor\n" + HEADER
                   + "model = dict(type=Segmentor, num_classes=3)\n")

    with pytest.raises(ModelError, match=rf"cannot import '{name}' \(imported by the config\): "
                                         rf"no module named '{dependency}'.*"
                                         rf"\(pip install {dependency}\)"):
        MMEngineBackend(cfg, case["ckpt"], CPU)


def test_import_made_by_the_model_constructor(tmp_path, case, no_itkit):
    """ITKIT's losses import monai inside their constructor, i.e. during the build."""
    name = f"itk_ctor_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from mmengine.registry import MODELS\n"
        "from tests.backends.mm_custom_model import ItkTestPointwiseSegmentor\n\n"
        f"@MODELS.register_module(name='{name}')\n"
        "class Segmentor(ItkTestPointwiseSegmentor):\n"
        "    def __init__(self, **kwargs):\n"
        "        from monai.losses import DiceCELoss  # noqa: F401\n"
        "        super().__init__(**kwargs)\n")
    cfg = write_config(tmp_path / "config.py", {"type": name, "num_classes": 3},
                       imports=(name,))

    with pytest.raises(ModelError, match=r"cannot build model.*\(pip install monai\)"):
        MMEngineBackend(cfg, case["ckpt"], CPU)


def test_module_that_fails_while_importing(tmp_path, case):
    """Not every failed import is a missing module (a CUDA-only wheel, for example): the
    error names the module and what it raised."""
    name = f"itk_broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    cfg = tmp_path / "config.py"
    cfg.write_text(f"from {name} import Segmentor\n" + HEADER
                   + "model = dict(type=Segmentor, num_classes=3)\n")

    with pytest.raises(ModelError, match=rf"cannot import '{name}'.*RuntimeError: operator "
                                         "torchvision::nms does not exist"):
        MMEngineBackend(cfg, case["ckpt"], CPU)


def test_names_that_do_not_exist_in_an_installed_module(tmp_path, case):
    cfg = write_config(tmp_path / "dotted.py",
                       {"type": "torch.nn.NoSuchLayer3D", "num_classes": 3}, imports=())
    with pytest.raises(ModelError, match=r"module 'torch\.nn' has no 'NoSuchLayer3D'"):
        MMEngineBackend(cfg, case["ckpt"], CPU)
    lazy = tmp_path / "lazy.py"
    lazy.write_text("from torch.nn import NoSuchLayer3D\n" + HEADER
                    + "model = dict(type=NoSuchLayer3D, num_classes=3)\n")
    with pytest.raises(ModelError, match=r"NoSuchLayer3D from torch\.nn"):
        MMEngineBackend(lazy, case["ckpt"], CPU)


def test_command_line_without_itkit(tmp_path, case):
    """The reported run, as a user starts it: ``python -m itk_infer`` in a fresh process
    (exit 1 and a raw traceback before the fix)."""
    if importlib.util.find_spec("itkit") is not None:
        pytest.skip("itkit is installed here")
    cfg = tmp_path / "semseg.py"
    cfg.write_text("from itkit.mm.task_models import SemSeg3D\n" + HEADER
                   + "model = dict(type=SemSeg3D, num_classes=3)\n")

    result = subprocess.run(
        [sys.executable, "-m", "itk_infer", "-i", str(case["in"]), "-o", str(case["out"]),
         "--backend", "mmengine", "-cfg", str(cfg), "-ckpt", str(case["ckpt"])],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "needs the package `itkit` (pip install itkit)" in result.stderr


@pytest.mark.parametrize(("module", "hint"), [
    ("itkit.mm.task_models", "package `itkit` (pip install itkit)"),
    ("mmseg.models", "package `onedl-mmsegmentation` or `mmsegmentation` "
                     "(pip install onedl-mmsegmentation)"),
    ("mmcv.transforms", "package `onedl-mmcv` (pip install onedl-mmcv)"),
    ("monai.losses", "package `monai` (pip install monai)"),
    ("acme_models.unet", "package `acme_models` (pip install acme_models)"),
])
def test_install_hints(module, hint):
    assert hint in install_hint(module)


def test_mmengine_missing_or_too_old(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "mmengine", None)
        with pytest.raises(ModelError, match=r"itk_infer\[mmengine\].*onedl-mmengine"):
            require_mmengine()
    monkeypatch.setattr(mmengine, "__version__", "0.9.1")
    with pytest.raises(ModelError, match=r"mmengine 0\.9\.1 is too old"):
        require_mmengine()


def test_two_mmengine_distributions_warn(monkeypatch, caplog):
    """mmengine and onedl-mmengine share one folder: say so, and how to keep one."""
    versions = {"mmengine": "0.10.7", "onedl-mmengine": "0.10.12"}
    monkeypatch.setattr(backend_module.importlib.metadata, "version",
                        lambda name: versions[name])
    caplog.set_level(logging.WARNING, logger="itk_infer")
    monkeypatch.setattr(logging.getLogger("itk_infer"), "propagate", True)

    assert require_mmengine() == mmengine.__version__

    assert "both mmengine 0.10.7 and onedl-mmengine 0.10.12 are installed" in caplog.text
    del versions["mmengine"]

    def one(name: str) -> str:
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(backend_module.importlib.metadata, "version", one)
    caplog.clear()
    require_mmengine()
    assert "both" not in caplog.text


def test_console_script_alias_and_module_entry_point():
    """``itk_infer`` stays; the alias that cannot collide with ITKIT's ``itk_infer`` runs the
    same function, and ``python -m itk_infer`` is this project's command."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["itk_infer"] == scripts["itk-infer-batch"] == "itk_infer.cli:console"
    from itk_infer import __version__

    shown = subprocess.run([sys.executable, "-m", "itk_infer", "--version"],
                           capture_output=True, text=True, timeout=120)
    assert shown.stdout.strip() == f"itk_infer {__version__}"
