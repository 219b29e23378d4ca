"""DataCompDR's reinforcement members of a sample: parsed into record fields, and written.

* ``syn.json``: ``{"syn_text": [captions]}`` -> ``synthetic_captions``;
* ``npz``: ``image_emb`` (A, D) and ``text_emb`` (T, D), the teacher ensemble's embeddings of A
  stored views of the image and of the real then the synthetic captions ->
  ``teacher_image_embeddings`` / ``teacher_text_embeddings``;
* ``paug.json``: ``{"param_aug": [[[top, left, height, width], ops], ...]}`` (a list or its JSON
  text) -> ``augmentation_boxes`` (A, 4), the crop of each stored view (the other augmentation
  ops are not replayed).
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pretrain.data import records

SYNTHETIC_EXTENSION = "syn.json"
TEACHER_EXTENSION = "npz"
AUGMENTATION_EXTENSION = "paug.json"
# The index slot (see shard_index) of each member.
SLOTS = {
    SYNTHETIC_EXTENSION: "synthetic",
    TEACHER_EXTENSION: "teacher",
    AUGMENTATION_EXTENSION: "augmentation",
}


class MalformedReinforcementError(ValueError):
    """A sample's ``syn.json`` / ``npz`` / ``paug.json`` member cannot be parsed."""


def parse_synthetic_captions(payload: bytes) -> list[str]:
    """``syn.json`` -> its captions (``{"syn_text": [...]}``, or a bare list)."""
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as error:
        raise MalformedReinforcementError(f"syn.json is not JSON: {error}") from error
    captions = value.get("syn_text") if isinstance(value, dict) else value
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise MalformedReinforcementError("syn.json needs a list of strings under 'syn_text'")
    return captions


# NumPy parses .npy headers with ast.literal_eval, which CPython 3.11 does not make safe to run
# in several threads at once ("AST constructor recursion depth mismatch" seen with grain's reader
# threads): one header at a time.
_NPY_HEADER_LOCK = threading.Lock()


def parse_teacher_embeddings(payload: bytes) -> dict[str, np.ndarray]:
    """``npz`` -> ``teacher_image_embeddings`` (A, D) and ``teacher_text_embeddings`` (T, D)."""
    try:
        with _NPY_HEADER_LOCK, np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
            image, text = np.asarray(arrays["image_emb"]), np.asarray(arrays["text_emb"])
    except (ValueError, KeyError, OSError, EOFError) as error:
        raise MalformedReinforcementError(f"npz member unreadable: {error!r}") from error
    image, text = np.atleast_2d(image), np.atleast_2d(text)
    if image.ndim != 2 or text.ndim != 2 or image.shape[1] != text.shape[1]:
        raise MalformedReinforcementError(
            f"npz image_emb {image.shape} and text_emb {text.shape} must be (n, D) with one D"
        )
    return {records.TEACHER_IMAGE_EMBEDDINGS: image, records.TEACHER_TEXT_EMBEDDINGS: text}


def parse_augmentation_boxes(payload: bytes) -> np.ndarray:
    """``paug.json`` -> (A, 4) int64 crop boxes (top, left, height, width), one per stored view."""
    try:
        value = json.loads(payload)
        views = value["param_aug"] if isinstance(value, dict) else value
        if isinstance(views, str):  # DataCompDR stores the list as JSON text
            views = json.loads(views)
        boxes = np.array([view[0] for view in views], dtype=np.int64).reshape(len(views), 4)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as error:
        raise MalformedReinforcementError(f"paug.json unreadable: {error!r}") from error
    return boxes


def read_reinforcements(payload: Callable[[str], bytes | None]) -> dict[str, Any]:
    """The record fields of a sample's reinforcement members; ``payload(slot)`` reads a member
    (None: the sample has none, and the record lacks its fields)."""
    fields: dict[str, Any] = {}
    if (synthetic := payload(SLOTS[SYNTHETIC_EXTENSION])) is not None:
        fields[records.SYNTHETIC_CAPTIONS] = parse_synthetic_captions(synthetic)
    if (teacher := payload(SLOTS[TEACHER_EXTENSION])) is not None:
        fields.update(parse_teacher_embeddings(teacher))
    if (augmentation := payload(SLOTS[AUGMENTATION_EXTENSION])) is not None:
        fields[records.AUGMENTATION_BOXES] = parse_augmentation_boxes(augmentation)
    return fields


def reinforcement_members(
    synthetic_captions: Sequence[str],
    boxes: Sequence[Sequence[int]],
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    dtype: str,
) -> dict[str, Any]:
    """The three members of one sample, as :func:`~pretrain.data.webdataset.write_shards` takes
    them; the embeddings are stored as ``dtype``."""
    arrays = io.BytesIO()
    np.savez(
        arrays, image_emb=image_embeddings.astype(dtype), text_emb=text_embeddings.astype(dtype)
    )
    return {
        SYNTHETIC_EXTENSION: {"syn_text": list(synthetic_captions)},
        AUGMENTATION_EXTENSION: {"param_aug": [[list(box), []] for box in boxes]},
        TEACHER_EXTENSION: arrays.getvalue(),
    }
