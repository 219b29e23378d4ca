"""Resizing and adaptive pooling of NHWC feature maps, with PyTorch's index arithmetic.

Dense heads (models/dense_heads.py, models/pyramid.py) are ported from PyTorch code bases
(CoreNet, torchvision, mmsegmentation), whose results depend on exactly which input pixels each
output pixel reads. The functions here reproduce ``torch.nn.functional``'s choices:

* :func:`adaptive_avg_pool2d` (B, H, W, C) -> (B, n, m, C): bin ``i`` of ``n`` over a length
  ``L`` averages ``[floor(i L / n), ceil((i + 1) L / n))``, so bins overlap when ``n`` does not
  divide ``L`` (and repeat pixels when ``n > L``), as ``F.adaptive_avg_pool2d`` does;
* :func:`resize_bilinear` (B, h, w, C) -> (B, H, W, C): ``F.interpolate(mode="bilinear")`` with
  ``align_corners=False`` (half-pixel centres, no antialiasing, PyTorch's default) or ``True``
  (corner pixels aligned: CoreNet's PSP module);
* :func:`resize_nearest`: ``F.interpolate(mode="nearest")``, source index ``floor(dst * in /
  out)`` in float32 (not the half-pixel "nearest-exact");
* :func:`upsample_to` picks one of the last two by name ("bilinear" | "nearest").

Both separable operations (pooling, align_corners resizing) are applied as two small matrices
built with NumPy from the static shapes, contracted at full float32 precision: exact averages and
weights on every backend (TPUs would otherwise run float32 matmuls in bfloat16 passes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

UPSAMPLE_METHODS = ("bilinear", "nearest")


def as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """``n`` -> ``(n, n)``; a pair is checked to hold two positive integers."""
    rows, cols = (size, size) if isinstance(size, int) else tuple(size)
    if rows < 1 or cols < 1:
        raise ValueError(f"sizes must be positive, got {size}")
    return int(rows), int(cols)


def adaptive_bin_edges(length: int, bins: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of PyTorch's adaptive pooling: ``floor(i L / n)`` to
    ``ceil((i + 1) L / n)`` for bin ``i`` of ``n`` over ``L`` (integer arithmetic, no rounding)."""
    return [((i * length) // bins, -((-(i + 1) * length) // bins)) for i in range(bins)]


def _pooling_matrix(length: int, bins: int) -> np.ndarray:
    """(bins, length): row ``i`` averages bin ``i``'s pixels."""
    matrix = np.zeros((bins, length), np.float32)
    for row, (start, end) in enumerate(adaptive_bin_edges(length, bins)):
        matrix[row, start:end] = 1.0 / (end - start)
    return matrix


def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of 1-D linear interpolation with aligned corners, as ``F.interpolate``
    computes them: source ``dst * (in - 1) / (out - 1)`` (0 for a single output pixel)."""
    # float32 arithmetic as PyTorch's kernel does: a float64 source (e.g. 10 * 47 / 10 = 47 where
    # float32 gives 46.99999) would shift weights by up to ~1e-6 per pixel of spread.
    scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
    source = np.arange(out_size, dtype=np.float32) * scale
    left = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    right = np.minimum(left + 1, in_size - 1)
    fraction = np.clip(source - left.astype(np.float32), 0.0, 1.0)
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, left), 1.0 - fraction)
    np.add.at(matrix, (rows, right), fraction)
    return matrix


def _apply_separable(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """``rows`` (n, H) and ``cols`` (m, W) applied to the spatial axes of ``x`` (B, H, W, C), in
    float32 at full precision; the result has ``x``'s dtype."""
    highest = jax.lax.Precision.HIGHEST
    y = jnp.einsum("nh,bhwc->bnwc", rows, x.astype(jnp.float32), precision=highest)
    y = jnp.einsum("mw,bnwc->bnmc", cols, y, precision=highest)
    return y.astype(x.dtype)


def adaptive_avg_pool2d(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """PyTorch's ``adaptive_avg_pool2d`` on NHWC: (B, H, W, C) -> (B, n, m, C).

    The mean over a rectangle of bins is the product of the row and column means, so the pooling
    is one (n, H) and one (m, W) averaging matrix.
    """
    bins_h, bins_w = as_size(output_size)
    _, height, width, _ = x.shape
    return _apply_separable(x, _pooling_matrix(height, bins_h), _pooling_matrix(width, bins_w))


def resize_bilinear(
    x: jax.Array, size: tuple[int, int], *, align_corners: bool = False
) -> jax.Array:
    """``F.interpolate(x, size, mode="bilinear", align_corners=...)`` on NHWC (B, h, w, C)."""
    height, width = as_size(size)
    if (height, width) == x.shape[1:3]:
        return x
    if not align_corners:
        # jax.image.resize's linear kernel is PyTorch's half-pixel interpolation (edge taps
        # renormalised = PyTorch's clamping); antialias would widen it when shrinking, which
        # PyTorch does not do.
        shape = (x.shape[0], height, width, x.shape[3])
        return jax.image.resize(x, shape, method="linear", antialias=False)
    rows = _align_corners_matrix(x.shape[1], height)
    cols = _align_corners_matrix(x.shape[2], width)
    return _apply_separable(x, rows, cols)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    # PyTorch computes scale = in / out and floor(dst * scale) in float32; doing the same
    # arithmetic keeps its choice at the rare sizes where float32 rounding decides the pixel.
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(source, in_size - 1)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode="nearest")`` on NHWC (B, h, w, C): a gather of pixels."""
    height, width = as_size(size)
    x = jnp.take(x, _nearest_indices(x.shape[1], height), axis=1)
    return jnp.take(x, _nearest_indices(x.shape[2], width), axis=2)


def upsample_to(x: jax.Array, size: tuple[int, int], method: str) -> jax.Array:
    """``x`` (B, h, w, C) resized to ``size`` by ``method`` ("bilinear": align_corners=False,
    or "nearest"), PyTorch's arithmetic."""
    if method == "bilinear":
        return resize_bilinear(x, size)
    if method == "nearest":
        return resize_nearest(x, size)
    raise ValueError(f"unknown upsample method {method!r}; choose from {UPSAMPLE_METHODS}")
