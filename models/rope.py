"""2-D rotary position embedding (RoPE) for a ViT's patch grid, as in EVA-02 (and timm's eva.py).

Layout (the facts every implementation must agree on to share weights):

* Every dimension of each head is rotated, in interleaved pairs ``(x[2i], x[2i+1])``.
* The first half of the pairs encodes the patch's row, the second half its column. With
  ``n = head_dim // 4`` frequencies ``f_k = theta ** (-k / n)`` (k = 0..n-1), pair ``k`` turns by
  ``row * f_k`` and pair ``n + k`` by ``col * f_k``.
* Positions are the integer grid indices, or, with a reference grid (EVA-02's ``pt_seq_len``,
  timm's ``ref_feat_shape``), ``arange(grid) / grid * ref``: a model trained on a 16 x 16 grid sees
  the same range of angles on a 14 x 14 one.
* Angles, sines and cosines are float32 whatever the compute dtype; the rotation runs in float32 and
  is cast back.
* Prefix tokens (the class token) are not rotated: they get angle 0, i.e. the identity rotation, so
  the class token and the patches go through one code path and the angles of kept patches are a
  plain gather (token dropping).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_THETA = 10000.0


def as_pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    rows, cols = value
    return int(rows), int(cols)


def rope_frequencies(head_dim: int, theta: float = DEFAULT_THETA) -> np.ndarray:
    """The ``head_dim // 4`` rotation frequencies (float32), shared by the row and column halves."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    count = head_dim // 4
    exponents = np.arange(count, dtype=np.float32) / np.float32(count)
    return (np.float32(1.0) / np.float32(theta) ** exponents).astype(np.float32)


def grid_positions(
    grid: int | tuple[int, int], ref_grid: int | tuple[int, int] | None = None
) -> np.ndarray:
    """(rows * cols, 2) float32 (row, col) positions of the patches, in row-major order."""
    rows, cols = as_pair(grid)
    axes = [np.arange(size, dtype=np.float32) for size in (rows, cols)]
    if ref_grid is not None:
        # EVA-02's scheme for a grid other than the pretraining one (same op order as timm, so
        # the float32 positions agree bit for bit).
        axes = [
            axis / np.float32(size) * np.float32(ref)
            for axis, size, ref in zip(axes, (rows, cols), as_pair(ref_grid))
        ]
    row_index, col_index = np.meshgrid(*axes, indexing="ij")
    return np.stack([row_index.reshape(-1), col_index.reshape(-1)], axis=-1)


def rope_angles(
    grid: int | tuple[int, int],
    head_dim: int,
    *,
    theta: float = DEFAULT_THETA,
    ref_grid: int | tuple[int, int] | None = None,
) -> np.ndarray:
    """(rows * cols, head_dim // 2) float32 angles, one per rotated pair: [row half | col half]."""
    frequencies = rope_frequencies(head_dim, theta)
    positions = grid_positions(grid, ref_grid)
    row_angles = positions[:, :1] * frequencies
    col_angles = positions[:, 1:] * frequencies
    return np.concatenate([row_angles, col_angles], axis=-1).astype(np.float32)


def with_prefix_tokens(angles: jax.Array, count: int = 1) -> jax.Array:
    """Prepend ``count`` zero-angle rows (not rotated) along the token axis (second to last)."""
    pad = [(0, 0)] * angles.ndim
    pad[-2] = (count, 0)
    return jnp.pad(angles, pad)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate the interleaved pairs of ``x`` (batch, tokens, heads, head_dim) by ``angles``.

    ``angles`` is (tokens, head_dim // 2) or (batch, tokens, head_dim // 2). The rotation runs in
    float32 and the result has ``x``'s dtype.
    """
    if angles.ndim == 2:
        angles = angles[None]
    angles = angles.astype(jnp.float32)[:, :, None, :]  # broadcast over heads
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
