"""Random-access reading of webdataset / DataComp tar shards, and a small shard writer.

A webdataset shard is an uncompressed tar file whose members are grouped into samples by key: the
member path up to the first ``.`` of its base name (``dir/000123.jpg`` and ``dir/000123.json``
form the sample ``dir/000123``; the rest of the name, ``jpg`` / ``json``, is its extension).
:class:`WebDatasetSource` scans the tar headers of every shard once (it reads the 512-byte headers
and jumps over the payloads, decompressing nothing) and keeps, per sample, where its image, text
and metadata payloads lie. ``source[i]`` then reads those bytes with positional reads
(``os.pread``), so any sample can be fetched in any order: grain can shuffle the whole set globally.

What a sample may contain (the layouts of img2dataset, DataComp, LAION, CC3M/CC12M, COCO-style
multi-caption sets):

* image: the first member with extension ``jpg``, ``jpeg``, ``png`` or ``webp`` (case-insensitive);
  a sample without one is returned with ``image_bytes=None`` (the pipeline skips and counts it);
* ``txt``: UTF-8 text. ``txt_captions='lines'`` (default) takes each non-blank line as one caption
  (so a file with one caption per line gives several); ``'single'`` takes the whole text as one;
* ``json``: metadata, returned as a dict. Captions are also taken from its fields named in
  ``json_caption_fields`` (default ``("captions", "caption")``), each a string or a list of strings.
  Captions from ``txt`` come first, then those from the JSON fields in order; exact duplicates are
  dropped (img2dataset writes the same caption to ``txt`` and to the JSON ``caption`` field).
  Malformed JSON gives ``metadata={}``.
* DataCompDR's reinforcements (MobileCLIP), read only with ``reinforcements=True``:
  ``syn.json`` (``{"syn_text": [captions]}``) gives ``synthetic_captions``; ``npz``
  (``image_emb`` (A, D), ``text_emb`` (T, D): the teacher ensemble's embeddings of A augmented
  views and of the real then the synthetic captions) gives ``teacher_image_embeddings`` /
  ``teacher_text_embeddings``; ``paug.json`` (``{"param_aug": [[[top, left, height, width],
  ops], ...]}``, a list or its JSON text) gives ``augmentation_boxes`` (A, 4), the crop of each
  stored view (other augmentation ops are not replayed). A sample without such a member simply
  lacks the field; a malformed one gets ``malformed_reinforcement`` (a message) instead
  (reinforced training skips and counts it).

Records are returned raw: ``dict(key=str, image_bytes=bytes | None, captions=list[str],
metadata=dict)``. Decoding and augmentation happen in the pipeline (:mod:`pretrain.data.pipeline`).

Scale: each process (host) scans the shards once at start-up (or reuses cached indexes) and
writes one combined index of memory-mapped ``.npy`` files, ~65 bytes per sample for DataComp-style
9-character keys and shards under 2 GiB (8 + key length + 48 bytes; 48 more if any shard is not):
12.8M samples ~0.8 GB, 1B samples ~65 GB of disk. The index is not held on the Python heap: its
pages live once in the OS page cache, shared by the process and its grain workers, and a pickled
source (what each worker receives) holds only the shard paths and the index directory. Start-up
memory is bounded by a few in-flight per-shard indexes, not by the data set's size. Random access
touches index pages all over the file, so for fast reads the index should fit in the host's free
RAM; beyond that each lookup may cost a disk read of the index besides the sample itself. Put
``index_cache_dir`` on a local disk (the default temporary directory may be a RAM-backed tmpfs).
Shards must be local files or a mounted bucket (e.g. gcsfuse): reads are ``os.pread`` calls.

Damaged input is skipped, not fatal: a shard with a damaged tar header keeps the samples before the
damage, a shard cut short keeps its whole members; both are logged and listed in
``WebDatasetSource.damaged_shards`` (``strict=True`` raises on a damaged header instead). A missing
shard raises at start-up: that is a configuration error.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSION = "txt"
METADATA_EXTENSION = "json"
SYNTHETIC_EXTENSION = "syn.json"
TEACHER_EXTENSION = "npz"
AUGMENTATION_EXTENSION = "paug.json"
DEFAULT_JSON_CAPTION_FIELDS = ("captions", "caption")

_BLOCK = 512
_INDEX_FORMAT_VERSION = 3  # 2: per-shard indexes record damage; 3: DataCompDR members
_MISSING = -1

_logger = logging.getLogger(__name__)


class MalformedReinforcementError(ValueError):
    """A sample's ``syn.json`` / ``npz`` / ``paug.json`` member cannot be parsed."""


class CorruptShardError(ValueError):
    """A shard's tar headers cannot be parsed (not a tar file, or a damaged header)."""


class TruncatedShardError(CorruptShardError):
    """A member's payload runs past the end of the shard (e.g. a partial download)."""


# ----------------------------------------------------------------------------- shard patterns

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALTERNATIVES = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expands ``{000..012}`` numeric ranges (zero padding kept) and ``{a,b}`` alternatives."""
    match = _RANGE.search(pattern)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        step = 1 if int(last) >= int(first) else -1
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [
            expanded
            for number in range(int(first), int(last) + step, step)
            for expanded in expand_braces(f"{head}{number:0{width}d}{tail}")
        ]
    match = _ALTERNATIVES.search(pattern)
    if match:
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [
            expanded
            for choice in match.group(1).split(",")
            for expanded in expand_braces(f"{head}{choice}{tail}")
        ]
    return [pattern]


def resolve_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Paths from paths, brace patterns (``a/{00000..00099}.tar``), globs, ``::``-joined lists.

    Globs are sorted; the order of everything else is kept, so the sample order is reproducible.
    """
    if isinstance(shards, str | os.PathLike):
        shards = str(shards).split("::")
    paths: list[str] = []
    for item in shards:
        for expanded in expand_braces(str(item)):
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise FileNotFoundError(f"No shard matches {expanded!r}")
                paths.extend(matches)
            else:
                paths.append(expanded)
    if not paths:
        raise ValueError(f"No shards given: {shards!r}")
    return paths


# ----------------------------------------------------------------------------- tar header scan


def _nul_terminated(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _header_number(field: bytes) -> int:
    """Parses a numeric header field: octal ASCII, or GNU base-256 for large values."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _header_number(block[148:156])
    except ValueError:  # not octal digits: not a tar header
        return False
    # The checksum counts its own field as eight spaces; some old writers sum signed bytes.
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
    return stored in (unsigned, signed)


def _parse_pax_records(payload: bytes) -> dict[str, str]:
    """Parses pax extended-header records ``"<length> <key>=<value>\\n"``."""
    records: dict[str, str] = {}
    position = 0
    while position < len(payload):
        space = payload.find(b" ", position)
        if space < 0:
            break
        length = int(payload[position:space])
        if length <= 0:
            break
        record = payload[space + 1 : position + length - 1]  # without the trailing newline
        key, _, value = record.partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def iter_tar_members(path: str) -> Iterator[tuple[str, int, int]]:
    """Yields the regular files of an uncompressed tar as ``(name, payload_offset, payload_size)``.

    Reads only the 512-byte headers (plus GNU long-name and pax payloads, which hold names).
    Handles ustar prefixes, GNU ``L`` long names, pax ``path``/``size`` records and base-256 sizes.
    Raises :class:`CorruptShardError` at a damaged header and :class:`TruncatedShardError` at a
    payload that runs past the end of the file, after yielding every member before that point.
    """
    file_size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        long_name: str | None = None
        pax: dict[str, str] = {}
        while offset + _BLOCK <= file_size:
            block = os.pread(fd, _BLOCK, offset)
            if block.count(0) == _BLOCK:  # end-of-archive marker
                return
            if not _checksum_ok(block):
                raise CorruptShardError(f"{path}: bad tar header checksum at byte {offset}")
            type_flag = block[156:157]
            size = _header_number(block[124:136])
            data_offset = offset + _BLOCK
            if type_flag in (b"L", b"x"):
                payload = os.pread(fd, size, data_offset)
            if type_flag == b"L":
                long_name = _nul_terminated(payload)
            elif type_flag == b"x":
                pax = _parse_pax_records(payload)
            elif type_flag in (b"0", b"\0", b"7"):
                name = _nul_terminated(block[0:100])
                if block[257:262] == b"ustar":
                    prefix = _nul_terminated(block[345:500])
                    if prefix:
                        name = f"{prefix}/{name}"
                name = pax.get("path", long_name or name)
                size = int(pax.get("size", size))
                if data_offset + size > file_size:
                    raise TruncatedShardError(
                        f"{path}: cut short at byte {file_size}, inside member {name!r}"
                    )
                yield name, data_offset, size
                long_name, pax = None, {}
            elif type_flag != b"g":  # directories, links, GNU 'K': the pending names were theirs
                long_name, pax = None, {}
            offset = data_offset + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    finally:
        os.close(fd)


def split_key(member_name: str) -> tuple[str, str]:
    """key = path up to the first '.' of the base name; then the extension."""
    directory, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, extension.lower()


# ----------------------------------------------------------------------------- per-shard index

_SLOTS = ("image", "text", "metadata", "synthetic", "teacher", "augmentation")
# DataCompDR's reinforcement members: synthetic captions, teacher embeddings, augmentations.
_REINFORCEMENT_SLOTS = {
    SYNTHETIC_EXTENSION: "synthetic",
    TEACHER_EXTENSION: "teacher",
    AUGMENTATION_EXTENSION: "augmentation",
}


def _slot_of(extension: str) -> str | None:
    if extension in IMAGE_EXTENSIONS:
        return "image"
    if extension == TEXT_EXTENSION:
        return "text"
    if extension == METADATA_EXTENSION:
        return "metadata"
    return _REINFORCEMENT_SLOTS.get(extension)


def index_shard(path: str) -> dict[str, np.ndarray]:
    """Groups members into samples: ``keys``, per slot ``<slot>_offset/_size`` (-1 absent).

    Samples are ordered by the first appearance of their key; a key whose members are scattered
    through the shard is still one sample. The first member of each slot wins.
    A damaged shard keeps the samples read before the damage; ``damage`` (a 0-d string array)
    then says what happened (empty when the shard is whole) and ``corrupt`` (0-d bool) is True
    for a damaged header, False for a shard that is only cut short.
    """
    order: dict[str, int] = {}
    offsets: dict[str, list[int]] = {slot: [] for slot in _SLOTS}
    sizes: dict[str, list[int]] = {slot: [] for slot in _SLOTS}
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
        if sample == len(offsets["image"]):
            for slot in _SLOTS:
                offsets[slot].append(_MISSING)
                sizes[slot].append(_MISSING)
        slot = _slot_of(extension)
        if slot is not None and offsets[slot][sample] == _MISSING:
            offsets[slot][sample] = offset
            sizes[slot][sample] = size
    # Keys as bytes: a quarter of the memory of NumPy's 4-byte-per-character strings.
    encoded_keys = [key.encode("utf-8", "surrogateescape") for key in order]
    index = {"keys": np.array(encoded_keys, dtype=bytes)}
    for slot in _SLOTS:
        index[f"{slot}_offset"] = np.array(offsets[slot], dtype=np.int64)
        index[f"{slot}_size"] = np.array(sizes[slot], dtype=np.int64)
    index["damage"] = np.array(damage)
    index["corrupt"] = np.array(corrupt)
    return index


def _shard_fingerprint(path: str) -> np.ndarray:
    stat = os.stat(path)
    return np.array([_INDEX_FORMAT_VERSION, stat.st_size, stat.st_mtime_ns], dtype=np.int64)


def _cache_path(path: str, cache_dir: str | None, next_to_shard: bool) -> str | None:
    if next_to_shard:
        return f"{path}.index.npz"
    if cache_dir:
        digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
        return os.path.join(cache_dir, f"{os.path.basename(path)}.{digest}.index.npz")
    return None


def load_or_build_shard_index(
    path: str, *, cache_dir: str | None = None, cache_next_to_shard: bool = False
) -> dict[str, np.ndarray]:
    """Reads a cached index if it matches the shard's size and mtime, else scans and caches it."""
    cache = _cache_path(path, cache_dir, cache_next_to_shard)
    fingerprint = _shard_fingerprint(path)
    if cache and os.path.exists(cache):
        try:
            with np.load(cache, allow_pickle=False) as stored:
                if np.array_equal(stored["fingerprint"], fingerprint):
                    return {name: stored[name] for name in stored.files if name != "fingerprint"}
        except (OSError, ValueError, KeyError) as error:  # a damaged cache is rebuilt
            _logger.warning("Ignoring unreadable index cache %s: %s", cache, error)
    index = index_shard(path)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        temporary = f"{cache}.tmp{os.getpid()}.{threading.get_ident()}.npz"
        np.savez(temporary, fingerprint=fingerprint, **index)
        os.replace(temporary, cache)  # atomic: concurrent hosts never read a half-written file
    return index


# ----------------------------------------------------------------------------- combined index
#
# The index of all shards lives in one directory of .npy files that every process memory-maps
# (``np.load(mmap_mode="r")``): the pages sit once in the OS page cache, shared by the host's
# process and its grain workers, and pickling a source sends only the directory's path.
# Per sample: ``key_offsets`` (int64, n + 1 entries) and ``key_bytes`` (the UTF-8 keys end to
# end), twelve ``<slot>_offset/_size`` arrays (int32 when every shard is under 2 GiB, else int64)
# and, per shard, ``shard_starts`` (int64, shards + 1 entries): ~65 bytes for DataComp's
# 9-character keys. ``index.json``, written last, lists the shards' fingerprints and damage.

_META_FILE = "index.json"
_PER_SAMPLE_ARRAYS = tuple(f"{slot}_{part}" for slot in _SLOTS for part in ("offset", "size"))
_COMBINED_ARRAYS = ("key_offsets", "key_bytes", "shard_starts", *_PER_SAMPLE_ARRAYS)


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


def combined_index_name(fingerprints: Sequence[Sequence[Any]]) -> str:
    """Directory name of a combined index: a hash of the format version and shard fingerprints."""
    text = json.dumps([_INDEX_FORMAT_VERSION, list(map(list, fingerprints))])
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


def _ordered_shard_indexes(
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
) -> dict[str, Any]:
    """Writes the per-shard indexes, in shard order, as one memory-mappable index; returns its meta.

    ``fingerprints`` (from :func:`shard_fingerprints`) bound the offsets, which picks their dtype.
    """
    largest_shard = max((size for _, size, _ in fingerprints), default=0)
    offset_dtype = np.int32 if largest_shard < 2**31 else np.int64
    writers = {
        name: _NpyAppender(os.path.join(directory, f"{name}.npy"), offset_dtype)
        for name in _PER_SAMPLE_ARRAYS
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
        for name in _PER_SAMPLE_ARRAYS:
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
        "format": _INDEX_FORMAT_VERSION,
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
    # Plain ndarray views of the maps (``.base`` is the np.memmap): indexing them skips the
    # np.memmap subclass machinery, a third of the time of a record lookup.
    arrays = {
        name: np.asarray(
            np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r", allow_pickle=False)
        )
        for name in _COMBINED_ARRAYS
    }
    count = meta["num_samples"]
    expected = {name: count for name in _PER_SAMPLE_ARRAYS}
    expected.update(
        key_offsets=count + 1,
        key_bytes=int(arrays["key_offsets"][-1]),
        shard_starts=len(meta["fingerprints"]) + 1,
    )
    for name, length in expected.items():
        if arrays[name].shape != (length,):
            raise ValueError(f"{directory}: {name} has shape {arrays[name].shape}, not ({length},)")
    return meta, arrays


def _reusable_index(directory: str, fingerprints: Sequence[Sequence[Any]]) -> bool:
    if not os.path.exists(os.path.join(directory, _META_FILE)):
        return False
    try:
        meta, _ = open_combined_index(directory)
    except (OSError, ValueError, KeyError) as error:  # a damaged cache is rebuilt
        _logger.warning("Ignoring unreadable combined index %s: %s", directory, error)
        return False
    return meta["format"] == _INDEX_FORMAT_VERSION and meta["fingerprints"] == [
        list(f) for f in fingerprints
    ]


def _publish(building: str, final: str, fingerprints: Sequence[Sequence[Any]]) -> None:
    """Renames a finished index into place (atomic); a valid one already there is kept."""
    try:
        os.rename(building, final)
        return
    except OSError:  # ``final`` exists: another process won the race, or a damaged copy is there
        if _reusable_index(final, fingerprints):
            return
    stale = f"{final}.stale{os.getpid()}.{threading.get_ident()}"
    os.rename(final, stale)
    os.rename(building, final)
    shutil.rmtree(stale, ignore_errors=True)


def _remove_if_owner(directory: str, owner_pid: int) -> None:
    # Forked children (grain workers) inherit this finalizer: only the creating process removes.
    if os.getpid() == owner_pid:
        shutil.rmtree(directory, ignore_errors=True)


# ----------------------------------------------------------------------------- file handles


class _FileHandles:
    """Lazily opened read-only descriptors, at most ``capacity`` open, safe across reader threads.

    A descriptor in use by a ``pread`` is never closed under it: eviction closes only idle ones.
    Not pickled (each grain worker process opens its own).
    """

    def __init__(self, paths: Sequence[str], capacity: int):
        self._paths = paths
        self._capacity = capacity
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._in_use: collections.Counter[int] = collections.Counter()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._acquire(shard)
        try:
            chunks = []
            while size > 0:
                chunk = os.pread(fd, size, offset)
                if not chunk:  # the shard shrank since it was indexed: return what is there
                    break
                chunks.append(chunk)
                offset += len(chunk)
                size -= len(chunk)
            return b"".join(chunks)
        finally:
            self._release(shard)

    def _acquire(self, shard: int) -> int:
        with self._lock:
            fd = self._open.get(shard)
            if fd is None:
                fd = os.open(self._paths[shard], os.O_RDONLY)
                self._open[shard] = fd
            self._open.move_to_end(shard)
            self._in_use[shard] += 1
            self._evict_idle()
            return fd

    def _release(self, shard: int) -> None:
        with self._lock:
            self._in_use[shard] -= 1
            if self._in_use[shard] == 0:
                del self._in_use[shard]
            self._evict_idle()

    def _evict_idle(self) -> None:
        for shard in list(self._open):
            if len(self._open) <= self._capacity:
                return
            if shard not in self._in_use:
                os.close(self._open.pop(shard))

    def close(self) -> None:
        with self._lock:
            for shard in [s for s in self._open if s not in self._in_use]:
                os.close(self._open.pop(shard))


# ----------------------------------------------------------------------------- the source


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
    return {"teacher_image_embeddings": image, "teacher_text_embeddings": text}


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
        directory (under ``$TMPDIR``) that is removed when this source is collected or at exit.
      cache_index_next_to_shards: if True, cache each index as ``<shard>.index.npz`` beside it.
      index_threads: shards indexed concurrently (I/O bound: helps on network file systems).
      max_open_files: descriptors kept open per process (least recently used ones are closed).
      strict: if True, a shard with a damaged tar header raises :class:`CorruptShardError`; by
        default its samples before the damage are kept, a warning names it and
        ``damaged_shards`` lists it (shards cut short are always kept and listed).
      reinforcements: if True, records carry the DataCompDR members (synthetic captions, teacher
        embeddings, stored crops; see the module docstring); off, they are not read at all.

    A missing or unreadable shard raises ``FileNotFoundError`` at construction (a configuration
    error). A cached index is reused only while the shards' sizes and modification times are
    unchanged. Records are dicts ``key`` (str), ``image_bytes`` (bytes or None), ``captions``
    (list[str], stripped, blank ones dropped), ``metadata`` (dict from ``.json``, ``{}`` if
    absent/invalid), and the reinforcement fields of the module docstring when present.

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
        reinforcements: bool = False,
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
        self.reinforcements = reinforcements
        fingerprints = shard_fingerprints(self.shards)

        def shard_index(path: str) -> dict[str, np.ndarray]:
            index = load_or_build_shard_index(
                path, cache_dir=index_cache_dir, cache_next_to_shard=cache_index_next_to_shards
            )
            if strict and bool(index["corrupt"]):  # stop before scanning the other shards
                raise CorruptShardError(str(index["damage"]))
            return index

        def write(directory: str) -> None:
            threads = max(1, min(index_threads, len(self.shards)))
            per_shard = _ordered_shard_indexes(self.shards, shard_index, threads)
            write_combined_index(directory, self.shards, per_shard, fingerprints)

        if index_cache_dir:
            self.index_dir = self._cached_index(index_cache_dir, fingerprints, write)
        else:
            self.index_dir = tempfile.mkdtemp(prefix="webdataset-index-")
            weakref.finalize(self, _remove_if_owner, self.index_dir, os.getpid())
            write(self.index_dir)
        meta, self._index = open_combined_index(self.index_dir)
        self._check_damage(meta["damaged"])
        self.damaged_shards = [record["shard"] for record in meta["damaged"]]
        self._num_samples = int(meta["num_samples"])
        if self._num_samples == 0:
            raise ValueError(
                f"No samples in {len(self.shards)} shards ({len(self.damaged_shards)} damaged), "
                f"e.g. {self.shards[0]!r}"
            )
        self._handles = _FileHandles(self.shards, self.max_open_files)

    @staticmethod
    def _cached_index(
        cache_dir: str, fingerprints: Sequence[Sequence[Any]], write: Callable[[str], None]
    ) -> str:
        final = os.path.join(cache_dir, combined_index_name(fingerprints))
        if _reusable_index(final, fingerprints):
            return final
        os.makedirs(cache_dir, exist_ok=True)
        # Built under a private name and renamed: readers never see a half-written index.
        building = tempfile.mkdtemp(prefix=".building-", dir=cache_dir)
        try:
            write(building)
            _publish(building, final, fingerprints)
        finally:
            shutil.rmtree(building, ignore_errors=True)  # already gone after a rename
        return final

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
        if offset == _MISSING:
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
        if not self.reinforcements:  # plain training: no npz parsing on the hot path
            return record
        try:
            record.update(self._reinforcements(index, shard))
        except MalformedReinforcementError as error:
            # Not fatal here: only reinforced training needs these; it skips and counts them.
            record["malformed_reinforcement"] = f"{record['key']}: {error}"
        return record

    def _reinforcements(self, index: int, shard: int) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if (payload := self._payload("synthetic", index, shard)) is not None:
            fields["synthetic_captions"] = parse_synthetic_captions(payload)
        if (payload := self._payload("teacher", index, shard)) is not None:
            fields.update(parse_teacher_embeddings(payload))
        if (payload := self._payload("augmentation", index, shard)) is not None:
            fields["augmentation_boxes"] = parse_augmentation_boxes(payload)
        return fields

    def __getstate__(self) -> dict[str, Any]:
        # Only paths travel into grain worker processes: they memory-map the same index files
        # (shared page cache) and reopen shard descriptors lazily.
        state = self.__dict__.copy()
        del state["_handles"], state["_index"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _, self._index = open_combined_index(self.index_dir)
        self._handles = _FileHandles(self.shards, self.max_open_files)

    def close(self) -> None:
        """Closes this process's open shard files (they reopen on the next read)."""
        self._handles.close()


# ----------------------------------------------------------------------------- writer


def _payload_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"Cannot write a {type(value).__name__} payload: give bytes, str, dict or list")


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o444
    info.mtime = 0  # reproducible shards: the same samples give the same bytes
    tar.addfile(info, io.BytesIO(payload))


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_pattern: str,
    samples_per_shard: int,
) -> list[str]:
    """Writes webdataset tar shards; returns their paths.

    Args:
      samples: mappings from extension (``"jpg"``, ``"txt"``, ``"json"``, ...) to payload (bytes are
        written as they are, str as UTF-8, dict/list as JSON); an optional ``"__key__"`` names the
        sample (default: its running number, ``"%09d"``, as DataComp does).
      out_pattern: printf-style path with the shard number, e.g. ``"out/shard-%05d.tar"``.
      samples_per_shard: samples per shard (the last shard may hold fewer).

    Each shard is written to a temporary name and renamed when complete.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if "%" not in out_pattern:
        raise ValueError(f"out_pattern needs a %-field for the shard number: {out_pattern!r}")
    paths: list[str] = []
    numbered = enumerate(samples)
    while chunk := list(itertools.islice(numbered, samples_per_shard)):
        path = out_pattern % len(paths)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        temporary = f"{path}.tmp{os.getpid()}"
        with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as tar:
            for number, sample in chunk:
                key = str(sample.get("__key__", f"{number:09d}"))
                for extension, value in sample.items():
                    if extension != "__key__":
                        _add_member(tar, f"{key}.{extension}", _payload_bytes(value))
        os.replace(temporary, path)
        paths.append(path)
    return paths
