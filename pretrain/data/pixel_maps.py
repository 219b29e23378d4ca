"""Per-pixel maps that follow an image's geometry: nearest-neighbour resampling, crops, mirrors.

Class maps, depth and surface normals are resampled by nearest neighbour, so that an invalid or
unlabelled pixel is never blended with a valid one and a class map holds only classes of its
source. Sampling is at pixel centres (output pixel ``i`` of ``n`` looks at input position
``(i + 0.5) * in / n``), as PIL resamples the image, so a map stays aligned with its image. A map
may have another resolution than its image (pseudo-labels are often stored smaller) as long as
it has the image's aspect ratio: image coordinates are scaled to the map's. Sizes are
``(height, width)``; arrays are (H, W) or (H, W, C).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Input index of each output index under nearest-neighbour resampling at pixel centres."""
    centres = (np.arange(out_size) + 0.5) * (in_size / out_size)
    return np.minimum(np.floor(centres).astype(np.int64), in_size - 1)


def resize_nearest(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) or (H, W, C) array to ``size``."""
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    rows = nearest_indices(array.shape[0], height)
    columns = nearest_indices(array.shape[1], width)
    return array[rows[:, None], columns[None, :]]


def _box_indices(start: float, extent: float, out_size: int, scale: float, limit: int):
    # Output pixel i samples image position start + (i + 0.5) * extent / out_size, i.e. map
    # position scale times that.
    centres = (start + (np.arange(out_size) + 0.5) * (extent / out_size)) * scale
    return np.clip(np.floor(centres).astype(np.int64), 0, limit - 1)


def has_aspect_of(map_hw: Sequence[int], image_hw: Sequence[int]) -> bool:
    """Whether a map of ``map_hw`` can be aligned with an image of ``image_hw``: the same aspect
    ratio up to the rounding of one map pixel; a 1 x 1 map is a constant and follows any image."""
    map_height, map_width = map_hw
    image_height, image_width = image_hw
    if (map_height, map_width) == (1, 1):
        return True
    return abs(map_height - image_height * map_width / image_width) <= 1.0


def crop_resize_nearest(
    array: np.ndarray,
    box: Sequence[int],
    image_hw: Sequence[int],
    size: Sequence[int],
) -> np.ndarray:
    """The map's part under the image crop ``box`` = (top, left, height, width) in the pixels of
    an image of ``image_hw``, resampled (nearest, pixel centres) to ``size``: where the image's
    ``crop_and_resize(box, size)`` puts each output pixel, this takes the map's pixel under it."""
    top, left, crop_height, crop_width = box
    rows = _box_indices(top, crop_height, size[0], array.shape[0] / image_hw[0], array.shape[0])
    columns = _box_indices(left, crop_width, size[1], array.shape[1] / image_hw[1], array.shape[1])
    return np.ascontiguousarray(array[rows[:, None], columns[None, :]])


def mirror(array: np.ndarray) -> np.ndarray:
    """Left-right mirror of an (H, W) or (H, W, C) array."""
    return np.ascontiguousarray(array[:, ::-1])


def mirror_normals(normals: np.ndarray) -> np.ndarray:
    """Left-right mirror of camera-frame normals: the pixels mirrored and ``x`` negated."""
    mirrored = mirror(normals)
    # 0 - x rather than -x: an invalid (zero) normal stays +0, never becomes -0.
    mirrored[..., 0] = 0.0 - mirrored[..., 0]
    return mirrored
