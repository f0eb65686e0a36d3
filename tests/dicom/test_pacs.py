"""A real Orthanc with its DICOMweb plugin on loopback, authentication on: series uploaded to
it are found by the sensor (QIDO-RS), retrieved (WADO-RS), segmented, and their SEGs stored
back (STOW-RS) and read back from Orthanc equal the model's labels."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pydicom")
pytest.importorskip("dicomweb_client")
hd = pytest.importorskip("highdicom")

from dagster import DagsterInstance, build_sensor_context, materialize  # noqa: E402

from itk_infer_assets.pacs import (  # noqa: E402
    PACS_PARTITIONS_NAME,
    PacsResource,
    build_pacs_sensor,
    pacs_job,
    pacs_segmentation,
)
from itk_infer_assets.resources import ItkInferResource  # noqa: E402
from tests.dicom.synthetic import SAGITTAL, phantom, write_series  # noqa: E402
from tests.dicom.test_dicom import (  # noqa: E402
    CLASSES,
    SHAPE,
    _dciodvfy_errors,
    expected_labels,
)
from tests.models import default_metadata, write_pointwise_model  # noqa: E402

USER, PASSWORD = "itk-test", "not-a-real-secret"


def _dicomweb_plugin() -> str | None:
    """The DICOMweb plugin the Debian package orthanc-dicomweb installed."""
    try:
        listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True,
                                 text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    found = [p for p in listing if p.endswith(".so") and "DicomWeb" in p]
    return found[0] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc on 127.0.0.1, a fresh storage folder, users required; stopped by its PID."""
    plugin = _dicomweb_plugin()
    if shutil.which("Orthanc") is None or plugin is None:
        pytest.skip("Orthanc or orthanc-dicomweb not installed (.ci/dicom.sh)")
    folder = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "itk_infer_test", "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"), "HttpPort": port, "DicomServerEnabled": False,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD}, "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "w")
    process = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import requests

    try:
        for _ in range(100):
            try:
                if requests.get(f"{url}/system", auth=(USER, PASSWORD), timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None:
                pytest.fail(f"Orthanc exited: {(folder / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# long: the whole round trip, sensor to SEG re-read from Orthanc, and its checks
def test_sensor_segments_new_series_and_stores_segs_back(orthanc, tmp_path):
    import requests

    assert requests.get(f"{orthanc}/system", timeout=5).status_code == 401  # auth is on
    study = "1.2.826.0.1.3680043.8.498.1"
    ct = write_series(tmp_path / "up" / "ct", phantom(SHAPE), seed=1, study_uid=study)
    sag = write_series(tmp_path / "up" / "sag", phantom(SHAPE), cosines=SAGITTAL, seed=2,
                       study_uid=study)
    pacs = PacsResource(url=f"{orthanc}/dicom-web", username=USER, password=PASSWORD,
                        work_root=str(tmp_path / "work"))
    import pydicom

    pacs.client().store_instances([pydicom.dcmread(p) for p in ct.files + sag.files])
    model = write_pointwise_model(tmp_path / "m.onnx", CLASSES,
                                  metadata=default_metadata(wl=40.0, ww=400.0))
    itk = ItkInferResource(output_root=str(tmp_path / "out"), onnx_path=str(model),
                           device="cpu")
    instance = DagsterInstance.ephemeral()
    sensor = build_pacs_sensor(pacs_job)
    with build_sensor_context(instance=instance, resources={"pacs": pacs}) as context:
        result = sensor(context)
    keys = sorted(r.partition_key for r in result.run_requests)
    assert keys == sorted(f"{study}/{s.uid}" for s in (ct, sag))
    instance.add_dynamic_partitions(PACS_PARTITIONS_NAME, keys)
    for key in keys:
        outcome = materialize([pacs_segmentation], partition_key=key, instance=instance,
                              resources={"itk_infer": itk, "pacs": pacs})
        assert outcome.success
    # Each SEG is in Orthanc now, found by QIDO-RS and re-read by WADO-RS.
    client = pacs.client()
    segs = client.search_for_series(search_filters={"Modality": "SEG"})
    assert len(segs) == 2
    datasets = [_retrieve(client, item) for item in segs]
    for series in (ct, sag):
        stored = [d for d in datasets
                  if d.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid]
        assert len(stored) == 1
        if shutil.which("dciodvfy"):  # what Orthanc serves back is still a valid SEG
            stored[0].save_as(tmp_path / "back.dcm")
            assert _dciodvfy_errors(tmp_path / "back.dcm") == []
        seg = hd.seg.Segmentation.from_dataset(stored[0])
        labels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=series.sop_uids, combine_segments=True,
            assert_missing_frames_are_empty=True)
        np.testing.assert_array_equal(labels, expected_labels(series.hu))
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["label_1", "label_2",
                                                               "label_3"]
    # The next tick finds nothing new: the SEGs are not images, the series are in the cursor.
    with build_sensor_context(instance=instance, resources={"pacs": pacs},
                              cursor=result.cursor) as context:
        again = sensor(context)
    assert again.run_requests == []
    # A third series arriving later is the only new one.
    later = write_series(tmp_path / "up" / "later", phantom(SHAPE), seed=3, study_uid=study)
    client.store_instances([pydicom.dcmread(p) for p in later.files])
    with build_sensor_context(instance=instance, resources={"pacs": pacs},
                              cursor=again.cursor) as context:
        third = sensor(context)
    assert [r.partition_key for r in third.run_requests] == [f"{study}/{later.uid}"]
    # The password reached Orthanc but no event of any run or tick.
    records = instance.all_logs(outcome.run_id)
    assert records and all(PASSWORD not in str(r) for r in records)
    assert not (tmp_path / "work" / study / ct.uid).exists()  # retrieved files removed


def test_a_refused_series_fails_its_run_naming_key_and_reason(orthanc, tmp_path):
    import pydicom

    study = "1.2.826.0.1.3680043.8.498.2"
    tilted = write_series(tmp_path / "up", phantom(SHAPE), seed=4, study_uid=study,
                          positions=np.stack([np.arange(SHAPE[0]) * 1.0, np.zeros(SHAPE[0]),
                                              np.arange(SHAPE[0]) * 2.5], axis=1))
    pacs = PacsResource(url=f"{orthanc}/dicom-web", username=USER, password=PASSWORD,
                        work_root=str(tmp_path / "work"))
    pacs.client().store_instances([pydicom.dcmread(p) for p in tilted.files])
    model = write_pointwise_model(tmp_path / "m.onnx", CLASSES, metadata=default_metadata())
    itk = ItkInferResource(output_root=str(tmp_path / "out"), onnx_path=str(model),
                           device="cpu")
    instance = DagsterInstance.ephemeral()
    key = f"{study}/{tilted.uid}"
    instance.add_dynamic_partitions(PACS_PARTITIONS_NAME, [key])
    outcome = materialize([pacs_segmentation], partition_key=key, instance=instance,
                          resources={"itk_infer": itk, "pacs": pacs}, raise_on_error=False)
    assert not outcome.success
    failure = next(e for e in outcome.all_events if e.event_type_value == "STEP_FAILURE")
    assert key in str(failure.event_specific_data.error)
    assert "gantry tilt" in str(failure.event_specific_data.error)


def test_definitions_add_the_pacs_source_only_when_configured():
    code = ("import itk_infer_assets.definitions as d; "
            "print(sorted(s.name for s in d.defs.sensors))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITK_INFER_PACS")}
    without = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout
    assert "itk_infer_pacs_sensor" not in without
    env |= {"ITK_INFER_PACS_URL": "http://127.0.0.1:9/dicom-web",
            "ITK_INFER_PACS_USER": "u", "ITK_INFER_PACS_PASSWORD": "p"}
    with_pacs = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                               text=True, check=True).stdout
    assert "itk_infer_pacs_sensor" in with_pacs


def _retrieve(client, seg_item):
    """The one instance of the SEG series a QIDO-RS result names (WADO-RS)."""
    study = seg_item["0020000D"]["Value"][0]
    series = seg_item["0020000E"]["Value"][0]
    (seg,) = client.retrieve_series(study, series)
    return seg


def test_wrong_credentials_are_refused(orthanc, tmp_path):
    from requests import HTTPError

    pacs = PacsResource(url=f"{orthanc}/dicom-web", username=USER, password="wrong",
                        work_root=str(tmp_path))
    with pytest.raises(HTTPError) as caught:
        pacs.client().search_for_series()
    assert caught.value.response.status_code == 401
    assert "wrong" not in str(caught.value)
