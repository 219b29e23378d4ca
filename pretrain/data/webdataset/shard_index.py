"""The index of one shard: where each sample's members lie, cached beside it or in a folder.

A sample's members go to slots by extension: ``image`` (the first ``jpg``, ``jpeg``, ``png`` or
``webp``, case-insensitive), ``text`` (``txt``), ``metadata`` (``json``) and DataCompDR's
reinforcement members (see :mod:`~pretrain.data.webdataset.datacompdr`); other members are
ignored unless an :class:`IndexLayout` names them (``extra_members``: each its own slot, e.g. the
dense label members of pseudo-labelled shards). Another member layout (the dense one of
:mod:`pretrain.data.dense`) indexes the same shards with its own ``slot_of`` and ``slots``
(:func:`index_shard`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np

from pretrain.data.webdataset import datacompdr
from pretrain.data.webdataset.tar import (
    CorruptShardError,
    TruncatedShardError,
    iter_tar_members,
    split_key,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSION = "txt"
METADATA_EXTENSION = "json"
SLOTS = ("image", "text", "metadata", *datacompdr.SLOTS.values())
INDEX_FORMAT_VERSION = 4  # 2: damage recorded; 3: DataCompDR members; 4: slots in the meta
MISSING = -1  # the offset and size of a member a sample does not have

_logger = logging.getLogger(__name__)


def _slot_of(extension: str) -> str | None:
    if extension in IMAGE_EXTENSIONS:
        return "image"
    if extension == TEXT_EXTENSION:
        return "text"
    if extension == METADATA_EXTENSION:
        return "metadata"
    return datacompdr.SLOTS.get(extension)


@dataclasses.dataclass(frozen=True)
class IndexLayout:
    """Which members an image-text index records: the slots of the module docstring plus
    ``extra_members`` (full extensions such as ``"seg.png"``, each indexed under its own name).
    Indexes of different layouts are cached apart; the default layout adds nothing, so that
    sources which never read other members keep their index as small as it is."""

    extra_members: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        clashing = [m for m in self.extra_members if m in SLOTS or _slot_of(m) is not None]
        if clashing or len(set(self.extra_members)) != len(self.extra_members):
            raise ValueError(f"extra members must be new and distinct, got {self.extra_members}")

    @property
    def slots(self) -> tuple[str, ...]:
        return (*SLOTS, *self.extra_members)

    @property
    def tag(self) -> str:
        """Empty for the default layout, else a short digest of the extra members (cache names)."""
        if not self.extra_members:
            return ""
        return hashlib.sha1("\n".join(self.extra_members).encode()).hexdigest()[:8]

    def slot_of(self, extension: str) -> str | None:
        return extension if extension in self.extra_members else _slot_of(extension)


IMAGE_TEXT = IndexLayout()


def index_shard(
    path: str,
    *,
    slot_of: Callable[[str], str | None] = _slot_of,
    slots: Sequence[str] = SLOTS,
) -> dict[str, np.ndarray]:
    """Groups members into samples: ``keys``, per slot ``<slot>_offset/_size`` (-1 absent).

    ``slot_of`` maps a member's extension to one of ``slots`` (None: ignored); the defaults are
    the image-text layout of the module docstring.

    Samples are ordered by the first appearance of their key; a key whose members are scattered
    through the shard is still one sample. The first member of each slot wins.
    A damaged shard keeps the samples read before the damage; ``damage`` (a 0-d string array)
    then says what happened (empty when the shard is whole) and ``corrupt`` (0-d bool) is True
    for a damaged header, False for a shard that is only cut short.
    """
    order: dict[str, int] = {}
    offsets: dict[str, list[int]] = {slot: [] for slot in slots}
    sizes: dict[str, list[int]] = {slot: [] for slot in slots}
    damage, corrupt = "", False
    members = iter_tar_members(path)
    while True:
        try:
            name, offset, size = next(members)
        except StopIteration:
            break
        except CorruptShardError as error:  # TruncatedShardError too
            damage, corrupt = str(error), not isinstance(error, TruncatedShardError)
            break
        key, extension = split_key(name)
        if not key or key.endswith("/"):  # e.g. "dir/.hidden": no sample key
            continue
        sample = order.setdefault(key, len(order))
        if sample == len(offsets[slots[0]]):
            for slot in slots:
                offsets[slot].append(MISSING)
                sizes[slot].append(MISSING)
        slot = slot_of(extension)
        if slot is not None and offsets[slot][sample] == MISSING:
            offsets[slot][sample] = offset
            sizes[slot][sample] = size
    # Keys as bytes: a quarter of the memory of NumPy's 4-byte-per-character strings.
    encoded_keys = [key.encode("utf-8", "surrogateescape") for key in order]
    index = {"keys": np.array(encoded_keys, dtype=bytes)}
    for slot in slots:
        index[f"{slot}_offset"] = np.array(offsets[slot], dtype=np.int64)
        index[f"{slot}_size"] = np.array(sizes[slot], dtype=np.int64)
    index["damage"] = np.array(damage)
    index["corrupt"] = np.array(corrupt)
    return index


def _shard_fingerprint(path: str) -> np.ndarray:
    stat = os.stat(path)
    return np.array([INDEX_FORMAT_VERSION, stat.st_size, stat.st_mtime_ns], dtype=np.int64)


def _cache_path(
    path: str, cache_dir: str | None, next_to_shard: bool, layout: IndexLayout
) -> str | None:
    suffix = f".{layout.tag}.index.npz" if layout.tag else ".index.npz"
    if next_to_shard:
        return f"{path}{suffix}"
    if cache_dir:
        digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
        return os.path.join(cache_dir, f"{os.path.basename(path)}.{digest}{suffix}")
    return None


def load_or_build_shard_index(
    path: str,
    *,
    cache_dir: str | None = None,
    cache_next_to_shard: bool = False,
    layout: IndexLayout = IMAGE_TEXT,
) -> dict[str, np.ndarray]:
    """Reads a cached index if it matches the shard's size and mtime, else scans and caches it."""
    cache = _cache_path(path, cache_dir, cache_next_to_shard, layout)
    fingerprint = _shard_fingerprint(path)
    if cache and os.path.exists(cache):
        try:
            with np.load(cache, allow_pickle=False) as stored:
                if np.array_equal(stored["fingerprint"], fingerprint):
                    return {name: stored[name] for name in stored.files if name != "fingerprint"}
        except (OSError, ValueError, KeyError) as error:  # a damaged cache is rebuilt
            _logger.warning("Ignoring unreadable index cache %s: %s", cache, error)
    index = index_shard(path, slot_of=layout.slot_of, slots=layout.slots)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        temporary = f"{cache}.tmp{os.getpid()}.{threading.get_ident()}.npz"
        np.savez(temporary, fingerprint=fingerprint, **index)
        os.replace(temporary, cache)  # atomic: concurrent hosts never read a half-written file
    return index
