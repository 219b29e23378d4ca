"""Writes webdataset tar shards (tests, and the reinforced shards of ``pretrain.reinforce``)."""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from typing import Any


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
