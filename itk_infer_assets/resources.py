"""The ``itk_infer`` resource (model, settings, folders) and the per-GPU lease.

The resource is filled from ``ITK_INFER_*`` environment variables in a deployment
(:func:`resource_from_env`) and from Python in tests. It only describes; the model is loaded
by the asset, once per run, with :meth:`ItkInferResource.load_model`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, EnvVar
from pydantic import Field, create_model

from itk_infer.backends import resolve_device
from itk_infer.cases import Case, OutputLayout
from itk_infer.config import Settings, env_values, settings_fields, settings_from_env
from itk_infer.errors import UsageError
from itk_infer.pipeline import Model, load_model
from itk_infer_assets.partitions import case_for_key, layout_for_key

log = logging.getLogger(__name__)

# How each kind of setting is typed in Dagster's config schema (no Paths or tuples there).
_CONFIG_TYPES: dict[str, Any] = {
    "path": str | None, "text": str, "choice": str, "bool": bool, "float": float | None,
    "int": int, "triple": list[int] | None, "spacing": list[float] | None,
}


class _ResourceMethods(ConfigurableResource):
    """What the resource's settings mean, in the core's terms; its fields are added from the
    schema by :func:`_resource_fields`."""

    def settings(self, **changes: Any) -> Settings:
        """The core's settings: every field of this resource, plus ``changes``."""
        values = {name: getattr(self, name) for name, _spec, _d in settings_fields("env")}
        return Settings(**{**values, **changes})

    def watch_path(self) -> Path:
        if not self.watch_root:
            raise UsageError("no watch root configured (set ITK_INFER_WATCH_ROOT)")
        return Path(self.watch_root)

    def output_path(self) -> Path:
        if not self.output_root:
            raise UsageError("no output root configured (set ITK_INFER_OUTPUT_ROOT)")
        return Path(self.output_root)

    def case_for(self, key: str) -> Case:
        return case_for_key(self.watch_path(), key)

    def layout_for(self, key: str) -> OutputLayout:
        return layout_for_key(self.output_path(), key)

    def uses_gpu(self) -> bool:
        if self.device == "cpu":
            return False
        import torch

        return self.device == "cuda" or torch.cuda.is_available()

    @contextlib.contextmanager
    def leased_device(self, logger: logging.Logger | None = None) -> Iterator[Any]:
        """The torch device to run on; a CUDA device is leased for the duration of the block."""
        logger = logger or log
        if not self.uses_gpu():
            yield resolve_device(self.device)
            return
        ids = visible_gpu_ids(self.gpus)
        if not ids:
            raise UsageError("device cuda requested but no CUDA device is visible")
        folder = Path(self.lease_dir) if self.lease_dir else default_lease_dir()
        with gpu_lease(folder, ids, logger=logger) as index:
            yield resolve_device("cuda", index)

    def load_model(self, device: Any) -> Model:
        """Load the model once (the run's cases then share it) and resolve its settings."""
        return load_model(self.settings(), device)


def _resource_fields() -> dict[str, Any]:
    """One config field per setting that a deployment can set, typed, with its default and
    help (and its variable, so the UI says where it comes from)."""
    out: dict[str, Any] = {}
    for name, spec, default in settings_fields("env"):
        if spec.kind in ("path", "triple", "spacing"):
            default = None if default is None else (str(default) if spec.kind == "path"
                                                     else list(default))
        out[name] = (_CONFIG_TYPES[spec.kind],
                     Field(default=default, description=f"{spec.help} ({spec.env})"))
    return out


ItkInferResource = create_model(  # type: ignore[call-overload]
    "ItkInferResource", __base__=_ResourceMethods, __module__=__name__,
    __doc__="Model and settings of the inference assets (the CLI's options, as "
            "configuration); one field per setting of itk_infer.config.Settings that has a "
            "variable.",
    **_resource_fields(),
)


# --- GPU lease ----------------------------------------------------------------------------


def default_lease_dir() -> Path:
    return Path(tempfile.gettempdir()) / "itk_infer-gpu-leases"


def visible_gpu_ids(limit: int = 0) -> list[str]:
    """Stable names of the visible CUDA devices (UUIDs when torch knows them), so processes with
    different ``CUDA_VISIBLE_DEVICES`` still agree on which lock file is which card."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    if limit > 0:
        count = min(count, limit)
    ids = []
    for index in range(count):
        try:
            ids.append(str(torch.cuda.get_device_properties(index).uuid))
        except (AttributeError, RuntimeError):
            ids.append(f"index{index}")
    return ids


@contextlib.contextmanager
def gpu_lease(
    folder: Path,
    gpu_ids: Sequence[str],
    *,
    poll_seconds: float = 1.0,
    timeout_seconds: float | None = None,
    logger: logging.Logger | None = None,
) -> Iterator[int]:
    """Hold an exclusive ``flock`` on one GPU's lock file; yields that GPU's index.

    The lock belongs to the open file, so it is released when the block ends or the process
    dies (no stale leases). It only coordinates processes that see the same ``folder``: the
    steps of one host. The ``gpu`` concurrency pool keeps the number of steps at the number
    of GPUs; the lease decides which step gets which card.

    Raises:
        TimeoutError: no GPU became free within ``timeout_seconds``.
    """
    logger = logger or log
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    waited = False
    while True:
        for index, gpu_id in enumerate(gpu_ids):
            fd = os.open(folder / f"gpu-{_safe(gpu_id)}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                logger.info("leased GPU %d (%s)", index, gpu_id)
                yield index
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no free GPU among {len(gpu_ids)} after {timeout_seconds} s")
        if not waited:
            logger.warning("all %d GPU(s) are leased; waiting (is the gpu pool limit above the "
                           "number of GPUs?)", len(gpu_ids))
            waited = True
        time.sleep(poll_seconds)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# --- environment --------------------------------------------------------------------------


def resource_from_env(environ: Mapping[str, str] | None = None) -> Any:
    """The resource as a deployment configures it: every ``ITK_INFER_*`` variable that is set
    replaces its field's default. Text and path settings stay ``EnvVar`` (resolved when the
    resource is built in the run, shown as environment-backed in the UI).

    Raises:
        UsageError: a variable that does not parse, or a value the schema refuses (named).
    """
    environ = os.environ if environ is None else environ
    values = env_values(environ)
    settings_from_env(environ)  # the schema's checks now, naming the environment
    fields = {name: spec for name, spec, _d in settings_fields("env")}
    config: dict[str, Any] = {}
    for name, value in values.items():
        spec = fields[name]
        config[name] = EnvVar(spec.env) if spec.kind in ("text", "path") else value
    return ItkInferResource(**config)
