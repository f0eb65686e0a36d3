"""Safe loading of MMEngine checkpoints: weights-only unpickling with a short allow-list.

A ``.pth`` file is a pickle, and unpickling can run any code the file names. Checkpoints are
therefore read with ``torch.load(weights_only=True)``, which builds only tensors, plain
containers and the types allow-listed here, and refuses everything else *before* calling it.

The allow-list is what checkpoints saved by MMEngine's ``Runner``/``CheckpointHook`` carry
besides tensors (found by saving real ones and reading what the weights-only unpickler
rejects):

* numpy scalars, arrays and dtypes: ``eta`` and ``best_score`` in ``message_hub``, the logged
  histories, metric values in ``meta``. Only boolean and numeric dtypes are accepted, so
  object arrays (which could smuggle pickled objects) are refused.
* ``mmengine.logging.HistoryBuffer`` (the logged scalars in ``message_hub``). It is rebuilt as
  the inert :class:`LoggedHistory`, so loading runs no MMEngine code: the real class's
  ``__setstate__`` writes into a class-level table. Its pickled state names the statistics
  methods ``min``/``max``/``current``/``mean`` through ``getattr(HistoryBuffer, name)``;
  ``getattr`` is replaced by :func:`_history_statistic`, which answers only those four
  names on the stand-in and refuses every other lookup.

``trust_checkpoint=True`` falls back to a full unpickle for files that need more; that runs
whatever code the file names, so it is only for files from a trusted source.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itk_infer.errors import ModelError

log = logging.getLogger(__name__)

try:  # numpy >= 2 (numpy 1.x pickles still name ``numpy.core``; both names are mapped below)
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

_HISTORY_BUFFER = "mmengine.logging.history_buffer.HistoryBuffer"
_HISTORY_STATISTICS = frozenset({"min", "max", "current", "mean"})


class LoggedHistory:
    """Inert stand-in for MMEngine's ``HistoryBuffer``: keeps the pickled state as attributes.

    ``message_hub`` is training bookkeeping; inference never reads it.
    """

    def __repr__(self) -> str:
        return f"LoggedHistory({sorted(vars(self))})"


def _history_statistic(obj: object, name: str) -> str:
    """The only ``getattr`` a checkpoint may call: ``HistoryBuffer.<statistic>``."""
    if obj is LoggedHistory and name in _HISTORY_STATISTICS:
        return f"HistoryBuffer.{name}"
    raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) is not allowed")


def _numeric_dtype_classes() -> list[type]:
    codes = "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]
    return sorted({type(np.dtype(code)) for code in codes}, key=lambda t: t.__name__)


def safe_globals() -> list[Any]:
    """The allow-list handed to ``torch.serialization.safe_globals``."""
    entries: list[Any] = [np.ndarray, np.dtype, *_numeric_dtype_classes()]
    for package in ("numpy.core", "numpy._core"):
        entries.append((_multiarray.scalar, f"{package}.multiarray.scalar"))
        entries.append((_multiarray._reconstruct, f"{package}.multiarray._reconstruct"))
    entries.append((LoggedHistory, _HISTORY_BUFFER))
    entries.append((_history_statistic, "builtins.getattr"))
    return entries


def _refusal_reason(path: Path, error: Exception) -> str:
    """Name the globals the file needs (static scan, nothing runs), else torch's own reason."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) files cannot be scanned; fall back to the message
        unsafe = []
    if unsafe:
        return "it needs " + ", ".join(unsafe)
    match = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n|$)", str(error), re.S)
    detail = (match.group(1) if match else str(error).splitlines()[0]).strip()
    named = re.search(r"Unsupported global: GLOBAL (\S+)", detail)
    if named:  # torch drops the "builtins." of built-in names here
        return f"it needs {named.group(1)}"
    return (f"the weights-only unpickler cannot read it ({detail}): it is damaged, not a "
            "PyTorch checkpoint, or needs full unpickling")


def load_checkpoint(path: Path, trust_checkpoint: bool = False) -> Any:
    """Unpickle the checkpoint at ``path`` onto the CPU.

    Raises:
        ModelError: the file is unreadable, or it needs objects outside the allow-list and
            ``trust_checkpoint`` is false (nothing from the file has run then).
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _refusal_reason(path, error)
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for damaged files
        raise ModelError(f"cannot read checkpoint {path}: {error}") from None
    if not trust_checkpoint:
        raise ModelError(
            f"refusing to load checkpoint {path}: {reason}. Without --trust-checkpoint only "
            "tensors, plain containers, numpy values and MMEngine training logs are loaded, "
            "because unpickling anything else can run arbitrary code; nothing from the file "
            "has been run. If the file comes from a source you trust, rerun with "
            "--trust-checkpoint."
        )
    log.warning("%s: %s; unpickling it fully because of --trust-checkpoint", path.name, reason)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ModelError(f"cannot read checkpoint {path}: {error}") from None


def extract_state_dict(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    """The model weights: ``checkpoint["state_dict"]`` or a bare state dict; ``module.``
    prefixes (from DataParallel/DistributedDataParallel) are removed."""
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        weights = checkpoint["state_dict"]
    else:
        weights = checkpoint
    if not isinstance(weights, Mapping) or not weights:
        raise ModelError(f"{source}: no state_dict in the checkpoint and not a bare state dict")
    not_tensors = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelError(
            f"{source}: the state dict holds non-tensor entries {not_tensors[:5]}; expected "
            "a mapping of parameter names to tensors (or a checkpoint with 'state_dict')"
        )
    return {
        (key[len("module.") :] if key.startswith("module.") else key): value
        for key, value in weights.items()
    }
