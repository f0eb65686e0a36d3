"""Small MMEngine models for the backend tests, loaded by configs through ``custom_imports``."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import METRICS, MODELS
from torch import nn


class PointwiseHead(nn.Conv3d):
    """A 1x1x1 convolution that records the input shapes it sees (the engine's batches)."""

    calls: ClassVar[list[tuple[int, ...]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        PointwiseHead.calls.append(tuple(x.shape))
        return super().forward(x)


@MODELS.register_module()
class ItkTestPointwiseSegmentor(BaseModel):
    """Original-tool layout: ``backbone`` is a 1x1x1 convolution, ``num_classes`` is set."""

    def __init__(self, num_classes: int, inference_config: dict | None = None,
                 data_preprocessor: dict | None = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        self.num_classes = num_classes
        self.inference_config = inference_config
        self.backbone = PointwiseHead(1, num_classes, 1)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None,
                mode: str = "tensor") -> Any:
        logits = self.backbone(inputs)
        if mode == "loss":
            return {"loss": nn.functional.cross_entropy(logits, labels)}
        if mode == "predict":
            return list(zip(logits.argmax(1), labels, strict=True))
        return logits


@MODELS.register_module()
class ItkTestTensorModeModel(BaseModel):
    """No backbone: run as ``model(x, mode='tensor')``; takes no ``inference_config``."""

    modes: ClassVar[list[str]] = []

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Conv3d(1, num_classes, 1)

    def forward(self, inputs: torch.Tensor, data_samples: Any = None, mode: str = "tensor"):
        type(self).modes.append(mode)
        if mode != "tensor":
            raise ValueError(f"only tensor mode in this test model, got {mode!r}")
        return self.head(inputs)


@MODELS.register_module()
class ItkTestWrongShapeSegmentor(BaseModel):
    """A backbone that halves the spatial size: its output does not fit the contract."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Conv3d(1, num_classes, 2, stride=2)

    def forward(self, inputs: torch.Tensor, data_samples: Any = None, mode: str = "tensor"):
        return self.backbone(inputs)


@METRICS.register_module()
class ItkTestAccuracy(BaseMetric):
    """Voxel accuracy of ``ItkTestPointwiseSegmentor`` predictions, as a numpy float32."""

    def process(self, data_batch: Any, data_samples: Any) -> None:
        for pred, truth in data_samples:
            self.results.append(np.float32((pred == truth).float().mean().item()))

    def compute_metrics(self, results: list) -> dict:
        return {"accuracy": np.float32(np.mean(results))}
