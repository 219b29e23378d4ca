"""``WebDatasetSource``: random access to the samples of webdataset / DataComp tar shards.

The tar headers of every shard are scanned once (payloads are jumped over, nothing is
decompressed) into an index of where each sample's members lie; ``source[i]`` then reads those
bytes with positional reads (``os.pread``), so grain can read any sample in any order and
shuffle the whole set. Shards must be local files or a mounted bucket (e.g. gcsfuse).

A sample's captions (the layouts of img2dataset, DataComp, LAION, CC3M/CC12M, COCO-style sets)
come from ``txt`` (``txt_captions='lines'``: each non-blank line is a caption; ``'single'``: the
whole text is one), then from its ``json`` metadata's fields ``json_caption_fields`` (each a
string or a list of strings); exact duplicates are dropped (img2dataset writes the same caption to
both). Records are returned raw, decoded and augmented by the pipeline.

Damaged input is skipped, not fatal: a shard with a damaged tar header keeps the samples before the
damage, a shard cut short keeps its whole members; both are logged and listed in
``damaged_shards``. A missing shard raises at start-up: that is a configuration error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pretrain.data import records
from pretrain.data.webdataset import combined_index, datacompdr
from pretrain.data.webdataset.handles import FileHandles
from pretrain.data.webdataset.shard_index import (
    MISSING,
    IndexLayout,
    load_or_build_shard_index,
)
from pretrain.data.webdataset.shards import resolve_shards
from pretrain.data.webdataset.tar import CorruptShardError

DEFAULT_JSON_CAPTION_FIELDS = ("captions", "caption")

_logger = logging.getLogger(__name__)


def parse_captions(
    text: bytes | None,
    metadata: Mapping[str, Any],
    *,
    txt_captions: str = "lines",
    json_caption_fields: Sequence[str] = DEFAULT_JSON_CAPTION_FIELDS,
) -> list[str]:
    """Captions of one sample: from the ``txt`` payload, then the JSON fields; no duplicates."""
    captions: list[str] = []
    if text is not None:
        decoded = text.decode("utf-8", "replace")
        captions.extend(decoded.splitlines() if txt_captions == "lines" else [decoded])
    for field in json_caption_fields:
        value = metadata.get(field)
        if isinstance(value, str):
            captions.append(value)
        elif isinstance(value, list):
            captions.extend(item for item in value if isinstance(item, str))
    stripped = (caption.strip() for caption in captions)
    return list(dict.fromkeys(caption for caption in stripped if caption))


def _parse_metadata(payload: bytes | None) -> dict[str, Any]:
    if payload is None:
        return {}
    try:
        metadata = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return {}
    return metadata if isinstance(metadata, dict) else {"value": metadata}


class WebDatasetSource:
    """Grain random-access source over webdataset tar shards: ``len(source)``, ``source[i]``.

    Args:
      shards: paths, brace patterns (``"data/{00000..00099}.tar"``), globs, a ``::``-joined string.
      txt_captions: ``'lines'`` (each non-blank line of ``.txt`` is a caption) or ``'single'``.
      json_caption_fields: JSON fields whose string / list-of-strings values are captions too.
      index_cache_dir: if set, the per-shard indexes (keyed by the shard's path) and the combined,
        memory-mapped index (keyed by a hash of the shard list and fingerprints) are kept there
        and reused by later runs; else the combined index is written to a private temporary
        directory that is removed when this source is collected or at exit.
      cache_index_next_to_shards: if True, cache each index as ``<shard>.index.npz`` beside it.
      index_threads: shards indexed concurrently (I/O bound: helps on network file systems).
      max_open_files: descriptors kept open per process (least recently used ones are closed).
      strict: if True, a shard with a damaged tar header raises :class:`CorruptShardError`; by
        default its samples before the damage are kept, a warning names it and
        ``damaged_shards`` lists it (shards cut short are always kept and listed).
      read_reinforcements: if True, records also carry their stored reinforcements, the
        DataCompDR members (see :mod:`~pretrain.data.webdataset.datacompdr`): the record fields
        named in :mod:`pretrain.data.records`, present when the sample has the member, or
        ``malformed_reinforcement`` (a message) when one cannot be parsed; off, they are not read.
      read_members: further members (full extensions, e.g. the dense label members
        ``"seg.png"``, ``"depth.png"``: pseudo-labelled shards) whose raw bytes records carry
        under their own names (None when a sample lacks one); indexed only when asked for.

    A missing or unreadable shard raises ``FileNotFoundError`` at construction (a configuration
    error). A cached index is reused only while the shards' sizes and modification times are
    unchanged. Records are dicts ``key`` (str), ``image_bytes`` (bytes, or None without an image
    member), ``captions`` (list[str], stripped, blank ones dropped), ``metadata`` (dict from
    ``.json``, ``{}`` if absent/invalid), and the reinforcements when read.

    Attributes:
      shards: the resolved shard paths.
      damaged_shards: shards whose scan stopped early (damaged header or cut short).
      index_dir: the directory of the memory-mapped combined index.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        txt_captions: str = "lines",
        json_caption_fields: Sequence[str] = DEFAULT_JSON_CAPTION_FIELDS,
        index_cache_dir: str | None = None,
        cache_index_next_to_shards: bool = False,
        index_threads: int = 16,
        max_open_files: int = 128,
        strict: bool = False,
        read_reinforcements: bool = False,
        read_members: Sequence[str] = (),
    ):
        if txt_captions not in ("lines", "single"):
            raise ValueError(f"txt_captions must be 'lines' or 'single', got {txt_captions!r}")
        if isinstance(json_caption_fields, str):
            raise TypeError(
                f"json_caption_fields must be a sequence of names, got {json_caption_fields!r}"
            )
        self.shards = resolve_shards(shards)
        self.txt_captions = txt_captions
        self.json_caption_fields = tuple(json_caption_fields)
        self.max_open_files = max_open_files
        self.strict = strict
        self.read_reinforcements = read_reinforcements
        layout = IndexLayout(tuple(read_members))
        self.read_members = layout.extra_members
        fingerprints = combined_index.shard_fingerprints(self.shards)

        def shard_index(path: str) -> dict[str, np.ndarray]:
            index = load_or_build_shard_index(
                path,
                cache_dir=index_cache_dir,
                cache_next_to_shard=cache_index_next_to_shards,
                layout=layout,
            )
            if strict and bool(index["corrupt"]):  # stop before scanning the other shards
                raise CorruptShardError(str(index["damage"]))
            return index

        def write(directory: str) -> None:
            threads = max(1, min(index_threads, len(self.shards)))
            per_shard = combined_index.ordered_shard_indexes(self.shards, shard_index, threads)
            combined_index.write_combined_index(
                directory, self.shards, per_shard, fingerprints, layout.slots
            )

        if index_cache_dir:
            self.index_dir = combined_index.cached_index_dir(
                index_cache_dir, fingerprints, write, layout.slots
            )
        else:
            self.index_dir = combined_index.private_index_dir(self, write)
        meta, self._index = combined_index.open_combined_index(self.index_dir)
        self._check_damage(meta["damaged"])
        self.damaged_shards = [record["shard"] for record in meta["damaged"]]
        self._num_samples = int(meta["num_samples"])
        if self._num_samples == 0:
            raise ValueError(
                f"No samples in {len(self.shards)} shards ({len(self.damaged_shards)} damaged), "
                f"e.g. {self.shards[0]!r}"
            )
        self._handles = FileHandles(self.shards, self.max_open_files)

    def _check_damage(self, damaged: Sequence[Mapping[str, Any]]) -> None:
        if self.strict:
            for record in damaged:
                if record["corrupt"]:
                    raise CorruptShardError(record["damage"])
        shown = 10  # a broken bucket should not flood the log
        for record in damaged[:shown]:
            _logger.warning(
                "Damaged shard %s: %s; its samples before the damage are kept",
                record["shard"],
                record["damage"],
            )
        if len(damaged) > shown:
            _logger.warning(
                "%d more damaged shards (see source.damaged_shards)", len(damaged) - shown
            )

    def __len__(self) -> int:
        return self._num_samples

    def __repr__(self) -> str:
        damaged = f", {len(self.damaged_shards)} damaged" if self.damaged_shards else ""
        return f"WebDatasetSource({len(self.shards)} shards{damaged}, {len(self)} samples)"

    def _shard_of(self, index: int) -> int:
        # Empty shards repeat a start; side="right" skips them to the shard that holds ``index``.
        return int(np.searchsorted(self._index["shard_starts"], index, side="right")) - 1

    def key(self, index: int) -> str:
        """The sample key of record ``index`` (in ``0 .. len - 1``)."""
        start, end = self._index["key_offsets"][index : index + 2]
        return self._index["key_bytes"][start:end].tobytes().decode("utf-8", "surrogateescape")

    def _payload(self, slot: str, index: int, shard: int) -> bytes | None:
        offset = int(self._index[f"{slot}_offset"][index])
        if offset == MISSING:
            return None
        return self._handles.read(shard, offset, int(self._index[f"{slot}_size"][index]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        shard = self._shard_of(index)
        metadata = _parse_metadata(self._payload("metadata", index, shard))
        captions = parse_captions(
            self._payload("text", index, shard),
            metadata,
            txt_captions=self.txt_captions,
            json_caption_fields=self.json_caption_fields,
        )
        record = {
            "key": self.key(index),
            "image_bytes": self._payload("image", index, shard),
            "captions": captions,
            "metadata": metadata,
        }
        for member in self.read_members:
            record[member] = self._payload(member, index, shard)
        if not self.read_reinforcements:  # plain training: no npz parsing on the hot path
            return record
        try:
            record.update(
                datacompdr.read_reinforcements(lambda slot: self._payload(slot, index, shard))
            )
        except datacompdr.MalformedReinforcementError as error:
            # Not fatal here: only reinforced training needs these; it skips and counts them.
            record[records.MALFORMED_REINFORCEMENT] = f"{record['key']}: {error}"
        return record

    def __getstate__(self) -> dict[str, Any]:
        # Only paths travel into grain worker processes: they memory-map the same index files
        # (shared page cache) and reopen shard descriptors lazily.
        state = self.__dict__.copy()
        del state["_handles"], state["_index"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _, self._index = combined_index.open_combined_index(self.index_dir)
        self._handles = FileHandles(self.shards, self.max_open_files)

    def close(self) -> None:
        """Closes this process's open shard files (they reopen on the next read)."""
        self._handles.close()
