"""SigLIP's pairwise sigmoid loss over a batch sharded across devices, in two equivalent forms.

For a global batch of ``B`` L2-normalised image embeddings ``x_i`` and text embeddings ``y_j``,
``labels = 2 I - 1`` (+1 for matching pairs, -1 otherwise), ``logits = scale * x @ y.T + bias``, and

    loss = -sum_{i,j} log_sigmoid(labels[i, j] * logits[i, j]) / B

which equals open_clip's per-rank loss (divided by the local batch) averaged over ranks.

Sharded (``axis_name`` given, ``n`` devices holding ``b = B / n`` pairs each), two forms that return
the same replicated value:

* ``sigmoid_loss`` all-gathers the texts and scores the local images against all of them:
  one (b x B) logit block per device, one all-gather.
* ``sigmoid_loss_ring`` passes the text shards around a ring with ``ppermute`` (n - 1 hops) and
  scores one (b x b) block at a time; positives exist only in the block of the device's own texts.
  The next hop is issued before the current block is scored, so communication can overlap
  compute, and each block's logits are recomputed in the backward pass (``jax.checkpoint``): the
  live memory is O(b x b + b x dim), never O(b x B). (The backward pass keeps the received text
  blocks, O(B x dim) in all, as open_clip's autograd does.)

Gradients: see ``losses.contrastive`` (exact under ``shard_map``; ``axis_size`` times the global
gradient inside ``pmap``, undone by the usual ``pmean`` over the axis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from losses.collectives import (
    all_gather_rows,
    axis_index,
    axis_size,
    global_sum,
    ring_permutation,
    similarity,
)

__all__ = ["sigmoid_loss", "sigmoid_loss_ring"]


def _as_float32(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(array).astype(jnp.float32) for array in arrays)


def _summed_pair_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``-sum log_sigmoid(labels * logits)`` over every pair of the block."""
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def _positive_labels(num_rows: int, num_columns: int, column_offset: jax.Array | int) -> jax.Array:
    """+1 where column == column_offset + row (the matching text), -1 elsewhere."""
    rows = jnp.arange(num_rows)[:, None] + column_offset
    columns = jnp.arange(num_columns)[None, :]
    return jnp.where(rows == columns, 1.0, -1.0).astype(jnp.float32)


def sigmoid_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Global-batch SigLIP loss from local shards: local images against all-gathered texts.

    Args:
      image_embeds: (local_batch, dim) L2-normalised image embeddings of this device.
      text_embeds: (local_batch, dim) L2-normalised text embeddings, row i pairs with image i.
      logit_scale: scalar multiplier (already exponentiated by the model).
      logit_bias: scalar added to every logit.
      axis_name: mesh/pmap axis name, or tuple of names, over which the batch is split; None for a
        single device.

    Returns:
      Scalar float32 loss (sum over global pairs / global batch), identical on every device.
    """
    images, texts, scale, bias = _as_float32(image_embeds, text_embeds, logit_scale, logit_bias)
    local_batch = images.shape[0]
    global_batch = local_batch * axis_size(axis_name)

    all_texts = all_gather_rows(texts, axis_name)
    logits = scale * similarity(images, all_texts) + bias
    labels = _positive_labels(local_batch, global_batch, axis_index(axis_name) * local_batch)
    return global_sum(_summed_pair_loss(logits, labels), axis_name) / global_batch


@jax.checkpoint
def _negative_block_loss(
    images: jax.Array, texts: jax.Array, scale: jax.Array, bias: jax.Array
) -> jax.Array:
    """Summed loss of a block of another device's texts: every pair is a negative.

    Checkpointed so that the backward pass recomputes the (b x b) logits instead of keeping one
    block per ring step, which would add up to the (b x B) matrix the ring exists to avoid.
    """
    logits = scale * similarity(images, texts) + bias
    return -jnp.sum(jax.nn.log_sigmoid(-logits))


def sigmoid_loss_ring(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    logit_scale: jax.Array,
    logit_bias: jax.Array,
    *,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Global-batch SigLIP loss from local shards, text shards passed around a ``ppermute`` ring.

    Same arguments and result as ``sigmoid_loss``; memory O(local x local) instead of
    O(local x global). ``axis_name`` may be a tuple: ``ppermute`` then uses the linear device index
    over those axes.
    """
    images, texts, scale, bias = _as_float32(image_embeds, text_embeds, logit_scale, logit_bias)
    local_batch = images.shape[0]
    num_devices = axis_size(axis_name)

    own_logits = scale * similarity(images, texts) + bias
    total = _summed_pair_loss(own_logits, _positive_labels(local_batch, local_batch, 0))

    if num_devices > 1:
        pass_on = lambda block: jax.lax.ppermute(block, axis_name, ring_permutation(num_devices))

        def score_and_pass(carry, _):
            block, running_total = carry
            # Issued before scoring `block` and independent of it, so the hop can overlap compute.
            next_block = pass_on(block)
            running_total = running_total + _negative_block_loss(images, block, scale, bias)
            return (next_block, running_total), None

        # Hop 1 here, hops 2 .. n-1 inside the scan, the last received block scored after it.
        (last_block, total), _ = jax.lax.scan(
            score_and_pass, (pass_on(texts), total), None, length=num_devices - 2
        )
        total = total + _negative_block_loss(images, last_block, scale, bias)

    return global_sum(total, axis_name) / (local_batch * num_devices)
