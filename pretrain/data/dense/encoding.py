"""The bytes of a dense sample's label members, both ways (see :mod:`pretrain.data.dense`).

==================  ==========================================================================
``seg.png``         class ids, 8-bit grey (``L``) or palette (``P``: the index is the class, as
                    PASCAL VOC stores them) or 16-bit grey (``I;16``); 255 = unlabelled. Exact.
``depth.png``       16-bit grey, ``round(depth_m * depth_scale)`` (default scale 1000: mm),
                    0 = invalid. Quantised: error <= 0.5 / depth_scale m; range up to
                    65535 / depth_scale m (the writer refuses deeper valid pixels); a valid
                    depth below 0.5 / depth_scale m is stored as 1, never as 0 (invalid).
``depth.npy``       float32 (H, W) metres, 0 = invalid. Exact.
``normals.png``     8-bit RGB, ``rgb = round((n + 1) * 127.5)``; read back as
                    ``rgb / 127.5 - 1`` made unit length; the all-zero pixel = invalid (no unit
                    vector maps to it). Quantised: each component within 0.5 / 127.5 before
                    renormalisation, about 0.3 degrees.
``normals.npy``     float32 (H, W, 3) unit vectors, the zero vector = invalid. Exact.
==================  ==========================================================================

Decoding raises :class:`CorruptLabelError` for any payload that is not what its name says.
"""

from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image

from pretrain.data.dense import layout

_GREY_INTEGER_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")
# NumPy parses .npy headers with ast.literal_eval, which CPython 3.11 does not make safe to run
# in several threads at once (as webdataset.datacompdr found with grain's reader threads).
_NPY_HEADER_LOCK = threading.Lock()


class CorruptLabelError(ValueError):
    """A label member's bytes cannot be decoded as its name says."""


# ----------------------------------------------------------------------------- containers


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _open_png(payload: bytes) -> Image.Image:
    if not payload:
        raise CorruptLabelError("empty label payload")
    try:
        image = Image.open(io.BytesIO(payload))
        image.load()  # decode now: truncated data fails here
    except Exception as error:
        # PIL raises many types on damaged input: every failure here is the data's.
        raise CorruptLabelError(f"cannot decode PNG: {type(error).__name__}: {error}") from error
    if image.format != "PNG":  # a JPEG label would be lossy: class ids and depths destroyed
        raise CorruptLabelError(f"label is {image.format}, not PNG")
    return image


def encode_npy(array: np.ndarray) -> bytes:
    """A ``.npy`` payload (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(payload: bytes) -> np.ndarray:
    """The array of a ``.npy`` payload."""
    try:
        with _NPY_HEADER_LOCK:
            return np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise CorruptLabelError(f"cannot read .npy: {error!r}") from error


def encode_image_png(image: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) RGB array as PNG (lossless)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return _png_bytes(Image.fromarray(image, mode="RGB"))


# ----------------------------------------------------------------------------- segmentation


def encode_segmentation_png(segmentation: np.ndarray) -> bytes:
    """Class ids (H, W) in [0, 65535] as 8-bit grey PNG when all fit, else 16-bit."""
    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 2 or not np.issubdtype(segmentation.dtype, np.integer):
        raise ValueError(f"segmentation must be integer (H, W), got {segmentation.dtype}")
    low, high = int(segmentation.min(initial=0)), int(segmentation.max(initial=0))
    if low < 0 or high > 65535:
        raise ValueError(f"class ids must be in [0, 65535], got [{low}, {high}]")
    dtype = np.uint8 if high <= 255 else np.uint16
    return _png_bytes(Image.fromarray(segmentation.astype(dtype)))


def decode_segmentation_png(payload: bytes) -> np.ndarray:
    """Class ids (H, W) int32 of a ``seg.png`` payload."""
    image = _open_png(payload)
    if image.mode not in _GREY_INTEGER_MODES:
        raise CorruptLabelError(f"seg.png must hold one integer channel, got mode {image.mode}")
    return np.asarray(image).astype(np.int32)


# ----------------------------------------------------------------------------- depth


def encode_depth_png(depth: np.ndarray, depth_scale: float = layout.DEFAULT_DEPTH_SCALE) -> bytes:
    """Depth (H, W) metres (0 or non-finite = invalid) as 16-bit ``depth_m * depth_scale``."""
    depth = np.asarray(depth, np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got {depth.shape}")
    valid = np.isfinite(depth) & (depth > 0)
    quantised = np.rint(np.where(valid, depth, 0.0) * depth_scale)
    if quantised.max(initial=0) > 65535:
        raise ValueError(
            f"depth {depth[valid].max():.3f} m exceeds the 16-bit PNG's range "
            f"{65535 / depth_scale:.3f} m at depth_scale {depth_scale}: use depth.npy"
        )
    # A valid depth never becomes the invalid 0.
    quantised = np.where(valid, np.maximum(quantised, 1), 0).astype(np.uint16)
    return _png_bytes(Image.fromarray(quantised))


def decode_depth_png(payload: bytes, depth_scale: float = layout.DEFAULT_DEPTH_SCALE) -> np.ndarray:
    """Depth (H, W) float32 metres of a 16-bit ``depth.png`` payload, 0 = invalid."""
    image = _open_png(payload)
    if image.mode not in _SIXTEEN_BIT_MODES:
        raise CorruptLabelError(f"depth.png must be 16-bit grey, got mode {image.mode}")
    return (np.asarray(image).astype(np.float64) / depth_scale).astype(np.float32)


# ----------------------------------------------------------------------------- normals


def encode_normals_png(normals: np.ndarray) -> bytes:
    """Unit normals (H, W, 3) (the zero vector = invalid) as 8-bit RGB."""
    normals = np.asarray(normals, np.float64)
    if normals.ndim != 3 or normals.shape[2] != 3:
        raise ValueError(f"normals must be (H, W, 3), got {normals.shape}")
    valid = np.any(normals != 0, axis=-1, keepdims=True)
    rgb = np.clip(np.rint((normals + 1.0) * 127.5), 0, 255)
    return _png_bytes(Image.fromarray(np.where(valid, rgb, 0).astype(np.uint8), mode="RGB"))


def decode_normals_png(payload: bytes) -> np.ndarray:
    """Unit normals (H, W, 3) float32 of a ``normals.png`` payload, zero where invalid."""
    image = _open_png(payload)
    if image.mode not in ("RGB", "RGBA"):
        raise CorruptLabelError(f"normals.png must be RGB, got mode {image.mode}")
    rgb = np.asarray(image)[..., :3].astype(np.float64)
    valid = np.any(rgb != 0, axis=-1, keepdims=True)
    normals = rgb / 127.5 - 1.0
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    # Quantisation moved the vectors off the unit sphere: back onto it (no valid rgb has length 0).
    normals = np.where(valid & (length > 0), normals / np.maximum(length, 1e-12), 0.0)
    return normals.astype(np.float32)


# ----------------------------------------------------------------------------- dispatch


def decode_member(
    member: str, payload: bytes, depth_scale: float = layout.DEFAULT_DEPTH_SCALE
) -> np.ndarray:
    """The array of a label member (one of ``layout.LABEL_MEMBERS``)."""
    if member == layout.SEGMENTATION_PNG:
        return decode_segmentation_png(payload)
    if member == layout.DEPTH_PNG:
        return decode_depth_png(payload, depth_scale)
    if member == layout.NORMALS_PNG:
        return decode_normals_png(payload)
    if member in (layout.DEPTH_NPY, layout.NORMALS_NPY):
        return decode_npy(payload)
    raise ValueError(f"{member!r} is not a label member: {layout.LABEL_MEMBERS}")
