"""Small 3-D U-Net used as the bundled demo model.

Three resolution levels (two 2x down-samplings), so every spatial size must be
divisible by ``UNet3D.size_divisor`` (4). Only Conv3d, BatchNorm3d, ReLU,
MaxPool3d, ConvTranspose3d and concatenation are used: all export to plain ONNX
operators, and BatchNorm in eval mode uses stored statistics, so the output
for a voxel does not depend on which patch it was computed in (unlike
instance or group normalisation).

Import it as ``from examples.unet import UNet3D`` from the repository root.
"""

from __future__ import annotations

import torch
from torch import nn

from examples.phantoms import NUM_CLASSES


class _DoubleConv(nn.Sequential):
    """(3x3x3 conv -> BatchNorm -> ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet3D(nn.Module):
    """3-D U-Net: ``(N, in_channels, Z, Y, X)`` -> logits ``(N, num_classes, Z, Y, X)``.

    Z, Y and X must each be divisible by ``size_divisor``.
    """

    size_divisor: int = 4

    def __init__(
        self, in_channels: int = 1, num_classes: int = NUM_CLASSES, base_channels: int = 8
    ) -> None:
        super().__init__()
        c = base_channels
        self.enc0 = _DoubleConv(in_channels, c)
        self.enc1 = _DoubleConv(c, 2 * c)
        self.bottom = _DoubleConv(2 * c, 4 * c)
        self.pool = nn.MaxPool3d(2)
        self.up1 = nn.ConvTranspose3d(4 * c, 2 * c, 2, stride=2)
        self.dec1 = _DoubleConv(4 * c, 2 * c)
        self.up0 = nn.ConvTranspose3d(2 * c, c, 2, stride=2)
        self.dec0 = _DoubleConv(2 * c, c)
        self.head = nn.Conv3d(c, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.enc0(x)
        s1 = self.enc1(self.pool(s0))
        b = self.bottom(self.pool(s1))
        d1 = self.dec1(torch.cat([self.up1(b), s1], dim=1))
        d0 = self.dec0(torch.cat([self.up0(d1), s0], dim=1))
        return self.head(d0)
