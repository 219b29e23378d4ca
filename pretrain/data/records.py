"""What the pipeline reads from a record (the mapping a source's ``[i]`` returns).

A record is raw (``WebDatasetSource``: ``image_bytes`` + ``captions``) or decoded (a TFDS data
source: an ``image`` array + ``captions``); :func:`image_and_captions` is the one place that
reads either. A record may also carry its stored reinforcements, the fields named below:
DataCompDR-style shards keep them beside each sample, and reinforced training reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

SYNTHETIC_CAPTIONS = "synthetic_captions"  # captioner-written captions: list of str
TEACHER_IMAGE_EMBEDDINGS = "teacher_image_embeddings"  # (A, D): of A stored views of the image
TEACHER_TEXT_EMBEDDINGS = "teacher_text_embeddings"  # (T, D): real, then synthetic, captions
AUGMENTATION_BOXES = "augmentation_boxes"  # (A, 4): each stored view's crop (top, left, h, w)
MALFORMED_REINFORCEMENT = "malformed_reinforcement"  # why the reinforcements could not be read


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


def has_image(image: Any) -> bool:
    """Whether the image :func:`image_and_captions` read is there (not None, not empty bytes)."""
    return not (image is None or (isinstance(image, bytes | bytearray) and len(image) == 0))
