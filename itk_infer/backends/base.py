"""The backend contract: a batch of windows in, logits out. Backends never open images."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from itk_infer.config import as_spacing
from itk_infer.errors import ModelError, UsageError

if TYPE_CHECKING:  # annotations only: an ONNX run on the CPU starts before torch loads
    import torch

log = logging.getLogger(__name__)

# Keys of ``inference_config`` that models trained with the original tool carry.
INFERENCE_CONFIG_KEYS = frozenset(
    {
        "patch_size",
        "patch_stride",
        "forward_batch_windows",
        "accumulate_device",
        "forward_device",
        "argmax_batchsize",
        "tta",
    }
)


@dataclass(frozen=True)
class ModelDefaults:
    """Settings a model carries with it (ONNX metadata, MMEngine config)."""

    window_level: float | None = None
    window_width: float | None = None
    inference_config: Mapping[str, Any] = field(default_factory=dict)
    spacing: tuple[float, float, float] | None = None  # mm, Z Y X: what the model expects
    # ``{name: value}`` as the model declares it (background included if declared), sorted by
    # value; ``None`` when the model names no labels.
    labels: dict[str, int] | None = None


def parse_labels(value: Any, source: str,
                 num_classes: int | None = None) -> dict[str, int] | None:
    """Label names a model declares: ``{name: value}`` (JSON text or a mapping) or a list of
    names meaning values ``0 .. N-1``. Malformed names (not ints, a value named twice, out of
    ``[0, num_classes)`` when known) are a warning naming ``source`` and give ``None``: the
    model still segments, its labels are then shown as ``label_<v>``."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            value = json.loads(value)
        if isinstance(value, Mapping):
            pairs = [(str(k), _label_value(v)) for k, v in value.items()]
        elif isinstance(value, list | tuple):
            pairs = [(str(name), index) for index, name in enumerate(value)]
        else:
            raise TypeError(f"got {type(value).__name__}")
        values = [v for _, v in pairs]
        if len(set(values)) != len(values):
            raise ValueError(f"a value is named twice: {values}")
        if min(values, default=0) < 0 or (num_classes and max(values, default=0) >= max(
                num_classes, 2)):
            raise ValueError(f"values {values} outside [0, {max(num_classes or 2, 2)})")
    except (TypeError, ValueError) as error:
        log.warning("%s: ignoring the label names, they are not {name: value} or a list of "
                    "names (%s); using label_<value>", source, error)
        return None
    return dict(sorted(pairs, key=lambda item: item[1])) or None


def _label_value(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"label value {value!r} is not an integer")
    return value


def display_names(labels: Mapping[str, int] | None, values: Iterable[int]) -> dict[int, str]:
    """``{value: name}`` for ``values``: the model's name for the value, else ``label_<v>``."""
    by_value = {v: name for name, v in (labels or {}).items()}
    return {int(v): by_value.get(int(v), f"label_{int(v)}") for v in values}


# Keys of the original tool that configs keep loading with, but that change nothing here:
# the argmax already runs slab by slab in bounded memory, and the model runs on --device.
IGNORED_KEYS = {
    "forward_device": "the model runs on --device",
    "argmax_batchsize": "the argmax always runs slab by slab in bounded memory",
}
_warned: set[str] = set()


def clean_inference_config(config: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    """Keep the keys of an ``inference_config`` that itk_infer uses; warn once per process
    about those it ignores (known or not)."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ModelError(f"{source}: inference_config must be a mapping, got {type(config)}")
    unknown = sorted(set(config) - INFERENCE_CONFIG_KEYS)
    if unknown:
        log.warning("%s: ignoring unknown inference_config keys %s", source, unknown)
    for key in sorted(set(config) & set(IGNORED_KEYS) - _warned):
        _warned.add(key)
        log.warning("inference_config.%s is ignored: %s", key, IGNORED_KEYS[key])
    return {k: v for k, v in config.items() if k in INFERENCE_CONFIG_KEYS
            and k not in IGNORED_KEYS}


def parse_inference_config_json(text: str, source: str) -> dict[str, Any]:
    try:
        return clean_inference_config(json.loads(text), source)
    except json.JSONDecodeError as error:
        raise ModelError(f"{source}: inference_config is not valid JSON: {error}") from None


def parse_spacing(value: Any, source: str) -> tuple[float, float, float] | None:
    """A model's declared spacing (JSON text or a list), checked; ``None`` when absent."""
    if value is None:
        return None
    try:
        values = json.loads(value) if isinstance(value, str) else value
        return as_spacing(values, f"{source}: spacing")
    except (ValueError, TypeError, UsageError) as error:
        raise ModelError(f"{source}: spacing must be three numbers > 0 (Z Y X mm): "
                         f"{error}") from None


def fingerprint_files(paths: Iterable[Path], extra: str = "") -> str:
    """SHA-256 over the bytes of the model files (and ``extra`` text), hex, first 16 digits."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    digest.update(extra.encode())
    return digest.hexdigest()[:16]


def require_file(path: Path | None, what: str) -> Path:
    if path is None:
        raise UsageError(f"{what} is required")
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what} not found: {path}")
    return path


@runtime_checkable
class Backend(Protocol):
    """A loaded model. ``forward`` maps (N, 1, Z, Y, X) float32 to (N, C, Z, Y, X) logits.

    Input and output tensors live on ``device``; the output may be float16 or float32.
    """

    name: str
    device: torch.device
    defaults: ModelDefaults
    fingerprint: str
    static_patch_size: tuple[int, int, int] | None
    static_batch_size: int | None
    num_classes: int | None
    fp16: bool

    def forward(self, batch: torch.Tensor) -> torch.Tensor: ...
