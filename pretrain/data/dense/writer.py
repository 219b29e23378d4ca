"""Writes dense samples in the folder / webdataset layout (tests, pseudo-labels, conversions).

:func:`dense_members` encodes one sample as ``{member: bytes}`` (the encodings of
:mod:`pretrain.data.dense.encoding`); :func:`write_dense_example` writes those members as files
of a folder or members of an open tar file. For shards, the same mappings (with ``"__key__"``)
go to :func:`pretrain.data.webdataset.write_shards`.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

from pretrain.data.dense import encoding, layout

# Encoded images are stored as they are, under the extension of their format.
_FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_FORMATS = ("npy", "png")


def _image_member(image: bytes | np.ndarray) -> tuple[str, bytes]:
    if isinstance(image, bytes | bytearray):
        try:
            image_format = Image.open(io.BytesIO(image)).format
        except Exception as error:
            raise ValueError(f"image bytes are not an image: {error}") from error
        if image_format not in _FORMAT_EXTENSIONS:
            raise ValueError(f"image format {image_format} is not one of {_FORMAT_EXTENSIONS}")
        return _FORMAT_EXTENSIONS[image_format], bytes(image)
    return "png", encoding.encode_image_png(image)


def _image_size(payload: bytes) -> tuple[int, int]:
    width, height = Image.open(io.BytesIO(payload)).size
    return height, width


def _check_key(key: str) -> None:
    base = key.rpartition("/")[2]
    if not base or "." in base:
        raise ValueError(f"a sample key needs a base name without '.', got {key!r}")


def dense_members(
    image: bytes | np.ndarray,
    *,
    segmentation: np.ndarray | None = None,
    depth: np.ndarray | None = None,
    normals: np.ndarray | None = None,
    depth_format: str = "npy",
    normals_format: str = "npy",
    depth_scale: float = layout.DEFAULT_DEPTH_SCALE,
) -> dict[str, bytes]:
    """One sample's members ``{extension: payload}``.

    ``image``: encoded JPEG / PNG / WebP bytes (kept as they are) or a uint8 (H, W, 3) array
    (PNG). ``depth_format`` / ``normals_format``: ``"npy"`` (exact float32) or ``"png"``
    (quantised, see :mod:`~pretrain.data.dense.encoding`; ``depth_scale`` for depth). Targets
    must have the image's height and width.
    """
    for name, chosen in (("depth_format", depth_format), ("normals_format", normals_format)):
        if chosen not in _FORMATS:
            raise ValueError(f"{name} must be one of {_FORMATS}, got {chosen!r}")
    extension, payload = _image_member(image)
    members = {extension: payload}
    image_hw = _image_size(payload)
    for name, array in (("segmentation", segmentation), ("depth", depth), ("normals", normals)):
        if array is not None and np.shape(array)[:2] != image_hw:
            raise ValueError(f"{name} {np.shape(array)[:2]} differs from the image {image_hw}")
    if segmentation is not None:
        members[layout.SEGMENTATION_PNG] = encoding.encode_segmentation_png(segmentation)
    if depth is not None:
        if depth_format == "npy":
            members[layout.DEPTH_NPY] = encoding.encode_npy(np.asarray(depth, np.float32))
        else:
            members[layout.DEPTH_PNG] = encoding.encode_depth_png(depth, depth_scale)
    if normals is not None:
        if normals_format == "npy":
            members[layout.NORMALS_NPY] = encoding.encode_npy(np.asarray(normals, np.float32))
        else:
            members[layout.NORMALS_PNG] = encoding.encode_normals_png(normals)
    return members


def _write_file(path: str, payload: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "wb") as file:
        file.write(payload)
    os.replace(temporary, path)  # readers never see half a file


def _add_tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o444
    info.mtime = 0  # reproducible shards, as webdataset.writer writes them
    tar.addfile(info, io.BytesIO(payload))


def write_dense_example(
    destination: str | os.PathLike | tarfile.TarFile,
    key: str,
    image: bytes | np.ndarray,
    segmentation: np.ndarray | None = None,
    depth: np.ndarray | None = None,
    normals: np.ndarray | None = None,
    *,
    depth_format: str = "npy",
    normals_format: str = "npy",
    depth_scale: float = layout.DEFAULT_DEPTH_SCALE,
) -> list[str]:
    """Writes one sample as ``KEY.<member>`` files under a folder (``key`` may hold '/': its
    subfolders are made) or as members of a tar file open for writing; returns the member names.
    The arguments are :func:`dense_members`'."""
    _check_key(key)
    members = dense_members(
        image,
        segmentation=segmentation,
        depth=depth,
        normals=normals,
        depth_format=depth_format,
        normals_format=normals_format,
        depth_scale=depth_scale,
    )
    names = [f"{key}.{extension}" for extension in members]
    for name, payload in zip(names, members.values()):
        if isinstance(destination, tarfile.TarFile):
            _add_tar_member(destination, name, payload)
        else:
            _write_file(os.path.join(os.fspath(destination), *name.split("/")), payload)
    return names
