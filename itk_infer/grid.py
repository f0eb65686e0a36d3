"""Where the sliding windows go: pure functions of shape, patch and stride, axes (Z, Y, X)."""

from __future__ import annotations

from functools import lru_cache

from itk_infer.config import Triple


def axis_starts(length: int, patch: int, stride: int) -> tuple[int, ...]:
    """Window starts along one axis: multiples of ``stride``, the last flush with the far edge.

    ``length`` must be >= ``patch`` (pad first, see :func:`padded_shape`).

    Examples:
        >>> axis_starts(10, 4, 3)
        (0, 3, 6)
        >>> axis_starts(11, 4, 3)
        (0, 3, 6, 7)
    """
    if length < patch:
        raise ValueError(f"axis of length {length} is shorter than the patch {patch}; pad first")
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return tuple(starts)


def padded_shape(shape: Triple, patch: Triple) -> Triple:
    """The shape after padding every axis shorter than the patch up to the patch."""
    return tuple(max(s, p) for s, p in zip(shape, patch, strict=True))  # type: ignore[return-value]


@lru_cache(maxsize=64)
def plan_windows(shape: Triple, patch: Triple, stride: Triple) -> tuple[Triple, ...]:
    """All window starts (z, y, x) for a (padded) volume, in Z order then Y then X.

    Examples:
        >>> plan_windows((4, 4, 6), (4, 4, 4), (2, 2, 2))
        ((0, 0, 0), (0, 0, 2))
    """
    zs, ys, xs = (axis_starts(s, p, t) for s, p, t in zip(shape, patch, stride, strict=True))
    return tuple((z, y, x) for z in zs for y in ys for x in xs)
