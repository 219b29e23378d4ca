"""RangeAugment's image-similarity loss and its annealed target (paper 000, Table 11: 40 -> 20 dB).

Per image, the mean squared error between the augmented and the original image, on the 0-255
scale, is pulled towards the MSE of the target PSNR with a smooth L1 (Huber, delta 1) loss, mean
over the batch, scaled by ``alpha / 255**2`` (CoreNet's normalisation by the largest possible MSE;
alpha 100). The target moves from the start PSNR to the end PSNR over training along a cosine
(or linear) curve in MSE space, as CoreNet does.

    PSNR = 20 log10(255) - 10 log10(MSE)   =>   MSE = 10 ** ((20 log10(255) - PSNR) / 10)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from losses.collectives import AxisName, axis_size, global_sum

__all__ = ["image_mse", "psnr_target_loss", "psnr_to_mse", "target_mse_schedule"]

MAX_PIXEL = 255.0


def psnr_to_mse(psnr: float) -> float:
    return 10.0 ** ((20.0 * math.log10(MAX_PIXEL) - psnr) / 10.0)


def target_mse_schedule(
    step: jax.Array, total_steps: int, start_psnr: float, end_psnr: float, curve: str = "cosine"
) -> jax.Array:
    """The target MSE at ``step``: start at step 0, end at ``total_steps`` (held afterwards)."""
    start, end = psnr_to_mse(start_psnr), psnr_to_mse(end_psnr)
    progress = jnp.clip(jnp.asarray(step, jnp.float32), 0, total_steps)
    if curve == "cosine":
        # CoreNet's table has total_steps + 1 points over a half period of total_steps + 1.
        return end + 0.5 * (start - end) * (1 + jnp.cos(jnp.pi * progress / (total_steps + 1)))
    if curve == "linear":
        return start + (end - start) * progress / max(total_steps, 1)
    raise ValueError(f"unknown curriculum {curve!r}; use 'cosine' or 'linear'")


def _smooth_l1(x: jax.Array) -> jax.Array:
    magnitude = jnp.abs(x)
    return jnp.where(magnitude < 1.0, 0.5 * x**2, magnitude - 0.5)


def image_mse(original: jax.Array, augmented: jax.Array) -> jax.Array:
    """Per-image mean squared error on the 0-255 scale of (batch, ...) images given in [0, 1]."""
    difference = (augmented.astype(jnp.float32) - original.astype(jnp.float32)) * MAX_PIXEL
    return jnp.mean(difference**2, axis=tuple(range(1, difference.ndim)))


def psnr_target_loss(
    mse: jax.Array,
    target_mse: jax.Array,
    *,
    alpha: float = 100.0,
    axis_name: AxisName = None,
) -> jax.Array:
    """Mean over the (global) batch of smooth-L1(mse - target_mse) * alpha / 255**2.

    ``mse`` is :func:`image_mse` of this device's images; with ``axis_name`` the mean is over the
    images of all devices.
    """
    per_image = _smooth_l1(mse - target_mse)
    total = global_sum(per_image.sum(), axis_name)
    count = per_image.shape[0] * axis_size(axis_name)
    return total / count * (alpha / MAX_PIXEL**2)
