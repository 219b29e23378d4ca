"""CLIP's symmetric contrastive (InfoNCE) loss over a batch sharded across devices.

For a global batch of ``B`` L2-normalised image embeddings ``x_i`` and text embeddings ``y_j``,
``logits = scale * x @ y.T`` (B x B), and

    loss = [ sum_i CE(logits[i, :], i) + sum_j CE(logits[:, j], j) ] / (2 B)

i.e. the mean of image->text and text->image cross-entropy, as in open_clip.

Sharded (``axis_name`` given): each of the ``n`` devices holds ``b = B / n`` rows of each side. It
all-gathers the other side and computes only its own ``b`` rows of ``logits`` and its own ``b``
columns (as rows of ``scale * y_local @ x_all.T``): memory O(b x B) per device, never B x B.
Gradients flow through the gathers (their transpose is a reduce-scatter), which equals open_clip's
``gather_with_grad=True, local_loss=True``. The per-device sums are ``psum``-ed, so the returned
global mean is replicated on every device.

Gradients: under ``jax.shard_map`` (check_vma on) ``jax.grad`` gives the gradient of the global
loss. Under ``jax.pmap`` (and ``shard_map`` with check_vma off) ``psum`` transposes to ``psum``,
so a gradient taken inside the map is ``axis_size`` times the global one (pmap differentiates the
sum of the devices' identical outputs); the usual ``pmean`` of the gradients over the axis
undoes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from losses.collectives import (
    all_gather_rows,
    axis_index,
    axis_size,
    global_sum,
    similarity,
)

__all__ = ["clip_loss"]


def _summed_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Sum over rows of ``-log_softmax(logits)[row, targets[row]]``."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(log_probs, targets[:, None], axis=-1))


def clip_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    logit_scale: jax.Array,
    *,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Global-batch CLIP loss from local shards.

    Args:
      image_embeds: (local_batch, dim) L2-normalised image embeddings of this device.
      text_embeds: (local_batch, dim) L2-normalised text embeddings, row i pairs with image i.
      logit_scale: scalar multiplier (already exponentiated and clamped by the model).
      axis_name: mesh/pmap axis name, or tuple of names, over which the batch is split; None for a
        single device.

    Returns:
      Scalar float32 mean loss over the global batch, identical on every device.
    """
    images = image_embeds.astype(jnp.float32)
    texts = text_embeds.astype(jnp.float32)
    scale = jnp.asarray(logit_scale, jnp.float32)
    local_batch = images.shape[0]
    global_batch = local_batch * axis_size(axis_name)

    # The positive for local row r sits in column (device offset + r) of the gathered side.
    targets = axis_index(axis_name) * local_batch + jnp.arange(local_batch)
    logits_per_image = scale * similarity(images, all_gather_rows(texts, axis_name))
    logits_per_text = scale * similarity(texts, all_gather_rows(images, axis_name))
    local_total = _summed_cross_entropy(logits_per_image, targets) + _summed_cross_entropy(
        logits_per_text, targets
    )
    return global_sum(local_total, axis_name) / (2 * global_batch)
