"""The data side of reinforced training: a record's stored reinforcements -> example fields.

:class:`ReinforcementFields` is a record plug-in of the pipeline
(``pretrain.data.examples.RecordPlugin``). To each training example it adds:

* ``synthetic_text``: the tokens of one of the record's synthetic captions (uniform);
* ``teacher_image``, ``teacher_text`` (of the chosen real caption) and, with synthetic captions,
  ``teacher_synthetic_text``: float32 (D,) rows of the record's stored ``teacher_image_embeddings``
  (A, D) and ``teacher_text_embeddings`` (T, D), whose rows are the record's non-blank real
  captions, then its non-blank synthetic captions, in order.

With ``augmentation_boxes`` (A, 4) stored too, the drawn view ``a`` is also the crop: the image is
cropped with box ``a`` (not flipped), so the student sees the very view whose teacher embedding is
row ``a``. Without boxes, view ``a`` is only an embedding and the crop is the pipeline's own.
Records that lack what is asked are skipped and counted: ``no_synthetic_caption``, or
``bad_reinforcement`` (malformed members, no embeddings, rows or boxes that do not match the
record, a box outside the image).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pretrain.data import records
from pretrain.data.examples import RecordCrop, RecordFields, Skip

NO_SYNTHETIC_CAPTION, BAD_REINFORCEMENT = "no_synthetic_caption", "bad_reinforcement"


@dataclasses.dataclass(frozen=True)
class ReinforcementFields:
    """Which reinforced-training fields the training examples carry (see the module docstring):
    ``synthetic_captions`` adds ``synthetic_text``; ``teacher_embeddings`` the teacher rows."""

    synthetic_captions: bool = True
    teacher_embeddings: bool = False

    def __call__(
        self,
        record: Mapping[str, Any],
        captions: Sequence[str],
        caption_index: int,
        rng: np.random.Generator,
    ) -> RecordFields | Skip:
        if records.MALFORMED_REINFORCEMENT in record:
            return Skip(BAD_REINFORCEMENT, record[records.MALFORMED_REINFORCEMENT])
        synthetic = records.caption_list(record.get(records.SYNTHETIC_CAPTIONS))
        texts, synthetic_index = {}, None
        if self.synthetic_captions:
            if not synthetic:
                return Skip(NO_SYNTHETIC_CAPTION)
            synthetic_index = int(rng.integers(len(synthetic)))
            texts["synthetic_text"] = synthetic[synthetic_index]
        if not self.teacher_embeddings:
            return RecordFields(texts=texts)
        if records.TEACHER_IMAGE_EMBEDDINGS not in record:
            return Skip(BAD_REINFORCEMENT, "no stored teacher embeddings")
        images = np.asarray(record[records.TEACHER_IMAGE_EMBEDDINGS], np.float32)
        text_rows = np.asarray(record[records.TEACHER_TEXT_EMBEDDINGS], np.float32)
        if text_rows.shape[0] != len(captions) + len(synthetic) or images.ndim != 2:
            return Skip(
                BAD_REINFORCEMENT,
                f"{text_rows.shape[0]} teacher text embeddings for {len(captions)} real and "
                f"{len(synthetic)} synthetic captions",
            )
        view = int(rng.integers(images.shape[0]))
        fields = {"teacher_image": images[view], "teacher_text": text_rows[caption_index]}
        if synthetic_index is not None:
            fields["teacher_synthetic_text"] = text_rows[len(captions) + synthetic_index]
        crop = _stored_view_crop(record, view, num_views=images.shape[0])
        if isinstance(crop, Skip):
            return crop
        return RecordFields(fields=fields, texts=texts, crop=crop)


def _stored_view_crop(
    record: Mapping[str, Any], view: int, num_views: int
) -> RecordCrop | Skip | None:
    """The crop of stored view ``view`` (None when the record stores no boxes)."""
    boxes = record.get(records.AUGMENTATION_BOXES)
    if boxes is None:
        return None
    boxes = np.asarray(boxes)
    if boxes.shape != (num_views, 4):
        return Skip(BAD_REINFORCEMENT, f"{boxes.shape} boxes for {num_views} views")
    box = tuple(int(v) for v in boxes[view])
    return RecordCrop(box, Skip(BAD_REINFORCEMENT, f"box {box} outside"))
