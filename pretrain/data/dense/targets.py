"""A dense record's image and targets, read as arrays in the package's conventions.

A record (what a source's ``[i]`` returns) is a mapping with ``image`` (encoded bytes or a uint8
(H, W, 3) array; None = missing) and, per target, either the decoded field or its encoded member:

==================  ===========================================  ===============================
target              decoded field                                encoded members (first wins)
==================  ===========================================  ===============================
``segmentation``    (H, W) integer class ids, ``ignore_label``   ``seg.png``
                    (255) = unlabelled
``depth``           (H, W) float metres, 0 = invalid             ``depth.npy``, ``depth.png``
                                                                 (with ``depth_scale``)
``normals``         (H, W, 3) float unit vectors, camera frame   ``normals.npy``, ``normals.png``
                    (x right, y up, z towards the viewer),
                    the zero vector = invalid
==================  ===========================================  ===============================

Targets come out as int32 / float32 / float32; depths that are not finite or not positive and
normals with a non-finite component become invalid. A requested target the record lacks, one that
cannot be decoded, and one whose size differs from the image's are :class:`LabelError` s with the
skip reason the pipeline counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pretrain.data.dense import encoding, layout

SEGMENTATION, DEPTH, NORMALS = "segmentation", "depth", "normals"
TARGETS = (SEGMENTATION, DEPTH, NORMALS)
IGNORE_LABEL = 255
# Skip reasons of the label side (the image's are examples.MISSING_IMAGE / CORRUPT_IMAGE).
MISSING_LABEL, CORRUPT_LABEL, LABEL_SIZE_MISMATCH = (
    "missing_label",
    "corrupt_label",
    "label_size_mismatch",
)


class LabelError(Exception):
    """A requested target cannot be read: ``reason`` is the skip reason, ``detail`` is logged."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """``targets`` as a tuple, each one of :data:`TARGETS` and none twice."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [name for name in targets if name not in TARGETS]
    if unknown or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct names from {TARGETS}, got {targets}")
    return targets


def as_segmentation(array: Any) -> np.ndarray:
    """Class ids (H, W) int32; a trailing channel of 1 is dropped."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise LabelError(CORRUPT_LABEL, f"segmentation must be integer (H, W): {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        raise LabelError(CORRUPT_LABEL, "segmentation class ids must be non-negative int32")
    return array.astype(np.int32)


def as_depth(array: Any) -> np.ndarray:
    """Depth (H, W) float32 metres; non-finite and non-positive values become 0 (invalid)."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    # Integer depths have a unit only their data set knows: store them as depth.png + scale.
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise LabelError(CORRUPT_LABEL, f"depth must be float (H, W): {array.dtype}")
    array = array.astype(np.float32)
    return np.where(np.isfinite(array) & (array > 0), array, np.float32(0))


def as_normals(array: Any) -> np.ndarray:
    """Normals (H, W, 3) float32; a pixel with a non-finite component becomes invalid (zero)."""
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3 or not np.issubdtype(array.dtype, np.floating):
        raise LabelError(CORRUPT_LABEL, f"normals must be float (H, W, 3): {array.shape}")
    array = array.astype(np.float32)
    return np.where(np.isfinite(array).all(axis=-1, keepdims=True), array, np.float32(0))


_CONVERTERS = {SEGMENTATION: as_segmentation, DEPTH: as_depth, NORMALS: as_normals}


def _member(record: Mapping[str, Any], target: str) -> str | None:
    """The encoded member of ``target`` that the record has (first in preference order)."""
    return next((m for m in layout.TARGET_MEMBERS[target] if record.get(m) is not None), None)


def has_target(record: Mapping[str, Any], target: str) -> bool:
    """Whether the record has ``target``, decoded or encoded (cheap: nothing is decoded)."""
    return record.get(target) is not None or _member(record, target) is not None


def read_target(record: Mapping[str, Any], target: str) -> np.ndarray:
    """One target of a record: its decoded field, else its first encoded member, converted."""
    value = record.get(target)
    if value is None:
        member = _member(record, target)
        if member is None:
            raise LabelError(MISSING_LABEL, f"no {target}")
        scale = float(record.get(layout.DEPTH_SCALE, layout.DEFAULT_DEPTH_SCALE))
        try:
            value = encoding.decode_member(member, record[member], scale)
        except encoding.CorruptLabelError as error:
            raise LabelError(CORRUPT_LABEL, f"{member}: {error}") from error
    return _CONVERTERS[target](value)


def read_targets(
    record: Mapping[str, Any], targets: Sequence[str], image_hw: tuple[int, int]
) -> dict[str, np.ndarray]:
    """The requested targets of a record, each checked to be the image's ``(height, width)``."""
    out = {}
    for target in targets:
        array = read_target(record, target)
        if array.shape[:2] != tuple(image_hw):
            raise LabelError(
                LABEL_SIZE_MISMATCH, f"{target} {array.shape[:2]} vs image {tuple(image_hw)}"
            )
        out[target] = array
    return out
