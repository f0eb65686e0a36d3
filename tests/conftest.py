"""Shared fixtures: tiny synthetic volumes and ONNX models built in code."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.models import default_metadata, write_pointwise_model

LPI = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def make_image(
    array: np.ndarray,
    direction: Sequence[float] = LPI,
    spacing: Sequence[float] = (0.8, 0.9, 2.5),
    origin: Sequence[float] = (10.0, -20.0, 30.0),
) -> sitk.Image:
    """A SimpleITK image from a (Z, Y, X) array with the given geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetDirection(tuple(direction))
    image.SetSpacing(tuple(spacing))
    image.SetOrigin(tuple(origin))
    return image


def write_volume(path: Path, array: np.ndarray, **geometry) -> Path:
    sitk.WriteImage(make_image(array, **geometry), str(path))
    return path


@pytest.fixture
def pointwise_model(tmp_path: Path) -> Path:
    """3 classes, window -1..1 (wl 0, ww 2), patch 8x16x16, stride 4x8x8, batch 2."""
    return write_pointwise_model(tmp_path / "pointwise.onnx", 3, metadata=default_metadata())


@pytest.fixture
def random_volume() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.uniform(-1.2, 1.2, size=(13, 21, 30)).astype(np.float32)


@pytest.fixture
def itk_logs(monkeypatch, caplog):
    """itk_infer's warnings in caplog (an earlier CLI run in this process may have stopped the
    logger's propagation)."""
    monkeypatch.setattr(logging.getLogger("itk_infer"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="itk_infer")
    return caplog
