"""A source record as the start of an output shard's sample, for tools that rewrite a data set
with something added (the reinforcement and pseudo-label tools).

:func:`source_sample` decodes the record's image (to compute on) and keeps what the output
sample carries over: the image's original bytes (decoded sources such as TFDS as PNG), the
captions (one line each, so that ``txt`` keeps one caption per line), the synthetic captions, and
the metadata with the record's label. :meth:`SourceSample.members` are those webdataset members.
A record the training pipeline would skip is returned as the pipeline's skip reason.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from typing import Any

import PIL.Image

from pretrain.data import examples, records, transforms

_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclasses.dataclass
class SourceSample:
    """A decoded source record and the members it keeps in an output shard."""

    key: str
    image: PIL.Image.Image
    image_payload: tuple[str, bytes]
    captions: list[str]
    synthetic_captions: list[str]
    metadata: dict[str, Any]

    def members(self) -> dict[str, Any]:
        """The webdataset members (``__key__``, the image, ``txt``, ``json``)."""
        extension, payload = self.image_payload
        return {
            "__key__": self.key,
            extension: payload,
            "txt": "\n".join(self.captions),
            "json": self.metadata,
        }


def one_line(caption: str) -> str:
    """A caption with its own line breaks (which would split it on reading) made spaces."""
    return " ".join(caption.split())


def image_payload(raw: Any, image: PIL.Image.Image) -> tuple[str, bytes]:
    """The image member (extension, bytes): the original encoded bytes when there are some."""
    if isinstance(raw, bytes | bytearray):
        format_name = PIL.Image.open(io.BytesIO(raw)).format
        if format_name in _EXTENSIONS:
            return _EXTENSIONS[format_name], bytes(raw)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def source_sample(index: int, record: Mapping[str, Any]) -> SourceSample | str:
    """The record as a :class:`SourceSample`, or the reason the pipeline skips it."""
    raw, captions = records.image_and_captions(record)
    captions = [one_line(c) for c in captions]
    if not records.has_image(raw):
        return examples.MISSING_IMAGE
    if not captions:
        return examples.EMPTY_CAPTION
    try:
        image = transforms.decode_to_pil(raw)
        payload = image_payload(raw, image)
    except transforms.CorruptImageError:
        return examples.CORRUPT_IMAGE
    metadata = dict(record.get("metadata") or {})
    if "label" in record:
        metadata["label"] = int(record["label"])
    synthetic = records.caption_list(record.get(records.SYNTHETIC_CAPTIONS))
    return SourceSample(
        key=str(record.get("key") or f"{index:09d}"),
        image=image,
        image_payload=payload,
        captions=captions,
        synthetic_captions=[one_line(c) for c in synthetic],
        metadata=metadata,
    )
