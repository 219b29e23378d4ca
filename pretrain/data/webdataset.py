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

Records are returned raw: ``dict(key=str, image_bytes=bytes | None, captions=list[str],
metadata=dict)``. Decoding and augmentation happen in the pipeline (:mod:`pretrain.data.pipeline`).

The index holds about 60 bytes per sample in NumPy arrays (a 12.8M-sample set: ~0.8 GB per host,
also pickled into each grain worker); for billions of samples convert the shards to ArrayRecord.
Shards must be local files or a mounted bucket (e.g. gcsfuse): reads are ``os.pread`` calls.
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
import tarfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSION = "txt"
METADATA_EXTENSION = "json"
DEFAULT_JSON_CAPTION_FIELDS = ("captions", "caption")

_BLOCK = 512
_INDEX_FORMAT_VERSION = 1
_MISSING = -1

_logger = logging.getLogger(__name__)


class CorruptShardError(ValueError):
    """A shard's tar headers cannot be parsed (not a tar file, or a damaged header)."""


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


def scan_tar_members(path: str) -> list[tuple[str, int, int]]:
    """Lists the regular files of an uncompressed tar as ``(name, payload_offset, payload_size)``.

    Reads only the 512-byte headers (plus GNU long-name and pax payloads, which hold names).
    Handles ustar prefixes, GNU ``L`` long names, pax ``path``/``size`` records and base-256 sizes.
    A shard cut short (a partial download) keeps the members that lie wholly inside the file.
    """
    members: list[tuple[str, int, int]] = []
    file_size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        long_name: str | None = None
        pax: dict[str, str] = {}
        while offset + _BLOCK <= file_size:
            block = os.pread(fd, _BLOCK, offset)
            if block.count(0) == _BLOCK:  # end-of-archive marker
                break
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
                    _logger.warning("%s is truncated: the samples after %r are lost", path, name)
                    break
                members.append((name, data_offset, size))
                long_name, pax = None, {}
            elif type_flag != b"g":  # directories, links, GNU 'K': the pending names were theirs
                long_name, pax = None, {}
            offset = data_offset + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    finally:
        os.close(fd)
    return members


def split_key(member_name: str) -> tuple[str, str]:
    """key = path up to the first '.' of the base name; then the extension."""
    directory, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, extension.lower()


# ----------------------------------------------------------------------------- per-shard index

_SLOTS = ("image", "text", "metadata")


def _slot_of(extension: str) -> str | None:
    if extension in IMAGE_EXTENSIONS:
        return "image"
    if extension == TEXT_EXTENSION:
        return "text"
    if extension == METADATA_EXTENSION:
        return "metadata"
    return None


def index_shard(path: str) -> dict[str, np.ndarray]:
    """Groups members into samples: ``keys``, per slot ``<slot>_offset/_size`` (-1 absent).

    Samples are ordered by the first appearance of their key; a key whose members are scattered
    through the shard is still one sample. The first member of each slot wins.
    """
    order: dict[str, int] = {}
    offsets: dict[str, list[int]] = {slot: [] for slot in _SLOTS}
    sizes: dict[str, list[int]] = {slot: [] for slot in _SLOTS}
    for name, offset, size in scan_tar_members(path):
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
      index_cache_dir: if set, per-shard indexes are cached there (keyed by the shard's path).
      cache_index_next_to_shards: if True, cache each index as ``<shard>.index.npz`` beside it.
      index_threads: shards indexed concurrently (I/O bound: helps on network file systems).
      max_open_files: descriptors kept open per process (least recently used ones are closed).

    A cached index is reused only while the shard's size and modification time are unchanged.
    Records are dicts ``key`` (str), ``image_bytes`` (bytes or None), ``captions`` (list[str],
    stripped, blank ones dropped), ``metadata`` (dict from ``.json``, ``{}`` if absent/invalid).
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
    ):
        if txt_captions not in ("lines", "single"):
            raise ValueError(f"txt_captions must be 'lines' or 'single', got {txt_captions!r}")
        self.shards = resolve_shards(shards)
        self.txt_captions = txt_captions
        self.json_caption_fields = tuple(json_caption_fields)
        self.max_open_files = max_open_files
        build = lambda path: load_or_build_shard_index(
            path, cache_dir=index_cache_dir, cache_next_to_shard=cache_index_next_to_shards
        )
        with futures.ThreadPoolExecutor(max(1, min(index_threads, len(self.shards)))) as pool:
            per_shard = list(pool.map(build, self.shards))
        counts = [len(index["keys"]) for index in per_shard]
        self.shard_of_sample = np.repeat(np.arange(len(self.shards), dtype=np.int32), counts)
        self.keys = np.concatenate([index["keys"].astype(bytes) for index in per_shard])
        self._offsets = {
            name: np.concatenate([index[name] for index in per_shard]).astype(np.int64)
            for name in per_shard[0]
            if name != "keys"
        }
        self._handles = _FileHandles(self.shards, self.max_open_files)

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.shards)} shards, {len(self)} samples)"

    def _payload(self, slot: str, index: int) -> bytes | None:
        offset = int(self._offsets[f"{slot}_offset"][index])
        if offset == _MISSING:
            return None
        return self._handles.read(
            int(self.shard_of_sample[index]), offset, int(self._offsets[f"{slot}_size"][index])
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        metadata = _parse_metadata(self._payload("metadata", index))
        captions = parse_captions(
            self._payload("text", index),
            metadata,
            txt_captions=self.txt_captions,
            json_caption_fields=self.json_caption_fields,
        )
        return {
            "key": self.keys[index].decode("utf-8", "surrogateescape"),
            "image_bytes": self._payload("image", index),
            "captions": captions,
            "metadata": metadata,
        }

    def __getstate__(self) -> dict[str, Any]:
        # Open descriptors and locks do not cross into grain worker processes: they reopen lazily.
        state = self.__dict__.copy()
        del state["_handles"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
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
