"""A PACS as source and destination, over DICOMweb: a sensor finds new series (QIDO-RS), a
run retrieves each one (WADO-RS), segments it with the core, and stores the DICOM-SEG back
(STOW-RS).

Small on purpose: one asset, ``pacs_segmentation``, partitioned by the dynamic partitions
``pacs_series`` (key ``<StudyInstanceUID>/<SeriesInstanceUID>``: stable, path-like, and the
folder the series is retrieved to), one run per series. Its own partitions, not the folder
sensor's ``images``: those keys name image files below the watched folder, which a series in a
PACS is not. The model and settings are the ``itk_infer`` resource's; the PACS is the
``pacs`` resource, whose URL and credentials come from the environment (``ITK_INFER_PACS_*``,
read by Dagster's ``EnvVar``: never in code, config or logs).
"""

# No `from __future__ import annotations`: Dagster reads the context/resource annotations.
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    ConfigurableResource,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    EnvVar,
    Failure,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    asset,
    define_asset_job,
    sensor,
)

from itk_infer.atomic import atomic_output
from itk_infer.cases import Case, OutputLayout
from itk_infer.errors import ItkInferError
from itk_infer.pipeline import predict_case
from itk_infer_assets.assets import GPU_OP_TAGS, GPU_POOL, GROUP
from itk_infer_assets.resources import ItkInferResource

log = logging.getLogger(__name__)

PACS_PARTITIONS_NAME = "pacs_series"
pacs_partitions = DynamicPartitionsDefinition(name=PACS_PARTITIONS_NAME)
# DICOM JSON tags (PS3.18 F.2): what QIDO-RS answers with.
STUDY_UID, SERIES_UID, MODALITY = "0020000D", "0020000E", "00080060"
# QIDO-RS attribute names of the sensor's filters (matching is the PACS's: wildcards work).
FILTERS = {"modality": "Modality", "series_description": "SeriesDescription",
           "station_name": "StationName"}
ENV = {"url": "ITK_INFER_PACS_URL", "username": "ITK_INFER_PACS_USER",
       "password": "ITK_INFER_PACS_PASSWORD"}
PLAIN_ENV = {"modality": "ITK_INFER_PACS_MODALITY",
             "series_description": "ITK_INFER_PACS_SERIES_DESCRIPTION",
             "station_name": "ITK_INFER_PACS_STATION_NAME"}


class PacsResource(ConfigurableResource):
    """A DICOMweb service (its base URL, e.g. Orthanc's ``http://host:8042/dicom-web``), HTTP
    basic credentials, the sensor's filters, and the folder series are retrieved to."""

    url: str
    username: str | None = None
    password: str | None = None
    work_root: str
    modality: str | None = "CT"
    series_description: str | None = None
    station_name: str | None = None

    def client(self) -> Any:
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session, create_session_from_user_pass

        session = (create_session_from_user_pass(self.username, self.password or "")
                   if self.username else create_session())
        return DICOMwebClient(url=self.url, session=session)

    def search_filters(self) -> dict[str, str]:
        return {attr: value for field, attr in FILTERS.items()
                if (value := getattr(self, field))}


def checked_uid(uid: str) -> str:
    """``uid`` if it is a DICOM UID (digits and dots, at most 64): safe as a file name."""
    if not uid or len(uid) > 64 or not all(c.isdigit() or c == "." for c in uid) \
            or uid.startswith(".") or ".." in uid:
        raise ValueError(f"not a DICOM UID: {uid!r}")
    return uid


def series_key(study_uid: str, series_uid: str) -> str:
    """The partition key of a series: ``<StudyInstanceUID>/<SeriesInstanceUID>``."""
    return f"{checked_uid(study_uid)}/{checked_uid(series_uid)}"


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def new_series(pacs: PacsResource, seen: set[str]) -> list[str]:
    """Keys of the series the PACS holds that match the filters and are not in ``seen``
    (derived objects, SEGs among them, are never images to segment)."""
    items = pacs.client().search_for_series(search_filters=pacs.search_filters(),
                                            get_remaining=True)  # every page
    found: set[str] = set()
    for item in items:
        if _value(item, MODALITY).upper() in ("SEG", "RTSTRUCT", "SR", "PR", "KO"):
            continue
        try:
            found.add(series_key(_value(item, STUDY_UID), _value(item, SERIES_UID)))
        except ValueError as error:
            log.warning("ignoring a series the PACS listed: %s", error)
    return sorted(found - seen)


def build_pacs_sensor(job: Any, minimum_interval_seconds: int = 30) -> SensorDefinition:
    """The sensor: each tick lists the matching series (QIDO-RS); a series not seen before
    becomes a ``pacs_series`` partition and a run. The cursor is the set of keys seen."""

    @sensor(name="itk_infer_pacs_sensor", job=job,
            minimum_interval_seconds=minimum_interval_seconds,
            default_status=DefaultSensorStatus.STOPPED,
            description="New series in the PACS (DICOMweb) -> segmentation -> SEG stored back.")
    def pacs_sensor(context: SensorEvaluationContext, pacs: PacsResource) -> SensorResult:
        seen = set(json.loads(context.cursor)) if context.cursor else set()
        known = set(context.instance.get_dynamic_partitions(PACS_PARTITIONS_NAME))
        fresh = new_series(pacs, seen | known)
        return SensorResult(
            run_requests=[RunRequest(partition_key=key, run_key=key) for key in fresh],
            dynamic_partitions_requests=[pacs_partitions.build_add_request(fresh)] if fresh
            else [],
            cursor=json.dumps(sorted(seen | set(fresh))),
        )

    return pacs_sensor


def retrieve(pacs: PacsResource, key: str) -> list[Path]:
    """Retrieve every instance of the series ``key`` (WADO-RS) into ``<work_root>/<key>/``,
    emptied first (instances deleted from the PACS since an earlier run must not count), one
    file per instance named by its SOPInstanceUID, each written atomically; returns them."""
    study, series = key.split("/")
    folder = Path(pacs.work_root, checked_uid(study), checked_uid(series))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    files = []
    for dataset in pacs.client().iter_series(study, series):
        path = folder / f"{checked_uid(str(dataset.SOPInstanceUID))}.dcm"
        with atomic_output(path) as tmp:
            dataset.save_as(tmp, enforce_file_format=True)
        files.append(path)
    return sorted(files)


def store(pacs: PacsResource, seg_path: Path) -> str:
    """Store the SEG in the PACS (STOW-RS); returns its SOPInstanceUID."""
    import pydicom

    seg = pydicom.dcmread(seg_path)
    pacs.client().store_instances([seg])
    return str(seg.SOPInstanceUID)


@asset(partitions_def=pacs_partitions, key="pacs_segmentation", group_name=GROUP,
       pool=GPU_POOL, op_tags=GPU_OP_TAGS,  # shares the GPUs with the folder pipeline's step
       description="DICOM-SEG of a PACS series, stored back to the PACS.")
def pacs_segmentation(context: AssetExecutionContext, itk_infer: ItkInferResource,
                      pacs: PacsResource) -> MaterializeResult:
    key = context.partition_key
    study, series = key.split("/")
    files = retrieve(pacs, key)
    context.log.info(f"{key}: {len(files)} instance(s) retrieved")
    if not files:
        raise Failure(description=f"{key}: the PACS returned no instance of this series")
    case = Case(name=series, path=files[0].parent, files=tuple(files))
    layout = OutputLayout(itk_infer.output_path() / "dicomweb" / study)
    try:
        with itk_infer.leased_device(context.log) as device:
            model = itk_infer.load_model(device)
            result = predict_case(case, model, layout)
    except ItkInferError as error:
        raise Failure(description=f"{key}: {error}") from error
    assert result.record is not None
    seg_path = layout.labels(case)
    stored = store(pacs, seg_path)
    shutil.rmtree(files[0].parent, ignore_errors=True)  # patient data: kept no longer than needed
    return MaterializeResult(metadata={
        "path": MetadataValue.path(str(seg_path)),
        "seg_sop_instance_uid": stored,
        "instances": len(files),
        "voxels_per_label": MetadataValue.json(result.record.voxels_per_label),
    })


pacs_job = define_asset_job("itk_infer_pacs_job", selection=[pacs_segmentation],
                            description="Segment a PACS series and store its SEG back.")


def pacs_resource_from_env(environ: Mapping[str, str]) -> PacsResource | None:
    """The ``pacs`` resource of a deployment, or ``None`` when ``ITK_INFER_PACS_URL`` is unset.

    URL and credentials are Dagster ``EnvVar``s: their values are read when a run or tick needs
    them and never shown in the UI or config. Filters and the work folder are plain variables.
    """
    if not environ.get(ENV["url"]):
        return None
    secrets = {field: EnvVar(name) for field, name in ENV.items() if environ.get(name)}
    plain = {field: environ[name] for field, name in PLAIN_ENV.items() if name in environ}
    work = environ.get("ITK_INFER_PACS_WORK_ROOT") or str(
        Path(tempfile.gettempdir()) / "itk_infer-pacs")
    return PacsResource(**secrets, **plain, work_root=work)
