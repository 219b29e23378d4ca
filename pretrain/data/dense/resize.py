"""The geometry of dense examples: resizing, cropping with padding and mirroring, image and
targets alike.

Images are resampled bilinearly by PIL; targets (class maps, depth, normals) by nearest
neighbour (:mod:`pretrain.data.pixel_maps`, re-exported here). Both sample at pixel centres
(output pixel ``i`` of ``n`` looks at input position ``(i + 0.5) * in / n``), so image and
targets stay aligned. Sizes are ``(height, width)``; arrays are (H, W) or (H, W, C).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from pretrain.data.pixel_maps import mirror, mirror_normals, nearest_indices, resize_nearest

__all__ = [
    "crop_or_pad",
    "crop_origin",
    "mirror",
    "mirror_normals",
    "nearest_indices",
    "resize_bilinear",
    "resize_nearest",
    "scaled_size",
]


def scaled_size(height: int, width: int, shorter_side: float) -> tuple[int, int]:
    """``(height, width)`` with the shorter side ``shorter_side`` (rounded), aspect kept."""
    factor = shorter_side / min(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


def resize_bilinear(image: Image.Image, size: Sequence[int]) -> np.ndarray:
    """PIL's bilinear resize of an RGB image to ``size``: uint8 (h, w, 3)."""
    height, width = size
    if (image.height, image.width) != (height, width):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)


def crop_origin(
    height: int, width: int, crop_size: Sequence[int], rng: np.random.Generator
) -> tuple[int, int]:
    """A uniform ``(top, left)`` of a ``crop_size`` window; 0 along a side shorter than the crop
    (that side is padded)."""
    crop_height, crop_width = crop_size
    top = int(rng.integers(0, max(height - crop_height, 0) + 1))
    left = int(rng.integers(0, max(width - crop_width, 0) + 1))
    return top, left


def crop_or_pad(
    array: np.ndarray, top: int, left: int, crop_size: Sequence[int], fill: float
) -> np.ndarray:
    """The ``crop_size`` window at ``(top, left)``; where it passes the array's bottom or right
    edge, ``fill``."""
    crop_height, crop_width = crop_size
    window = array[top : top + crop_height, left : left + crop_width]
    if window.shape[:2] == (crop_height, crop_width):
        return np.ascontiguousarray(window)
    out = np.full((crop_height, crop_width, *array.shape[2:]), fill, array.dtype)
    out[: window.shape[0], : window.shape[1]] = window
    return out
