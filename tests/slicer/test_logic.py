"""The ITKInfer Slicer module's logic under ``slicer-core`` (real MRML scene, storage and
segmentation nodes) against a real ``itk_infer serve`` subprocess.

Run by ``.ci/slicer.sh`` in its own virtual environment (slicer-core pins its own VTK); the
server and the reference command line come from the main environment, whose Python is
named by ``ITK_INFER_PYTHON`` (run as ``python -m itk_infer`` from the repository root).
Skipped without ``slicer-core``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

try:
    import slicer
    HAVE_SLICER = hasattr(slicer, "vtkMRMLScene")  # the repo's slicer/ folder also imports
except ImportError:
    HAVE_SLICER = False

pytestmark = pytest.mark.skipif(not HAVE_SLICER, reason="slicer-core is not installed "
                                "(run .ci/slicer.sh: it needs its own virtual environment)")

REPO = Path(__file__).resolve().parents[2]
if HAVE_SLICER:  # the module's folder, as Slicer's "Additional module paths" adds it
    sys.path.insert(0, str(REPO / "slicer" / "ITKInfer"))
DEMO = REPO / "examples" / "demo"
TOKEN = "slicer-test-token-0123456789"  # a test secret, not a credential
READY = re.compile(r"at (http://\S+) \(auth (on|off)\)")
CASE = "case_02.nii.gz"


def itk_infer(*args: str) -> list[str]:
    """The command line of the main environment's ``itk_infer``."""
    python = os.environ.get("ITK_INFER_PYTHON")
    if not python:
        pytest.skip("set ITK_INFER_PYTHON to the Python of the environment with itk_infer")
    return [python, "-m", "itk_infer", *args]


def start(folder: Path, token: str | None) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k != "ITK_INFER_SERVE_TOKEN"}
    if token:
        env["ITK_INFER_SERVE_TOKEN"] = token
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "stdout.txt"
    with open(out, "w") as handle, open(folder / "stderr.txt", "w") as err:
        process = subprocess.Popen(
            itk_infer("serve", "--onnx", str(DEMO / "model.onnx"), "--device", "cpu",
                      "--host", "127.0.0.1", "--port", "0", "--scratch-dir", str(folder)),
            stdout=handle, stderr=err, env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if found := READY.search(out.read_text()):
            return process, found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start:\n" + (folder / "stderr.txt").read_text())


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start(tmp_path_factory.mktemp("open"), None)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start(tmp_path_factory.mktemp("token"), TOKEN)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def cli_label_map(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The command line's label map of the demo image (the independent reference)."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "in").mkdir()
    shutil.copy(DEMO / "images" / CASE, folder / "in" / CASE)
    subprocess.run(itk_infer("-i", str(folder / "in"), "-o", str(folder / "out"), "--onnx",
                             str(DEMO / "model.onnx"), "--device", "cpu", "--no-progress"),
                   check=True, cwd=REPO, capture_output=True)
    return folder / "out" / CASE


def read_volume(scene, path: Path, kind: str = "vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(kind, path.name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), path
    scene.RemoveNode(storage)
    return node


def ijk_to_ras(node) -> np.ndarray:
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    matrix = vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def segments_as_labels(scene, result, volume) -> np.ndarray:
    """The segmentation exported segment by segment on the volume's grid, each segment's
    voxels set to its server label value (k, j, i order)."""
    from ITKInferLib import SegmentResult  # noqa: F401  (the module under test is importable)

    seg = result.segmentation.GetSegmentation()
    labels = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.int32)
    for index in range(seg.GetNumberOfSegments()):
        segment_id = seg.GetNthSegmentID(index)
        value = result.label_names[seg.GetNthSegment(index).GetName()]
        out = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            result.segmentation, [segment_id], out, volume,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        mask = slicer.util.arrayFromVolume(out) > 0
        assert np.allclose(ijk_to_ras(out), ijk_to_ras(volume))
        assert not (labels[mask] != 0).any(), "segments overlap"
        labels[mask] = value
        scene.RemoveNode(out)
    return labels


def resample_reference(reference, volume) -> np.ndarray:
    """The reference label map's value at each voxel centre of ``volume``, by physical
    position (both grids must coincide up to axis order and flips)."""
    shape = slicer.util.arrayFromVolume(volume).shape
    k, j, i = np.indices(shape).reshape(3, -1)
    ras = ijk_to_ras(volume) @ np.stack([i, j, k, np.ones_like(i)]).astype(float)
    ijk = np.linalg.inv(ijk_to_ras(reference)) @ ras
    rounded = np.rint(ijk[:3]).astype(int)
    np.testing.assert_allclose(ijk[:3], rounded, atol=1e-3)  # same voxel centres
    ref = slicer.util.arrayFromVolume(reference)
    return ref[rounded[2], rounded[1], rounded[0]].reshape(shape)


def test_segment_matches_cli_in_physical_space(open_server: str, cli_label_map: Path) -> None:
    from ITKInferLib import InferClient, ITKInferLogic

    scene = slicer.vtkMRMLScene()
    volume = read_volume(scene, DEMO / "images" / CASE)
    client = InferClient(open_server)
    info = client.info()
    (model,) = info["models"]
    result = ITKInferLogic(scene).segment(client, model, volume)

    # names: the server's labels, in label order, each once
    served = info["models"][model]["labels"]
    assert result.segment_names == sorted(served, key=served.get)
    assert result.label_names == served
    assert result.segmentation.GetScene() is scene
    ours = segments_as_labels(scene, result, volume)
    reference = read_volume(scene, cli_label_map, "vtkMRMLLabelMapVolumeNode")
    expected = resample_reference(reference, volume)
    assert len(np.unique(expected)) > 2  # a real multi-label answer, not an empty map
    np.testing.assert_array_equal(ours, expected)
    # the temporary files are gone, and no helper node stayed in the scene
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeArchetypeStorageNode") == 0


def test_token_auth(token_server: str) -> None:
    from ITKInferLib import InferClient, ITKInferLogic, ServerError

    scene = slicer.vtkMRMLScene()
    volume = read_volume(scene, DEMO / "images" / CASE)
    client = InferClient(token_server, token=TOKEN)
    assert InferClient(token_server).auth_enabled()
    client.connect()
    (model,) = client.models()
    result = ITKInferLogic(scene).segment(client, model, volume)
    assert result.segment_names
    with pytest.raises(ServerError) as wrong:
        ITKInferLogic(scene).segment(InferClient(token_server, token="not-the-token-1234567"),
                                     model, volume)
    assert wrong.value.status == 401 and "wrong password" in str(wrong.value)
    with pytest.raises(ServerError) as skipped_login:  # a client that never logs in
        InferClient(token_server).info()
    assert skipped_login.value.status == 401
    with pytest.raises(ValueError, match="requires a token"):
        InferClient(token_server).connect()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_unreachable_server() -> None:
    import socket

    from ITKInferLib import InferClient, ITKInferLogic, Unreachable

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scene = slicer.vtkMRMLScene()
    volume = read_volume(scene, DEMO / "images" / CASE)
    with pytest.raises(Unreachable, match=f"cannot reach http://127.0.0.1:{port}"):
        ITKInferLogic(scene).segment(InferClient(f"http://127.0.0.1:{port}", timeout=5),
                                     "model", volume)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_rejects_non_volume_and_bad_url() -> None:
    from ITKInferLib import InferClient, ITKInferLogic

    scene = slicer.vtkMRMLScene()
    with pytest.raises(ValueError, match="scalar volume"):
        ITKInferLogic(scene).prepare(scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode"))
    with pytest.raises(ValueError, match="not an http"):
        InferClient("127.0.0.1:8000")


def test_network_step_on_a_worker_thread(open_server: str) -> None:
    """The widget's split: prepare and apply on this thread, request on another."""
    import threading

    from ITKInferLib import InferClient, ITKInferLogic

    scene = slicer.vtkMRMLScene()
    volume = read_volume(scene, DEMO / "images" / CASE)
    logic = ITKInferLogic(scene)
    client = InferClient(open_server)
    (model,) = client.models()
    prepared = logic.prepare(volume)
    assert prepared.path.stat().st_size > 96 * 96 * 40 * 2  # the int16 voxels, uncompressed
    answers: list = []
    worker = threading.Thread(target=lambda: answers.append(
        ITKInferLogic.request(client, model, prepared)))
    worker.start()
    worker.join(120)
    (answer,) = answers
    assert answer.filename.endswith(".nrrd") and answer.data.startswith(b"NRRD")
    result = logic.apply(prepared, answer)
    assert result.segment_names == sorted(answer.label_names, key=answer.label_names.get)
    ITKInferLogic.cleanup(prepared)
    assert not prepared.folder.exists()
