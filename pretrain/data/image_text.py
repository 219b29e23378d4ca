"""From config to image-text data: sources (embedded scenes, tar shards, TFDS) and streams.

A source config (``config.data.train`` or an entry of ``config.eval.sets``) names its kind:
  source="synthetic_scenes"  the embedded procedural data set (built locally on first use),
                             ``scenes_config`` picks the builder config (default "base");
  source="webdataset"        DataComp-style tar shards, ``shards`` = paths / brace pattern / glob;
  source="tfds"              a prepared TFDS data set ``tfds_name`` (e.g. "coco_captions",
                             "imagenet2012"); ``image_field``, ``caption_field`` (a path such as
                             "captions/text"), ``label_field`` name its features. A set without
                             captions (classification) gets its class name as the caption.
Fields shared by all: ``split``, ``data_dir`` (TFDS data dir, empty = TFDS default).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from pretrain.data import pipeline
from pretrain.data.tokenizer import ClipTokenizer

SOURCES = ("synthetic_scenes", "webdataset", "tfds")


def make_source(source_config: Mapping[str, Any]) -> Any:
    """A random-access source (``len``, ``[i]``) for one source config."""
    kind = source_config.get("source", "")
    split = source_config.get("split", "train")
    data_dir = source_config.get("data_dir") or None
    if kind == "synthetic_scenes":
        from pretrain.data import synthetic_scenes

        return synthetic_scenes.data_source(
            split, source_config.get("scenes_config", "base"), data_dir
        )
    if kind == "webdataset":
        if not source_config.get("shards"):
            raise ValueError(
                "source 'webdataset' needs shards: e.g. "
                "--config.data.train.shards='/data/datacomp/{00000000..00001023}.tar'"
            )
        from pretrain.data.webdataset import WebDatasetSource

        return WebDatasetSource(source_config["shards"])
    if kind == "tfds":
        import tensorflow_datasets as tfds

        name = source_config.get("tfds_name")
        if not name:
            raise ValueError("source 'tfds' needs tfds_name")
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS data set {name!r} is not prepared in {builder.data_dir_root}; prepare it "
                "first (e.g. `tfds build`) or set data_dir"
            )
        return TfdsRecords(
            builder.as_data_source(split=split),
            features=builder.info.features,
            image_field=source_config.get("image_field", "image"),
            caption_field=source_config.get("caption_field", ""),
            label_field=source_config.get("label_field", "label"),
        )
    raise ValueError(f"unknown data source {kind!r}; choose from {SOURCES}")


def _field(record: Mapping[str, Any], path: str) -> Any:
    for part in path.split("/"):
        record = record[part]
    return record


class TfdsRecords:
    """A TFDS data source seen with the field names the image-text pipeline reads.

    ``caption_field``: a feature path ("captions", "captions/text"...); empty picks "captions" or
    "caption" when the data set has one; "label" (or no caption feature at all) uses the class
    name of the record's label, so classification sets serve zero-shot evaluation and
    label-as-caption training.
    """

    def __init__(
        self,
        source: Any,
        *,
        features: Any,
        image_field: str = "image",
        caption_field: str = "",
        label_field: str = "label",
    ):
        top_level = set(features.keys())
        for name, path in (("image_field", image_field), ("caption_field", caption_field)):
            if path and path != "label" and path.split("/")[0] not in top_level:
                raise ValueError(f"{name} {path!r} is not a feature of {sorted(top_level)}")
        if not caption_field:
            caption_field = next((f for f in ("captions", "caption") if f in top_level), "label")
        self._source = source
        self._image_field = image_field
        self._caption_field = caption_field
        self._label_field = label_field if label_field in top_level else ""
        self._label_names: list[str] | None = None
        if caption_field == "label":
            if not self._label_field:
                raise ValueError(f"no caption or label feature in {sorted(top_level)}")
            self._label_names = [n.replace("_", " ") for n in features[label_field].names]

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        out = {"image": _field(record, self._image_field)}
        if self._label_field:
            out["label"] = int(record[self._label_field])
        if self._label_names is not None:
            out["captions"] = [self._label_names[out["label"]]]
        else:
            out["captions"] = _field(record, self._caption_field)
        return out


def train_dataset(
    data_config: ConfigDict,
    *,
    batch_size: int,
    seed: int,
    context_length: int,
    process_index: int,
    process_count: int,
) -> Any:
    """The training stream of ``config.data``: shuffled, cropped, tokenised, per process."""
    train_config = data_config.train
    return pipeline.image_text_dataset(
        make_source(train_config),
        batch_size_per_process=batch_size,
        seed=seed,
        train=True,
        image_size=int(data_config.image_size),
        tokenizer=ClipTokenizer(context_length),
        process_index=process_index,
        process_count=process_count,
        caption_choice=train_config.get("caption_choice", "random"),
        worker_count=int(data_config.worker_count),
        worker_buffer_size=int(data_config.worker_buffer_size),
        crop_scale=tuple(data_config.random_resized_crop_scale),
        crop_ratio=tuple(data_config.random_resized_crop_ratio),
    )


def eval_batches(
    source: Any,
    *,
    image_size: int,
    context_length: int,
    batch_size: int,
    max_examples: int | None = None,
    num_captions: int = 0,
    worker_count: int = 0,
) -> Iterator[dict[str, Any]]:
    """One in-order pass of evaluation batches (every process reads the whole set).

    Yields dicts with ``image`` (n,H,W,3) uint8, ``label`` (n,) when the source has labels and,
    with ``num_captions`` > 0, ``captions``: a list of (c_i, L) token arrays, one per image.
    Padding rows of the last batch are removed here, so batches may be shorter.
    """
    if max_examples:
        source = _Prefix(source, max_examples)
    dataset = pipeline.image_text_dataset(
        source,
        batch_size_per_process=batch_size,
        seed=0,
        train=False,
        image_size=image_size,
        tokenizer=ClipTokenizer(context_length),
        drop_remainder=False,
        num_eval_captions=num_captions,
        worker_count=worker_count,
    )
    for batch in dataset:
        valid = np.asarray(batch["valid"], bool)
        if not valid.any():
            continue
        out = {"image": batch["image"][valid]}
        if "label" in batch:
            out["label"] = batch["label"][valid]
        if num_captions:
            texts, present = batch["all_text"][valid], batch["all_text_valid"][valid]
            out["captions"] = [tokens[mask] for tokens, mask in zip(texts, present)]
        yield out


class _Prefix:
    """The first ``count`` records of a source (evaluation subsets)."""

    def __init__(self, source: Any, count: int):
        self._source = source
        self._count = min(int(count), len(source))

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._source[index]
