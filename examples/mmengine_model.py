"""The demo U-Net as an MMEngine segmentor, registered in MMEngine's ``MODELS`` registry.

``DemoSegmentor`` has the layout of the original tool's 3-D segmentors: a ``backbone``
(here :class:`examples.unet.UNet3D`, registered as ``UNet3D``) that maps a windowed image
``(N, 1, Z, Y, X)`` to logits ``(N, C, Z, Y, X)``, a ``num_classes`` attribute and the
``inference_config`` it was trained for. ``itk_infer --backend mmengine`` calls
``model.backbone(x)``; ``forward(..., mode='tensor'|'predict'|'loss')`` is the usual MMEngine
interface for training and evaluation.

A config loads this module with ``custom_imports = dict(imports=['examples.mmengine_model'])``
(see ``examples/demo/mmengine_config.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from torch import nn

from examples.unet import UNet3D

MODELS.register_module(name="UNet3D", module=UNet3D)


@MODELS.register_module()
class DemoSegmentor(BaseModel):
    """3-D segmentor: ``backbone`` gives per-class logits at the input's size."""

    def __init__(
        self,
        backbone: dict,
        num_classes: int,
        inference_config: dict | None = None,
        data_preprocessor: dict | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.num_classes = int(num_classes)
        self.inference_config = dict(inference_config or {})
        self.backbone: nn.Module = MODELS.build(
            backbone, default_args={"num_classes": self.num_classes}
        )

    def forward(
        self, inputs: torch.Tensor, data_samples: torch.Tensor | None = None,
        mode: str = "tensor",
    ) -> Any:
        """``tensor``: logits; ``predict``: label maps (N, Z, Y, X); ``loss``: cross-entropy
        against ``data_samples`` (integer label maps)."""
        logits = self.backbone(inputs)
        if mode == "tensor":
            return logits
        if mode == "predict":
            return logits.argmax(dim=1)
        if mode == "loss":
            if data_samples is None:
                raise ValueError("mode='loss' needs data_samples (label maps)")
            return {"loss": nn.functional.cross_entropy(logits, data_samples.long())}
        raise ValueError(f"unknown mode {mode!r} (tensor, predict or loss)")
