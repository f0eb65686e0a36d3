"""Frozen settings objects that validate themselves when built."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from itk_infer.errors import UsageError

BlendMode = Literal["gaussian", "constant"]
DeviceName = Literal["auto", "cpu", "cuda"]
BackendName = Literal["onnx", "mmengine"]
BLEND_MODES: tuple[str, ...] = ("gaussian", "constant")

Triple = tuple[int, int, int]


def as_triple(values: Sequence[int] | None, what: str) -> Triple | None:
    """Validate a (Z, Y, X) triple of positive integers; ``None`` passes through.

    Examples:
        >>> as_triple([32, 64, 64], "patch size")
        (32, 64, 64)
    """
    if values is None:
        return None
    values = tuple(values)
    if len(values) != 3:
        raise UsageError(f"{what} needs three values (Z Y X), got {list(values)}")
    out = []
    for v in values:
        if isinstance(v, bool) or int(v) != v or int(v) < 1:
            raise UsageError(f"{what} must be positive integers (Z Y X), got {list(values)}")
        out.append(int(v))
    return (out[0], out[1], out[2])


@dataclass(frozen=True)
class WindowSettings:
    """Intensity window: clip to [level - width/2, level + width/2], scale to [0, 1].

    Examples:
        >>> WindowSettings(level=40, width=400).bounds
        (-160.0, 240.0)
    """

    level: float
    width: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.level) and math.isfinite(self.width)):
            raise UsageError(f"window level/width must be finite, got {self.level}/{self.width}")
        if self.width <= 0:
            raise UsageError(f"--ww (window width) must be > 0, got {self.width}")

    @property
    def bounds(self) -> tuple[float, float]:
        """Lower and upper clip values."""
        half = float(self.width) / 2.0
        return (float(self.level) - half, float(self.level) + half)


@dataclass(frozen=True)
class SlidingWindowSettings:
    """How a volume is cut into windows and the windows blended back.

    ``patch_size`` ``None`` means one forward pass over the whole volume. ``patch_stride``
    ``None`` means half the patch. Smaller strides blend more windows per voxel (smoother,
    slower); a stride equal to the patch is fastest but shows seams.
    """

    patch_size: Triple | None = None
    patch_stride: Triple | None = None
    batch_size: int = 1
    blend: str = "gaussian"
    # Accepted for models trained with the original tool; "cpu" keeps the blending slab on the host.
    accumulate_device: str | None = None
    forward_device: str | None = None
    argmax_batchsize: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", as_triple(self.patch_size, "patch size"))
        object.__setattr__(self, "patch_stride", as_triple(self.patch_stride, "patch stride"))
        if self.blend not in BLEND_MODES:
            raise UsageError(f"blend must be one of {BLEND_MODES}, got {self.blend!r}")
        if int(self.batch_size) < 1:
            raise UsageError(f"forward batch size must be >= 1, got {self.batch_size}")
        if self.patch_size is not None and self.patch_stride is not None:
            for p, s in zip(self.patch_size, self.patch_stride, strict=True):
                if s > p:
                    raise UsageError(
                        f"patch stride {list(self.patch_stride)} is larger than patch size "
                        f"{list(self.patch_size)}: windows would leave gaps"
                    )

    def resolved(self, shape_zyx: Triple) -> tuple[Triple, Triple]:
        """Patch and stride for a volume of ``shape_zyx`` (patch ``None`` → whole volume)."""
        patch = self.patch_size or shape_zyx
        stride = self.patch_stride or (
            patch if self.patch_size is None else tuple(max(1, p // 2) for p in patch)
        )
        return patch, stride  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how."""

    backend: str
    onnx_path: Path | None = None
    cfg_path: Path | None = None
    ckpt_path: Path | None = None
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("onnx", "mmengine"):
            raise UsageError(f"unknown backend {self.backend!r} (choose onnx or mmengine)")
        if self.backend == "onnx" and self.onnx_path is None:
            raise UsageError("--backend onnx requires --onnx MODEL.onnx")
        if self.backend == "mmengine" and (self.cfg_path is None or self.ckpt_path is None):
            raise UsageError("--backend mmengine requires -cfg CONFIG.py and -ckpt CHECKPOINT.pth")


@dataclass(frozen=True)
class Overrides:
    """Values the user gave explicitly; each replaces only the model default it names."""

    window_level: float | None = None
    window_width: float | None = None
    patch_size: Triple | None = None
    patch_stride: Triple | None = None
    blend: str = "gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", as_triple(self.patch_size, "--patch-size"))
        object.__setattr__(self, "patch_stride", as_triple(self.patch_stride, "--patch-stride"))
        if self.window_width is not None and self.window_width <= 0:
            raise UsageError(f"--ww (window width) must be > 0, got {self.window_width}")
        if self.blend not in BLEND_MODES:
            raise UsageError(f"--blend must be one of {BLEND_MODES}, got {self.blend!r}")
        if self.patch_size and self.patch_stride:
            SlidingWindowSettings(self.patch_size, self.patch_stride)


@dataclass(frozen=True)
class OutputOptions:
    """Which optional outputs to write besides the label maps."""

    save_logits: bool = False
    save_conf: bool = False


@dataclass(frozen=True)
class InferenceSettings:
    """Everything that decides the numbers in the outputs of one case."""

    window: WindowSettings
    sliding: SlidingWindowSettings
    fp16: bool = False

    def describe(self) -> dict:
        """A JSON-friendly view, stored in records and compared on resume."""
        return {
            "window_level": self.window.level,
            "window_width": self.window.width,
            "patch_size": list(self.sliding.patch_size) if self.sliding.patch_size else None,
            "patch_stride": list(self.sliding.patch_stride) if self.sliding.patch_stride else None,
            "blend": self.sliding.blend,
            "fp16": self.fp16,
        }


@dataclass(frozen=True)
class RunSettings:
    """One batch run: where from, where to, which model, which options."""

    input_folder: Path
    output_folder: Path
    model: ModelSpec
    overrides: Overrides = field(default_factory=Overrides)
    outputs: OutputOptions = field(default_factory=OutputOptions)
    device: str = "auto"
    fp16: bool = False
    overwrite: bool = False
    num_proc: int = 1
    gpus: int = 1
    report_path: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.num_proc < 1:
            raise UsageError(f"--num-proc must be >= 1, got {self.num_proc}")
        if self.gpus < 0:
            raise UsageError(f"--gpus must be >= 0, got {self.gpus}")
