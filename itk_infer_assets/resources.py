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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from itk_infer.backends import Backend, load_backend, resolve_device
from itk_infer.cases import Case, OutputLayout
from itk_infer.config import (
    InferenceSettings,
    ModelSpec,
    OutputOptions,
    Overrides,
    RunSettings,
)
from itk_infer.errors import UsageError
from itk_infer.pipeline import resolve_inference_settings
from itk_infer_assets.partitions import case_for_key, layout_for_key

log = logging.getLogger(__name__)

# Field → environment variable. Strings stay EnvVar (resolved when the resource is built in
# the run, shown as env-backed in the UI); other types are parsed when definitions load.
ENV_VARS: dict[str, str] = {
    "watch_root": "ITK_INFER_WATCH_ROOT",
    "output_root": "ITK_INFER_OUTPUT_ROOT",
    "backend": "ITK_INFER_BACKEND",
    "onnx_path": "ITK_INFER_ONNX",
    "cfg_path": "ITK_INFER_CFG",
    "ckpt_path": "ITK_INFER_CKPT",
    "trust_checkpoint": "ITK_INFER_TRUST_CHECKPOINT",
    "window_level": "ITK_INFER_WL",
    "window_width": "ITK_INFER_WW",
    "patch_size": "ITK_INFER_PATCH_SIZE",
    "patch_stride": "ITK_INFER_PATCH_STRIDE",
    "blend": "ITK_INFER_BLEND",
    "fp16": "ITK_INFER_FP16",
    "device": "ITK_INFER_DEVICE",
    "gpus": "ITK_INFER_GPUS",
    "lease_dir": "ITK_INFER_LEASE_DIR",
    "sensor_logits": "ITK_INFER_SENSOR_LOGITS",
    "preview": "ITK_INFER_PREVIEW",
}
_STRING_FIELDS = ("watch_root", "output_root", "backend", "onnx_path", "cfg_path", "ckpt_path",
                  "blend", "device", "lease_dir")
_BOOL_FIELDS = ("trust_checkpoint", "fp16", "sensor_logits", "preview")
_FLOAT_FIELDS = ("window_level", "window_width")
_TRIPLE_FIELDS = ("patch_size", "patch_stride")


@dataclass
class LoadedModel:
    """A model on its device and the settings resolved against its defaults."""

    backend: Backend
    inference: InferenceSettings


class ItkInferResource(ConfigurableResource):
    """Model and settings of the inference assets (the CLI's options, as configuration)."""

    watch_root: str = Field(default="", description="folder the sensor watches; partition keys "
                            "are image paths relative to it (ITK_INFER_WATCH_ROOT)")
    output_root: str = Field(default="", description="outputs mirror the relative folders of "
                             "the keys below this folder (ITK_INFER_OUTPUT_ROOT)")
    backend: str = Field(default="onnx", description="onnx or mmengine")
    onnx_path: str | None = Field(default=None, description="ONNX model file")
    cfg_path: str | None = Field(default=None, description="MMEngine config file")
    ckpt_path: str | None = Field(default=None, description="MMEngine checkpoint file")
    trust_checkpoint: bool = False
    window_level: float | None = Field(default=None, description="None: the model's")
    window_width: float | None = Field(default=None, description="None: the model's")
    patch_size: list[int] | None = Field(default=None, description="Z Y X; None: the model's")
    patch_stride: list[int] | None = Field(default=None, description="Z Y X; None: the model's")
    blend: str = "gaussian"
    fp16: bool = False
    device: str = Field(default="auto", description="auto, cpu or cuda")
    gpus: int = Field(default=0, description="GPUs to lease from; 0: every visible one")
    lease_dir: str = Field(default="", description="folder of the GPU lease files "
                           "(default: <tmp>/itk_infer-gpu-leases; must be shared by all steps "
                           "on one host)")
    sensor_logits: bool = Field(default=False, description="runs requested by the folder "
                                "sensor also build the logits asset")
    preview: bool = Field(default=True, description="draw the PNG preview of each case (reads "
                          "the input and the label map once more)")

    # --- what the settings mean, in the core's terms -------------------------------------

    def watch_path(self) -> Path:
        if not self.watch_root:
            raise UsageError("no watch root configured (set ITK_INFER_WATCH_ROOT)")
        return Path(self.watch_root)

    def output_path(self) -> Path:
        if not self.output_root:
            raise UsageError("no output root configured (set ITK_INFER_OUTPUT_ROOT)")
        return Path(self.output_root)

    def model_spec(self) -> ModelSpec:
        return ModelSpec(
            backend=self.backend,
            onnx_path=Path(self.onnx_path) if self.onnx_path else None,
            cfg_path=Path(self.cfg_path) if self.cfg_path else None,
            ckpt_path=Path(self.ckpt_path) if self.ckpt_path else None,
            trust_checkpoint=self.trust_checkpoint,
        )

    def overrides(self) -> Overrides:
        return Overrides(
            window_level=self.window_level,
            window_width=self.window_width,
            patch_size=tuple(self.patch_size) if self.patch_size else None,  # type: ignore[arg-type]
            patch_stride=tuple(self.patch_stride) if self.patch_stride else None,  # type: ignore[arg-type]
            blend=self.blend,
        )

    def case_for(self, key: str) -> Case:
        return case_for_key(self.watch_path(), key)

    def layout_for(self, key: str) -> OutputLayout:
        return layout_for_key(self.output_path(), key)

    def run_settings(self, layout: OutputLayout, save_logits: bool) -> RunSettings:
        """The settings :func:`itk_infer.runner.run_cases` reads for one output folder.

        Confidence is always computed: the confidences table only lists cases that have one.
        ``overwrite`` is on because a materialisation always redoes its cases.
        """
        return RunSettings(
            input_folder=self.watch_path(),
            output_folder=layout.folder,
            model=self.model_spec(),
            overrides=self.overrides(),
            outputs=OutputOptions(save_logits=save_logits, save_conf=True),
            device=self.device,
            fp16=self.fp16,
            overwrite=True,
            progress=False,
        )

    # --- devices and the model -------------------------------------------------------------

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

    def load_model(self, device: Any) -> LoadedModel:
        """Load the model once (the run's cases then share it) and resolve its settings."""
        backend = load_backend(self.model_spec(), device, fp16=self.fp16)
        return LoadedModel(backend, resolve_inference_settings(self.overrides(), backend,
                                                               self.fp16))


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


def _parse_bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise UsageError(f"{name}={text!r}: expected 1/0, true/false, yes/no or on/off")


def _parse_triple(name: str, text: str) -> list[int]:
    parts = text.replace(",", " ").split()
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"{name}={text!r}: expected three integers 'Z Y X'") from None
    if len(values) != 3 or min(values) < 1:
        raise UsageError(f"{name}={text!r}: expected three positive integers 'Z Y X'")
    return values


def resource_from_env(environ: Mapping[str, str] | None = None) -> ItkInferResource:
    """The resource as a deployment configures it: every ``ITK_INFER_*`` variable that is set
    replaces its field's default (see :data:`ENV_VARS`).

    Raises:
        UsageError: a variable that does not parse (named in the message).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field, name in ENV_VARS.items():
        text = environ.get(name)
        if text is None or (text.strip() == "" and field not in _STRING_FIELDS):
            continue
        if field in _STRING_FIELDS:
            values[field] = EnvVar(name)
        elif field in _BOOL_FIELDS:
            values[field] = _parse_bool(name, text)
        elif field in _FLOAT_FIELDS:
            try:
                values[field] = float(text)
            except ValueError:
                raise UsageError(f"{name}={text!r}: expected a number") from None
        elif field in _TRIPLE_FIELDS:
            values[field] = _parse_triple(name, text)
        elif field == "gpus":
            try:
                values[field] = int(text)
            except ValueError:
                raise UsageError(f"{name}={text!r}: expected an integer") from None
    return ItkInferResource(**values)
