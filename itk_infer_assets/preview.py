"""A small PNG preview of a case: three orthogonal mid-slices with the labels overlaid.

Pure numpy + zlib (no imaging library). Panels follow the radiological convention of the
LPI arrays the core produces: axial (anterior up, patient right on the left), coronal and
sagittal (superior up), each resampled to square pixels so anatomy keeps its proportions.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Sequence

import numpy as np

# Label colours (RGB); label 0 (background) is never drawn. Cycles past the end.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)
OVERLAY_ALPHA = 0.45
GAP_PX = 2


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) RGB, got {rgb.shape}")
    height, width = rgb.shape[:2]
    # Each scanline starts with filter type 0 (none).
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


def _resample(panel: np.ndarray, spacing_rc: tuple[float, float], mm_per_px: float) -> np.ndarray:
    """Nearest-neighbour resize to square pixels of ``mm_per_px``."""
    rows, cols = panel.shape[:2]
    out_rows = max(1, round(rows * spacing_rc[0] / mm_per_px))
    out_cols = max(1, round(cols * spacing_rc[1] / mm_per_px))
    r = np.minimum((np.arange(out_rows) + 0.5) * rows / out_rows, rows - 1).astype(np.intp)
    c = np.minimum((np.arange(out_cols) + 0.5) * cols / out_cols, cols - 1).astype(np.intp)
    return panel[r][:, c]


def _overlay(gray: np.ndarray, labels: np.ndarray) -> np.ndarray:
    rgb = np.repeat((np.clip(gray, 0.0, 1.0) * 255.0)[..., None], 3, axis=2)
    palette = np.asarray(PALETTE, np.float64)
    mask = labels > 0
    if mask.any():
        colours = palette[(labels[mask].astype(np.int64) - 1) % len(palette)]
        rgb[mask] = (1.0 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colours
    return np.round(rgb).astype(np.uint8)


def preview_rgb(
    image: np.ndarray,
    labels: np.ndarray,
    spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
    max_side: int = 160,
) -> np.ndarray:
    """Axial, coronal and sagittal mid-slices side by side, as (H, W, 3) uint8.

    Args:
        image: (Z, Y, X) intensities already windowed to [0, 1], LPI.
        labels: (Z, Y, X) label map on the same grid.
        spacing_zyx: voxel spacing in mm, (Z, Y, X) order.
        max_side: longest side of the largest panel in pixels (all share one scale).
    """
    if image.shape != labels.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must be equal 3-D")
    z, y, x = (n // 2 for n in image.shape)
    sz, sy, sx = (float(s) for s in spacing_zyx)
    cuts = (
        (np.s_[z, :, :], (sy, sx)),  # axial: rows Y (anterior first), columns X
        (np.s_[:, y, :], (sz, sx)),  # coronal: rows Z (superior first), columns X
        (np.s_[:, :, x], (sz, sy)),  # sagittal: rows Z, columns Y
    )
    # One scale for all panels, so a millimetre is as long in each of them.
    extent_mm = max(max(image[cut].shape[0] * rs, image[cut].shape[1] * cs)
                    for cut, (rs, cs) in cuts)
    mm_per_px = extent_mm / max_side
    panels = []
    for cut, spacing in cuts:
        rgb = _overlay(image[cut].astype(np.float64), labels[cut])
        panels.append(_resample(rgb, spacing, mm_per_px))
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + GAP_PX * (len(panels) - 1)
    canvas = np.zeros((height, width, 3), np.uint8)
    left = 0
    for panel in panels:
        top = (height - panel.shape[0]) // 2
        canvas[top : top + panel.shape[0], left : left + panel.shape[1]] = panel
        left += panel.shape[1] + GAP_PX
    return canvas


def preview_png(image: np.ndarray, labels: np.ndarray, spacing_zyx: Sequence[float],
                max_side: int = 160) -> bytes:
    """The preview PNG of a windowed LPI image and its label map (as the core holds them)."""
    return encode_png(preview_rgb(image, labels, spacing_zyx, max_side))


def markdown_image(png: bytes, alt: str = "preview") -> str:
    """Markdown that shows ``png`` inline (a base64 data URI), for ``MetadataValue.md``."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
