"""``DenseShardSource``: random access to the dense samples of webdataset tar shards.

The shards hold the members of :mod:`pretrain.data.dense.layout` (``KEY.jpg``, ``KEY.seg.png``,
``KEY.depth.npy``...). Their headers are scanned once at construction by the webdataset
package's scanner (:func:`pretrain.data.webdataset.shard_index.index_shard` with the dense
slots); ``source[i]`` reads the members with positional reads through the shared descriptor pool.
The index (a key and one offset / size per slot and sample, ~100 bytes a sample) is kept in
memory and pickled to grain workers with the source: fine for the tens of thousands of samples
of dense sets, unlike ``WebDatasetSource``'s memory-mapped index for billions. Damaged shards
keep the samples before the damage (logged); a missing shard raises at construction.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pretrain.data.dense import layout
from pretrain.data.webdataset import combined_index, shard_index
from pretrain.data.webdataset.handles import FileHandles
from pretrain.data.webdataset.shards import resolve_shards

_logger = logging.getLogger(__name__)

_index_dense_shard = functools.partial(
    shard_index.index_shard, slot_of=layout.member_of, slots=layout.SLOTS
)


def _concatenated(indexes: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One index over all shards: keys, per-slot offsets / sizes and ``shard_starts``."""
    arrays = {
        name: np.concatenate([index[name] for index in indexes])
        for name in ("keys", *(f"{s}_{p}" for s in layout.SLOTS for p in ("offset", "size")))
    }
    arrays["shard_starts"] = np.cumsum([0, *(len(index["keys"]) for index in indexes)])
    return arrays


class DenseShardSource:
    """Grain random-access source over dense webdataset shards: ``len(source)``, ``source[i]``.

    Records are dicts as :class:`~pretrain.data.dense.folder.FolderSource` makes them: ``key``,
    ``image`` (bytes or None), the label members present (bytes) and ``depth_scale``.

    Args:
      shards: paths, brace patterns (``"data/{0000..0099}.tar"``), globs, a ``::``-joined string.
      depth_scale: ``depth.png`` holds metres x this (1000: millimetres).
      index_threads: shards scanned concurrently.
      max_open_files: descriptors kept open per process.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        depth_scale: float = layout.DEFAULT_DEPTH_SCALE,
        index_threads: int = 16,
        max_open_files: int = 128,
    ):
        self.shards = resolve_shards(shards)
        self.depth_scale = float(depth_scale)
        self.max_open_files = max_open_files
        combined_index.shard_fingerprints(self.shards)  # a missing shard fails here, by name
        threads = max(1, min(index_threads, len(self.shards)))
        indexes = list(
            combined_index.ordered_shard_indexes(self.shards, _index_dense_shard, threads)
        )
        self.damaged_shards = []
        for path, index in zip(self.shards, indexes):
            if str(index["damage"]):
                _logger.warning("Damaged shard %s: %s; earlier samples kept", path, index["damage"])
                self.damaged_shards.append(path)
        self._index = _concatenated(indexes)
        if len(self) == 0:
            raise ValueError(f"No samples in {len(self.shards)} shards, e.g. {self.shards[0]!r}")
        self._handles = FileHandles(self.shards, self.max_open_files)

    def __len__(self) -> int:
        return len(self._index["keys"])

    def __repr__(self) -> str:
        return f"DenseShardSource({len(self.shards)} shards, {len(self)} samples)"

    def key(self, index: int) -> str:
        """The sample key of record ``index``."""
        return bytes(self._index["keys"][index]).decode("utf-8", "surrogateescape")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        shard = int(np.searchsorted(self._index["shard_starts"], index, side="right")) - 1
        record: dict[str, Any] = {"key": self.key(index), layout.DEPTH_SCALE: self.depth_scale}
        for slot in layout.SLOTS:
            offset = int(self._index[f"{slot}_offset"][index])
            present = offset != shard_index.MISSING
            size = int(self._index[f"{slot}_size"][index])
            payload = self._handles.read(shard, offset, size) if present else None
            if present or slot == layout.IMAGE:  # ``image`` always there, None when absent
                record[slot] = payload
        return record

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_handles"]  # each process opens its own descriptors
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._handles = FileHandles(self.shards, self.max_open_files)

    def close(self) -> None:
        """Closes this process's open shard files (they reopen on the next read)."""
        self._handles.close()
