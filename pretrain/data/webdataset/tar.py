"""A tar scanner that reads only the headers, and the webdataset key of a member.

A webdataset shard is an uncompressed tar file whose members are grouped into samples by key: the
member path up to the first ``.`` of its base name (``dir/000123.jpg`` and ``dir/000123.json``
form the sample ``dir/000123``; the rest of the name, ``jpg`` / ``json``, is its extension).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

_BLOCK = 512


class CorruptShardError(ValueError):
    """A shard's tar headers cannot be parsed (not a tar file, or a damaged header)."""


class TruncatedShardError(CorruptShardError):
    """A member's payload runs past the end of the shard (e.g. a partial download)."""


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
