"""CatLIP's multi-label binary cross-entropy over a batch sharded across devices.

For a global batch of ``B`` images with ``C`` logits ``x[b, c]`` each and multi-hot targets
``y[b, c]`` in {0, 1} (the synsets found in the image's caption):

    loss = (1 / B) * sum_{b, c} [ softplus(x[b, c]) - y[b, c] * x[b, c] ]

which is ``-[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]`` summed over classes and averaged
over images: CoreNet's ``binary_cross_entropy_with_logits(reduction="sum") / batch_size``. Each
class is an independent sigmoid, so nothing couples the classes or the images and the per-device
work stays local. ``softplus(x) = max(x, 0) + log1p(exp(-|x|))`` never overflows, so logits of
any magnitude give finite values, and its derivative gives the gradient
``d loss / d x[b, c] = (sigmoid(x[b, c]) - y[b, c]) / B``.

Everything is computed in float32 whatever the input dtypes (bf16 logits, uint8 multi-hot targets
from the data pipeline).

Padding rows: optional row ``weights`` w[b] (0 for padding, 1 for real images) turn the average
into ``sum_b w[b] * row_loss[b] / sum_b w[b]`` over the global batch (0 when every row is padding).

Sharded (``axis_name`` given, see losses/collectives.py): every device holds ``B / n`` rows; the
per-device sums (and weight sums) are ``psum``-ed, so the returned value is the global mean,
replicated on every device.

Gradients follow losses/contrastive.py: under ``jax.shard_map`` (check_vma on) ``jax.grad`` is
the gradient of the global loss; inside ``jax.pmap`` it is ``axis_size`` times the global one
(``psum`` transposes to ``psum``), which the usual ``pmean`` of gradients undoes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from losses.collectives import AxisName, axis_size, global_sum

__all__ = ["global_row_mean", "multilabel_bce_loss", "sigmoid_bce_per_row"]


def sigmoid_bce_per_row(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """(rows,) float32 ``sum_c softplus(x) - y x``: binary cross-entropy summed over classes."""
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    return jnp.sum(jax.nn.softplus(logits) - targets * logits, axis=-1)


def global_row_mean(
    row_losses: jax.Array,
    *,
    weights: jax.Array | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    """Mean of per-row losses over the global batch, replicated on every device.

    ``row_losses`` (local_batch,) float32. Without ``weights`` the divisor is the global row count
    (static); with ``weights`` (local_batch,) it is the global sum of the weights, and an all-zero
    global weight (a batch made of padding only) gives 0 instead of 0 / 0.
    """
    if weights is None:
        global_count = row_losses.shape[0] * axis_size(axis_name)
        return global_sum(jnp.sum(row_losses), axis_name) / global_count
    if weights.shape != row_losses.shape:
        raise ValueError(
            f"weights must be (local_batch,) = {row_losses.shape}, got shape {weights.shape}"
        )
    # Weights are data (which rows are real), never something to differentiate.
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    total = global_sum(jnp.sum(weights * row_losses), axis_name)
    total_weight = global_sum(jnp.sum(weights), axis_name)
    return total / jnp.where(total_weight > 0, total_weight, 1.0)


def multilabel_bce_loss(
    logits: jax.Array,
    targets: jax.Array,
    *,
    axis_name: AxisName = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Binary cross-entropy with logits, summed over classes and averaged over the global batch.

    Args:
      logits: (local_batch, classes) logits of this device, any float dtype.
      targets: (local_batch, classes) multi-hot targets in {0, 1}, any dtype (uint8, bool, float).
      axis_name: mesh/pmap axis name, or tuple of names, over which the batch is split; None for a
        single device.
      weights: optional (local_batch,) row weights, 0 for padding rows and 1 for real ones; the
        mean is then over the global sum of the weights.

    Returns:
      Scalar float32 loss, identical on every device.
    """
    if logits.ndim != 2 or targets.shape != logits.shape:
        raise ValueError(
            "logits and targets must both be (batch, classes), got "
            f"{logits.shape} and {targets.shape}"
        )
    return global_row_mean(
        sigmoid_bce_per_row(logits, targets), weights=weights, axis_name=axis_name
    )
