"""The embedded scenes (:mod:`pretrain.data.scenes`) as dense records: their exact targets.

``segmentation``: 0 = the ground (and the sky: everything that is not an object), ``1 +
SHAPES.index(shape)`` = an object, so ``NUM_CLASSES`` = 7 and no pixel is unlabelled.
``depth``: the ray distance in scene units; ``normals``: the exact camera-frame normals. A pixel
whose ray hit nothing (the sky: the renderer gives it ``FAR_DEPTH`` and the normal facing the
camera) is invalid for both depth (0) and normals (zero).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pretrain.data.dense import targets
from pretrain.data.scenes.geometry import SHAPES
from pretrain.data.scenes.render import FAR_DEPTH

NUM_CLASSES = 1 + len(SHAPES)
_SKY_NORMAL = np.array([0.0, 0.0, 1.0], np.float32)


def sky_mask(depth: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Where the renderer's ray hit nothing: exactly ``FAR_DEPTH`` and the camera-facing normal
    (a very distant ground hit may exceed ``FAR_DEPTH``; it never equals it with that normal)."""
    return (depth == np.float32(FAR_DEPTH)) & np.all(normals == _SKY_NORMAL, axis=-1)


def scene_targets(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A scenes record's image and targets, the sky invalid for depth and normals."""
    depth = np.asarray(record["depth"], np.float32)
    normals = np.asarray(record["normals"], np.float32)
    sky = sky_mask(depth, normals)
    return {
        "image": record["image"],
        targets.SEGMENTATION: record["segmentation"],
        targets.DEPTH: np.where(sky, np.float32(0), depth),
        targets.NORMALS: np.where(sky[..., None], np.float32(0), normals),
    }


class SceneRecords:
    """A prepared dense scenes split (``builder.data_source``) as dense records; ``key`` is the
    example's seed."""

    num_classes = NUM_CLASSES

    def __init__(self, source: Any):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        return {"key": str(record["seed"]), **scene_targets(record)}
