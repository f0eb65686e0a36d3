"""Checks of the CI container stage (.ci/docker.sh) that are easier in Python than in bash.

Subcommands:
  host-constraints PYPROJECT [REQ...]   the host's versions of everything the project needs
  compare REF OUT NAME...   label maps OUT/NAME equal REF/NAME (bytes, else voxels + geometry)
  add-partitions KEY...     add keys to the ``images`` dynamic partitions of $DAGSTER_HOME
  wait-run RUN_ID           wait for a run; succeed only if it succeeded inside a container
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def host_constraints(pyproject: Path, extra: list[str]) -> list[str]:
    """``name==version`` of every installed distribution that the project's dependencies (and
    ``extra`` requirements) pull in, following extras and environment markers.

    Only this closure, not the host's whole environment: an unrelated package installed on
    the host must not invalidate the image's cached dependency layer.
    """
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads(pyproject.read_text())["project"]
    skip = {canonicalize_name(project["name"]), "pip", "setuptools", "wheel"}
    todo = [Requirement(r) for r in [*project["dependencies"], *extra]]
    seen: set[tuple[str, frozenset[str]]] = set()
    pins: dict[str, str] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in skip or (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # not on the host: the image takes what the index offers
        pins[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e})
                                         for e in ["", *req.extras]):
                todo.append(sub)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def compare_label_maps(ref_dir: Path, out_dir: Path, names: list[str]) -> list[str]:
    """One line per case; raises AssertionError naming every case that differs.

    Identical bytes are the expectation (same writer, same versions). Files whose bytes differ
    (a gzip stream or a header written by another library version) still pass when their
    voxels, pixel type and geometry are identical, and the line says so.
    """
    import numpy as np
    import SimpleITK as sitk

    lines, problems = [], []
    for name in names:
        ref, out = ref_dir / name, out_dir / name
        if not out.is_file():
            problems.append(f"{name}: missing in {out_dir}")
            continue
        if ref.read_bytes() == out.read_bytes():
            lines.append(f"{name}: identical bytes ({out.stat().st_size} B)")
            continue
        a, b = sitk.ReadImage(str(ref)), sitk.ReadImage(str(out))
        same_voxels = (a.GetPixelID() == b.GetPixelID()
                       and np.array_equal(sitk.GetArrayViewFromImage(a),
                                          sitk.GetArrayViewFromImage(b)))
        same_geometry = (a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
                         and a.GetOrigin() == b.GetOrigin()
                         and a.GetDirection() == b.GetDirection())
        if same_voxels and same_geometry:
            lines.append(f"{name}: bytes differ (file encoding) but voxels, pixel type and "
                         "geometry are identical")
        else:
            what = [w for w, ok in (("voxels", same_voxels), ("geometry", same_geometry)) if not ok]
            problems.append(f"{name}: {' and '.join(what)} differ")
    if problems:
        raise AssertionError("; ".join(problems))
    return lines


def add_partitions(keys: list[str]) -> None:
    from dagster import DagsterInstance

    from itk_infer_assets.partitions import IMAGES_PARTITIONS_NAME

    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(IMAGES_PARTITIONS_NAME, keys)
        known = instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME)
    missing = sorted(set(keys) - set(known))
    if missing:
        raise AssertionError(f"partitions not added: {missing}")
    print(f"partitions '{IMAGES_PARTITIONS_NAME}': {', '.join(known)}")


def wait_run(run_id: str, timeout: float, materializations: int | None) -> None:
    """Poll the run until it ends; raise unless it succeeded in a Docker container."""
    from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

    with DagsterInstance.get() as instance:
        deadline = time.monotonic() + timeout
        status = None
        exited_at = None
        while True:
            run = instance.get_run_by_id(run_id)
            if run is None:
                raise AssertionError(f"run {run_id} is not in the instance")
            if run.status != status:
                status = run.status
                print(f"run {run_id}: {status.value}", flush=True)
            if run.is_finished:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} still {status.value} after {timeout:.0f} s")
            # A run worker that dies without reporting leaves the run STARTING/STARTED forever
            # (no daemon watches runs in CI): give up soon after its container has exited.
            exited = _exited_container(run.tags.get("docker/container_id"))
            if exited is not None:
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 15:
                    raise AssertionError(f"run {run_id} still {status.value}, but its container "
                                         f"exited:\n{exited}")
            time.sleep(2)

        container = run.tags.get("docker/container_id")
        if run.status != DagsterRunStatus.SUCCESS:
            for record in instance.all_logs(run_id):
                event = record.dagster_event
                if record.level >= 40 or (event is not None and event.is_failure):
                    print(f"  {record.step_key or '-'}: {record.user_message[:2000]}",
                          file=sys.stderr)
            raise AssertionError(f"run {run_id} ended {run.status.value} "
                                 f"(container {container})")
        if not container:
            raise AssertionError(f"run {run_id} has no docker/container_id tag: it did not "
                                 "run through DockerRunLauncher")
        done = instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
        keys = sorted({(e.dagster_event.asset_key.to_user_string(),
                        e.dagster_event.partition or "") for e in done if e.dagster_event})
        print(f"run {run_id} succeeded in container {container[:12]} "
              f"(image {run.tags.get('dagster/image', '?')}); {len(keys)} materializations")
        for asset, partition in keys:
            print(f"  {asset} [{partition}]")
        if materializations is not None and len(keys) != materializations:
            raise AssertionError(f"expected {materializations} materializations, got {len(keys)}")


def _exited_container(container_id: str | None) -> str | None:
    """The last lines of the container's log if it has exited, else None."""
    if not container_id:
        return None
    import docker

    try:
        container = docker.from_env().containers.get(container_id)
    except docker.errors.NotFound:
        return "(container removed)"
    if container.status not in ("exited", "dead"):
        return None
    return container.logs(tail=20).decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    # The checkout's packages, whichever way the host installed them.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("host-constraints")
    p.add_argument("pyproject", type=Path)
    p.add_argument("extra", nargs="*")
    p = sub.add_parser("compare")
    p.add_argument("ref", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("names", nargs="+")
    p = sub.add_parser("add-partitions")
    p.add_argument("keys", nargs="+")
    p = sub.add_parser("wait-run")
    p.add_argument("run_id")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--materializations", type=int, default=None,
                   help="how many (asset, partition) materializations the run must record")
    args = parser.parse_args(argv)
    try:
        if args.command == "host-constraints":
            print("\n".join(host_constraints(args.pyproject, args.extra)))
        elif args.command == "compare":
            for line in compare_label_maps(args.ref, args.out, args.names):
                print(f"  {line}")
        elif args.command == "add-partitions":
            add_partitions(args.keys)
        else:
            wait_run(args.run_id, args.timeout, args.materializations)
    except AssertionError as error:
        print(f"ci_helper {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
