"""Fixtures of the server tests: live servers (module scope: each starts in seconds) and the
command line's label maps of the demo images, the reference for every answer."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.server.live import DEMO_IMAGES, DEMO_MODEL, TOKEN, LiveServer, start_server

try:  # the Slicer-side client; CI installs it with --no-deps (see .ci/run)
    with warnings.catch_warnings():  # its multipart reader imports cgi (gone in 3.13)
        warnings.simplefilter("ignore", DeprecationWarning)
        from monailabel.client import MONAILabelClient  # noqa: F401
except ImportError:
    HAVE_CLIENT = False
else:
    HAVE_CLIENT = True

try:
    import fastapi  # noqa: F401
    import python_multipart  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError:
    HAVE_SERVER = False
else:
    HAVE_SERVER = True

needs_live = pytest.mark.skipif(
    not (HAVE_CLIENT and HAVE_SERVER),
    reason="needs the server extra and the monailabel client: "
    "pip install -e '.[server]' && pip install --no-deps monailabel==0.8.5 requests")


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Auth off (loopback), a 1.5 MB upload cap, two requests may wait."""
    server = start_server(tmp_path_factory.mktemp("open"), "--max-upload-mb", "1.5",
                          "--queue-length", "2", "--max-uploads", "8")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Auth on (token from the environment), no waiting room: a second request gets 503."""
    server = start_server(tmp_path_factory.mktemp("token"), "--queue-length", "0",
                          token=TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cli_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The command line's label maps of the three demo images (LPI, input formats)."""
    from itk_infer.cli import main

    out = tmp_path_factory.mktemp("cli") / "out"
    code = main(["-i", str(DEMO_IMAGES), "-o", str(out), "--onnx", str(DEMO_MODEL),
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def large_nrrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """case_02 stacked three times along z: a request that runs long enough to be seen."""
    image = sitk.ReadImage(str(DEMO_IMAGES / "case_02.nii.gz"))
    array = sitk.GetArrayFromImage(image)
    large = sitk.GetImageFromArray(np.concatenate([array] * 3))
    large.SetSpacing(image.GetSpacing())
    large.SetDirection(image.GetDirection())
    large.SetOrigin(image.GetOrigin())
    path = tmp_path_factory.mktemp("large") / "large.nrrd"
    sitk.WriteImage(large, str(path))
    return path


@pytest.fixture(scope="session")
def demo_nrrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """case_02 (RAS) as Slicer saves a volume for upload: NRRD."""
    path = tmp_path_factory.mktemp("nrrd") / "case_02.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(DEMO_IMAGES / "case_02.nii.gz")), str(path))
    return path
