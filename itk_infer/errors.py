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
