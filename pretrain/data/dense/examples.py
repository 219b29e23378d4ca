"""How one dense record becomes one example, in grain's reader threads or worker processes.

Training: the image and its targets are scaled by a factor drawn uniformly from ``scale_range``
(the shorter side becomes ``image_size * factor``, aspect kept; depth values are not changed by
the scale), a ``crop_size`` window is taken at a uniform position (padded at the bottom / right
with 0 pixels, ``ignore_label``, invalid depth and normals where the scaled image is smaller),
and with ``horizontal_flip`` the example is mirrored half of the time, the normals' ``x``
negated. Evaluation: a resize to ``eval_size``, nothing random. Images are resampled bilinearly,
targets by nearest neighbour (:mod:`pretrain.data.dense.resize`). The random draws of an example
come from one stream seeded by ``[seed, stream, epoch, record index]`` (as in
:mod:`pretrain.data.examples`), so an example does not depend on process or worker counts; the
flip is drawn after the crop whether flips are on or not, so turning them on changes no crop.

A record without an image, with an undecodable image, or without / with an unreadable or
wrong-sized requested target becomes a ``SkippedRecord`` with the reason
(:mod:`pretrain.data.dense.targets`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pretrain.data import transforms
from pretrain.data.dense import resize
from pretrain.data.dense import targets as dense_targets
from pretrain.data.examples import CORRUPT_IMAGE, MISSING_IMAGE, SkippedRecord

# The stream of the scale, crop and flip draws (0 is the shuffle's, pipeline.shuffle_seed).
SCALE_CROP_FLIP_STREAM = 1

_logger = logging.getLogger(__name__)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int | np.integer):
        return int(value), int(value)
    height, width = value
    return int(height), int(width)


@dataclasses.dataclass(frozen=True)
class DenseAugmentation:
    """How a dense example is drawn from its record (sizes are ``(height, width)``; an int is a
    square). Training: ``image_size`` (the shorter side before scaling; None: the crop's shorter
    side), ``scale_range``, ``crop_size``, ``horizontal_flip``; evaluation: ``eval_size``. The
    defaults fit the embedded scenes' 64-pixel ``dense`` config."""

    image_size: int | None = None
    scale_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (64, 64)
    horizontal_flip: bool = True
    eval_size: tuple[int, int] = (64, 64)

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_size", _pair(self.crop_size))
        object.__setattr__(self, "eval_size", _pair(self.eval_size))
        if self.image_size is None:
            object.__setattr__(self, "image_size", min(self.crop_size))
        object.__setattr__(self, "scale_range", tuple(float(s) for s in self.scale_range))
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be 0 < low <= high, got {self.scale_range}")
        if self.image_size <= 0 or min(self.crop_size + self.eval_size) <= 0:
            raise ValueError(f"sizes must be positive: {self}")


def _fill_values(ignore_label: int) -> dict[str, float]:
    """What padding holds: no class, invalid depth, invalid (zero) normals."""
    return {
        dense_targets.SEGMENTATION: ignore_label,
        dense_targets.DEPTH: 0.0,
        dense_targets.NORMALS: 0.0,
    }


def _mirrored(target: str, array: np.ndarray) -> np.ndarray:
    if target == dense_targets.NORMALS:
        return resize.mirror_normals(array)
    return resize.mirror(array)


class DenseExampleMaker:
    """Picklable grain map: ``(epoch, source_index, record) -> example dict | SkippedRecord``.

    An example holds ``image`` uint8 (h, w, 3), the requested ``targets`` (``segmentation``
    int32 (h, w), ``depth`` float32 (h, w), ``normals`` float32 (h, w, 3)) and ``index`` int64.
    """

    def __init__(
        self,
        *,
        train: bool,
        targets: Sequence[str],
        seed: int,
        augmentation: DenseAugmentation = DenseAugmentation(),
        ignore_label: int = dense_targets.IGNORE_LABEL,
    ):
        self.train = train
        self.targets = dense_targets.check_targets(targets)
        self.seed = seed
        self.augmentation = augmentation
        self.fill = _fill_values(ignore_label)
        self._skips_logged = 0

    def _skip(self, index: int, reason: str, detail: str = "") -> SkippedRecord:
        # Log the first few skips and then every thousandth, per process: visible but not noisy.
        self._skips_logged += 1
        if self._skips_logged <= 10 or self._skips_logged % 1000 == 0:
            _logger.warning("Skipping record %d (%s) %s", index, reason, detail)
        return SkippedRecord(index=index, reason=reason)

    def __call__(self, item: tuple[int, int, Mapping[str, Any]]) -> dict[str, Any] | SkippedRecord:
        epoch, index, record = item
        image_data = record.get("image")
        if image_data is None:
            return self._skip(index, MISSING_IMAGE)
        missing = [t for t in self.targets if not dense_targets.has_target(record, t)]
        if missing:  # before decoding anything: a missing label is the cheapest skip
            return self._skip(index, dense_targets.MISSING_LABEL, f"no {', '.join(missing)}")
        try:
            image = transforms.decode_to_pil(image_data)
        except transforms.CorruptImageError as error:
            return self._skip(index, CORRUPT_IMAGE, str(error))
        try:
            labels = dense_targets.read_targets(record, self.targets, (image.height, image.width))
        except dense_targets.LabelError as error:
            return self._skip(index, error.reason, error.detail)
        if self.train:
            rng = np.random.default_rng([self.seed, SCALE_CROP_FLIP_STREAM, epoch, index])
            pixels, labels = self._augment(image, labels, rng)
        else:
            size = self.augmentation.eval_size
            pixels = resize.resize_bilinear(image, size)
            labels = {name: resize.resize_nearest(a, size) for name, a in labels.items()}
        return {"image": pixels, **labels, "index": np.int64(index)}

    def _augment(
        self, image: Any, labels: dict[str, np.ndarray], rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Random scale, crop (padded) and flip of the image and its targets, in that order."""
        augmentation = self.augmentation
        factor = rng.uniform(*augmentation.scale_range)
        size = resize.scaled_size(image.height, image.width, augmentation.image_size * factor)
        top, left = resize.crop_origin(*size, augmentation.crop_size, rng)
        flip = rng.random() < 0.5  # drawn always: turning flips on changes no crop
        crop = augmentation.crop_size
        pixels = resize.crop_or_pad(resize.resize_bilinear(image, size), top, left, crop, 0)
        labels = {
            name: resize.crop_or_pad(
                resize.resize_nearest(array, size), top, left, crop, self.fill[name]
            )
            for name, array in labels.items()
        }
        if augmentation.horizontal_flip and flip:
            pixels = resize.mirror(pixels)
            labels = {name: _mirrored(name, array) for name, array in labels.items()}
        return pixels, labels

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_skips_logged"] = 0
        return state
