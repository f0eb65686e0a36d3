"""Folder sensor: new images below the watched root become ``images`` partitions, run in
batches of ``run_batch`` images (one model load per run); replaced images run again.

The scan (:func:`scan_watch_root`) is a pure function of the file system, the previous scan
state and two callbacks ("which of these keys are known", "what file did their latest
materialisation come from"), so it is tested without Dagster.

Cursor and cost (the trade-off): the cursor keeps, per folder, its mtime and when it was last
listed, plus the files still being written (``pending``: key → size, mtime). It does *not*
keep the known keys or their files' identities — those are in the instance (the partitions,
and each latest materialisation's data version), asked only for the few candidates of a tick.
A tick

* stats every known folder (a folder whose mtime is unchanged gained or lost no entry: adding,
  renaming or deleting a file changes its folder's mtime), and
* lists only the folders that changed; of their files only those created or renamed in since
  the last listing (``st_ctime`` ≥ last listing − ``margin``) are candidates: a new file, or a
  known one replaced (written elsewhere, then renamed over the old name) whose size or mtime
  differs from its latest materialisation's data version,
* stats each pending file.

So a tick over 100,000 untouched files costs one ``stat`` per folder and a cursor of one small
entry per folder; a changed folder costs one listing (one ``stat`` per entry). The price is
trusting folder mtimes and file ctimes: on file systems whose clocks drift from the sensor
host's by more than ``margin`` (some network mounts), raise the margin. A file rewritten in
place changes no folder mtime and is not noticed: replace files by renaming, or materialise
the partition by hand. A tick adds at most ``max_new_per_tick`` keys (rounded down to whole
batches), keeps at most as many waiting files, and stops early when it runs out of its time
budget; what it did not finish (folders not listed, files not probed) it leaves in the cursor
for the next tick (known keys are filtered out, never re-added).

A file whose size or mtime changed since the previous tick (or that was modified within
``settle`` seconds) waits; it is taken once two ticks agree. Names that cannot be keys (not
valid UTF-8, characters Dagster refuses), unsupported suffixes, unreadable or
non-3-D/vector images and case-name collisions are logged once, counted and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from dagster import (
    AssetKey,
    DagsterEventType,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from itk_infer.cases import IMAGE_SUFFIXES, RECORDS_DIRNAME, case_name
from itk_infer_assets.partitions import (
    BATCH_SIZE_TAG,
    DATA_VERSION_TAG,
    FORBIDDEN_IN_KEYS,
    IMAGES_PARTITIONS_NAME,
    RANGE_END_TAG,
    RANGE_START_TAG,
    PartitionKeyError,
    check_key,
    images_partitions,
    input_version_ns,
    is_input_version,
    is_utf8,
    shown,
)
from itk_infer_assets.resources import ItkInferResource

if TYPE_CHECKING:  # what define_asset_job returns; not part of dagster's public names
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

log = logging.getLogger(__name__)

CURSOR_VERSION = 1
NEVER = -1  # mtime of a folder discovered but not yet listed
MAX_SKIPS_LOGGED = 50  # per tick: a first tick over a large tree may skip thousands
QUERY_CHUNK = 500  # partitions per instance query (SQL parameter limits)

KeysQuery = Callable[[Sequence[str]], set[str]]
VersionsQuery = Callable[[Sequence[str]], dict[str, str]]


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
    new_files: dict[str, tuple[int, int]]  # key → (size, mtime_ns) when taken (new and rerun)
    state: ScanState
    skipped: list[tuple[str, str]]  # (relative path, printable; reason)
    waiting: list[str]  # keys in the next cursor's pending: being written, or not yet probed
    # Known keys to run again: their file differs from the latest materialisation's data
    # version (replaced since).
    rerun_keys: list[str] = field(default_factory=list)
    folders_checked: int = 0
    folders_listed: int = 0
    capped: bool = False  # over max_new_per_tick or out of time: the rest come next tick
    out_of_time: bool = False
    invalid_names: int = 0  # of the skipped: names that cannot be partition keys

    def summary(self) -> str:
        """One line for the tick's log and skip message."""
        text = (f"{len(self.new_keys)} new, {len(self.rerun_keys)} to rerun, "
                f"{len(self.skipped)} skipped ({self.invalid_names} invalid names), "
                f"{len(self.waiting)} waiting; {self.folders_listed} of "
                f"{self.folders_checked} folders listed")
        if self.out_of_time:
            return text + "; out of time, more next tick"
        return text + "; more next tick" if self.capped else text


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


def _key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a partition key, or ``None``."""
    try:
        check_key(key)
    except PartitionKeyError as error:
        return str(error)
    return None


def _folder_problem(name: str) -> str | None:
    """Why no image inside a folder of this name can be a key, or ``None``."""
    if not is_utf8(name):
        return "folder name is not valid UTF-8: its images cannot be partition keys"
    if any(bad in name for bad in FORBIDDEN_IN_KEYS):
        return "folder name holds '...' or control characters, which Dagster refuses in keys"
    return None


class _Candidate(NamedTuple):
    """An image file that may become a key (or run again) this tick."""

    key: str
    path: Path
    size: int
    mtime_ns: int
    fresh: bool  # not seen by an earlier tick: report its skip once
    rerun: bool = False  # already a partition: run it again


@dataclass
class _Tick:
    """One tick of :func:`scan_watch_root`: the previous state, the result being built, the
    limits (cap, clock)."""

    root: Path
    old: ScanState
    is_known: KeysQuery
    versions: VersionsQuery | None
    excluded: set[Path]
    now: int
    settle_ns: int
    margin_ns: int
    cap: int
    probe: Callable[[Path], str | None]
    clock: Callable[[], float]
    walk_deadline: float | None  # no folder is listed after this: the rest is for probing
    deadline: float | None
    result: ScanResult = field(default_factory=lambda: ScanResult([], {}, ScanState(), [], []))
    ready: list[_Candidate] = field(default_factory=list)  # settled, new or to rerun
    pending: dict[str, tuple[int, int]] = field(default_factory=dict)  # the next cursor's
    children: dict[str, list[str]] = field(init=False)  # known subfolders of each known folder

    def __post_init__(self) -> None:
        self.children = {}
        for rel in self.old.folders:
            if rel:
                self.children.setdefault(rel.rpartition("/")[0], []).append(rel)

    def skip(self, rel: str, reason: str, invalid_name: bool = False) -> None:
        self.result.skipped.append((shown(rel or "."), reason))
        self.result.invalid_names += int(invalid_name)

    def past(self, deadline: float | None) -> bool:
        """Whether ``deadline`` has passed (then the result says so)."""
        if deadline is None or self.clock() < deadline:
            return False
        self.result.out_of_time = self.result.capped = True
        return True

    def listing_over(self) -> bool:
        """Whether the time for listings is up; the clock is not read again once it is."""
        return self.result.out_of_time or self.past(self.walk_deadline)

    def recheck_pending(self) -> None:
        """Stat the files that were still being written: their folder may not change again."""
        candidates = []
        for key in sorted(self.old.pending):
            if _key_problem(key) is not None:
                continue  # an older version's cursor: never a key, so never taken
            path = self.root / key
            try:
                st = path.stat()
            except OSError:
                continue  # gone
            candidates.append(_Candidate(key, path, st.st_size, st.st_mtime_ns, True))
        settled, waiting = self._triage(candidates)
        self.pending.update(waiting)
        self.ready.extend(settled[:self.cap])
        for item in settled[self.cap:]:
            self.pending[item.key] = (item.size, item.mtime_ns)  # over budget: next tick
            self.result.capped = True

    def walk(self) -> None:
        """Visit the folders depth-first from the root, listing only those that changed."""
        todo = [""]
        while todo:
            todo.extend(self._visit(todo.pop()))

    def finish(self) -> ScanResult:
        """Probe the settled candidates in key order (until the deadline; the rest wait in the
        cursor) and complete the result."""
        result = self.result
        ready = sorted(self.ready, key=lambda item: item.key)
        for index, item in enumerate(ready):
            if self.past(self.deadline):
                self.pending.update({i.key: (i.size, i.mtime_ns) for i in ready[index:]})
                break
            reason = _unusable(item.path, self.probe)
            if reason is None:
                (result.rerun_keys if item.rerun else result.new_keys).append(item.key)
                result.new_files[item.key] = (item.size, item.mtime_ns)
            elif item.fresh:
                self.skip(item.key, reason)
        result.state.pending = self.pending
        result.waiting = sorted(self.pending)
        return result

    def _previous(self, rel: str) -> FolderState:
        return self.old.folders.get(rel, FolderState(NEVER, self.now))

    def _since(self, kept: FolderState) -> int | None:
        """Entries changed before this were decided by an earlier listing (``None``: first
        listing of the folder, everything is new)."""
        return None if kept.mtime_ns == NEVER else kept.listed_ns - self.margin_ns

    def _fresh(self, st: os.stat_result, kept: FolderState) -> bool:
        return kept.mtime_ns == NEVER or st.st_ctime_ns >= kept.listed_ns

    def _visit(self, rel: str) -> list[str]:
        """Stat one folder and list it if needed; returns the subfolders to visit next."""
        try:
            mtime_ns = (self.root / rel).stat().st_mtime_ns
        except OSError:
            return []  # the folder went away; forget it (and, unvisited, its children)
        self.result.folders_checked += 1
        kept = self._previous(rel)
        # A folder changed within the margin of its last listing may have changed again
        # unseen (timestamp granularity, clock skew): list it again.
        unchanged = (kept.mtime_ns != NEVER and kept.mtime_ns == mtime_ns
                     and kept.mtime_ns < kept.listed_ns - self.margin_ns)
        full = len(self.ready) >= self.cap or len(self.pending) >= self.cap
        # Only listings count against the time: the stats are what keeps the state whole, and
        # each listing done advances its folder, so the next tick starts where this one ended.
        if unchanged or full or self.listing_over():
            # Unchanged: same entries as last time, so the same subfolders. Over budget: the
            # old state makes the next tick list it.
            self.result.state.folders[rel] = kept
            return self.children.get(rel, [])
        return self._list(rel, kept, mtime_ns)

    def _list(self, rel: str, kept: FolderState, mtime_ns: int) -> list[str]:
        """List one changed folder and take its new files; returns its subfolders."""
        self.result.folders_listed += 1
        try:
            entries = sorted(os.scandir(self.root / rel), key=lambda e: e.name)
        except OSError as error:
            self.skip(rel, f"cannot list folder: {error.strerror}")
            self.result.state.folders[rel] = kept
            return []
        subfolders, candidates = self._read(rel, entries, kept)
        found, waiting = self._triage(candidates)
        taken = self._take(found, waiting)
        self.result.state.folders[rel] = FolderState(mtime_ns, self.now) if taken else kept
        return subfolders

    def _read(self, rel: str, entries: list[os.DirEntry], kept: FolderState,
              ) -> tuple[list[str], list[_Candidate]]:
        """Split a listing into the subfolders to enter and the candidate files."""
        subfolders: list[str] = []
        candidates: list[_Candidate] = []
        for entry in entries:
            if entry.name.startswith("."):  # hidden, temporaries, .itk_infer records
                continue
            key = _join(rel, entry.name)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if self._enter(key, entry, kept):
                        subfolders.append(key)
                        self.result.state.folders.setdefault(key, self._previous(key))
                    continue
                if not entry.is_file():
                    continue
                st = entry.stat()
            except OSError:
                continue  # vanished while listing
            item = self._candidate(key, entry, st, kept)
            if item is not None:
                candidates.append(item)
        return subfolders, candidates

    def _enter(self, key: str, entry: os.DirEntry, kept: FolderState) -> bool:
        """Whether to walk into a subfolder; one whose name cannot be part of a key is
        skipped (reported when new)."""
        if entry.name == RECORDS_DIRNAME or Path(entry.path).resolve() in self.excluded:
            return False
        problem = _folder_problem(entry.name)
        if problem is None:
            return True
        if self._fresh(entry.stat(follow_symlinks=False), kept):
            self.skip(key, problem, invalid_name=True)
        return False

    def _candidate(self, key: str, entry: os.DirEntry, st: os.stat_result, kept: FolderState,
                   ) -> _Candidate | None:
        """The file as a candidate, or ``None`` when an earlier tick decided it already or it
        cannot be a key (unsupported suffix, invalid name: reported once)."""
        since = self._since(kept)
        if since is not None and st.st_ctime_ns < since:
            return None  # there at the previous listing: already decided
        if key in self.old.pending:
            return None  # handled by recheck_pending
        fresh = self._fresh(st, kept)
        if case_name(entry.name) is None:
            if fresh:
                self.skip(key, "unsupported file type (not .mha/.nii/.nii.gz)")
            return None
        # Before any instance query: a name that is not valid UTF-8 cannot even be asked for.
        problem = _key_problem(key)
        if problem is not None:
            if fresh:
                self.skip(key, problem, invalid_name=True)
            return None
        return _Candidate(key, Path(entry.path), st.st_size, st.st_mtime_ns, fresh)

    def _triage(self, candidates: list[_Candidate],
                ) -> tuple[list[_Candidate], dict[str, tuple[int, int]]]:
        """The settled candidates that are new or to run again, and those still being written
        (changed since the previous tick, or modified within ``settle``)."""
        settled: list[_Candidate] = []
        waiting: dict[str, tuple[int, int]] = {}
        for item in candidates:
            before = self.old.pending.get(item.key)
            if before == (item.size, item.mtime_ns) or (
                    before is None and item.mtime_ns <= self.now - self.settle_ns):
                settled.append(item)
            else:
                waiting[item.key] = (item.size, item.mtime_ns)
        if not settled:
            return [], waiting
        known = self.is_known([item.key for item in settled])
        new = [item for item in settled if item.key not in known]
        return new + self._reruns([item for item in settled if item.key in known]), waiting

    def _reruns(self, known: list[_Candidate]) -> list[_Candidate]:
        """The known candidates whose file differs from their latest materialisation's data
        version. A version we did not make (older materialisations), or none yet (a run still
        queued, or failed), is no evidence: those are left alone."""
        if not known or self.versions is None:
            return []
        recorded = self.versions([item.key for item in known])
        reruns = []
        for item in known:
            before = recorded.get(item.key)
            if is_input_version(before) and before != input_version_ns(item.size, item.mtime_ns):
                reruns.append(item._replace(rerun=True))
        return reruns

    def _take(self, found: list[_Candidate], waiting: dict[str, tuple[int, int]]) -> bool:
        """Take one folder's files as far as the cap allows; ``False`` when some did not fit."""
        room = self.cap - len(self.ready)
        pending_room = self.cap - len(self.pending)
        self.ready.extend(found[:max(room, 0)])
        self.pending.update(list(waiting.items())[:max(pending_room, 0)])
        if len(found) > room or len(waiting) > pending_room:
            # Too many at once: the caller keeps the folder's old state, so the next tick lists
            # it again (what was taken is known by then and not taken twice) and the cursor
            # stays bounded too.
            self.result.capped = True
            return False
        return True


def scan_watch_root(
    root: Path,
    state: ScanState,
    is_known: KeysQuery,
    *,
    versions: VersionsQuery | None = None,
    exclude: Iterable[Path] = (),
    now_ns: int | None = None,
    settle_seconds: float = 5.0,
    margin_seconds: float = 30.0,
    max_new_per_tick: int = 1000,
    time_budget_seconds: float | None = None,
    probe: Callable[[Path], str | None] = probe_image,
    clock: Callable[[], float] = time.monotonic,
) -> ScanResult:
    """Find the image files below ``root`` that are new (or changed) since ``state``.

    Args:
        root: the watched folder.
        state: the previous tick's state (``ScanState()`` on the first tick).
        is_known: returns the subset of the given keys that already are partitions.
        versions: the data version of each given key's latest materialisation (keys without
            one left out); a known file whose own version differs runs again. ``None``: never.
        exclude: folders never to enter (the output root when it lies inside ``root``).
        now_ns: the tick's wall-clock time (tests pin it).
        settle_seconds: a file modified more recently than this waits for the next tick.
        margin_seconds: slack on folder mtimes and file ctimes (clock granularity/skew).
        max_new_per_tick: most keys one tick takes (new and rerun); the rest wait.
        time_budget_seconds: no folder is listed after half of it, no header probed after
            all of it; what was not done waits in the state for the next tick (every known
            folder is still stat'ed: that is what keeps the state). ``None``: no limit.
        probe: decides whether a file is a usable image (header read).
        clock: monotonic seconds, for the budget (tests pass a fake).

    Returns:
        New and rerun keys (sorted), the next state, skipped files with reasons, and files
        still waiting.
    """
    start = clock()
    budget = time_budget_seconds
    tick = _Tick(
        root=Path(root), old=state, is_known=is_known, versions=versions,
        excluded={Path(p).resolve() for p in exclude},
        now=time.time_ns() if now_ns is None else now_ns,
        settle_ns=int(settle_seconds * 1e9), margin_ns=int(margin_seconds * 1e9),
        cap=max_new_per_tick, probe=probe, clock=clock,
        walk_deadline=None if budget is None else start + budget / 2,
        deadline=None if budget is None else start + budget,
    )
    tick.recheck_pending()
    tick.walk()
    return tick.finish()


def _unusable(path: Path, probe: Callable[[Path], str | None]) -> str | None:
    sibling = _sibling_with_same_case(path.parent, path.name)
    if sibling is not None:
        return f"same case name as {shown(sibling)} in its folder: the outputs would collide; " \
               "rename one"
    return probe(path)


def known_keys_in_instance(context: SensorEvaluationContext) -> KeysQuery:
    """``is_known`` for :func:`scan_watch_root` backed by the instance's partitions: the first
    100 keys of a tick are asked one by one, beyond that the whole partition list is read once
    (a registering tick asks about ~1000 keys, folder by folder)."""

    everything: set[str] | None = None  # the whole list, read at most once per tick
    asked = 0

    def is_known(keys: Sequence[str]) -> set[str]:
        nonlocal everything, asked
        instance = context.instance
        asked += len(keys)
        if everything is None and asked <= 100:
            return {k for k in keys if instance.has_dynamic_partition(IMAGES_PARTITIONS_NAME, k)}
        if everything is None:
            everything = set(instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME))
        return everything & set(keys)

    return is_known


def _chunks(keys: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(keys), QUERY_CHUNK):
        yield list(keys[start:start + QUERY_CHUNK])


def recorded_versions_in_instance(context: SensorEvaluationContext, asset: AssetKey,
                                  ) -> VersionsQuery:
    """``versions`` for :func:`scan_watch_root`: the data version tag of each key's latest
    materialisation of ``asset`` (one indexed query per chunk of keys)."""

    def versions(keys: Sequence[str]) -> dict[str, str]:
        storage = context.instance.event_log_storage
        found: dict[str, str] = {}
        for chunk in _chunks(keys):
            latest = storage.get_latest_tags_by_partition(
                asset, DagsterEventType.ASSET_MATERIALIZATION, [DATA_VERSION_TAG],
                asset_partitions=chunk)
            found.update({k: tags[DATA_VERSION_TAG] for k, tags in latest.items()
                          if DATA_VERSION_TAG in tags})
        return found

    return versions


def plan_batches(new_keys: Sequence[str], rerun_keys: Sequence[str], batch: int,
                 partition_order: Callable[[], Sequence[str]]) -> list[list[str]]:
    """The tick's runs, each a list of keys that is a contiguous range of the partition order.

    New keys are added by the tick's one add request in this order, after every existing key,
    so consecutive slices of them are ranges. Keys to rerun were added by earlier ticks: they
    are placed by their position in the partition order (read only when there are some), and
    only neighbours share a run.
    """
    batches = [list(new_keys[i:i + batch]) for i in range(0, len(new_keys), batch)]
    if not rerun_keys:
        return batches
    position = {key: index for index, key in enumerate(partition_order())}
    run: list[str] = []
    for key in sorted(rerun_keys, key=lambda k: (position.get(k, -1), k)):
        adjacent = bool(run) and key in position and run[-1] in position \
            and position[key] == position[run[-1]] + 1
        if run and (not adjacent or len(run) >= batch):
            batches.append(run)
            run = []
        run.append(key)
    if run:
        batches.append(run)
    return batches


def whole_batches(max_new_per_tick: int, batch: int) -> int:
    """The per-tick cap rounded down to whole batches (at least one), so a flood spread over
    ticks still fills every run but the last.

    Examples:
        >>> whole_batches(1000, 32), whole_batches(10, 32)
        (992, 32)
    """
    return max(batch, max_new_per_tick // batch * batch)


def build_folder_sensor(
    job: UnresolvedAssetJobDefinition,
    *,
    name: str = "image_folder_sensor",
    minimum_interval_seconds: int = 30,
    settle_seconds: float = 5.0,
    margin_seconds: float = 30.0,
    max_new_per_tick: int = 1000,
    time_budget_seconds: float | None = 20.0,
    run_tags: dict[str, str] | None = None,
    default_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING,
) -> SensorDefinition:
    """The folder sensor: adds the new keys as partitions and requests runs of up to
    ``run_batch`` keys (the resource's setting) each, as partition ranges."""
    from itk_infer_assets.assets import LOGITS, SEGMENTATION

    @sensor(
        name=name,
        job=job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description="Adds every new image below the watched root (ITK_INFER_WATCH_ROOT) as an "
                    "'images' partition and requests segmentation runs of up to "
                    "ITK_INFER_RUN_BATCH images each; replaced images run again.",
    )
    def image_folder_sensor(
        context: SensorEvaluationContext, itk_infer: ItkInferResource
    ) -> SensorResult | SkipReason:
        if not itk_infer.watch_root or not Path(itk_infer.watch_root).is_dir():
            return SkipReason(f"watch root {itk_infer.watch_root!r} is not a folder "
                              "(set ITK_INFER_WATCH_ROOT)")
        batch = max(1, int(itk_infer.run_batch))
        scan = scan_watch_root(
            Path(itk_infer.watch_root), ScanState.from_json(context.cursor),
            known_keys_in_instance(context),
            versions=recorded_versions_in_instance(context, SEGMENTATION),
            exclude=[Path(itk_infer.output_root)] if itk_infer.output_root else [],
            settle_seconds=settle_seconds, margin_seconds=margin_seconds,
            max_new_per_tick=whole_batches(max_new_per_tick, batch),
            time_budget_seconds=time_budget_seconds,
        )
        _log_scan(context.log, scan)
        batches = plan_batches(
            scan.new_keys, scan.rerun_keys, batch,
            lambda: context.instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME))
        selection = [SEGMENTATION, LOGITS] if itk_infer.sensor_logits else [SEGMENTATION]
        return _sensor_result(scan, batches, selection, run_tags or {})

    return image_folder_sensor


def _log_scan(logger: logging.Logger, scan: ScanResult) -> None:
    """Log a tick's summary, skipped files (at most ``MAX_SKIPS_LOGGED``) and waiting files."""
    logger.info(scan.summary())
    for path, reason in scan.skipped[:MAX_SKIPS_LOGGED]:
        logger.warning(f"skipping {path}: {reason}")
    if len(scan.skipped) > MAX_SKIPS_LOGGED:
        logger.warning(f"... and {len(scan.skipped) - MAX_SKIPS_LOGGED} more skipped")
    if scan.waiting:
        logger.info(f"{len(scan.waiting)} file(s) waiting for the next tick: "
                    + ", ".join(scan.waiting[:10]))


def run_request(keys: Sequence[str], files: dict[str, tuple[int, int]],
                selection: Sequence[AssetKey], tags: dict[str, str]) -> RunRequest:
    """One run over ``keys`` (a contiguous range of the partition order).

    The run key names each file's size and mtime: deterministic, so a re-evaluated tick asks
    for the same runs and Dagster skips those it made, and new for a replaced file, so that
    one runs again. A single key is a plain partition run (its run key as before batching).
    """
    identities = [f"{key}|{files[key][0]}|{files[key][1]}" for key in keys]
    if len(keys) == 1:
        return RunRequest(run_key=identities[0], partition_key=keys[0],
                          asset_selection=list(selection), tags=tags)
    digest = hashlib.sha256("\n".join(identities).encode()).hexdigest()[:16]
    return RunRequest(
        run_key=f"{keys[0]}..{keys[-1]}|{len(keys)}|{digest}",
        asset_selection=list(selection),
        tags={**tags, RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1],
              BATCH_SIZE_TAG: str(len(keys))},
    )


def _sensor_result(scan: ScanResult, batches: list[list[str]], selection: Sequence[AssetKey],
                   tags: dict[str, str]) -> SensorResult:
    """The tick's answer: the new keys as partitions (one request, in order: the batches'
    ranges rely on it), a run per batch, and the next cursor."""
    cursor = scan.state.to_json()
    if not batches:
        return SensorResult(skip_reason=f"nothing to run: {scan.summary()}", cursor=cursor)
    adds = [images_partitions.build_add_request(scan.new_keys)] if scan.new_keys else []
    return SensorResult(
        dynamic_partitions_requests=adds,
        run_requests=[run_request(keys, scan.new_files, selection, tags) for keys in batches],
        cursor=cursor,
    )
