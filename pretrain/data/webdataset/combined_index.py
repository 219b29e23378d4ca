"""The index of all shards: one folder of memory-mapped ``.npy`` files, built once and shared.

Every process memory-maps the folder (``np.load(mmap_mode="r")``): the pages sit once in the OS
page cache, shared by the host's process and its grain workers, and pickling a source sends only
the folder's path; start-up memory is bounded by a few in-flight per-shard indexes. Per sample:
``key_offsets`` (int64, n + 1 entries) and ``key_bytes`` (the UTF-8 keys end to end), twelve
``<slot>_offset/_size`` arrays (int32 when every shard is under 2 GiB, else int64) and, per
shard, ``shard_starts`` (int64, shards + 1 entries): ~65 bytes for DataComp's 9-character keys
(1B samples ~65 GB), which should fit in free RAM for fast random access; each extra member
slot (:class:`~pretrain.data.webdataset.shard_index.IndexLayout`) adds 8 bytes. ``index.json``,
written last, lists the slots, the shards' fingerprints and damage.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np

from pretrain.data.webdataset.shard_index import INDEX_FORMAT_VERSION, SLOTS

_META_FILE = "index.json"
_KEY_AND_SHARD_ARRAYS = ("key_offsets", "key_bytes", "shard_starts")


def per_sample_arrays(slots: Sequence[str] = SLOTS) -> tuple[str, ...]:
    """The per-sample arrays of an index over ``slots``: an offset and a size per slot."""
    return tuple(f"{slot}_{part}" for slot in slots for part in ("offset", "size"))


_logger = logging.getLogger(__name__)


def shard_fingerprints(paths: Sequence[str]) -> list[list[Any]]:
    """``[absolute path, size, mtime_ns]`` per shard; a missing shard is a configuration error."""
    fingerprints = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise FileNotFoundError(
                f"webdataset shard {path!r} cannot be opened ({error.strerror}); check the "
                "shards pattern"
            ) from error
        fingerprints.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return fingerprints


def combined_index_name(fingerprints: Sequence[Sequence[Any]], slots: Sequence[str] = SLOTS) -> str:
    """Directory name of a combined index: a hash of the format version, the shard fingerprints
    and (beyond the default ones) the slots."""
    key: list[Any] = [INDEX_FORMAT_VERSION, list(map(list, fingerprints))]
    if tuple(slots) != SLOTS:
        key.append(list(slots))
    text = json.dumps(key)
    return f"webdataset-index-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


class _NpyAppender:
    """Writes a 1-D .npy file by appending chunks, so no whole array is ever held in memory.

    The header is written first with length 0 and rewritten at the end: NumPy pads 1-D headers
    so that any length up to 21 digits fits in the same number of bytes.
    """

    def __init__(self, path: str, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self._header_size = self._write_header()

    def _write_header(self) -> int:
        header = {"descr": self.dtype.str, "fortran_order": False, "shape": (self.count,)}
        np.lib.format.write_array_header_1_0(self._file, header)
        return self._file.tell()

    def append(self, values: np.ndarray) -> None:
        if values.size and np.issubdtype(self.dtype, np.integer):
            limits = np.iinfo(self.dtype)
            if values.min() < limits.min or values.max() > limits.max:
                raise OverflowError(f"{self._file.name}: values do not fit {self.dtype}")
        self._file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.count += len(values)

    def finish(self) -> None:
        self._file.seek(0)
        if self._write_header() != self._header_size:
            raise RuntimeError(f"{self._file.name}: the .npy header changed size")
        self._file.close()


def ordered_shard_indexes(
    paths: Sequence[str], build: Callable[[str], dict[str, np.ndarray]], threads: int
) -> Iterator[dict[str, np.ndarray]]:
    """Per-shard indexes in shard order, built by ``threads`` threads, few held at a time."""
    with futures.ThreadPoolExecutor(threads) as pool:
        remaining = iter(paths)
        pending = collections.deque(
            pool.submit(build, p) for p in itertools.islice(remaining, 2 * threads)
        )
        try:
            while pending:
                index = pending.popleft().result()
                for path in itertools.islice(remaining, 1):
                    pending.append(pool.submit(build, path))
                yield index
        finally:  # an error (or a strict abort) does not wait for the shards still queued
            for future in pending:
                future.cancel()


def write_combined_index(
    directory: str,
    shards: Sequence[str],
    shard_indexes: Iterable[Mapping[str, np.ndarray]],
    fingerprints: Sequence[Sequence[Any]],
    slots: Sequence[str] = SLOTS,
) -> dict[str, Any]:
    """Writes the per-shard indexes, in shard order, as one memory-mappable index; returns its meta.

    ``fingerprints`` (from :func:`shard_fingerprints`) bound the offsets, which picks their dtype;
    ``slots`` are the per-shard indexes' slots.
    """
    slot_arrays = per_sample_arrays(slots)
    largest_shard = max((size for _, size, _ in fingerprints), default=0)
    offset_dtype = np.int32 if largest_shard < 2**31 else np.int64
    writers = {
        name: _NpyAppender(os.path.join(directory, f"{name}.npy"), offset_dtype)
        for name in slot_arrays
    }
    writers["key_bytes"] = _NpyAppender(os.path.join(directory, "key_bytes.npy"), np.uint8)
    writers["key_offsets"] = _NpyAppender(os.path.join(directory, "key_offsets.npy"), np.int64)
    writers["key_offsets"].append(np.zeros(1, np.int64))
    shard_starts, damaged = [0], []
    for shard, index in zip(shards, shard_indexes, strict=True):
        keys = index["keys"].tolist()
        key_ends = writers["key_bytes"].count + np.cumsum(
            [len(key) for key in keys], dtype=np.int64
        )
        writers["key_offsets"].append(key_ends)
        writers["key_bytes"].append(np.frombuffer(b"".join(keys), np.uint8))
        for name in slot_arrays:
            writers[name].append(index[name])
        shard_starts.append(shard_starts[-1] + len(keys))
        if str(index["damage"]):
            damaged.append(
                {"shard": shard, "damage": str(index["damage"]), "corrupt": bool(index["corrupt"])}
            )
    for writer in writers.values():
        writer.finish()
    np.save(os.path.join(directory, "shard_starts.npy"), np.array(shard_starts, np.int64))
    meta = {
        "format": INDEX_FORMAT_VERSION,
        "slots": list(slots),
        "num_samples": shard_starts[-1],
        "fingerprints": [list(f) for f in fingerprints],
        "damaged": damaged,
    }
    # Written last, to a temporary name: a directory with this file is a complete index.
    temporary = os.path.join(directory, f".{_META_FILE}.tmp")
    with open(temporary, "w") as file:
        json.dump(meta, file)
    os.replace(temporary, os.path.join(directory, _META_FILE))
    return meta


def open_combined_index(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a combined index; the arrays are read-only views of memory maps.

    Raises ``OSError`` / ``ValueError`` when files are missing or their lengths disagree.
    """
    with open(os.path.join(directory, _META_FILE)) as file:
        meta = json.load(file)
    slot_arrays = per_sample_arrays(meta["slots"])
    # Plain ndarray views of the maps (``.base`` is the np.memmap): indexing them skips the
    # np.memmap subclass machinery, a third of the time of a record lookup.
    arrays = {
        name: np.asarray(
            np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r", allow_pickle=False)
        )
        for name in (*_KEY_AND_SHARD_ARRAYS, *slot_arrays)
    }
    count = meta["num_samples"]
    expected = {name: count for name in slot_arrays}
    expected.update(
        key_offsets=count + 1,
        key_bytes=int(arrays["key_offsets"][-1]),
        shard_starts=len(meta["fingerprints"]) + 1,
    )
    for name, length in expected.items():
        if arrays[name].shape != (length,):
            raise ValueError(f"{directory}: {name} has shape {arrays[name].shape}, not ({length},)")
    return meta, arrays


def _reusable_index(
    directory: str, fingerprints: Sequence[Sequence[Any]], slots: Sequence[str] = SLOTS
) -> bool:
    if not os.path.exists(os.path.join(directory, _META_FILE)):
        return False
    try:
        meta, _ = open_combined_index(directory)
    except (OSError, ValueError, KeyError) as error:  # a damaged cache is rebuilt
        _logger.warning("Ignoring unreadable combined index %s: %s", directory, error)
        return False
    return (
        meta["format"] == INDEX_FORMAT_VERSION
        and meta["slots"] == list(slots)
        and meta["fingerprints"] == [list(f) for f in fingerprints]
    )


def _publish(
    building: str, final: str, fingerprints: Sequence[Sequence[Any]], slots: Sequence[str] = SLOTS
) -> None:
    """Renames a finished index into place (atomic); a valid one already there is kept."""
    try:
        os.rename(building, final)
        return
    except OSError:  # ``final`` exists: another process won the race, or a damaged copy is there
        if _reusable_index(final, fingerprints, slots):
            return
    stale = f"{final}.stale{os.getpid()}.{threading.get_ident()}"
    os.rename(final, stale)
    os.rename(building, final)
    shutil.rmtree(stale, ignore_errors=True)


def _remove_if_owner(directory: str, owner_pid: int) -> None:
    # Forked children (grain workers) inherit this finalizer: only the creating process removes.
    if os.getpid() == owner_pid:
        shutil.rmtree(directory, ignore_errors=True)


def cached_index_dir(
    cache_dir: str,
    fingerprints: Sequence[Sequence[Any]],
    write: Callable[[str], None],
    slots: Sequence[str] = SLOTS,
) -> str:
    """The combined index of these shards (over ``slots``) in ``cache_dir``: reused while the
    shards are unchanged, else made with ``write(folder)``."""
    final = os.path.join(cache_dir, combined_index_name(fingerprints, slots))
    if _reusable_index(final, fingerprints, slots):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    # Built under a private name and renamed: readers never see a half-written index.
    building = tempfile.mkdtemp(prefix=".building-", dir=cache_dir)
    try:
        write(building)
        _publish(building, final, fingerprints, slots)
    finally:
        shutil.rmtree(building, ignore_errors=True)  # already gone after a rename
    return final


def private_index_dir(owner: object, write: Callable[[str], None]) -> str:
    """A temporary folder (under ``$TMPDIR``) made with ``write(folder)`` and removed when
    ``owner`` is collected or at exit; put ``index_cache_dir`` on a local disk instead when
    ``$TMPDIR`` is a RAM-backed tmpfs."""
    directory = tempfile.mkdtemp(prefix="webdataset-index-")
    weakref.finalize(owner, _remove_if_owner, directory, os.getpid())
    write(directory)
    return directory
