"""UTA's token alignment loss: negative cosine similarity to a frozen teacher, per token.

For a global batch of ``B`` images with ``T`` aligned tokens each (the kept patches plus the class
token), student tokens ``s`` (after the student's projection) and teacher tokens ``t`` (the
teacher's features at the same positions, in the same order):

    loss = -(1 / (B T)) * sum_{b, k} cos(s[b, k], t[b, k])

computed in float32 whatever the input dtype (bf16 activations are cast first).

Sharded (``axis_name`` given): every device holds ``B / n`` rows; the per-device sums are
``psum``-ed and divided by the global token count, so the returned mean is replicated. There is
no cross-device term, so memory and compute stay local.

The teacher is frozen: this function applies ``jax.lax.stop_gradient`` to ``teacher_tokens``
itself, so no gradient reaches the teacher even if the caller forgets to stop it.

Gradients follow losses/contrastive.py: under ``jax.shard_map`` (check_vma on) ``jax.grad`` is
the gradient of the global loss; inside ``jax.pmap`` it is ``axis_size`` times the global one
(``psum`` transposes to ``psum``), which the usual ``pmean`` of gradients undoes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from losses.collectives import AxisName, axis_size, global_sum

__all__ = ["cosine_similarity", "token_alignment_loss"]

# As torch.nn.functional.cosine_similarity (which EVA-02 uses): guards all-zero vectors.
_NORM_EPS = 1e-8


def _clamped_norm(x: jax.Array, eps: float) -> jax.Array:
    # Clamping the squared norm (not the norm) keeps the gradient finite (zero) at x = 0, where
    # the derivative of a norm is 0/0.
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), eps * eps))


def cosine_similarity(x: jax.Array, y: jax.Array, eps: float = _NORM_EPS) -> jax.Array:
    """Cosine similarity along the last axis; each norm is clamped below at ``eps``."""
    return jnp.sum(x * y, axis=-1) / (_clamped_norm(x, eps) * _clamped_norm(y, eps))


def token_alignment_loss(
    student_tokens: jax.Array,
    teacher_tokens: jax.Array,
    *,
    axis_name: AxisName = None,
) -> jax.Array:
    """Mean negative cosine similarity over tokens and the global batch.

    Args:
      student_tokens: (local_batch, tokens, dim) projected student tokens of this device.
      teacher_tokens: (local_batch, tokens, dim) teacher tokens at the same positions; no
        gradient flows into them (stop_gradient here).
      axis_name: mesh/pmap axis name, or tuple of names, over which the batch is split; None for a
        single device.

    Returns:
      Scalar float32 loss in [-1, 1], identical on every device.
    """
    if student_tokens.shape != teacher_tokens.shape or student_tokens.ndim != 3:
        raise ValueError(
            "student and teacher tokens must both be (batch, tokens, dim), got "
            f"{student_tokens.shape} and {teacher_tokens.shape}"
        )
    student = student_tokens.astype(jnp.float32)
    teacher = jax.lax.stop_gradient(teacher_tokens.astype(jnp.float32))
    local_batch, tokens, _ = student.shape
    global_count = local_batch * tokens * axis_size(axis_name)
    local_total = -jnp.sum(cosine_similarity(student, teacher))
    return global_sum(local_total, axis_name) / global_count
