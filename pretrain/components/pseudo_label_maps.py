"""The data side of CLIPTeX: a record's pseudo-label members -> maps that follow its image.

:class:`PseudoLabelMaps` is a record plug-in of the pipeline
(``pretrain.data.examples.RecordPlugin``). For each requested target it decodes the record's
label member (the dense layout of :mod:`pretrain.data.dense`: ``seg.png``, ``depth.png`` /
``depth.npy``, ``normals.png`` / ``normals.npy``, as ``python -m pretrain.pseudo_label`` writes
them) into a :class:`~pretrain.data.examples.PixelMap`, which the example maker crops, resizes
(nearest) and flips with the image (a normal's x negated). A record without a target's member
gets a constant invalid map for it (ignore label, zero depth, zero normals): the expert gave no
label there, and the loss leaves that example out of that task. A member that cannot be decoded
skips the record (``corrupt_label``), as dense data does; a map whose aspect ratio is not its
image's is skipped by the example maker (``map_size_mismatch``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pretrain.data.dense import targets as dense_targets
from pretrain.data.examples import PixelMap, RecordFields, Skip

# A constant map of each target that marks "no label" (1 x 1: it follows any image).
_NO_LABEL_CHANNELS = {"segmentation": (), "depth": (), "normals": (3,)}
_NO_LABEL_DTYPES = {"segmentation": np.int32, "depth": np.float32, "normals": np.float32}


def no_label_map(target: str, ignore_label: int) -> np.ndarray:
    """The 1 x 1 map that says "no label" for ``target``."""
    fill = ignore_label if target == "segmentation" else 0
    shape = (1, 1, *_NO_LABEL_CHANNELS[target])
    return np.full(shape, fill, _NO_LABEL_DTYPES[target])


@dataclasses.dataclass(frozen=True)
class PseudoLabelMaps:
    """Maps of ``targets`` at the example's size / ``stride`` (see the module docstring)."""

    targets: Sequence[str]
    stride: int = 1
    ignore_label: int = dense_targets.IGNORE_LABEL

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", dense_targets.check_targets(self.targets))

    def __call__(
        self,
        record: Mapping[str, Any],
        captions: Sequence[str],
        caption_index: int,
        rng: np.random.Generator,
    ) -> RecordFields | Skip:
        del captions, caption_index, rng
        maps = {}
        for target in self.targets:
            if dense_targets.has_target(record, target):
                try:
                    array = dense_targets.read_target(record, target)
                except dense_targets.LabelError as error:
                    return Skip(error.reason, error.detail)
            else:
                array = no_label_map(target, self.ignore_label)
            maps[target] = PixelMap(
                array, stride=self.stride, negate_x_on_flip=target == dense_targets.NORMALS
            )
        return RecordFields(maps=maps)
