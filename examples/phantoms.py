"""Synthetic CT-like phantoms with exact label maps.

A phantom is a soft-tissue "body" ellipsoid in air holding one ellipsoid
"organ" per organ class, each with its own CT number, plus Gaussian noise.
Everything is drawn from a ``numpy`` generator seeded with ``seed``, so a seed
always gives the same phantom.

Arrays are built in (Z, Y, X) index order (the order of
``sitk.GetArrayFromImage``); shapes are defined in millimetres relative to the
volume centre, so the voxel spacing is respected. The orientation only sets the
image direction (and origin): the voxel content is identical for every
orientation, only its placement in physical space changes.

Import it as ``from examples.phantoms import make_phantom`` from the repository
root; ``python examples/phantoms.py [seed]`` prints a short summary.
"""

from __future__ import annotations

import sys

import numpy as np
import SimpleITK as sitk

CLASS_NAMES: tuple[str, ...] = ("background", "body", "lung", "fat", "vessel", "bone")
NUM_CLASSES: int = len(CLASS_NAMES)

# Nominal CT number (HU) of each label; each phantom jitters them by up to
# +-HU_JITTER so the model cannot rely on exact values.
CLASS_HU: tuple[int, ...] = (-1000, 40, -600, -100, 250, 800)
HU_JITTER: float = 15.0
NOISE_STD_HU: float = 20.0

# Intensity window used for training and inference: [-1000, 1000] HU keeps
# every class apart (air and bone stay well inside it).
WL: float = 0.0
WW: float = 2000.0

ORIENTATIONS: tuple[str, ...] = ("LPI", "RAS", "oblique")

_OBLIQUE_DEG = 20.0
_OBLIQUE_SHIFT_MM = (12.5, -30.0, 45.0)
_MAX_TRIES = 100
_MIN_SCALE = 0.65


def apply_window(hu: np.ndarray, level: float = WL, width: float = WW) -> np.ndarray:
    """Clip ``hu`` to ``[level - width/2, level + width/2]`` and scale to [0, 1] (float32)."""
    lo = level - width / 2.0
    return ((np.clip(hu, lo, lo + width) - lo) / width).astype(np.float32)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix (x, y, z order) for angles in radians about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _direction(orientation: str) -> np.ndarray:
    """Direction cosines (columns = image axes x, y, z) in SimpleITK's LPS world."""
    if orientation == "LPI":
        return np.diag([1.0, 1.0, -1.0])
    if orientation == "RAS":
        return np.diag([-1.0, -1.0, 1.0])
    if orientation == "oblique":
        return _rotation(np.deg2rad(_OBLIQUE_DEG), 0.0, 0.0) @ np.diag([1.0, 1.0, -1.0])
    raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")


class _Grid:
    """Voxel-centre coordinates in mm relative to the volume centre, axis order (x, y, z)."""

    def __init__(self, size_zyx: tuple[int, int, int], spacing_xyz: tuple[float, float, float]):
        self.shape = tuple(size_zyx)
        size_xyz = size_zyx[::-1]
        self.axes = [
            (np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(size_xyz, spacing_xyz, strict=True)
        ]
        self.spacing = np.asarray(spacing_xyz, dtype=float)
        self.fov = np.asarray(size_xyz, dtype=float) * self.spacing

    def ellipsoid(self, center: np.ndarray, semi: np.ndarray, rot: np.ndarray) -> np.ndarray:
        """Boolean (Z, Y, X) mask of a rotated ellipsoid, evaluated only in its bounding box."""
        mask = np.zeros(self.shape, dtype=bool)
        reach = float(semi.max())
        sl = []
        for ax, c in zip(self.axes, center, strict=True):
            idx = np.nonzero(np.abs(ax - c) <= reach)[0]
            if idx.size == 0:
                return mask
            sl.append(slice(idx[0], idx[-1] + 1))
        x = self.axes[0][sl[0]][None, None, :] - center[0]
        y = self.axes[1][sl[1]][None, :, None] - center[1]
        z = self.axes[2][sl[2]][:, None, None] - center[2]
        # Local coordinates q = R^T p, written out to stay in broadcast form.
        r = 0.0
        for k in range(3):
            q = rot[0, k] * x + rot[1, k] * y + rot[2, k] * z
            r = r + (q / semi[k]) ** 2
        mask[sl[2], sl[1], sl[0]] = r <= 1.0
        return mask


def _small_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    return _rotation(*np.deg2rad(rng.uniform(-max_deg, max_deg, size=3)))


def make_phantom(
    seed: int,
    size_zyx: tuple[int, int, int] = (40, 96, 96),
    spacing_xyz_mm: tuple[float, float, float] = (0.8, 0.8, 2.5),
    orientation: str = "LPI",
) -> tuple[sitk.Image, sitk.Image]:
    """Make one phantom and its label map.

    Args:
        seed: seed of the random generator; the same seed gives the same phantom.
        size_zyx: array shape (Z, Y, X); the SimpleITK image size is its reverse.
        spacing_xyz_mm: voxel spacing in mm, SimpleITK (x, y, z) order.
        orientation: "LPI" (direction diag(1, 1, -1)), "RAS" (diag(-1, -1, 1)) or
            "oblique" (LPI rotated 20 degrees about x, shifted origin).

    Returns:
        ``(image, labels)`` on the same grid: image int16 in HU (air -1000),
        labels uint8 with values ``0 .. NUM_CLASSES - 1`` (see ``CLASS_NAMES``).
        ``sitk.GetArrayFromImage`` of either gives a (Z, Y, X) array.
    """
    direction = _direction(orientation)
    rng = np.random.default_rng(seed)
    grid = _Grid(size_zyx, spacing_xyz_mm)
    fov = grid.fov
    labels = np.zeros(grid.shape, dtype=np.uint8)

    # Body: elliptic cross-section filling most of the field of view, long
    # enough in z to look like a trunk that tapers slightly at the volume ends.
    body_semi = np.array(
        [
            rng.uniform(0.36, 0.44) * fov[0],
            rng.uniform(0.30, 0.38) * fov[1],
            rng.uniform(0.8, 1.2) * fov[2],
        ]
    )
    body_center = np.append(rng.uniform(-0.04, 0.04, size=2) * fov[:2], 0.0)
    body_rot = _rotation(0.0, 0.0, np.deg2rad(rng.uniform(-10.0, 10.0)))
    body = grid.ellipsoid(body_center, body_semi, body_rot)
    labels[body] = 1

    # Organs: one non-overlapping ellipsoid per class, kept inside the body and
    # placed in random order so no class is always squeezed in last. Rejected
    # draws shrink the next one a little (down to _MIN_SCALE) to ease packing;
    # after _MAX_TRIES misses the class is left out of this phantom.
    in_plane = min(body_semi[0], body_semi[1])
    for label in rng.permutation(np.arange(2, NUM_CLASSES)):
        scale = 1.0
        for _ in range(_MAX_TRIES):
            semi = scale * np.array(
                [
                    rng.uniform(0.24, 0.38) * in_plane,
                    rng.uniform(0.24, 0.38) * in_plane,
                    rng.uniform(0.18, 0.35) * fov[2],
                ]
            )
            radius, angle = 0.65 * np.sqrt(rng.uniform()), rng.uniform(0.0, 2 * np.pi)
            offset = np.array(
                [
                    radius * np.cos(angle) * body_semi[0],
                    radius * np.sin(angle) * body_semi[1],
                    rng.uniform(-0.25, 0.25) * fov[2],
                ]
            )
            mask = grid.ellipsoid(body_center + body_rot @ offset, semi, _small_rotation(rng, 15.0))
            if mask.any() and not (mask & ~body).any() and not (labels[mask] >= 2).any():
                labels[mask] = label
                break
            scale = max(_MIN_SCALE, scale * 0.97)

    hu_of_label = np.asarray(CLASS_HU, dtype=np.float32)
    hu_of_label[1:] += rng.uniform(-HU_JITTER, HU_JITTER, size=NUM_CLASSES - 1)
    hu = hu_of_label[labels] + rng.normal(0.0, NOISE_STD_HU, size=grid.shape).astype(np.float32)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    # Origin puts the volume centre at the world origin (plus a shift for oblique).
    origin = -direction @ (grid.spacing * (np.asarray(size_zyx[::-1]) - 1) / 2.0)
    if orientation == "oblique":
        origin = origin + np.asarray(_OBLIQUE_SHIFT_MM)

    out = []
    for arr in (hu, labels):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(tuple(float(s) for s in spacing_xyz_mm))
        img.SetOrigin(tuple(float(o) for o in origin))
        img.SetDirection(tuple(float(d) for d in direction.ravel()))
        out.append(img)
    return out[0], out[1]


if __name__ == "__main__":
    image, label_map = make_phantom(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    counts = np.bincount(sitk.GetArrayViewFromImage(label_map).ravel(), minlength=NUM_CLASSES)
    print(f"size {image.GetSize()} spacing {image.GetSpacing()} origin {image.GetOrigin()}")
    for name, hu, n in zip(CLASS_NAMES, CLASS_HU, counts, strict=True):
        print(f"  {name:<10} {hu:>6} HU  {n:>7} voxels")
