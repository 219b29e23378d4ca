"""``FolderSource``: random access to the dense samples of a directory of files.

The directory (and, with ``recursive``, its subdirectories) holds the members of
:mod:`pretrain.data.dense.layout`: ``KEY.jpg`` / ``KEY.png`` (image) beside ``KEY.seg.png``,
``KEY.depth.png`` or ``KEY.depth.npy``, ``KEY.normals.png`` or ``KEY.normals.npy``. The files
are listed once, at construction, in sorted key order (so the record order is reproducible);
``source[i]`` reads the sample's files and returns them raw, decoded by the pipeline. A file that
cannot be read returns empty bytes, which the pipeline skips as corrupt.
"""

from __future__ import annotations

import os
from typing import Any

from pretrain.data.dense import layout
from pretrain.data.webdataset.tar import split_key


def _member_rank(path: str) -> tuple[int, str]:
    # Of several image files of one key, the first image extension in IMAGE_EXTENSIONS wins.
    _, extension = split_key(os.path.basename(path))
    if extension in layout.IMAGE_EXTENSIONS:
        return layout.IMAGE_EXTENSIONS.index(extension), path
    return 0, path


def _relative_files(directory: str, recursive: bool) -> list[str]:
    """Files under ``directory`` as '/'-separated relative paths, hidden ones left out."""
    if not recursive:
        return [
            entry.name
            for entry in os.scandir(directory)
            if entry.is_file() and not entry.name.startswith(".")
        ]
    files = []
    for root, folders, names in os.walk(directory):
        folders[:] = [name for name in folders if not name.startswith(".")]
        relative_root = os.path.relpath(root, directory)
        for name in names:
            if not name.startswith("."):
                path = name if relative_root == "." else os.path.join(relative_root, name)
                files.append(path.replace(os.sep, "/"))
    return files


def scan_folder(directory: str, recursive: bool = False) -> dict[str, dict[str, str]]:
    """``{key: {slot: relative path}}`` of the dense samples in ``directory``, keys sorted; a
    sample has at least one member of the layout (other files are ignored)."""
    samples: dict[str, dict[str, str]] = {}
    for path in sorted(_relative_files(directory, recursive), key=_member_rank):
        key, extension = split_key(path)
        slot = layout.member_of(extension)
        if slot is not None:
            samples.setdefault(key, {}).setdefault(slot, path)
    return dict(sorted(samples.items()))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:  # vanished or unreadable since the scan: a corrupt member, skipped later
        return b""


class FolderSource:
    """Grain random-access source over a folder of dense samples: ``len(source)``, ``source[i]``.

    Records are dicts: ``key`` (str), ``image`` (bytes, None without an image file), the label
    members present (``seg.png``, ``depth.npy``... -> bytes) and ``depth_scale``.

    Args:
      directory: the folder.
      recursive: also the samples of its subdirectories (their keys keep the relative path).
      depth_scale: ``depth.png`` holds metres x this (1000: millimetres).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        recursive: bool = False,
        depth_scale: float = layout.DEFAULT_DEPTH_SCALE,
    ):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"dense folder {self.directory!r} is not a directory")
        self.depth_scale = float(depth_scale)
        samples = scan_folder(self.directory, recursive)
        if not samples:
            raise ValueError(f"no dense samples (images or label files) in {self.directory!r}")
        self._keys = list(samples)
        self._members = list(samples.values())

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"FolderSource({self.directory!r}, {len(self)} samples)"

    def key(self, index: int) -> str:
        """The sample key of record ``index``."""
        return self._keys[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        members = self._members[index]
        record: dict[str, Any] = {
            "key": self._keys[index],
            layout.IMAGE: None,
            layout.DEPTH_SCALE: self.depth_scale,
        }
        for slot, path in members.items():
            record[slot] = _read(os.path.join(self.directory, path))
        return record
