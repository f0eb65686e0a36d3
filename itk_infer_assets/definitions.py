"""The code location: the one ``Definitions`` (``defs``) with the assets, the job the folder
sensor starts, the sensors and the ``itk_infer`` resource filled from the environment."""

from __future__ import annotations

import json
import os

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    define_asset_job,
    in_process_executor,
)

from itk_infer.config import settings_from_env
from itk_infer_assets.assets import (
    CONFIDENCES,
    K8S_GPU_CONFIG,
    LOGITS,
    SEGMENTATION,
    confidences,
    itk_infer_inference,
)
from itk_infer_assets.pacs import (
    build_pacs_sensor,
    pacs_job,
    pacs_resource_from_env,
    pacs_segmentation,
)
from itk_infer_assets.resources import resource_from_env
from itk_infer_assets.sensors import build_folder_sensor

# The deployment's settings; the sensor knobs among them shape definitions, not runs, so they
# are read when the code location loads.
SETTINGS = settings_from_env(os.environ)

# Run-level GPU request for run launchers that start one container per run (Kubernetes).
RUN_TAGS = {"dagster-k8s/config": json.dumps(K8S_GPU_CONFIG)}

inference_job = define_asset_job(
    "itk_infer_inference_job",
    selection=AssetSelection.assets(SEGMENTATION, LOGITS),
    tags=RUN_TAGS,
    description="Segmentation (and logits) of images partitions; started by the folder sensor.",
)

_interval = max(1, int(SETTINGS.sensor_interval))

image_folder_sensor = build_folder_sensor(
    inference_job,
    minimum_interval_seconds=_interval,
    settle_seconds=SETTINGS.sensor_settle,
    run_tags=RUN_TAGS,
)

confidences_automation = AutomationConditionSensorDefinition(
    "itk_infer_automation",
    target=AssetSelection.assets(CONFIDENCES),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=_interval,
    description="Rebuilds confidences.xlsx after new segmentations.",
)

# The PACS source (README "DICOM and PACS"): only when ITK_INFER_PACS_URL is set.
PACS = pacs_resource_from_env(os.environ)
_pacs_parts: dict = {} if PACS is None else {
    "assets": [pacs_segmentation], "jobs": [pacs_job], "resources": {"pacs": PACS},
    "sensors": [build_pacs_sensor(pacs_job, minimum_interval_seconds=_interval)]}

# A run is essentially one step (the GPU inference), so steps run inside the run's process:
# no second interpreter (and torch import) per run. A Kubernetes deployment that wants a pod
# per step swaps in `dagster_k8s.k8s_job_executor` here.
defs = Definitions(
    assets=[itk_infer_inference, confidences, *_pacs_parts.get("assets", [])],
    jobs=[inference_job, *_pacs_parts.get("jobs", [])],
    sensors=[image_folder_sensor, confidences_automation, *_pacs_parts.get("sensors", [])],
    resources={"itk_infer": resource_from_env(), **_pacs_parts.get("resources", {})},
    executor=in_process_executor,
)
