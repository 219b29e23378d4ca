"""Dense TFDS data sets seen as dense records: feature names and label ids per known set.

==================  ==============  ======================  ===================================
TFDS name           image feature   target feature          label ids -> classes
==================  ==============  ======================  ===================================
``scene_parse150``  ``image``       ``annotation``          ADE20k: 0 ("other") -> ignore,
(ADE20k)                            (segmentation)          1..150 -> 0..149 (150 classes)
``nyu_depth_v2``    ``image``       ``depth`` (metres)      -
``cityscapes``      ``image_left``  ``segmentation_label``  the 34 label ids -> the 19 train
                                    (segmentation)          ids (:data:`CITYSCAPES_TRAIN_IDS`),
                                                            the others -> ignore
==================  ==============  ======================  ===================================

A TFDS name with a config (``cityscapes/semantic_segmentation``) is looked up by its first part;
any other set works with its feature names given. Class maps that TFDS decodes as (H, W, 1) are
squeezed; the ADE20k annotation, decoded as RGB, gives its class from the first (red) channel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from pretrain.data.dense import targets

# Cityscapes' label id (index) -> train id (None: not evaluated, ignore), from the official
# cityscapesScripts labels.py; 34 ids, 19 classes.
CITYSCAPES_TRAIN_IDS: tuple[int | None, ...] = (
    None, None, None, None, None, None, None,  # unlabeled .. ground (0-6)
    0, 1,  # road, sidewalk (7, 8)
    None, None,  # parking, rail track (9, 10)
    2, 3, 4,  # building, wall, fence (11-13)
    None, None, None,  # guard rail, bridge, tunnel (14-16)
    5,  # pole (17)
    None,  # polegroup (18)
    6, 7, 8, 9, 10, 11, 12, 13, 14, 15,  # traffic light .. bus (19-28)
    None, None,  # caravan, trailer (29, 30)
    16, 17, 18,  # train, motorcycle, bicycle (31-33)
)  # fmt: skip
CITYSCAPES_NUM_CLASSES = 19
ADE20K_NUM_CLASSES = 150


def ade20k_table(ignore_label: int = targets.IGNORE_LABEL) -> np.ndarray:
    """ADE20k's label id -> class: 0 -> ignore, k -> k - 1 for k in 1..150."""
    table = np.full(ADE20K_NUM_CLASSES + 1, ignore_label, np.int32)
    table[1:] = np.arange(ADE20K_NUM_CLASSES)
    return table


def cityscapes_table(ignore_label: int = targets.IGNORE_LABEL) -> np.ndarray:
    """Cityscapes' label id -> train id, ignore for the ids not evaluated."""
    return np.array(
        [ignore_label if train_id is None else train_id for train_id in CITYSCAPES_TRAIN_IDS],
        np.int32,
    )


def map_labels(labels: np.ndarray, table: np.ndarray, ignore_label: int) -> np.ndarray:
    """``table[labels]`` (int32), ids outside the table -> ignore."""
    inside = (labels >= 0) & (labels < len(table))
    return np.where(inside, table[np.clip(labels, 0, len(table) - 1)], ignore_label).astype(
        np.int32
    )


@dataclasses.dataclass(frozen=True)
class TfdsLayout:
    """Where a TFDS set keeps its image and targets, and how its label ids become classes."""

    image_field: str = "image"
    segmentation_field: str = ""
    depth_field: str = ""
    label_table: str = ""  # "ade20k", "cityscapes" or "" (ids are classes)
    first_channel_labels: bool = False  # the class map is decoded as RGB: take channel 0


KNOWN_SETS: dict[str, TfdsLayout] = {
    "scene_parse150": TfdsLayout(
        segmentation_field="annotation", label_table="ade20k", first_channel_labels=True
    ),
    "nyu_depth_v2": TfdsLayout(depth_field="depth"),
    "cityscapes": TfdsLayout(
        image_field="image_left", segmentation_field="segmentation_label", label_table="cityscapes"
    ),
}
_TABLES = {"ade20k": ade20k_table, "cityscapes": cityscapes_table}
_NUM_CLASSES = {"ade20k": ADE20K_NUM_CLASSES, "cityscapes": CITYSCAPES_NUM_CLASSES}


def tfds_layout(name: str, **overrides: str) -> TfdsLayout:
    """The layout of TFDS set ``name`` (known or not), with non-empty field overrides applied."""
    base = KNOWN_SETS.get(name.split("/")[0].split(":")[0], TfdsLayout())
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v})


def _class_map(array: Any, first_channel: bool) -> Any:
    array = np.asarray(array)
    if array.ndim == 3 and (first_channel or array.shape[2] == 1):
        return array[..., 0]
    return array  # anything else is left to the pipeline's checks (a corrupt label)


class TfdsDenseRecords:
    """A TFDS data source (or any list of feature dicts) as dense records.

    ``features``: the data set's top-level feature names (a ``FeaturesDict`` or a mapping);
    ``layout``: its fields (:func:`tfds_layout`). Records hold ``image`` and the targets the
    layout names, class maps mapped with its label table. ``num_classes``: the classes of the
    segmentation (None when unknown).
    """

    def __init__(
        self,
        source: Any,
        *,
        features: Mapping[str, Any],
        layout: TfdsLayout,
        ignore_label: int = targets.IGNORE_LABEL,
    ):
        top_level = set(features.keys())
        fields = {
            "image_field": layout.image_field,
            "segmentation_field": layout.segmentation_field,
            "depth_field": layout.depth_field,
        }
        for name, field in fields.items():
            if field and field not in top_level:
                raise ValueError(f"{name} {field!r} is not a feature of {sorted(top_level)}")
        if not (layout.segmentation_field or layout.depth_field):
            raise ValueError(f"no target feature (segmentation_field, depth_field) in {layout}")
        self._source = source
        self._layout = layout
        self._ignore_label = ignore_label
        self._table = _TABLES[layout.label_table](ignore_label) if layout.label_table else None
        self.num_classes = _NUM_CLASSES.get(layout.label_table)

    def __len__(self) -> int:
        return len(self._source)

    def _segmentation(self, value: Any) -> Any:
        labels = _class_map(value, self._layout.first_channel_labels)
        if self._table is None or labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            return labels
        return map_labels(labels, self._table, self._ignore_label)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        out = {"image": record[self._layout.image_field]}
        if self._layout.segmentation_field:
            out[targets.SEGMENTATION] = self._segmentation(record[self._layout.segmentation_field])
        if self._layout.depth_field:
            out[targets.DEPTH] = record[self._layout.depth_field]
        return out
