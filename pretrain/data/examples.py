"""How one record becomes one example, in grain's reader threads or worker processes.

Training: decode, a random resized crop (and, with ``horizontal_flip``, a mirror half of the time),
a caption drawn uniformly among the record's captions (or the first, ``caption_choice='first'``),
tokenised. Evaluation: resize + centre crop, the first caption. What a task adds to its examples
comes from :class:`Plugins`: picklable callables run on every example, each with its own random
stream, so that adding one changes no crop or caption draw.

A record plug-in may also give per-pixel maps (:class:`PixelMap`, e.g. dense pseudo-labels)
that follow the image: the same crop box, resampled by nearest neighbour
(:mod:`pretrain.data.pixel_maps`), mirrored with it.

A record with no image, an undecodable image or no non-blank caption (when a caption is needed),
one a record plug-in rejects, or one whose maps do not have its image's aspect ratio, becomes a
:class:`SkippedRecord` with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pretrain.data import pixel_maps, records, transforms

# Skip reasons of the example maker itself (record plug-ins add their own).
MISSING_IMAGE, CORRUPT_IMAGE, EMPTY_CAPTION = "missing_image", "corrupt_image", "empty_caption"
MAP_SIZE_MISMATCH = "map_size_mismatch"
CAPTION_CHOICES = ("random", "first")

# The random streams of an example (crop and caption, and the record plug-in's: training only),
# each seeded by [seed, stream, epoch, record index] alone, so an example does not depend on
# process or worker counts; one stream per consumer (0 is the shuffle's, pipeline.shuffle_seed).
CROP_AND_CAPTION_STREAM, EXTRAS_STREAM, RECORD_FIELDS_STREAM = 1, 2, 3

_logger = logging.getLogger(__name__)

Tokenizer = Callable[[Sequence[str]], np.ndarray]
# Fields made from the chosen caption, e.g. multi-hot synset labels: caption -> {name: array}.
CaptionFields = Callable[[str], dict[str, np.ndarray]]
# Fields made from the example's own random stream, e.g. token masks: rng -> {name: array}.
ExampleExtras = Callable[[np.random.Generator], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Skip:
    """A record plug-in's verdict that a record cannot become an example: ``reason`` is counted,
    ``detail`` logged."""

    reason: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class RecordCrop:
    """A crop the record prescribes instead of the random one (and never flipped): ``box`` is
    (top, left, height, width) in the image's own pixels (the image is then decoded at full
    size); an image that does not contain the box is skipped with ``skip_if_outside``."""

    box: tuple[int, int, int, int]
    skip_if_outside: Skip


@dataclasses.dataclass(frozen=True)
class PixelMap:
    """A per-pixel field of a record that follows the image's crop and flip (e.g. a dense
    pseudo-label): ``array`` (h, w) or (h, w, c) at any resolution with the image's aspect ratio
    (a 1 x 1 array is a constant map, e.g. "no label here"), resampled by nearest neighbour to the
    example's size divided by ``stride``; mirrored with the image, channel 0 negated too with
    ``negate_x_on_flip`` (a surface normal's x)."""

    array: np.ndarray
    stride: int = 1
    negate_x_on_flip: bool = False


@dataclasses.dataclass(frozen=True)
class RecordFields:
    """What a record plug-in adds to a training example: ``fields`` as they are, ``texts``
    (field name -> text) tokenised with the pipeline's tokenizer, optionally the crop, and
    ``maps`` that follow the image's geometry."""

    fields: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    texts: Mapping[str, str] = dataclasses.field(default_factory=dict)
    crop: RecordCrop | None = None
    maps: Mapping[str, PixelMap] = dataclasses.field(default_factory=dict)


# Training's per-record hook, e.g. reinforced training's stored teacher embeddings:
# (record, its non-blank captions, the chosen caption's index, its own rng) -> fields or a skip.
RecordPlugin = Callable[
    [Mapping[str, Any], Sequence[str], int, np.random.Generator], RecordFields | Skip
]


@dataclasses.dataclass(frozen=True)
class Plugins:
    """What a task adds to each example (all picklable; None: nothing).

    ``caption_fields``: fields of the chosen caption (with it, records without a caption are
    skipped as with a tokenizer). ``example_extras``: fields from the example's own random
    stream. ``record_fields``: training only, fields from the whole record (``RecordPlugin``).
    """

    caption_fields: CaptionFields | None = None
    example_extras: ExampleExtras | None = None
    record_fields: RecordPlugin | None = None


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """How training draws an example from its record.

    ``crop_scale``, ``crop_ratio``: RandomResizedCrop's area-fraction and aspect-ratio ranges;
    ``horizontal_flip``: mirror half of the crops; ``caption_choice``: 'random' or 'first';
    ``fast_decode``: decode JPEGs at reduced scale when every crop keeps the output resolution.
    """

    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    horizontal_flip: bool = False
    caption_choice: str = "random"
    fast_decode: bool = True

    def __post_init__(self) -> None:
        if self.caption_choice not in CAPTION_CHOICES:
            raise ValueError(
                f"caption_choice must be one of {CAPTION_CHOICES}, got {self.caption_choice!r}"
            )
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(self.crop_ratio))


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    """Stands in the stream for a record that cannot become an example."""

    index: int
    reason: str


def _tokens(tokenizer: Tokenizer, captions: Sequence[str]) -> np.ndarray:
    return np.asarray(tokenizer(list(captions)), dtype=np.int32)


class ExampleMaker:
    """Picklable grain map: ``(epoch, source_index, record) -> example dict | SkippedRecord``.

    ``tokenizer``: list of str -> int array ``(n, context_length)``, or None for image-only
    examples (no ``text``, captions not required). ``num_eval_captions`` (evaluation only): the
    first K captions' tokens as ``all_text`` (K, L) and ``all_text_valid`` (K,).
    """

    def __init__(
        self,
        *,
        train: bool,
        image_size: int,
        tokenizer: Tokenizer | None,
        seed: int,
        augmentation: Augmentation = Augmentation(),
        plugins: Plugins = Plugins(),
        num_eval_captions: int = 0,
    ):
        self.train = train
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.seed = seed
        self.augmentation = augmentation
        self.plugins = plugins
        self.num_eval_captions = num_eval_captions
        # Reduced-scale JPEG decoding only in training: evaluation stays identical to open_clip's.
        self.decode_min_side = (
            transforms.crop_min_side(image_size, augmentation.crop_scale, augmentation.crop_ratio)
            if train and augmentation.fast_decode
            else None
        )
        self._skips_logged = 0

    def at_size(self, image_size: int) -> ExampleMaker:
        """The same maker for another output size (variable-resolution batches): the same
        records give the same crops, captions and fields, resampled to ``image_size``."""
        return ExampleMaker(
            train=self.train,
            image_size=image_size,
            tokenizer=self.tokenizer,
            seed=self.seed,
            augmentation=self.augmentation,
            plugins=self.plugins,
            num_eval_captions=self.num_eval_captions,
        )

    def _rng(self, stream: int, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, epoch, index])

    def _skip(self, index: int, skip: Skip) -> SkippedRecord:
        # Log the first few skips and then every thousandth, per process: visible but not noisy.
        self._skips_logged += 1
        if self._skips_logged <= 10 or self._skips_logged % 1000 == 0:
            _logger.warning("Skipping record %d (%s) %s", index, skip.reason, skip.detail)
        return SkippedRecord(index=index, reason=skip.reason)

    def __call__(self, item: tuple[int, int, Mapping[str, Any]]) -> dict[str, Any] | SkippedRecord:
        epoch, index, record = item
        needs_caption = self.tokenizer is not None or self.plugins.caption_fields is not None
        image_data, captions = records.image_and_captions(record, needs_caption)
        if not records.has_image(image_data):
            return self._skip(index, Skip(MISSING_IMAGE))
        if needs_caption and not captions:
            return self._skip(index, Skip(EMPTY_CAPTION))
        caption_index, added = 0, RecordFields()
        if self.train:
            rng = self._rng(CROP_AND_CAPTION_STREAM, epoch, index)
            caption_index = self._caption_index(rng, captions)
            if self.plugins.record_fields is not None:
                outcome = self.plugins.record_fields(
                    record, captions, caption_index, self._rng(RECORD_FIELDS_STREAM, epoch, index)
                )
                if isinstance(outcome, Skip):
                    return self._skip(index, outcome)
                added = outcome
        try:
            # A record's own crop box is in the image's own pixels: decode at full size then.
            min_side = self.decode_min_side if added.crop is None else None
            image = transforms.decode_to_pil(image_data, min_side=min_side)
        except transforms.CorruptImageError as error:
            return self._skip(index, Skip(CORRUPT_IMAGE, str(error)))
        maps: dict[str, np.ndarray] = {}
        if not self.train:
            pixels = transforms.resize_center_crop(image, self.image_size)
        else:
            if added.crop is not None:
                if not transforms.box_inside(added.crop.box, image.height, image.width):
                    return self._skip(index, added.crop.skip_if_outside)
                box, flip = added.crop.box, False
            else:
                box, flip = self._random_box_and_flip(image, rng)
            pixels = transforms.crop_and_resize(image, box, self.image_size)
            if flip:
                pixels = pixel_maps.mirror(pixels)
            image_hw = (image.height, image.width)
            for name, pixel_map in added.maps.items():
                if not pixel_maps.has_aspect_of(pixel_map.array.shape[:2], image_hw):
                    detail = f"{name} {pixel_map.array.shape[:2]} vs image {image_hw}"
                    return self._skip(index, Skip(MAP_SIZE_MISMATCH, detail))
                maps[name] = self._follow(pixel_map, box, image_hw, flip)
        example = {"image": pixels, "index": np.int64(index), **maps}
        example.update(self._added_fields(captions[caption_index] if captions else "", added))
        if self.plugins.example_extras is not None:
            example.update(self.plugins.example_extras(self._rng(EXTRAS_STREAM, epoch, index)))
        if "label" in record:
            example["label"] = np.int32(record["label"])
        if not self.train and self.num_eval_captions > 0:
            example.update(self._eval_captions(captions))
        return example

    def _caption_index(self, rng: np.random.Generator, captions: Sequence[str]) -> int:
        # Drawn under both choices, so that the crop does not depend on caption_choice.
        pick = int(rng.integers(len(captions))) if captions else 0
        return pick if self.augmentation.caption_choice == "random" else 0

    def _random_box_and_flip(
        self, image: Any, rng: np.random.Generator
    ) -> tuple[tuple[int, int, int, int], bool]:
        """torchvision's RandomResizedCrop box, and whether the crop is mirrored."""
        augmentation = self.augmentation
        box = transforms.sample_crop_box(
            image.height, image.width, rng, augmentation.crop_scale, augmentation.crop_ratio
        )
        # Drawn after the crop, so that enabling flips changes no crop.
        return box, bool(augmentation.horizontal_flip and rng.random() < 0.5)

    def _follow(
        self,
        pixel_map: PixelMap,
        box: tuple[int, int, int, int],
        image_hw: tuple[int, int],
        flip: bool,
    ) -> np.ndarray:
        """A map under the image's crop box, at the example's size / its stride, mirrored."""
        side = max(1, self.image_size // pixel_map.stride)
        array = pixel_maps.crop_resize_nearest(pixel_map.array, box, image_hw, (side, side))
        if not flip:
            return array
        if pixel_map.negate_x_on_flip:
            return pixel_maps.mirror_normals(array)
        return pixel_maps.mirror(array)

    def _added_fields(self, caption: str, added: RecordFields) -> dict[str, Any]:
        """The chosen caption's tokens and fields, then a record plug-in's texts and fields."""
        fields: dict[str, Any] = {}
        if self.tokenizer is not None:
            fields["text"] = _tokens(self.tokenizer, [caption])[0]
        if self.plugins.caption_fields is not None:
            fields.update(self.plugins.caption_fields(caption))
        for name, text in added.texts.items():
            fields[name] = _tokens(self.tokenizer, [text])[0]
        fields.update(added.fields)
        return fields

    def _eval_captions(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        kept = captions[: self.num_eval_captions]
        tokens = _tokens(self.tokenizer, kept)
        all_text = np.zeros((self.num_eval_captions, tokens.shape[1]), np.int32)
        all_text[: len(kept)] = tokens
        return {
            "all_text": all_text,
            "all_text_valid": np.arange(self.num_eval_captions) < len(kept),
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_skips_logged"] = 0
        return state
