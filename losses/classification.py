"""Single-label softmax cross-entropy with label smoothing, over a batch sharded across devices.

For CatLIP's transfer learning on single-label data sets (ImageNet-1k, Places365): a global batch
of ``B`` images with ``C`` logits ``x[b, :]`` each and integer labels ``l[b]``; with label smoothing
``eps`` the target distribution is (as torch's ``cross_entropy(label_smoothing=eps)`` and optax's
``smooth_labels``)

    q[b, c] = (1 - eps) * [c == l[b]] + eps / C

and

    loss = -(1 / B) * sum_{b, c} q[b, c] * log_softmax(x[b, :])[c]

whose gradient is ``d loss / d x[b, c] = (softmax(x[b, :])[c] - q[b, c]) / B``. Computed in float32
whatever the logits' dtype (log_softmax subtracts the row maximum, so large logits stay finite).

Padding rows, sharding (``axis_name``) and the gradient conventions under ``jax.shard_map`` and
``jax.pmap`` are those of losses/bce.py (the multi-label loss), whose global row mean this module
reuses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from losses.bce import global_row_mean
from losses.collectives import AxisName

__all__ = ["smoothed_one_hot", "softmax_cross_entropy_loss"]


def smoothed_one_hot(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
    """(rows, num_classes) float32 targets ``(1 - eps) * one_hot + eps / num_classes``."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return (1.0 - label_smoothing) * one_hot + label_smoothing / num_classes


def softmax_cross_entropy_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    axis_name: AxisName = None,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Softmax cross-entropy against (smoothed) integer labels, averaged over the global batch.

    Args:
      logits: (local_batch, classes) logits of this device, any float dtype.
      labels: (local_batch,) integer class indices in [0, classes).
      label_smoothing: ``eps`` in [0, 1]: the share of the target spread uniformly over classes.
      axis_name: mesh/pmap axis name, or tuple of names, over which the batch is split; None for a
        single device.
      weights: optional (local_batch,) row weights, 0 for padding rows and 1 for real ones; the
        mean is then over the global sum of the weights.

    Returns:
      Scalar float32 loss, identical on every device.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            "logits must be (batch, classes) and labels (batch,), got "
            f"{logits.shape} and {labels.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = smoothed_one_hot(labels, logits.shape[-1], label_smoothing)
    row_losses = -jnp.sum(targets * log_probs, axis=-1)
    return global_row_mean(row_losses, weights=weights, axis_name=axis_name)
