"""Image decoding and CLIP-style crops in NumPy/PIL, run inside grain workers.

The crops follow torchvision, which open_clip uses, so that images seen in training and in
evaluation match the PyTorch recipes:

* training: ``RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=BICUBIC)`` (open_clip's
  default scale) — :func:`sample_crop_box` is torchvision's ``RandomResizedCrop.get_params``
  (area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``, ten tries, then a
  centre crop clipped to the ratio range) and :func:`crop_and_resize` crops then resizes;
* evaluation: ``Resize(size, BICUBIC)`` on the shorter side, then ``CenterCrop(size)``.

Resampling is PIL's bicubic, as in torchvision on PIL images. Everything returns ``uint8``; the
model side normalises on device with :func:`normalize` (``CLIP_MEAN``/``CLIP_STD``, OpenAI's).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

# OpenAI CLIP's normalisation (also open_clip's default for CLIP and most ViT recipes).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_BICUBIC = Image.Resampling.BICUBIC

ImageLike = np.ndarray | Image.Image


class CorruptImageError(ValueError):
    """The bytes or array cannot be decoded to an image (corrupt, truncated, empty, unsupported)."""


# ----------------------------------------------------------------------------- decoding


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise TypeError(f"Image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"Image arrays must be HxW or HxWxC, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise CorruptImageError(f"Empty image of shape {array.shape}")
    channels = array.shape[2]
    if channels in (1, 2):  # grey, grey + alpha
        return np.repeat(array[..., :1], 3, axis=2)
    if channels in (3, 4):  # RGB, RGBA (alpha dropped, as PIL's convert('RGB') does)
        return np.ascontiguousarray(array[..., :3])
    raise ValueError(f"Image arrays must have 1 to 4 channels, got shape {array.shape}")


def _high_bit_depth_to_grey8(image: Image.Image) -> Image.Image:
    """PIL clips 16/32-bit and float grey images to 0..255 when converting: rescale instead."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_grey8(image)
    elif image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes to RGB
    return image.convert("RGB")


def decode_to_pil(data: bytes | ImageLike, *, min_side: int | None = None) -> Image.Image:
    """Decodes encoded bytes (JPEG, PNG, WebP, ...), an array or a PIL image to an RGB PIL image.

    ``min_side``: for JPEGs, decode at a reduced scale (1/2, 1/4 or 1/8, done in the DCT domain and
    several times faster) as long as both sides stay at least ``min_side`` pixels.

    Raises:
      CorruptImageError: the data is empty, truncated, not an image, or cannot become RGB.
    """
    if isinstance(data, np.ndarray):
        return Image.fromarray(_array_to_rgb(data), mode="RGB")
    if isinstance(data, Image.Image):
        return _pil_to_rgb(data)
    if not data:
        raise CorruptImageError("Empty image payload")
    try:
        image = Image.open(io.BytesIO(data))
        if min_side and image.format == "JPEG":
            image.draft("RGB", (min_side, min_side))
        image.load()  # decode now, so that truncated data fails here and not later
        image = _pil_to_rgb(image)
        if image.width == 0 or image.height == 0:
            raise CorruptImageError(f"Empty image of size {image.size}")
        return image
    except CorruptImageError:
        raise
    except MemoryError:
        raise
    except Exception as error:
        # PIL raises many types on damaged input (OSError, SyntaxError, struct.error, IndexError,
        # DecompressionBombError...): every failure inside decoding these bytes is the data's.
        raise CorruptImageError(f"Cannot decode image: {type(error).__name__}: {error}") from error


def _as_pil(image: ImageLike) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(_array_to_rgb(image), "RGB")


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


# ----------------------------------------------------------------------------- crops


def sample_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0),
    max_tries: int = 10,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(top, left, crop_height, crop_width)``.

    Tries ``max_tries`` times: area fraction ~ U(scale), aspect ratio w/h ~ exp(U(log ratio));
    accepts the first box that fits in the image, at a uniform position. Otherwise falls back to
    the largest centred box whose aspect ratio is clipped into ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(max_tries):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    image_ratio = width / height
    if image_ratio < min(ratio):
        crop_width, crop_height = width, round(width / min(ratio))
    elif image_ratio > max(ratio):
        crop_width, crop_height = round(height * max(ratio)), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def crop_and_resize(
    image: ImageLike, box: tuple[int, int, int, int], size: int | Sequence[int]
) -> np.ndarray:
    """Crops ``box = (top, left, height, width)``, resizes it (bicubic) to ``size``: uint8 HxWx3."""
    top, left, crop_height, crop_width = box
    out_height, out_width = _size_hw(size)
    cropped = _as_pil(image).crop((left, top, left + crop_width, top + crop_height))
    return np.asarray(cropped.resize((out_width, out_height), _BICUBIC))


def box_inside(box: Sequence[int], height: int, width: int) -> bool:
    """Whether ``(top, left, crop_height, crop_width)`` is a non-empty crop inside the image."""
    top, left, crop_height, crop_width = box
    return (
        top >= 0
        and left >= 0
        and crop_height > 0
        and crop_width > 0
        and top + crop_height <= height
        and left + crop_width <= width
    )


def crop_min_side(
    size: int | Sequence[int],
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0),
) -> int:
    """Shortest image side at which every random crop still has at least ``size`` pixels per side.

    A crop of area fraction s and ratio r has sides sqrt(s*A*r) and sqrt(s*A/r) >= min(H, W) *
    sqrt(s_min * min(r_min, 1/r_max)); the fallback crop keeps the whole shorter side.
    """
    shrink = math.sqrt(scale[0] * min(ratio[0], 1.0 / ratio[1], 1.0))
    return math.ceil(max(_size_hw(size)) / shrink)


def random_resized_crop(
    image: ImageLike,
    size: int | Sequence[int],
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0),
) -> np.ndarray:
    """torchvision ``RandomResizedCrop`` with bicubic resampling; uint8 ``(size, size, 3)``."""
    pil_image = _as_pil(image)
    box = sample_crop_box(pil_image.height, pil_image.width, rng, scale, ratio)
    return crop_and_resize(pil_image, box, size)


def resize_shorter_side(image: ImageLike, size: int) -> Image.Image:
    """torchvision ``Resize(size)``: shorter side to size, longer to int(size * long / short)."""
    pil_image = _as_pil(image)
    width, height = pil_image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    if (new_width, new_height) == (width, height):
        return pil_image
    return pil_image.resize((new_width, new_height), _BICUBIC)


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """torchvision ``CenterCrop`` box ``(top, left, size, size)`` (Python's round, as it uses)."""
    return round((height - size) / 2.0), round((width - size) / 2.0), size, size


def resize_center_crop(image: ImageLike, size: int) -> np.ndarray:
    """Evaluation transform: bicubic resize of the shorter side to ``size``, then centre crop."""
    resized = resize_shorter_side(image, size)
    top, left, _, _ = center_crop_box(resized.height, resized.width, size)
    return np.asarray(resized.crop((left, top, left + size, top + size)))


# ----------------------------------------------------------------------------- model side


def unit_images(images_uint8: Any) -> Any:
    """uint8 RGB -> float32 in [0, 1] (NumPy or JAX arrays)."""
    return images_uint8.astype(np.float32) / 255.0


def normalize_unit(images: Any) -> Any:
    """Float images in [0, 1] -> CLIP's normalisation ``(images - mean) / std`` over the channel
    axis; NumPy arrays, or JAX arrays inside jit (only operators are used)."""
    return (images - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def normalize(images_uint8: Any) -> Any:
    """uint8 RGB -> the float32 input of every tower of this project (CLIP's normalisation)."""
    return normalize_unit(unit_images(images_uint8))
