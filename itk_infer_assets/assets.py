"""The assets: ``segmentation`` + ``logits`` (one GPU step per run, partitioned by image) with
its QC asset checks, and ``confidences`` (the CLI's table, rebuilt after new segmentations,
plus a Review sheet of the cases that failed QC).

The step calls the same core as the command line: it loads the model once, then runs the
run's partitions through :func:`itk_infer.caseloop.run_cases` (read-ahead and write-behind),
one output folder at a time. Outputs land where the CLI would put them; metadata, previews
and QC come from the per-case results in memory, never from re-reading what was just written.

Each partition gets its own materialisation event (metadata, and the data version of its
input file: size and mtime) and its own QC results, logged as its case finishes: a run over
a range of partitions cannot give each partition its own data version through one output.
"""

# No `from __future__ import annotations`: Dagster reads the context/config annotations.
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from dagster import (
    AllPartitionMapping,
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetSpec,
    AutomationCondition,
    BackfillPolicy,
    Config,
    DagsterInstance,
    Failure,
    MaterializeResult,
    MetadataValue,
    PreviewWarning,
    asset,
    multi_asset,
)

from itk_infer.caseloop import run_cases
from itk_infer.cases import Case, OutputLayout, case_name
from itk_infer.config import OutputOptions
from itk_infer.errors import ItkInferError
from itk_infer.outfolder import prepare_output
from itk_infer.pipeline import CaseResult, Model
from itk_infer.records import confidence_rows, write_confidences
from itk_infer_assets.isolated import run_isolated
from itk_infer_assets.partitions import (
    BATCH_SIZE_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    IMAGES_PARTITIONS_NAME,
    PartitionKeyError,
    images_partitions,
    input_version,
    key_folder,
)
from itk_infer_assets.preview import markdown_image, preview_png
from itk_infer_assets.qc import CHECK_DESCRIPTIONS, QcSpec, evaluate, qc_spec
from itk_infer_assets.resources import ItkInferResource

GROUP = "itk_infer"
SEGMENTATION = AssetKey("segmentation")
LOGITS = AssetKey("logits")
CONFIDENCES = AssetKey("confidences")
GPU_POOL = "gpu"
# Partitions per run of a backfill: one model load serves this many images, and several runs
# can still share the GPUs (the gpu pool decides how many run at once).
MAX_PARTITIONS_PER_RUN = 32

# One GPU for the step. Read by the Kubernetes executor (per-step pods) and, as run tags (see
# definitions.py), by the Kubernetes run launcher. Docker's launcher takes no per-run resources
# from tags: give its containers the GPU with `container_kwargs.device_requests` in
# dagster.yaml (see there).
K8S_GPU_CONFIG = {
    "container_config": {
        "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}
    }
}
GPU_OP_TAGS = {"dagster-k8s/config": K8S_GPU_CONFIG, "itk_infer/device": "gpu"}


def _plan(itk_infer: ItkInferResource, keys: list[str]) -> tuple[dict[Path, list[tuple[str, Case]]],
                                                                  dict[str, str]]:
    """Group the run's keys by output folder (run order kept); refuse keys that cannot work."""
    groups: dict[Path, list[tuple[str, Case]]] = {}
    refused: dict[str, str] = {}
    names: dict[tuple[Path, str], str] = {}
    for key in keys:
        try:
            case, layout = itk_infer.case_for(key), itk_infer.layout_for(key)
        except PartitionKeyError as error:
            refused[key] = str(error)
            continue
        if layout.labels(case).resolve() == case.path.resolve():
            refused[key] = "the output folder is the input folder: outputs would replace inputs"
            continue
        other = names.setdefault((layout.folder, case.name), key)
        if other != key:
            refused[key] = f"same case name as {other}: the outputs would collide"
            continue
        groups.setdefault(layout.folder, []).append((key, case))
    return groups, refused


def _segmentation_metadata(result: CaseResult, layout: OutputLayout, model: Model,
                           preview_md: str | None) -> dict:
    record = result.record
    assert record is not None  # only done cases get metadata
    metadata = {
        "path": MetadataValue.path(str(layout.labels(result.case))),
        "record": MetadataValue.path(str(layout.record(result.case))),
        "confidence": MetadataValue.float(float(record.confidence))
        if record.confidence is not None else MetadataValue.text("n/a"),
        "voxels_per_label": MetadataValue.json(record.voxels_per_label),
        # By label name (the model's, else label_<v>); confidences only with save_conf.
        "volumes_ml": MetadataValue.json(record.volumes_ml),
        "confidence_by_label": MetadataValue.json(record.confidence_by_label),
        "timings_s": MetadataValue.json(record.timings_s),
        "num_classes": MetadataValue.int(int(record.num_classes)),
        "source_orientation": MetadataValue.text(record.source_orientation),
        "device": MetadataValue.text(str(record.settings.get("device", ""))),
        "model_fingerprint": MetadataValue.text(record.model_fingerprint),
        "settings": MetadataValue.json(model.describe()),
    }
    if preview_md is not None:
        metadata["preview"] = MetadataValue.md(preview_md)
    return metadata


def _logits_metadata(result: CaseResult, layout: OutputLayout) -> dict:
    record = result.record
    assert record is not None
    return {
        "path": MetadataValue.path(str(layout.logits(result.case))),
        "size_bytes": MetadataValue.int(int(record.output_sizes.get("logits", 0))),
        "dtype": MetadataValue.text("float16, (C, Z, Y, X), zarr v3"),
    }


def _preview(context: AssetExecutionContext, key: str, result: CaseResult) -> str | None:
    """The preview as Markdown, from the arrays the case left in memory; one that cannot be
    drawn is logged, not fatal (the case's outputs are complete at this point)."""
    if result.image is None or result.labels is None or result.spacing_zyx is None:
        return None
    try:
        png = preview_png(result.image, result.labels, result.spacing_zyx)
    except Exception as error:  # cosmetic only; the outputs are already published
        context.log.warning(f"{key}: no preview: {type(error).__name__}: {error}")
        return None
    return markdown_image(png, f"{result.case.name}: axial, coronal, sagittal")


def _log_done(context: AssetExecutionContext, key: str, result: CaseResult,
              layout: OutputLayout, model: Model, spec: QcSpec | None,
              previews: bool) -> None:
    """Log a done case's materialisations (metadata, its input's data version) and its QC
    results, from the result in memory."""
    selected = context.selected_asset_keys
    record = result.record
    assert record is not None  # only done cases get here
    metadata: dict[AssetKey, dict] = {}
    if SEGMENTATION in selected:
        preview = _preview(context, key, result) if previews else None
        metadata[SEGMENTATION] = _segmentation_metadata(result, layout, model, preview)
    if LOGITS in selected:
        metadata[LOGITS] = _logits_metadata(result, layout)
    # The version of the input the record says was read: a file replaced since then has
    # another version, so the sensor runs it again.
    tags = {DATA_VERSION_TAG: input_version(record.input_size, record.input_mtime),
            DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}
    for asset_key, values in metadata.items():
        context.log_event(AssetMaterialization(asset_key, partition=key, metadata=values,
                                               tags=tags))
    if spec is None:
        return
    checks = {k.name for k in context.selected_asset_check_keys if k.asset_key == SEGMENTATION}
    for outcome in evaluate(record, spec, result.case.path, layout.labels(result.case),
                            result.spacing_zyx):
        if outcome.name in checks:
            context.log_event(AssetCheckEvaluation(
                asset_key=SEGMENTATION, check_name=outcome.name, passed=outcome.passed,
                partition=key, metadata=outcome.metadata, description=outcome.description,
                severity=AssetCheckSeverity.ERROR, blocking=False))


def _run_folders(context: AssetExecutionContext, itk_infer: ItkInferResource, model: Model,
                 groups: dict[Path, list[tuple[str, Case]]], failed: dict[str, str],
                 spec: QcSpec | None) -> list[str]:
    """Run each output folder's cases through the core's case loop, logging each done case
    as it finishes; returns the done keys, and adds the others to ``failed``."""
    selected = context.selected_asset_keys
    outputs = OutputOptions(save_logits=LOGITS in selected, save_conf=True)
    previews = bool(itk_infer.preview) and SEGMENTATION in selected
    done: list[str] = []
    for folder, items in groups.items():
        layout = prepare_output(folder)
        key_of = {case.name: key for key, case in items}

        def on_result(result: CaseResult, layout: OutputLayout = layout,
                      key_of: dict[str, str] = key_of) -> None:
            key = key_of[result.case.name]
            if result.status != "done" or result.record is None:
                failed[key] = result.reason or "finished without a record"
                context.log.error(f"{key} failed: {failed[key]}")
                return
            _log_done(context, key, result, layout, model, spec, previews)
            done.append(key)

        # A materialisation always redoes its cases; confidence is always computed, since the
        # confidences table only lists cases that have one.
        run_cases([case for _, case in items], model, layout, outputs, overwrite=True,
                  keep_arrays=previews, on_result=on_result)
    return done


def _check_run(context: AssetExecutionContext, keys: list[str]) -> None:
    """Refuse runs this step cannot do right."""
    if not context.selected_asset_keys:
        raise Failure(description="the QC checks are evaluated by the segmentation step from "
                                  "the case in memory: materialise the partitions to re-check")
    expected = context.run.tags.get(BATCH_SIZE_TAG, "")
    if expected.isdigit() and len(keys) > int(expected):
        # The folder sensor's range: its keys were added together, so it should hold exactly
        # them; more means partitions were added between its ends by someone else.
        raise Failure(description=(
            f"the run's partition range {keys[0]} to {keys[-1]} resolves to {len(keys)} keys, "
            f"but the folder sensor put {expected} in it (partitions were added in between "
            "elsewhere); nothing was run: materialise these keys as a backfill"))


def _qc_spec(context: AssetExecutionContext, itk_infer: ItkInferResource) -> QcSpec | None:
    """The QC thresholds, or ``None`` when the run evaluates no check."""
    if not any(k.asset_key == SEGMENTATION for k in context.selected_asset_check_keys):
        return None
    return qc_spec(itk_infer.settings(), itk_infer.qc_volumes, itk_infer.qc_min_confidence)


with warnings.catch_warnings():
    # One result per image is what the UI should show, so the checks are partitioned like the
    # asset; that is a preview feature of the pinned dagster release, hence its warning.
    warnings.simplefilter("ignore", PreviewWarning)
    QC_CHECKS = [
        AssetCheckSpec(name, asset=SEGMENTATION, partitions_def=images_partitions,
                       description=text, blocking=False)
        for name, text in CHECK_DESCRIPTIONS.items()
    ]


@multi_asset(
    name="itk_infer_inference",
    specs=[
        AssetSpec(
            SEGMENTATION,
            partitions_def=images_partitions,
            group_name=GROUP,
            skippable=True,
            description="Label map of one image (same file name and format as the input; LPI), "
                        "with its record .itk_infer/<case>.json and confidence.",
        ),
        AssetSpec(
            LOGITS,
            partitions_def=images_partitions,
            group_name=GROUP,
            skippable=True,
            description="Blended logits <case>.zarr (float16, C x Z x Y x X), from the same "
                        "model pass as the segmentation (whose label map is always written "
                        "with it). Deselect to write none.",
        ),
    ],
    check_specs=QC_CHECKS,
    can_subset=True,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    backfill_policy=BackfillPolicy.multi_run(MAX_PARTITIONS_PER_RUN),
    description="Sliding-window inference of the run's images with one model load (itk_infer "
                "core, pipelined). Always redoes the case and replaces its outputs atomically.",
)
def itk_infer_inference(
    context: AssetExecutionContext, itk_infer: ItkInferResource
) -> Iterator[MaterializeResult]:
    selected = context.selected_asset_keys
    keys = list(context.partition_keys)
    _check_run(context, keys)
    t0 = time.perf_counter()
    try:
        groups, failed = _plan(itk_infer, keys)
        spec = _qc_spec(context, itk_infer)
        with itk_infer.leased_device(context.log) as device:
            context.log.info(f"{len(keys)} partition(s) on {device}; "
                             f"logits: {LOGITS in selected}")
            if itk_infer.case_timeout is not None:  # stoppable only in a worker process
                load_s = 0.0
                done = run_isolated(
                    itk_infer.settings(save_logits=LOGITS in selected, save_conf=True),
                    device, groups, failed,
                    lambda key, result, layout, model: _log_done(
                        context, key, result, layout, model, spec, previews=False))
            else:
                model = itk_infer.load_model(device)
                load_s = time.perf_counter() - t0
                done = _run_folders(context, itk_infer, model, groups, failed, spec)
    except (ItkInferError, TimeoutError) as error:
        # Settings, model or devices: nothing of this run can succeed.
        raise Failure(description=f"{type(error).__name__}: {error}") from error

    context.log.info(f"{len(done)} done, {len(failed)} failed in "
                     f"{time.perf_counter() - t0:.1f} s (model load {load_s:.1f} s)")
    if failed:
        # The cases that worked are complete on disk and already logged as materialised.
        reasons = [f"{key}: {reason}" for key, reason in sorted(failed.items())]
        raise Failure(
            description=f"{len(failed)} of {len(keys)} case(s) failed: " + "; ".join(reasons),
            metadata={"failed": MetadataValue.json(dict(sorted(failed.items())))},
        )
    # No outputs (both assets are skippable): each partition's materialisation was logged
    # with its own metadata and data version above.
    yield from ()


# After new segmentations, once none is still running (so a burst of sensor runs gives one
# table rebuild). Not `eager()`: that waits while *any* partition is missing, and with
# per-image partitions one unreadable image would block the table forever.
CONFIDENCES_CONDITION = (
    AutomationCondition.any_deps_updated().since_last_handled()
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
).with_label("after new segmentations")


class ConfidencesConfig(Config):
    rebuild_all: bool = False  # rebuild every table, even those whose records did not change


def _records_mtime_ns(layout: OutputLayout) -> int:
    # Publishing a record renames it into .itk_infer/, which changes the folder's mtime.
    return layout.records_folder.stat().st_mtime_ns


def qc_failures(instance: DagsterInstance) -> dict[str, list[tuple[str, str]]]:
    """Partition key → ``(check, description)`` of each QC check whose latest result for that
    partition failed (a partition materialised again and passing drops out)."""
    # Storage-level queries, as the webserver makes them; dagster is pinned to one release.
    from dagster._core.event_api import PartitionKeyFilter
    from dagster._core.storage.asset_check_execution_record import (
        AssetCheckExecutionRecordStatus,
    )

    storage = instance.event_log_storage
    check_keys = [AssetCheckKey(SEGMENTATION, name) for name in CHECK_DESCRIPTIONS]
    failures: dict[str, list[tuple[str, str]]] = {}
    for info in storage.get_asset_check_partition_info(check_keys):
        if (info.partition_key is None
                or info.latest_execution_status != AssetCheckExecutionRecordStatus.FAILED):
            continue
        latest = storage.get_asset_check_execution_history(
            info.check_key, limit=1, partition_filter=PartitionKeyFilter(key=info.partition_key))
        evaluation = latest[0].evaluation if latest else None
        description = (evaluation.description or "") if evaluation is not None else ""
        failures.setdefault(info.partition_key, []).append((info.check_key.name, description))
    return failures


def _review_by_folder(failures: dict[str, list[tuple[str, str]]],
                      ) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """The failures grouped as folder → case name → failed checks."""
    grouped: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for key, checks in failures.items():
        try:
            folder = key_folder(key)
        except PartitionKeyError:
            continue
        name = case_name(key.rpartition("/")[2])
        if name is not None:
            grouped.setdefault(folder, {}).setdefault(name, []).extend(sorted(checks))
    return grouped


def _review_rows(rows: list[tuple[str, float]], failed: dict[str, list[tuple[str, str]]],
                 ) -> list[tuple[str, str, str]]:
    """The Review sheet of one table: its cases that failed QC, with the checks and why."""
    return [(name, ", ".join(check for check, _ in failed[name]),
             "; ".join(text for _, text in failed[name] if text))
            for name, _conf in rows if name in failed]


@asset(
    key=CONFIDENCES,
    deps=[AssetDep(SEGMENTATION, partition_mapping=AllPartitionMapping())],
    group_name=GROUP,
    automation_condition=CONFIDENCES_CONDITION,
    description="confidences.xlsx (sheet Confidences: Case, Confidence), exactly as the CLI "
                "writes it, in every output folder, from the per-case records; plus a sheet "
                "Review (Case, Failed checks, Details) when some case failed QC.",
)
def confidences(
    context: AssetExecutionContext, config: ConfidencesConfig, itk_infer: ItkInferResource
) -> MaterializeResult:
    output_root = itk_infer.output_path()
    folders: set[str] = set()
    for key in context.instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME):
        try:
            folders.add(key_folder(key))
        except PartitionKeyError:
            continue
    review = _review_by_folder(qc_failures(context.instance))
    tables: dict[str, dict] = {}
    lowest: list[tuple[float, str]] = []
    unchanged = 0
    for folder in sorted(folders):
        layout = OutputLayout(output_root.joinpath(*folder.split("/")) if folder else output_root)
        if not layout.records_folder.is_dir():
            continue
        before = _records_mtime_ns(layout)
        if (not config.rebuild_all and layout.confidences.exists()
                and layout.confidences.stat().st_mtime_ns == before):
            unchanged += 1
            continue
        rows = confidence_rows(layout.folder)
        to_review = _review_rows(rows, review.get(folder, {}))
        path = write_confidences(layout.folder, rows, review=to_review)
        # Stamp the table with the records' state it was built from: a record published while
        # we read makes the folder newer than the table, so the next run rebuilds it.
        os.utime(path, ns=(time.time_ns(), before))
        prefix = f"{folder}/" if folder else ""
        lowest.extend((conf, prefix + name) for name, conf in rows)
        tables[folder or "."] = {"path": str(path), "rows": len(rows), "review": len(to_review)}
    return MaterializeResult(metadata=_confidences_metadata(tables, lowest, unchanged, folders))


def _confidences_metadata(tables: dict[str, dict], lowest: list[tuple[float, str]],
                          unchanged: int, folders: set[str]) -> dict:
    lowest.sort()
    rows = "\n".join(f"| {name} | {conf:.4f} |" for conf, name in lowest[:20])
    summary = ("| case | confidence |\n|---|---|\n" + rows) if rows else "no table rebuilt"
    return {
        "tables": MetadataValue.json(tables),
        "rebuilt": MetadataValue.int(len(tables)),
        "unchanged": MetadataValue.int(unchanged),
        "rows_rebuilt": MetadataValue.int(sum(t["rows"] for t in tables.values())),
        "to_review": MetadataValue.int(sum(t["review"] for t in tables.values())),
        "lowest_confidences": MetadataValue.md(summary),
        "folders": MetadataValue.int(len(folders)),
    }
