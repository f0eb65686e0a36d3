"""The exceptions of itk_infer and the exit codes they map to."""

from __future__ import annotations


class ItkInferError(Exception):
    """Base class; ``exit_code`` is what the command line returns for it."""

    exit_code = 1


class UsageError(ItkInferError):
    """Bad arguments or settings, found before any case runs (exit 2)."""

    exit_code = 2


class ModelError(UsageError):
    """The model cannot be loaded or does not fit the tool's contract (exit 2)."""


class CaseError(ItkInferError):
    """One case failed (unreadable image, wrong dimension, model failure); the batch goes on."""


class DiskFullError(ItkInferError):
    """The output's file system is full: the run stops instead of failing every case left."""


def is_disk_full(error: BaseException) -> bool:
    """``error`` says the disk (or quota) is full, as an OSError or in a native library's
    message (SimpleITK raises RuntimeError with the system's text)."""
    import errno

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)
