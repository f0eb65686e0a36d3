"""Folder sensor: new images below the watched root become ``images`` partitions, one run each.

The scan (:func:`scan_watch_root`) is a pure function of the file system, the previous scan
state and a "which of these keys are known" callback, so it is tested without Dagster.

Cursor and cost (the trade-off): the cursor keeps, per folder, its mtime and when it was last
listed, plus the files still being written (``pending``: key → size, mtime). It does *not*
keep the known keys — those are the partitions in the instance, asked only for the few
candidates of a tick. A tick

* stats every known folder (a folder whose mtime is unchanged gained or lost no entry: adding,
  renaming or deleting a file changes its folder's mtime), and
* lists only the folders that changed; of their files only those created or renamed in since
  the last listing (``st_ctime`` ≥ last listing − ``margin``) are candidates,
* stats each pending file.

So a tick over 100,000 untouched files costs one ``stat`` per folder and a cursor of one small
entry per folder; a changed folder costs one listing (one ``stat`` per entry). The price is
trusting folder mtimes and file ctimes: on file systems whose clocks drift from the sensor
host's by more than ``margin`` (some network mounts), raise the margin. The first tick, or a
flood of files, adds at most ``max_new_per_tick`` keys and keeps at most as many waiting
files; folders not finished keep their old state and are listed again on the next tick (known
keys are filtered out, never re-added). Measured on 100,000 empty files in 100 folders
(local disk): a tick with nothing new takes about 1 ms with a 5 KB cursor; one new file in a
1,000-file folder about 10 ms; registering all 100,000 takes 100 ticks of 1,000.

A file whose size or mtime changed since the previous tick (or that was modified within
``settle`` seconds) waits; it is taken once two ticks agree. Unsupported suffixes, unreadable
or non-3-D/vector images and case-name collisions are logged and skipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from itk_infer.cases import IMAGE_SUFFIXES, RECORDS_DIRNAME, case_name
from itk_infer_assets.partitions import IMAGES_PARTITIONS_NAME, check_key, images_partitions
from itk_infer_assets.resources import ItkInferResource

if TYPE_CHECKING:  # what define_asset_job returns; not part of dagster's public names
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

log = logging.getLogger(__name__)

CURSOR_VERSION = 1
NEVER = -1  # mtime of a folder discovered but not yet listed
MAX_SKIPS_LOGGED = 50  # per tick: a first tick over a large tree may skip thousands


@dataclass
class FolderState:
    mtime_ns: int  # folder mtime when it was last listed (NEVER: list it)
    listed_ns: int  # wall clock when that listing started


@dataclass
class ScanState:
    """What the cursor remembers between ticks."""

    folders: dict[str, FolderState] = field(default_factory=dict)
    pending: dict[str, tuple[int, int]] = field(default_factory=dict)  # key → (size, mtime_ns)

    def to_json(self) -> str:
        return json.dumps({
            "version": CURSOR_VERSION,
            "folders": {k: [v.mtime_ns, v.listed_ns] for k, v in sorted(self.folders.items())},
            "pending": {k: list(v) for k, v in sorted(self.pending.items())},
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> ScanState:
        """The state in a cursor; an empty, foreign or damaged cursor starts over (safe: known
        keys are filtered by the instance, so starting over re-adds nothing)."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
            if data.get("version") != CURSOR_VERSION:
                return cls()
            folders = {str(k): FolderState(int(v[0]), int(v[1]))
                        for k, v in data.get("folders", {}).items()}
            pending = {str(k): (int(v[0]), int(v[1])) for k, v in data.get("pending", {}).items()}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            log.warning("ignoring an unreadable sensor cursor; scanning from scratch")
            return cls()
        return cls(folders, pending)


@dataclass
class ScanResult:
    new_keys: list[str]
    new_files: dict[str, tuple[int, int]]  # key → (size, mtime_ns) when taken
    state: ScanState
    skipped: list[tuple[str, str]]  # (relative path, reason)
    waiting: list[str]  # keys still being written
    folders_checked: int = 0
    folders_listed: int = 0
    capped: bool = False  # more new files than max_new_per_tick: the rest come next tick


def probe_image(path: Path) -> str | None:
    """Why ``path`` cannot be a case (reads the header only), or ``None`` when it can."""
    import SimpleITK as sitk

    if not os.access(path, os.R_OK):
        return "not readable (permissions)"
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        lines = [ln for ln in str(error).splitlines() if ln.strip()]
        return f"cannot read image header: {lines[-1].strip() if lines else error}"
    if reader.GetDimension() != 3:
        return f"image is {reader.GetDimension()}-D; a 3-D volume is required"
    if reader.GetNumberOfComponents() != 1:
        return f"image has {reader.GetNumberOfComponents()} components per voxel; scalar needed"
    return None


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _sibling_with_same_case(folder: Path, filename: str) -> str | None:
    """Another image in ``folder`` that would produce the same case name (and outputs)."""
    name = case_name(filename)
    for suffix in IMAGE_SUFFIXES:
        other = f"{name}{suffix}"
        if other != filename and (folder / other).exists():
            return other
    return None


def scan_watch_root(
    root: Path,
    state: ScanState,
    is_known: Callable[[Sequence[str]], set[str]],
    *,
    exclude: Iterable[Path] = (),
    now_ns: int | None = None,
    settle_seconds: float = 5.0,
    margin_seconds: float = 30.0,
    max_new_per_tick: int = 1000,
    probe: Callable[[Path], str | None] = probe_image,
) -> ScanResult:
    """Find the image files below ``root`` that are new since ``state``.

    Args:
        root: the watched folder.
        state: the previous tick's state (``ScanState()`` on the first tick).
        is_known: returns the subset of the given keys that already are partitions.
        exclude: folders never to enter (the output root when it lies inside ``root``).
        now_ns: the tick's wall-clock time (tests pin it).
        settle_seconds: a file modified more recently than this waits for the next tick.
        margin_seconds: slack on folder mtimes and file ctimes (clock granularity/skew).
        max_new_per_tick: most keys one tick adds; the rest wait for the next tick.
        probe: decides whether a file is a usable image (header read).

    Returns:
        New keys (sorted), the next state, skipped files with reasons, and files still waiting.
    """
    root = Path(root)
    now = time.time_ns() if now_ns is None else now_ns
    settle_ns, margin_ns = int(settle_seconds * 1e9), int(margin_seconds * 1e9)
    excluded = {Path(p).resolve() for p in exclude}
    result = ScanResult([], {}, ScanState(), [], [])
    children: dict[str, list[str]] = {}
    for rel in state.folders:
        if rel:
            children.setdefault(rel.rsplit("/", 1)[0] if "/" in rel else "", []).append(rel)

    # key, path, size, mtime_ns, fresh (not seen by an earlier tick: report skips once)
    Item = tuple[str, Path, int, int, bool]
    ready: list[Item] = []  # stable and not yet a partition
    new_pending: dict[str, tuple[int, int]] = {}

    def consider(items: list[Item], waiting: dict[str, tuple[int, int]], key: str, path: Path,
                 size: int, mtime_ns: int, fresh: bool) -> None:
        before = state.pending.get(key)
        if before == (size, mtime_ns) or (before is None and mtime_ns <= now - settle_ns):
            items.append((key, path, size, mtime_ns, fresh))
        else:
            waiting[key] = (size, mtime_ns)

    def unknown(items: list[Item]) -> list[Item]:
        known = is_known([item[0] for item in items]) if items else set()
        return [item for item in items if item[0] not in known]

    # Files that were still being written: look at them directly, their folder may not change.
    stable: list[Item] = []
    for key in sorted(state.pending):
        path = root / key
        try:
            st = path.stat()
        except OSError:
            continue  # gone
        consider(stable, new_pending, key, path, st.st_size, st.st_mtime_ns, True)
    stable = unknown(stable)
    ready.extend(stable[:max_new_per_tick])
    for key, _path, size, mtime_ns, _fresh in stable[max_new_per_tick:]:
        new_pending[key] = (size, mtime_ns)  # stable but over budget: taken next tick
        result.capped = True

    todo = [""]
    while todo:
        rel = todo.pop()
        folder = root / rel if rel else root
        try:
            st = folder.stat()
        except OSError:
            continue  # the folder went away; forget it (and, unvisited, its children)
        result.folders_checked += 1
        before = state.folders.get(rel)
        kept = before if before is not None else FolderState(NEVER, now)
        recent = before is not None and before.mtime_ns >= before.listed_ns - margin_ns
        unchanged = before is not None and before.mtime_ns == st.st_mtime_ns and not recent
        if unchanged or len(ready) >= max_new_per_tick or len(new_pending) >= max_new_per_tick:
            # Unchanged: same entries as last time, so the same subfolders. Over budget: the
            # old state makes the next tick list it.
            result.state.folders[rel] = kept
            todo.extend(children.get(rel, []))
            continue
        since = None if kept.mtime_ns == NEVER else kept.listed_ns - margin_ns
        result.folders_listed += 1
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            result.skipped.append((rel or ".", f"cannot list folder: {error.strerror}"))
            result.state.folders[rel] = kept
            continue
        found: list[Item] = []
        waiting: dict[str, tuple[int, int]] = {}
        for entry in entries:
            if entry.name.startswith("."):  # hidden, temporaries, .itk_infer records
                continue
            key = _join(rel, entry.name)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != RECORDS_DIRNAME and Path(entry.path).resolve() not in excluded:
                        todo.append(key)
                        result.state.folders.setdefault(
                            key, state.folders.get(key, FolderState(NEVER, now)))
                    continue
                if not entry.is_file():
                    continue
                est = entry.stat()
            except OSError:
                continue  # vanished while listing
            if since is not None and est.st_ctime_ns < since:
                continue  # there at the previous listing: already decided
            if key in state.pending:
                continue  # handled above
            fresh = since is None or est.st_ctime_ns >= kept.listed_ns
            if case_name(entry.name) is None:
                if fresh:
                    result.skipped.append((key, "unsupported file type (not .mha/.nii/.nii.gz)"))
                continue
            consider(found, waiting, key, Path(entry.path), est.st_size, est.st_mtime_ns, fresh)
        found = unknown(found)
        room = max_new_per_tick - len(ready)
        pending_room = max_new_per_tick - len(new_pending)
        if len(found) > room or len(waiting) > pending_room:
            # Too many at once: take what fits; the old state makes the next tick list this
            # folder again (what was taken is known by then and not taken twice), so the
            # cursor stays bounded too.
            ready.extend(found[:max(room, 0)])
            new_pending.update(list(waiting.items())[:max(pending_room, 0)])
            result.capped = True
            result.state.folders[rel] = kept
            continue
        ready.extend(found)
        new_pending.update(waiting)
        result.state.folders[rel] = FolderState(st.st_mtime_ns, now)

    result.state.pending = new_pending
    result.waiting = sorted(new_pending)
    for key, path, size, mtime_ns, fresh in sorted(ready, key=lambda item: item[0]):
        reason = _unusable(key, path, probe)
        if reason is not None:
            if fresh:
                result.skipped.append((key, reason))
            continue
        result.new_keys.append(key)
        result.new_files[key] = (size, mtime_ns)
    return result


def _unusable(key: str, path: Path, probe: Callable[[Path], str | None]) -> str | None:
    try:
        check_key(key)
    except ValueError as error:
        return str(error)
    sibling = _sibling_with_same_case(path.parent, path.name)
    if sibling is not None:
        return f"same case name as {sibling} in its folder: the outputs would collide; rename one"
    return probe(path)


def known_keys_in_instance(context: SensorEvaluationContext) -> Callable[[Sequence[str]], set[str]]:
    """``is_known`` for :func:`scan_watch_root` backed by the instance's partitions: a few keys
    are asked one by one, many at once by reading the whole partition list."""

    everything: set[str] | None = None  # the whole list, read at most once per tick

    def is_known(keys: Sequence[str]) -> set[str]:
        nonlocal everything
        instance = context.instance
        if everything is None and len(keys) <= 100:
            return {k for k in keys if instance.has_dynamic_partition(IMAGES_PARTITIONS_NAME, k)}
        if everything is None:
            everything = set(instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME))
        return everything & set(keys)

    return is_known


def build_folder_sensor(
    job: UnresolvedAssetJobDefinition,
    *,
    name: str = "image_folder_sensor",
    minimum_interval_seconds: int = 30,
    settle_seconds: float = 5.0,
    margin_seconds: float = 30.0,
    max_new_per_tick: int = 1000,
    run_tags: dict[str, str] | None = None,
    default_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING,
) -> SensorDefinition:
    """The folder sensor: adds the new keys as partitions and requests one run per key."""
    from itk_infer_assets.assets import LOGITS, SEGMENTATION

    @sensor(
        name=name,
        job=job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description="Adds every new image below the watched root (ITK_INFER_WATCH_ROOT) as an "
                    "'images' partition and requests a segmentation run for it.",
    )
    def image_folder_sensor(
        context: SensorEvaluationContext, itk_infer: ItkInferResource
    ) -> SensorResult | SkipReason:
        if not itk_infer.watch_root or not Path(itk_infer.watch_root).is_dir():
            return SkipReason(f"watch root {itk_infer.watch_root!r} is not a folder "
                              "(set ITK_INFER_WATCH_ROOT)")
        root = Path(itk_infer.watch_root)
        exclude = [Path(itk_infer.output_root)] if itk_infer.output_root else []
        scan = scan_watch_root(
            root, ScanState.from_json(context.cursor), known_keys_in_instance(context),
            exclude=exclude, settle_seconds=settle_seconds, margin_seconds=margin_seconds,
            max_new_per_tick=max_new_per_tick,
        )
        for path, reason in scan.skipped[:MAX_SKIPS_LOGGED]:
            context.log.warning(f"skipping {path}: {reason}")
        if len(scan.skipped) > MAX_SKIPS_LOGGED:
            context.log.warning(f"... and {len(scan.skipped) - MAX_SKIPS_LOGGED} more skipped")
        if scan.waiting:
            context.log.info(f"{len(scan.waiting)} file(s) still being written; next tick: "
                             + ", ".join(scan.waiting[:10]))
        if scan.capped:
            context.log.info(f"added {len(scan.new_keys)} keys; more next tick")
        cursor = scan.state.to_json()
        if not scan.new_keys:
            return SensorResult(skip_reason=f"no new images ({len(scan.waiting)} waiting)",
                                cursor=cursor)
        selection = [SEGMENTATION, LOGITS] if itk_infer.sensor_logits else [SEGMENTATION]
        requests = []
        for key in scan.new_keys:
            size, mtime_ns = scan.new_files[key]
            requests.append(RunRequest(
                run_key=f"{key}|{size}|{mtime_ns}",
                partition_key=key,
                asset_selection=selection,
                tags=run_tags or {},
            ))
        return SensorResult(
            dynamic_partitions_requests=[images_partitions.build_add_request(scan.new_keys)],
            run_requests=requests,
            cursor=cursor,
        )

    return image_folder_sensor
