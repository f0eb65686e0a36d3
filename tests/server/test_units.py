"""The server's parts without HTTP: options, the Host and token checks, upload checks, the
store's TTL and caps, the queue, label names and result options."""

from __future__ import annotations

import gzip
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from itk_infer.errors import UsageError
from itk_infer.server.imagecheck import BadUpload, check_upload, suffix_of
from itk_infer.server.options import ServerOptions, is_loopback
from itk_infer.server.security import bearer, host_name, token_matches
from itk_infer.server.store import IMAGE, StoreFull, UploadStore

TOKEN = "0123456789abcdef-token"


# --------------------------------------------------------------------------- options


def test_public_host_needs_a_strong_token():
    with pytest.raises(UsageError, match="token"):
        ServerOptions(host="0.0.0.0")
    with pytest.raises(UsageError, match="at least 16"):
        ServerOptions(token="short")
    assert ServerOptions(host="0.0.0.0", token=TOKEN).auth_enabled
    assert not ServerOptions().auth_enabled  # loopback, no token: auth off
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "0.0.0.0",
                                     "10.1.2.3", "example.org")] == [True] * 4 + [False] * 3


def test_host_allowlist():
    local = ServerOptions().host_allowlist()
    assert local is not None and {"localhost", "127.0.0.1", "::1"} <= local
    assert "attacker.example" not in local
    extra = ServerOptions(host="10.0.0.5", token=TOKEN, allowed_hosts=("GPU-Box",))
    assert {"10.0.0.5", "gpu-box"} <= (extra.host_allowlist() or set())
    assert ServerOptions(allowed_hosts=("*",)).host_allowlist() is None


def test_host_and_token_parsing():
    assert host_name("LOCALHOST:8000") == "localhost"
    assert host_name("[::1]:8000") == "::1"
    assert host_name("example.org.") == "example.org"
    assert bearer("bearer abc") == bearer("Bearer abc") == "abc"
    assert bearer("Basic abc") == ""
    assert token_matches(TOKEN, TOKEN)
    assert not token_matches(TOKEN[:-1], TOKEN)
    assert not token_matches("", "")  # no token configured: nothing matches


# --------------------------------------------------------------------------- uploads


def _image(path: Path, shape=(4, 5, 6), vector: bool = False) -> Path:
    array = np.zeros((*shape, 3) if vector else shape, np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    return path


def test_only_allowlisted_extensions():
    assert suffix_of("scan.NII.GZ") == ".nii.gz"
    assert suffix_of("/tmp/slicer/tmpab12.nrrd") == ".nrrd"
    assert suffix_of("C:\\data\\x.mha") == ".mha"
    for name in ("x.mhd", "x.nhdr", "x.hdr", "x.gz", "x.nii.gz.exe", ".nii", "x"):
        assert suffix_of(name) is None, name


def test_well_formed_images_pass(tmp_path):
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        assert check_upload(_image(tmp_path / f"a{suffix}"), suffix, 10**6) == (6, 5, 4)


def test_headers_naming_other_files_are_refused(tmp_path):
    mha = tmp_path / "a.mha"
    mha.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                   "ElementDataFile = /etc/hostname\n")
    nrrd = tmp_path / "a.nrrd"
    nrrd.write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                    "datafile: /etc/hostname\n\n")
    pair = _image(tmp_path / "b.nii")
    data = bytearray(pair.read_bytes())
    data[344:348] = b"ni1\0"  # header of a .hdr/.img pair
    pair.write_bytes(bytes(data))
    gz = tmp_path / "c.nii.gz"
    gz.write_bytes(gzip.compress(bytes(data)))
    for path, suffix in ((mha, ".mha"), (nrrd, ".nrrd"), (pair, ".nii"), (gz, ".nii.gz")):
        with pytest.raises(BadUpload) as refused:
            check_upload(path, suffix, 10**6)
        assert refused.value.status == 400


def test_wrong_shapes_and_sizes_are_refused(tmp_path):
    flat = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.Image(4, 4, sitk.sitkUInt8), str(flat))
    cases = [(flat, 400, "2-D"), (_image(tmp_path / "v.mha", vector=True), 400, "components"),
             (_image(tmp_path / "big.mha"), 413, "voxels")]
    for path, status, words in cases:
        with pytest.raises(BadUpload, match=words) as refused:
            check_upload(path, ".mha", 100)
        assert refused.value.status == status


# --------------------------------------------------------------------------- store


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _received(store: UploadStore) -> Path:
    path = store.new_path(".nii")
    path.write_bytes(b"x")
    return path


def test_store_expires_evicts_and_keeps_pinned(tmp_path):
    clock = Clock()
    store = UploadStore(tmp_path, ttl=10, max_entries=2, clock=clock)
    assert store.root.stat().st_mode & 0o777 == 0o700
    a = store.add(IMAGE, "a", _received(store), 1)
    clock.now = 1
    store.add(IMAGE, "b", _received(store), 1)
    pinned = store.pin(IMAGE, "a")  # now the most recently used
    clock.now = 2
    store.add(IMAGE, "c", _received(store), 1)  # evicts b, the least recently used
    assert store.get(IMAGE, "b") is None and pinned is a and a.path.exists()
    store.pin(IMAGE, "c")
    with pytest.raises(StoreFull):
        store.add(IMAGE, "d", _received(store), 1)  # a and c in use
    clock.now = 100
    assert store.sweep() == 0  # pinned entries never expire
    store.release(a)
    store.release(store.get(IMAGE, "c"))  # type: ignore[arg-type]
    clock.now = 111
    assert store.sweep() == 2 and not a.path.exists()
    assert list(store.uploads.iterdir()) == []
    store.close()
    assert not store.root.exists()


def test_replacing_a_pinned_upload_keeps_its_file_until_released(tmp_path):
    store = UploadStore(tmp_path, ttl=10, max_entries=4, clock=Clock())
    old = store.add(IMAGE, "a", _received(store), 1)
    store.pin(IMAGE, "a")
    new = store.add(IMAGE, "a", _received(store), 1)
    assert old.path.exists() and store.get(IMAGE, "a") is new
    store.release(old)
    assert not old.path.exists() and new.path.exists()
    store.close()


# --------------------------------------------------------------------------- inference


def test_gate_bounds_the_queue():
    from itk_infer.server.inference import Busy, InferenceGate

    gate = InferenceGate(queue_length=1)
    gate.enter()
    gate.enter()
    with pytest.raises(Busy) as busy:
        gate.enter()
    assert busy.value.retry_after >= 1
    gate.leave(2.0)
    gate.enter()


def test_label_names():
    from itk_infer.backends.base import parse_labels
    from itk_infer.server.inference import generic_labels

    assert generic_labels(6) == {f"label_{i}": i for i in range(1, 6)}
    assert generic_labels(1) == {"label_1": 1}  # a sigmoid model

    assert parse_labels('{"background": 0, "liver": 1, "spleen": 2}', "t") == {
        "background": 0, "liver": 1, "spleen": 2}
    assert parse_labels(["background", "liver"], "t") == {"background": 0, "liver": 1}
    assert parse_labels("not json", "t") is None
    assert parse_labels(None, "t") is None


def test_label_names_from_the_model(tmp_path):
    import torch

    from itk_infer.config import Settings
    from itk_infer.pipeline import load_model
    from itk_infer.server.inference import label_names
    from tests.models import default_metadata, write_pointwise_model

    plain = write_pointwise_model(tmp_path / "plain.onnx", 3, metadata=default_metadata())
    named = write_pointwise_model(tmp_path / "named.onnx", 3, metadata={
        **default_metadata(), "labels": '{"liver": 1, "tumour": 2}'})
    cpu = torch.device("cpu")
    assert label_names(load_model(Settings(onnx_path=plain), cpu)) == {"label_1": 1,
                                                                       "label_2": 2}
    assert label_names(load_model(Settings(onnx_path=named), cpu)) == {"liver": 1,
                                                                       "tumour": 2}
    # The server shows the backend's parsed names, background left out.
    from itk_infer.backends.base import ModelDefaults

    backend = SimpleNamespace(name="mmengine", num_classes=3, defaults=ModelDefaults(
        labels={"background": 0, "kidney": 1, "cyst": 2}))
    assert label_names(SimpleNamespace(backend=backend)) == {"kidney": 1, "cyst": 2}


def test_result_options():
    from itk_infer.server.inference import ResultOptions

    assert ResultOptions.from_params({}) == ResultOptions(".nii.gz", None, True)
    slicer = ResultOptions.from_params({"result_extension": ".nrrd", "result_dtype": "uint8"})
    assert (slicer.suffix, slicer.dtype) == (".nrrd", "uint8")
    assert ResultOptions.from_params({"result_extension": "mha"}).suffix == ".mha"
    for bad in ({"result_extension": ".png"}, {"result_dtype": "float64"}):
        with pytest.raises(BadUpload):
            ResultOptions.from_params(bad)
