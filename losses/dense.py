"""Dense (per-pixel) losses for segmentation, depth and surface normals, over a sharded batch.

Every loss takes LOCAL arrays ``(local_batch, H, W, ...)`` of this device and an optional
``axis_name`` (see losses/collectives.py), and returns a float32 scalar, identical on every device:
the mean of a per-pixel loss ``l[b, h, w]`` over the valid pixels of the GLOBAL batch,

    m[b, h, w] = valid[b, h, w] * weights[b]
    loss = sum_{b, h, w} m * l / sum_{b, h, w} m        (0 when no pixel is valid)

with both sums ``psum``-ed over ``axis_name``, so the value does not depend on how the batch is
split (a per-device mean of means would weight devices by their pixel counts). ``weights`` (B,)
are per-image weights, 0 for padding images or images without a label and 1 for real ones (other
non-negative values weight all of an image's pixels). The mask is data: no gradient flows through
it. This is losses/bce.py's ``global_row_mean`` with pixels as rows and ``m`` as their weights.
Everything is computed in float32 whatever the input dtypes (bf16 activations are cast first).

Gradients follow losses/contrastive.py: under ``jax.shard_map`` (check_vma on) ``jax.grad`` is
the gradient of the global loss; inside ``jax.pmap`` it is ``axis_size`` times the global one.
Invalid pixels never produce NaN gradients: their inputs are replaced by finite values BEFORE
any operation with an infinite derivative (a ``where`` after it would give ``0 * inf = NaN``).

The losses:

- :func:`pixel_cross_entropy` (semantic segmentation): ``l = -log_softmax(x[b, h, w])[y[b, h, w]]``;
  a pixel is valid when its label is not ``ignore_label`` and lies in ``[0, C)`` (any other label
  is ignored too, since a jitted function cannot raise). The mean is over non-ignored pixels:
  mmsegmentation's ``CrossEntropyLoss(avg_non_ignore=True)`` (its default ``False`` divides by
  every pixel, ignored ones included).

- :func:`ssi_depth_loss` (MiDaS / ZoeDepth's scale- and shift-invariant loss, in disparity space:
  the caller passes the target DISPARITY). Per image, the closed-form least-squares scale ``s`` and
  shift ``t`` (:func:`least_squares_scale_shift`) minimise ``sum_mask (s p + t - d)^2``; then
  ``l = |s p + t - d|``. Gradients flow to ``p`` through ``s`` and ``t`` as well (MiDaS does not
  stop them).

- :func:`nll_angmf_loss` (Bae et al. 2021, "Estimating and exploiting the aleatoric uncertainty in
  surface normal estimation"): the network's 4 channels are an unnormalised normal ``xyz`` and a
  raw concentration ``k``; ``n = xyz / |xyz|``, ``kappa = elu(k) + 1.01`` (> 0.01), and with
  ``theta = acos(cos(n, n_gt))``

      l = -log(kappa^2 + 1) + kappa * theta + log(1 + exp(-kappa * pi))

  the negative log-likelihood of the angular vonMF distribution. Pixels with ``|cos| >= 0.999``
  are left out (as the paper's code does; the mask is not differentiated), because
  ``d acos(c) / dc = -1 / sqrt(1 - c^2)`` is infinite at ``c = +-1``.

- :func:`masked_l1_loss`: ``l = mean_k |p[..., k] - t[..., k]|`` (one channel when the arrays are
  ``(B, H, W)``).

The scale-and-shift fit (used by the SSI loss here and by the ``disparity_scale_shift`` depth
alignment of pretrain/evaluate/dense_metrics.py, in float64 NumPy there) solves, per image over
its ``n`` valid pixels, the 2x2 normal equations of ``min_{s, t} sum (s p + t - d)^2``:

    [sum p^2  sum p] [s]   [sum p d]
    [sum p    n    ] [t] = [sum d  ]

by eliminating ``t``: ``t = mean(d) - s mean(p)`` and ``s = cov(p, d) / var(p)``, with the
(co)variances from CENTRED values (two passes) rather than ``n sum p^2 - (sum p)^2``, whose
cancellation loses every digit of float32 when the predictions vary little. The determinant of
the system is ``n^2 var(p)``; the guard: when ``n < 2`` or ``var(p) <= 1e-8 mean(p^2)`` (the
predictions of the image are constant to 1e-4 of their magnitude, so ``s`` is not determined and
would be dominated by rounding) the fit falls back to ``s = 1, t = mean(d) - mean(p)``, the
shift-only fit, which is one of the minimisers when ``p`` is exactly constant (the residual is
``|d - mean(d)|``, a finite value with a finite gradient). An image without valid pixels gets
``s = 1, t = 0`` and contributes nothing to the loss.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from losses.alignment import cosine_similarity
from losses.bce import global_row_mean
from losses.collectives import AxisName

__all__ = [
    "ANGMF_COS_LIMIT",
    "ANGMF_KAPPA_OFFSET",
    "angmf_normals_and_kappa",
    "global_pixel_mean",
    "least_squares_scale_shift",
    "masked_l1_loss",
    "nll_angmf_loss",
    "per_example_pixel_sums",
    "pixel_cross_entropy",
    "pixel_l1",
    "pixel_nll",
    "pooled_pixel_mean",
    "ssi_depth_loss",
]

# kappa = elu(k) + 1.01 keeps the concentration above 0.01, where log(kappa^2 + 1) is well behaved.
ANGMF_KAPPA_OFFSET = 1.01
# Pixels with |cos| at or above this are left out of the NLL-AngMF mean (acos has an infinite
# derivative at +-1).
ANGMF_COS_LIMIT = 0.999
# var(p) <= this * mean(p^2): the predictions are constant as far as the fit can tell.
_RELATIVE_VARIANCE_FLOOR = 1e-8


def global_pixel_mean(
    pixel_losses: jax.Array,
    valid: jax.Array,
    *,
    weights: jax.Array | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    """``sum(m * l) / sum(m)`` over the global batch with ``m = valid * weights[b]``; 0 if no pixel.

    ``pixel_losses`` (B, H, W) float32 must be finite wherever ``m > 0``; ``valid`` (B, H, W)
    bool; ``weights`` optional (B,).
    """
    if valid.shape != pixel_losses.shape:
        raise ValueError(f"valid must be {pixel_losses.shape}, got {valid.shape}")
    mask = valid.astype(jnp.float32)
    if weights is not None:
        if weights.shape != pixel_losses.shape[:1]:
            raise ValueError(
                f"weights must be (local_batch,) = {pixel_losses.shape[:1]}, got {weights.shape}"
            )
        mask = mask * weights.astype(jnp.float32)[:, None, None]
    # Zero the losses of masked-out pixels so that a non-finite value there cannot leak in as
    # 0 * inf; global_row_mean stops the gradient through the mask and guards a zero count.
    losses = jnp.where(mask > 0, pixel_losses.astype(jnp.float32), 0.0)
    return global_row_mean(losses.reshape(-1), weights=mask.reshape(-1), axis_name=axis_name)


def per_example_pixel_sums(
    pixel_losses: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per image (B,) float32: the sum of ``pixel_losses`` (B, H, W) over its ``valid`` pixels and
    their count. The two halves of :func:`global_pixel_mean`, for a loss computed where only
    per-example values may cross a boundary (the CLIP task's exact gradient accumulation carries
    per-example values between micro-batches); :func:`pooled_pixel_mean` finishes it."""
    if valid.shape != pixel_losses.shape:
        raise ValueError(f"valid must be {pixel_losses.shape}, got {valid.shape}")
    mask = valid.astype(bool)
    losses = jnp.where(mask, pixel_losses.astype(jnp.float32), 0.0)
    return jnp.sum(losses, axis=(1, 2)), jnp.sum(mask, axis=(1, 2), dtype=jnp.float32)


def pooled_pixel_mean(
    sums: jax.Array, counts: jax.Array, *, axis_name: AxisName = None
) -> jax.Array:
    """``sum(sums) / sum(counts)`` over the global batch (0 when no pixel is valid): with
    :func:`per_example_pixel_sums`' halves, exactly :func:`global_pixel_mean`."""
    rows = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0)
    return global_row_mean(rows, weights=counts, axis_name=axis_name)


# --------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------


def pixel_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_label: int = 255,
    axis_name: AxisName = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Softmax cross-entropy per pixel, averaged over the global batch's non-ignored pixels.

    Args:
      logits: (local_batch, H, W, classes), any float dtype.
      labels: (local_batch, H, W) integer classes; ``ignore_label`` or any value outside
        ``[0, classes)`` marks a pixel without a label.
      ignore_label: the label of unlabelled pixels (255 in ADE20K / Cityscapes / Pascal files).
      axis_name: mesh/pmap axis name(s) over which the batch is split; None for one device.
      weights: optional (local_batch,) per-image weights, 0 for padding images.

    Returns:
      Scalar float32 loss, identical on every device.
    """
    if logits.ndim != 4 or labels.shape != logits.shape[:3]:
        raise ValueError(
            f"logits must be (B, H, W, C) and labels (B, H, W), got {logits.shape} and "
            f"{labels.shape}"
        )
    nll, valid = pixel_nll(logits, labels, ignore_label=ignore_label)
    return global_pixel_mean(nll, valid, weights=weights, axis_name=axis_name)


def pixel_nll(
    logits: jax.Array, labels: jax.Array, *, ignore_label: int = 255
) -> tuple[jax.Array, jax.Array]:
    """Per pixel: ``-log_softmax(logits)[label]`` float32 (B, H, W) and which pixels are valid
    (labelled: not ``ignore_label``, in ``[0, C)``). Invalid pixels hold finite values."""
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer classes, got dtype {labels.dtype}")
    num_classes = logits.shape[-1]
    labels = labels.astype(jnp.int32)
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    # An index in range for every pixel; the ignored ones are masked out of the mean.
    safe_labels = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    return nll, valid


# --------------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------------


def least_squares_scale_shift(
    prediction: Any,
    target: Any,
    valid: Any,
    *,
    xp: ModuleType = jnp,
) -> tuple[Any, Any]:
    """Per-image least-squares ``(scale, shift)`` minimising ``sum_valid (s p + t - d)^2``.

    Args:
      prediction: (B, ...) predictions ``p`` (e.g. disparities), any float dtype.
      target: (B, ...) targets ``d``; values at invalid pixels are never read (they may be inf).
      valid: (B, ...) bool, the pixels that enter the fit.
      xp: the array namespace: ``jax.numpy`` (default; float32, differentiable, jit-able) or
        ``numpy`` (float64, for the host-side metrics).

    Returns:
      ``(scale (B,), shift (B,))``; the fallbacks for images with fewer than two distinct valid
      predictions or no valid pixel are in the module docstring.
    """
    dtype = np.float64 if xp is np else jnp.float32
    valid = xp.asarray(valid).astype(bool)
    if xp.asarray(prediction).shape != valid.shape or xp.asarray(target).shape != valid.shape:
        raise ValueError(
            "prediction, target and valid must have one shape, got "
            f"{xp.asarray(prediction).shape}, {xp.asarray(target).shape} and {valid.shape}"
        )
    pixel_axes = tuple(range(1, valid.ndim))
    # Invalid pixels read as 0 so that inf / NaN there never enter a sum (or its gradient).
    p = xp.where(valid, xp.asarray(prediction).astype(dtype), 0.0)
    d = xp.where(valid, xp.asarray(target).astype(dtype), 0.0)
    count = xp.sum(valid.astype(dtype), axis=pixel_axes)
    per_pixel = xp.maximum(count, 1.0)  # 1 / 1 for an image without valid pixels
    mean_p = xp.sum(p, axis=pixel_axes) / per_pixel
    mean_d = xp.sum(d, axis=pixel_axes) / per_pixel
    centred_shape = (-1,) + (1,) * len(pixel_axes)
    centred_p = xp.where(valid, p - mean_p.reshape(centred_shape), 0.0)
    centred_d = xp.where(valid, d - mean_d.reshape(centred_shape), 0.0)
    variance = xp.sum(centred_p * centred_p, axis=pixel_axes) / per_pixel
    covariance = xp.sum(centred_p * centred_d, axis=pixel_axes) / per_pixel
    second_moment = xp.sum(p * p, axis=pixel_axes) / per_pixel
    solvable = (count >= 2) & (variance > _RELATIVE_VARIANCE_FLOOR * second_moment)
    # Double where: the division never sees a zero variance, so its gradient stays finite.
    scale = xp.where(solvable, covariance / xp.where(solvable, variance, 1.0), 1.0)
    shift = xp.where(count > 0, mean_d - scale * mean_p, 0.0)
    return scale, shift


def ssi_depth_loss(
    prediction: jax.Array,
    target: jax.Array,
    valid: jax.Array,
    *,
    axis_name: AxisName = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Scale- and shift-invariant L1 loss (MiDaS), averaged over the global batch's valid pixels.

    Args:
      prediction: (local_batch, H, W) predicted disparities, any float dtype.
      target: (local_batch, H, W) target disparities (1 / depth); values at invalid pixels are
        never read.
      valid: (local_batch, H, W) bool, pixels with a usable target.
      axis_name: mesh/pmap axis name(s) over which the batch is split; None for one device.
      weights: optional (local_batch,) per-image weights, 0 for padding images.

    Returns:
      Scalar float32 loss ``mean_valid |s p + t - d|`` with the per-image least-squares ``s, t``.
    """
    if prediction.ndim != 3 or target.shape != prediction.shape:
        raise ValueError(
            f"prediction and target must both be (B, H, W), got {prediction.shape} and "
            f"{target.shape}"
        )
    valid = valid.astype(bool)
    scale, shift = least_squares_scale_shift(prediction, target, valid)
    p = jnp.where(valid, prediction.astype(jnp.float32), 0.0)
    d = jnp.where(valid, target.astype(jnp.float32), 0.0)
    residual = jnp.abs(scale[:, None, None] * p + shift[:, None, None] - d)
    return global_pixel_mean(residual, valid, weights=weights, axis_name=axis_name)


def masked_l1_loss(
    prediction: jax.Array,
    target: jax.Array,
    valid: jax.Array,
    *,
    axis_name: AxisName = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Mean over the global batch's valid pixels of ``mean_k |prediction - target|``.

    Args:
      prediction: (local_batch, H, W) or (local_batch, H, W, K), any float dtype.
      target: same shape; values at invalid pixels are never read.
      valid: (local_batch, H, W) bool.
      axis_name: mesh/pmap axis name(s) over which the batch is split; None for one device.
      weights: optional (local_batch,) per-image weights, 0 for padding images.

    Returns:
      Scalar float32 loss, identical on every device.
    """
    if prediction.ndim not in (3, 4) or target.shape != prediction.shape:
        raise ValueError(
            "prediction and target must both be (B, H, W) or (B, H, W, K), got "
            f"{prediction.shape} and {target.shape}"
        )
    valid = valid.astype(bool)
    return global_pixel_mean(
        pixel_l1(prediction, target, valid), valid, weights=weights, axis_name=axis_name
    )


def pixel_l1(prediction: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
    """Per pixel ``mean_k |prediction - target|`` float32 (B, H, W); 0 at invalid pixels."""
    difference = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    if difference.ndim == 3:
        difference = difference[..., None]
    # Zeroed before abs: a NaN / inf target at an invalid pixel gives neither a value nor a NaN
    # gradient (abs'(0) = 0).
    difference = jnp.where(valid.astype(bool)[..., None], difference, 0.0)
    return jnp.mean(jnp.abs(difference), axis=-1)


# --------------------------------------------------------------------------------------------------
# Surface normals
# --------------------------------------------------------------------------------------------------


def angmf_normals_and_kappa(output: jax.Array) -> tuple[jax.Array, jax.Array]:
    """From the 4-channel NLL-AngMF output: unit normals (..., 3) and concentrations (...).

    ``normals = xyz / max(|xyz|, 1e-8)`` (a zero vector stays zero), ``kappa = elu(k) + 1.01``;
    float32 whatever the input dtype.
    """
    if output.shape[-1] != 4:
        raise ValueError(f"output must have 4 channels (x, y, z, kappa), got {output.shape}")
    output = output.astype(jnp.float32)
    xyz = output[..., :3]
    # The clamped squared norm keeps the gradient finite at xyz = 0 (as losses/alignment.py).
    norm = jnp.sqrt(jnp.maximum(jnp.sum(xyz * xyz, axis=-1, keepdims=True), 1e-16))
    kappa = jax.nn.elu(output[..., 3]) + ANGMF_KAPPA_OFFSET
    return xyz / norm, kappa


def nll_angmf_loss(
    output: jax.Array,
    target_normals: jax.Array,
    valid: jax.Array,
    *,
    axis_name: AxisName = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Bae et al.'s NLL of the angular vonMF distribution, averaged over usable valid pixels.

    Args:
      output: (local_batch, H, W, 4): unnormalised normal (x, y, z) and raw concentration.
      target_normals: (local_batch, H, W, 3) ground-truth normals (normalised here).
      valid: (local_batch, H, W) bool, pixels with a ground-truth normal; pixels whose predicted
        and true normals have ``|cos| >= 0.999`` are left out as well.
      axis_name: mesh/pmap axis name(s) over which the batch is split; None for one device.
      weights: optional (local_batch,) per-image weights, 0 for padding images.

    Returns:
      Scalar float32 loss, identical on every device.
    """
    if output.ndim != 4 or target_normals.shape != (*output.shape[:3], 3):
        raise ValueError(
            f"output must be (B, H, W, 4) and target_normals (B, H, W, 3), got {output.shape} "
            f"and {target_normals.shape}"
        )
    _, kappa = angmf_normals_and_kappa(output)
    cos = cosine_similarity(output[..., :3].astype(jnp.float32), target_normals.astype(jnp.float32))
    usable = valid.astype(bool) & (jnp.abs(jax.lax.stop_gradient(cos)) < ANGMF_COS_LIMIT)
    # acos sees 0 at the left-out pixels, so its infinite derivative at +-1 never meets them.
    angle = jnp.arccos(jnp.where(usable, cos, 0.0))
    pixel_losses = -jnp.log(kappa * kappa + 1.0) + kappa * angle + jax.nn.softplus(-kappa * jnp.pi)
    return global_pixel_mean(pixel_losses, usable, weights=weights, axis_name=axis_name)
