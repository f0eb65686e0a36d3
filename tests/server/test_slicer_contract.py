"""The HTTP contract with 3D Slicer's MONAILabel module, driven by the real ``monailabel``
client (0.8.5) against a real ``itk_infer serve`` on loopback.

The module's sequence for a volume loaded in Slicer: ``GET /auth/`` (login dialog when on),
``GET /info/``, ``PUT /datastore/?image=<volume name>`` with the volume saved to a
temporary file, ``POST /infer/<model>`` with ``result_extension=.nrrd`` and
``result_dtype=uint8``, then the label map is read with SimpleITK and its segments named
from ``label_names``. Every answer is compared with the command line's label map."""

from __future__ import annotations

import http.client
import json
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.server.conftest import needs_live
from tests.server.live import DEMO_IMAGES, TOKEN, assert_same_label_map

pytestmark = [needs_live, pytest.mark.slow,
              # the client's multipart reader (Python 3.11 still has the module)
              pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")]

SLICER_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8"}


def client(url: str):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(url, tmpdir=tempfile.mkdtemp(), client_id="user-xyz")


def put_file(url: str, path: Path, image: str = "x", field: str = "file") -> tuple[int, dict]:
    """An upload through the client's own transport, keeping the status code."""
    from monailabel.client.client import MONAILabelUtils

    status, body, _files, _headers = MONAILabelUtils.http_multipart(
        "PUT", url, f"/datastore/?image={image}", {"params": "{}"}, {field: str(path)})
    return status, json.loads(body)


def raw(url: str, method: str, path: str, headers: dict[str, str] | None = None
        ) -> http.client.HTTPResponse:
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    connection.request(method, path, headers=headers or {})
    response = connection.getresponse()
    response.read()
    return response


def test_slicer_sequence_with_nrrd_matches_the_command_line(open_server, cli_labels,
                                                           demo_nrrd):
    assert urlparse(open_server.url).hostname == "127.0.0.1"  # the default: loopback only
    c = client(open_server.url)
    assert c.auth_enabled() is False
    info = c.info()
    assert "config" not in info  # Slicer asks for a server upgrade when it is there
    (name, model), = info["models"].items()
    assert model["type"] == "segmentation" and model["dimension"] == 3
    # The names come from the demo model's ONNX metadata ``labels``, background left out.
    from examples.phantoms import CLASS_NAMES

    assert model["labels"] == {n: i for i, n in enumerate(CLASS_NAMES) if i}
    assert info["labels"] == list(model["labels"])
    assert info["trainers"] == info["strategies"] == info["scoring"] == {}
    assert info["train_stats"] == {}
    assert c.upload_image(str(demo_nrrd), "CT chest 1") == {"image": "CT chest 1"}
    assert c.info()["datastore"]["total"] >= 1

    result, params = c.infer(name, "CT chest 1", dict(SLICER_PARAMS))
    assert result.endswith(".nrrd")
    assert params["label_names"] == model["labels"]
    assert params["result_dtype"] == "uint8" and params["latencies"]["total"] > 0
    assert_same_label_map(Path(result), cli_labels / "case_02.nii.gz")
    assert c.train_status(True) is False  # Slicer polls this: "not training"


def test_three_concurrent_requests_in_every_format(open_server, cli_labels):
    c = client(open_server.url)
    cases = {"case_01.mha": ".nii.gz", "case_02.nii.gz": ".mha", "case_03.nii": ".nii"}
    for filename in cases:
        c.upload_image(str(DEMO_IMAGES / filename), filename)
    answers: dict[str, object] = {}

    def infer(filename: str) -> None:
        try:
            params = {"result_extension": cases[filename], "result_dtype": "uint16"}
            answers[filename] = client(open_server.url).infer("model", filename, params)
        except Exception as error:  # reported below
            answers[filename] = error

    threads = [threading.Thread(target=infer, args=(f,)) for f in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for filename, suffix in cases.items():
        result, params = answers[filename]  # an exception here fails with its message
        assert result.endswith(suffix) and params["result_dtype"] == "uint16"
        assert_same_label_map(Path(result), cli_labels / filename)


def test_image_sent_with_the_request_and_session(open_server, cli_labels):
    c = client(open_server.url)
    result, _params = c.infer("model", "direct", {"result_extension": ".nrrd"},
                              file=str(DEMO_IMAGES / "case_03.nii"))
    assert_same_label_map(Path(result), cli_labels / "case_03.nii")
    session = c.create_session(str(DEMO_IMAGES / "case_01.mha"))["session_id"]
    assert c.get_session(session)["session_id"] == session
    assert c.remove_session(session) == {"session_id": session}
    with pytest.raises(Exception, match="404"):
        c.get_session(session)


def test_bad_uploads_are_4xx_and_the_server_keeps_serving(open_server, tmp_path):
    garbage = tmp_path / "scan.nii.gz"
    garbage.write_bytes(b"\x00not an image" * 100)
    wrong_name = tmp_path / "scan.exe"
    wrong_name.write_bytes(b"MZ" * 100)
    no_extension = tmp_path / "scan"
    no_extension.write_bytes(b"x" * 100)
    oversized = tmp_path / "big.nrrd"
    oversized.write_bytes(b"NRRD0004\n" + b"\x00" * (2 << 20))  # cap: 1.5 MB
    detached = tmp_path / "detached.nrrd"
    detached.write_bytes(b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\n"
                         b"encoding: raw\ndata file: /etc/hostname\n\n")
    expected = {garbage: 400, wrong_name: 415, no_extension: 415, oversized: 413,
                detached: 400}
    for path, status in expected.items():
        got, body = put_file(open_server.url, path)
        assert got == status, (path.name, body)
        assert str(open_server.scratch) not in json.dumps(body)
    assert put_file(open_server.url, garbage, field="label")[0] == 400  # unexpected field
    assert put_file(open_server.url, garbage, image="a%09b")[0] == 400  # control character
    c = client(open_server.url)
    truncated = tmp_path / "truncated.nii.gz"  # a whole header, half the voxels
    data = (DEMO_IMAGES / "case_02.nii.gz").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    c.upload_image(str(truncated), "truncated")
    with pytest.raises(Exception, match="422") as unusable:
        c.infer("model", "truncated", {})
    assert "truncated" in str(unusable.value.msg) and str(open_server.scratch) not in str(
        unusable.value.msg)
    with pytest.raises(Exception, match="404"):
        c.infer("model", "never uploaded", {})
    with pytest.raises(Exception, match="404"):
        c.infer("no-such-model", "x", {})
    with pytest.raises(Exception, match="400"):
        c.infer("model", "x", {"result_extension": ".png"})
    assert c.info()["name"] == "itk_infer"
    assert open_server.process.poll() is None
    assert "Traceback" not in open_server.log()
    # nothing of the refused uploads is left on disk
    assert not [p for p in open_server.scratch_files() if p.stat().st_size > (1 << 20)]


def test_host_allowlist_and_no_cors(open_server):
    url = open_server.url
    assert raw(url, "GET", "/auth/", {"Host": "attacker.example:8000"}).status == 400
    assert raw(url, "GET", "/auth/", {"Host": f"localhost:{urlparse(url).port}"}).status == 200
    for method in ("GET", "OPTIONS"):
        response = raw(url, method, "/info/", {"Origin": "http://attacker.example",
                                               "Access-Control-Request-Method": "GET"})
        assert not [h for h in response.headers if h.lower().startswith("access-control")]
    response = raw(url, "GET", "/info/")
    assert response.headers["Cache-Control"] == "no-store"
    assert raw(url, "GET", "/docs").status == 404  # no schema or docs routes


def test_auth_login_as_slicer_does(token_server, cli_labels, demo_nrrd):
    from monailabel.client.client import MONAILabelClientException

    c = client(token_server.url)
    assert c.auth_enabled() is True
    with pytest.raises(MONAILabelClientException, match="401"):
        c.info()
    with pytest.raises(MONAILabelClientException) as refused:
        c.auth_token("anyone", "wrong password")
    assert refused.value.status_code == 401
    c.update_auth({"access_token": "forged", "token_type": "bearer"})
    assert c.auth_valid_token() is False
    token = c.auth_token("any user name", TOKEN)  # the token typed as the password
    assert token["token_type"] == "bearer"
    c.update_auth(token)
    assert c.auth_valid_token() is True
    c.upload_image(str(demo_nrrd), "volume")
    result, _params = c.infer("model", "volume", dict(SLICER_PARAMS))
    assert_same_label_map(Path(result), cli_labels / "case_02.nii.gz")


def test_full_queue_answers_503_with_retry_after(token_server, large_nrrd):
    from monailabel.client.client import MONAILabelUtils

    c = authed_client(token_server.url)
    c.upload_image(str(large_nrrd), "busy")
    first: dict[str, object] = {}
    thread = threading.Thread(target=lambda: first.update(
        answer=authed_client(token_server.url).infer("model", "busy", {})))
    thread.start()
    # The first request is running once its work folder exists; the queue holds no other.
    assert wait_for(lambda: next(token_server.scratch.glob("*/work/*"), None) is not None)
    status, body, _files, headers = MONAILabelUtils.http_multipart(
        "POST", token_server.url, "/infer/model?image=busy", {"params": "{}"}, {},
        headers={"Authorization": f"Bearer {TOKEN}"})
    thread.join(120)
    assert status == 503, body
    assert int(headers["Retry-After"]) >= 1
    assert "answer" in first


def authed_client(url: str):
    c = client(url)
    c.update_auth({"access_token": TOKEN, "token_type": "bearer"})
    return c


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False
