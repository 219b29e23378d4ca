"""The grain pipeline for image-text training and evaluation, with bad records skipped and counted.

``image_text_dataset(source, ...)`` turns any random-access source (``len``/``[i]``) into an
iterable of per-process batches. Records may be raw (``webdataset.WebDatasetSource``:
``image_bytes`` + ``captions``) or decoded (a TFDS ``data_source``: ``image`` array + ``captions``);
:func:`image_and_captions` is the one place that reads either.

Order of the data (grain ``MapDataset`` steps, so a position is restored from a step count):

* training: the whole source is shuffled with the seed (a new permutation each epoch), repeated
  (forever unless ``num_epochs``), and process ``p`` of ``P`` takes every ``P``-th element of that
  one global stream: within an epoch the processes' examples are disjoint and cover the source,
  and the global stream does not depend on the number of processes;
* evaluation: no shuffle, one pass; process ``p`` takes the ``p``-th contiguous block
  ``[p*N//P, (p+1)*N//P)`` in order.

Per example (in grain reader threads, or worker processes when ``worker_count > 0``): decode,
crop (training: random resized crop with an RNG seeded by ``(seed, epoch, source index)``, so
the augmentation of a record is reproducible and independent of process and worker counts;
evaluation: resize + centre crop), pick a caption (training: uniformly among the record's captions
with the same RNG, or the first with ``caption_choice='first'``; evaluation: the first), tokenize.

A record with no image, an undecodable image (:class:`~pretrain.data.transforms.CorruptImageError`)
or no non-blank caption becomes a :class:`SkippedRecord`; :class:`SkipCountingBatchIterDataset`
batches the good examples and reports in each batch how many records were skipped since the
previous batch. Any other exception (a bug, a schema error, an I/O error) propagates.

Batch fields (``b = batch_size_per_process``, ``L`` = the tokenizer's context length):

==================  ===============  ======================================================
``image``           uint8 (b,H,W,3)  RGB, not normalised (see ``transforms.normalize``)
``text``            int32 (b, L)     tokens of the chosen caption
``valid``           bool (b,)        False on padding rows (only in a padded last batch)
``index``           int64 (b,)       index of the record in the source; -1 on padding
``skipped``         Python int       records skipped since the previous batch (host only:
                                     pop it before putting the batch on devices)
``label``           int32 (b,)       only if the source's records have a ``label``
(caption fields)    (b, ...)         with ``caption_fields``: its fields of the chosen caption
``synthetic_text``  int32 (b, L)     with ``reinforcement``: a synthetic caption's tokens
``teacher_*``       float32 (b, D)   with stored teacher embeddings (see :class:`Reinforcement`)
``all_text``        int32 (b, K, L)  evaluation with ``num_eval_captions=K > 0``: the
                                     first K captions' tokens, zero rows where missing
``all_text_valid``  bool (b, K)      which rows of ``all_text`` hold a caption
==================  ===============  ======================================================

Evaluation with ``drop_remainder=False``: the last batch is padded to ``b`` rows with zeros and
``valid=False`` (so shapes never change under jit); reduce metrics over ``valid`` rows only.
Skipped records after the last good example are reported in a final all-padding batch. With
``drop_remainder=True`` the last partial batch, and its ``skipped`` count, are dropped. With
several processes the number of batches can differ between processes (uneven blocks, skips).

Checkpointing: ``it = iter(ds)``; ``it.get_state()`` / ``it.set_state(state)`` restore the exact
position (also with ``worker_count > 0``), e.g. through orbax's ``grain.checkpoint.CheckpointSave``.
With ``worker_count > 0`` each worker batches its own slice of the process's stream (grain's
``mp_prefetch``), so the batches differ from ``worker_count=0`` ones (deterministic for a fixed
``worker_count``), and an evaluation pass ends with up to one padded batch per worker.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from pretrain.data import transforms

SKIP_REASONS = (
    "missing_image",
    "corrupt_image",
    "empty_caption",
    "no_synthetic_caption",
    "bad_reinforcement",
)
CAPTION_CHOICES = ("random", "first")

_logger = logging.getLogger(__name__)

Tokenizer = Callable[[Sequence[str]], np.ndarray]
# Per-example fields made from the chosen caption in the data workers, e.g. CatLIP's multi-hot
# synset labels: caption -> {name: array}.
CaptionFields = Callable[[str], dict[str, np.ndarray]]
# Per-example fields made in the data workers from a per-(seed, epoch, record) RNG, e.g. masks.
ExampleExtras = Callable[[np.random.Generator], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Reinforcement:
    """Which reinforced-training (DataCompDR) fields the training examples carry.

    ``synthetic_captions``: ``synthetic_text``, the tokens of one of the record's synthetic
    captions (uniform, seeded per record and epoch). ``teacher_embeddings``: ``teacher_image``,
    ``teacher_text`` (of the chosen real caption) and, with synthetic captions,
    ``teacher_synthetic_text`` (of the chosen synthetic one), float32 (D,), read from the
    record's stored ``teacher_image_embeddings`` (A, D) and ``teacher_text_embeddings`` (T, D),
    whose rows are the record's non-blank real captions, then its non-blank synthetic captions,
    in order. When the record stores ``augmentation_boxes`` (A, 4), a view ``a`` is drawn and
    the image is cropped with box ``a`` (not flipped): the student sees the very view whose
    teacher embedding is row ``a``. Without boxes, view ``a`` is only an embedding and the crop
    is the pipeline's own.
    """

    synthetic_captions: bool = True
    teacher_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    """Stands in the stream for a record that cannot become an example (see ``SKIP_REASONS``)."""

    index: int
    reason: str


# ----------------------------------------------------------------------------- records


def _as_text(value: Any) -> str:
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def caption_list(value: Any) -> list[str]:
    """A record's caption field (str, bytes, list or array of them, None) as stripped,
    non-blank strings in order."""
    if value is None:
        return []
    if isinstance(value, str | bytes | np.bytes_ | np.str_):
        items = [value]
    elif isinstance(value, np.ndarray):
        items = list(value.ravel())
    else:
        items = list(value)
    stripped = (_as_text(item).strip() for item in items)
    return [caption for caption in stripped if caption]


def image_and_captions(
    record: Mapping[str, Any], require_captions: bool = True
) -> tuple[Any, list[str]]:
    """``(image, captions)`` of a raw or decoded record; blank captions removed.

    The image is ``record['image_bytes']`` (raw: encoded bytes or None) or ``record['image']``
    (decoded array, or encoded bytes); captions are ``record['captions']`` (list / array of str or
    bytes) or ``record['caption']``. A record with neither field is a schema error and raises,
    unless ``require_captions`` is False (image-only pipelines).
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"Records must be mappings, got {type(record).__name__}")
    if "image_bytes" in record:
        image = record["image_bytes"]
    elif "image" in record:
        image = record["image"]
    else:
        raise KeyError(f"Record has no 'image_bytes' or 'image' field: {sorted(record)}")
    if "captions" in record:
        captions = record["captions"]
    elif "caption" in record:
        captions = record["caption"]
    elif not require_captions:
        captions = None
    else:
        raise KeyError(f"Record has no 'captions' or 'caption' field: {sorted(record)}")
    return image, caption_list(captions)


def _is_missing(image: Any) -> bool:
    return image is None or (isinstance(image, bytes | bytearray) and len(image) == 0)


# ----------------------------------------------------------------------------- one example


def _tokens(tokenizer: Tokenizer, captions: Sequence[str]) -> np.ndarray:
    return np.asarray(tokenizer(list(captions)), dtype=np.int32)


class ExampleMaker:
    """Picklable grain map: ``(epoch, source_index, record) -> example dict | SkippedRecord``."""

    def __init__(
        self,
        *,
        train: bool,
        image_size: int,
        tokenizer: Tokenizer | None,
        seed: int,
        caption_choice: str = "random",
        crop_scale: tuple[float, float] = (0.9, 1.0),
        crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0),
        fast_decode: bool = True,
        num_eval_captions: int = 0,
        example_extras: ExampleExtras | None = None,
        caption_fields: CaptionFields | None = None,
        horizontal_flip: bool = False,
        reinforcement: Reinforcement | None = None,
    ):
        self.train = train
        self.reinforcement = reinforcement if train else None
        self.horizontal_flip = horizontal_flip
        self.caption_fields = caption_fields
        self.example_extras = example_extras
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.seed = seed
        self.caption_choice = caption_choice
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.num_eval_captions = num_eval_captions
        # Reduced-scale JPEG decoding only in training: evaluation stays identical to open_clip's.
        self.decode_min_side = (
            transforms.crop_min_side(image_size, self.crop_scale, self.crop_ratio)
            if train and fast_decode
            else None
        )
        self._skips_logged = 0

    def example_rng(self, epoch: int, index: int) -> np.random.Generator:
        """The augmentation RNG of a record in an epoch: a function of (seed, epoch, index) only."""
        return np.random.default_rng([self.seed, 1, epoch, index])

    def _skip(self, index: int, reason: str, detail: str = "") -> SkippedRecord:
        # Log the first few skips and then every thousandth, per process: visible but not noisy.
        self._skips_logged += 1
        if self._skips_logged <= 10 or self._skips_logged % 1000 == 0:
            _logger.warning("Skipping record %d (%s) %s", index, reason, detail)
        return SkippedRecord(index=index, reason=reason)

    def __call__(self, item: tuple[int, int, Mapping[str, Any]]) -> dict[str, Any] | SkippedRecord:
        epoch, index, record = item
        needs_caption = self.tokenizer is not None or self.caption_fields is not None
        image_data, captions = image_and_captions(record, needs_caption)
        if _is_missing(image_data):
            return self._skip(index, "missing_image")
        if needs_caption and not captions:
            return self._skip(index, "empty_caption")
        reinforced: dict[str, Any] = {}
        stored_view = None
        if self.train:
            rng = self.example_rng(epoch, index)
            # Drawn under both choices, so that the crop does not depend on caption_choice.
            pick = int(rng.integers(len(captions))) if captions else 0
            caption_index = pick if self.caption_choice == "random" else 0
            if self.reinforcement is not None:
                # Their own stream, so that reinforcement changes no crop or caption draw.
                extra_rng = np.random.default_rng([self.seed, 3, epoch, index])
                outcome = self._reinforced_fields(index, record, captions, caption_index, extra_rng)
                if isinstance(outcome, SkippedRecord):
                    return outcome
                reinforced, stored_view = outcome
        try:
            # A stored view's box is in the image's own pixels: decode at full size then.
            min_side = self.decode_min_side if stored_view is None else None
            image = transforms.decode_to_pil(image_data, min_side=min_side)
        except transforms.CorruptImageError as error:
            return self._skip(index, "corrupt_image", str(error))
        if self.train:
            caption = captions[caption_index] if captions else ""
            if stored_view is not None:
                if not transforms.box_inside(stored_view, image.height, image.width):
                    return self._skip(index, "bad_reinforcement", f"box {stored_view} outside")
                pixels = transforms.crop_and_resize(image, stored_view, self.image_size)
            else:
                pixels = transforms.random_resized_crop(
                    image, self.image_size, rng, self.crop_scale, self.crop_ratio
                )
                # Drawn after the crop, so that enabling flips changes no crop.
                if self.horizontal_flip and rng.random() < 0.5:
                    pixels = np.ascontiguousarray(pixels[:, ::-1])
        else:
            caption = captions[0] if captions else ""
            pixels = transforms.resize_center_crop(image, self.image_size)
        example = {"image": pixels, "index": np.int64(index)}
        if self.tokenizer is not None:
            example["text"] = _tokens(self.tokenizer, [caption])[0]
        if self.caption_fields is not None:
            example.update(self.caption_fields(caption))
        if "synthetic_caption" in reinforced:
            synthetic_caption = reinforced.pop("synthetic_caption")
            example["synthetic_text"] = _tokens(self.tokenizer, [synthetic_caption])[0]
        example.update(reinforced)
        if self.example_extras is not None:
            # Their own stream, so that adding them changes no crop or caption draw.
            example.update(self.example_extras(np.random.default_rng([self.seed, 2, epoch, index])))
        if "label" in record:
            example["label"] = np.int32(record["label"])
        if not self.train and self.num_eval_captions > 0:
            kept = captions[: self.num_eval_captions]
            tokens = _tokens(self.tokenizer, kept)
            all_text = np.zeros((self.num_eval_captions, tokens.shape[1]), np.int32)
            all_text[: len(kept)] = tokens
            example["all_text"] = all_text
            example["all_text_valid"] = np.arange(self.num_eval_captions) < len(kept)
        return example

    def _reinforced_fields(
        self,
        index: int,
        record: Mapping[str, Any],
        captions: list[str],
        caption_index: int,
        rng: np.random.Generator,
    ) -> tuple[dict[str, Any], tuple[int, ...] | None] | SkippedRecord:
        """``(fields, stored view box or None)`` of :class:`Reinforcement`, or a skip; the
        chosen synthetic caption is ``fields["synthetic_caption"]`` (tokenised by the caller)."""
        if "malformed_reinforcement" in record:
            return self._skip(index, "bad_reinforcement", record["malformed_reinforcement"])
        fields: dict[str, Any] = {}
        synthetic = caption_list(record.get("synthetic_captions"))
        if self.reinforcement.synthetic_captions:
            if not synthetic:
                return self._skip(index, "no_synthetic_caption")
            synthetic_index = int(rng.integers(len(synthetic)))
            fields["synthetic_caption"] = synthetic[synthetic_index]
        if not self.reinforcement.teacher_embeddings:
            return fields, None
        if "teacher_image_embeddings" not in record:
            return self._skip(index, "bad_reinforcement", "no stored teacher embeddings")
        images = np.asarray(record["teacher_image_embeddings"], np.float32)
        texts = np.asarray(record["teacher_text_embeddings"], np.float32)
        if texts.shape[0] != len(captions) + len(synthetic) or images.ndim != 2:
            return self._skip(
                index,
                "bad_reinforcement",
                f"{texts.shape[0]} teacher text embeddings for {len(captions)} real and "
                f"{len(synthetic)} synthetic captions",
            )
        view = int(rng.integers(images.shape[0]))
        fields["teacher_image"] = images[view]
        fields["teacher_text"] = texts[caption_index]
        if self.reinforcement.synthetic_captions:
            fields["teacher_synthetic_text"] = texts[len(captions) + synthetic_index]
        boxes = record.get("augmentation_boxes")
        if boxes is None:
            return fields, None
        boxes = np.asarray(boxes)
        if boxes.shape != (images.shape[0], 4):
            return self._skip(
                index, "bad_reinforcement", f"{boxes.shape} boxes for {images.shape[0]} views"
            )
        return fields, tuple(int(v) for v in boxes[view])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_skips_logged"] = 0
        return state


# ----------------------------------------------------------------------------- skip-counting batch


def _padding_rows(template: Mapping[str, tuple[tuple[int, ...], np.dtype]], rows: int) -> dict:
    padding = {name: np.zeros((rows, *shape), dtype) for name, (shape, dtype) in template.items()}
    if "index" in padding:
        padding["index"][:] = -1
    return padding


def _stack(
    examples: Sequence[Mapping[str, np.ndarray]],
    template: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    batch_size: int,
    skipped: int,
) -> dict[str, Any]:
    rows = len(examples)
    if rows == batch_size:
        batch = {name: np.stack([example[name] for example in examples]) for name in template}
    else:  # the last batch of a pass: padding rows, then the examples written over the first ones
        batch = _padding_rows(template, batch_size)
        for row, example in enumerate(examples):
            for name in template:
                batch[name][row] = example[name]
    batch["valid"] = np.arange(batch_size) < rows
    batch["skipped"] = skipped
    return batch


class _SkipCountingBatchIterator(grain.DatasetIterator):
    """Fills each batch with good examples, counting the ``SkippedRecord`` s met on the way.

    Its state is its parent's: nothing is buffered between batches, so restoring the parent's
    position restores this iterator exactly.
    """

    def __init__(
        self,
        parent: grain.DatasetIterator,
        batch_size: int,
        drop_remainder: bool,
        max_consecutive_skips: int,
    ):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._max_consecutive_skips = max_consecutive_skips
        self._template: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None

    def __next__(self) -> dict[str, Any]:
        examples: list[Mapping[str, np.ndarray]] = []
        skipped = consecutive_skips = 0
        reasons: dict[str, int] = {}
        while len(examples) < self._batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                can_pad = examples or (skipped and self._template is not None)
                if self._drop_remainder or not can_pad:
                    raise
                break
            if isinstance(element, SkippedRecord):
                skipped += 1
                consecutive_skips += 1
                reasons[element.reason] = reasons.get(element.reason, 0) + 1
                if consecutive_skips > self._max_consecutive_skips:
                    raise RuntimeError(
                        f"{consecutive_skips} records in a row were skipped ({reasons}): "
                        "the data or the source's record format is wrong."
                    )
                continue
            consecutive_skips = 0
            if self._template is None:
                self._template = {
                    name: (np.shape(value), np.asarray(value).dtype)
                    for name, value in element.items()
                }
            examples.append(element)
        return _stack(examples, self._template, self._batch_size, skipped)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return f"SkipCountingBatchIterator(batch_size={self._batch_size})"


class SkipCountingBatchIterDataset(grain.IterDataset):
    """Batches dict examples, dropping ``SkippedRecord`` elements and counting them per batch.

    Each batch has ``batch_size`` rows, a bool ``valid`` (False on padding rows) and ``skipped``
    (int: records skipped since the previous batch). ``drop_remainder=False`` pads the last batch.
    ``max_consecutive_skips`` stops a run whose data is all bad instead of letting it spin.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        batch_size: int,
        *,
        drop_remainder: bool = True,
        max_consecutive_skips: int = 10_000,
    ):
        super().__init__(parent)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._max_consecutive_skips = max_consecutive_skips

    def __iter__(self) -> _SkipCountingBatchIterator:
        return _SkipCountingBatchIterator(
            self._parent.__iter__(),
            self._batch_size,
            self._drop_remainder,
            self._max_consecutive_skips,
        )

    def __str__(self) -> str:
        return f"SkipCountingBatchIterDataset(batch_size={self._batch_size})"


# ----------------------------------------------------------------------------- the pipeline


def _with_source_index(index: int, record: Any, *, num_records: int) -> tuple[int, Any]:
    # Past the first epoch grain addresses the source with epoch * num_records + index.
    return index % num_records, record


def _with_epoch(position: int, item: tuple[int, Any], *, records_per_epoch: int):
    return (position // records_per_epoch, *item)


def _with_epoch_zero(item: tuple[int, Any]) -> tuple[int, int, Any]:
    return (0, *item)


def shuffle_seed(seed: int) -> int:
    """The 32-bit seed of grain's shuffle, derived from the run's seed (a separate stream)."""
    return int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])


def process_block(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
    """``[start, stop)`` of process ``process_index``'s contiguous evaluation block."""
    return (
        process_index * num_records // process_count,
        (process_index + 1) * num_records // process_count,
    )


def _ignore_termination_signal(worker_index: int, worker_count: int) -> None:
    """Workers outlive a SIGTERM sent to the whole process group (SLURM, Kubernetes), so that
    the main process can still read the batches it needs and save its preemption checkpoint;
    grain stops them when the iterator is closed."""
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside an absl app (tests, notebooks) they are
    # unparsed and reading them raises, so take the defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def image_text_dataset(
    source: Any,
    *,
    batch_size_per_process: int,
    seed: int,
    train: bool,
    image_size: int,
    tokenizer: Tokenizer | None,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    caption_choice: str = "random",
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    drop_remainder: bool = True,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0),
    num_eval_captions: int = 0,
    fast_decode: bool = True,
    read_options: grain.ReadOptions | None = None,
    max_consecutive_skips: int = 10_000,
    example_extras: ExampleExtras | None = None,
    caption_fields: CaptionFields | None = None,
    horizontal_flip: bool = False,
    reinforcement: Reinforcement | None = None,
) -> grain.IterDataset:
    """The per-process image-text batch stream; see the module docstring for order and fields.

    Args:
      source: random-access source of raw or decoded records (see :func:`image_and_captions`).
      batch_size_per_process: rows per batch on this process (the global batch / process count).
      seed: non-negative run seed: fixes the shuffle (training) and every augmentation.
      train: shuffled, repeated, randomly cropped (True) or one in-order pass, centre crop (False).
      image_size: output height and width.
      tokenizer: picklable callable, list of str -> int array ``(n, context_length)``; None
        for image-only streams (no ``text``, captions not required).
      process_index, process_count: this process's share of the data (``jax.process_index()``...).
      num_epochs: training epochs (None: forever); ignored in evaluation (one pass).
      caption_choice: training caption: 'random' (uniform, seeded) or 'first'.
      worker_count: grain worker processes (``mp_prefetch``); 0 reads in threads of this process.
      worker_buffer_size: batches buffered per worker.
      drop_remainder: drop (True) or pad (False, with ``valid``) the last partial batch.
      crop_scale, crop_ratio: RandomResizedCrop's area-fraction and aspect-ratio ranges.
      num_eval_captions: evaluation only: keep the first K captions' tokens as ``all_text``.
      fast_decode: training only: decode JPEGs at reduced scale when the crop keeps its resolution.
      read_options: grain reader threads / buffer of each process (grain's defaults if None).
      max_consecutive_skips: raise when this many records in a row are bad.
      example_extras: picklable callable adding fields to each example from its own RNG
        (deterministic per seed, epoch and record), e.g. token masks.
      caption_fields: picklable callable adding fields made from the chosen caption (e.g.
        CatLIP's multi-hot labels); with it, records without a caption are skipped as with a
        tokenizer.
      horizontal_flip: training only: mirror half of the crops (seeded per record and epoch).
      reinforcement: training only: the reinforced-training fields to add (synthetic caption
        tokens, stored teacher embeddings; see :class:`Reinforcement`); records without them are
        skipped and counted (``no_synthetic_caption``, ``bad_reinforcement``).
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if caption_choice not in CAPTION_CHOICES:
        raise ValueError(f"caption_choice must be one of {CAPTION_CHOICES}, got {caption_choice!r}")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    num_records = len(source)
    if num_records == 0:
        raise ValueError("The source is empty")

    records = grain.MapDataset.source(source).map_with_index(
        functools.partial(_with_source_index, num_records=num_records)
    )
    if train:
        records = records.shuffle(seed=shuffle_seed(seed)).repeat(num_epochs)
        records = records.map_with_index(
            functools.partial(_with_epoch, records_per_epoch=num_records)
        )
        records = records[process_index::process_count]
    else:
        start, stop = process_block(num_records, process_index, process_count)
        records = records[start:stop].map(_with_epoch_zero)

    make_example = ExampleMaker(
        train=train,
        image_size=image_size,
        tokenizer=tokenizer,
        seed=seed,
        caption_choice=caption_choice,
        crop_scale=crop_scale,
        crop_ratio=crop_ratio,
        fast_decode=fast_decode,
        num_eval_captions=num_eval_captions,
        example_extras=example_extras,
        caption_fields=caption_fields,
        horizontal_flip=horizontal_flip,
        reinforcement=reinforcement,
    )
    examples = records.map(make_example).to_iter_dataset(read_options or grain.ReadOptions())
    batches = SkipCountingBatchIterDataset(
        examples,
        batch_size_per_process,
        drop_remainder=drop_remainder,
        max_consecutive_skips=max_consecutive_skips,
    )
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            ),
            worker_init_fn=_ignore_termination_signal,
        )
    return batches
