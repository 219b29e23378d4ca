"""MobileCLIP's reinforced-training losses: similarity-matrix distillation from a frozen teacher
ensemble, plus CLIP losses on real and synthetic captions (DataCompDR).

Distillation. For a global batch of ``B`` pairs, the student's L2-normalised embeddings ``x``
(images) and ``y`` (texts) give row-wise softmax distributions

    Q_i2t = softmax_rows(s * x @ y.T),    Q_t2i = softmax_rows(s * y @ x.T)

and each of the ``K`` frozen teachers (embeddings ``u_k``, ``v_k``, scale ``t_k``) gives
``P_i2t^k = softmax_rows(t_k * u_k @ v_k.T)`` (and ``P_t2i^k`` likewise). The teachers are combined
by averaging their PROBABILITIES, ``P = mean_k P^k``, as ml-mobileclip's released recipes do
(``--distill-average-after-softmax``), and

    loss = [ sum_i KL(P_i2t[i] || Q_i2t[i]) + sum_j KL(P_t2i[j] || Q_t2i[j]) ] / (2 B)

i.e. KL(teacher || student) averaged over the rows and the two directions. MobileCLIP's paper
writes the ensemble term as the mean over teachers of KL(P^k || Q), and its code as the soft
cross-entropy ``-sum P log Q`` with ``P`` the averaged probabilities; the three differ only by
teacher entropies, constants for the student, so all have the same gradient. This KL form is the
one that is zero when the student reproduces the (averaged) teacher.

Reinforced total (ml-mobileclip's ``DRClipLoss``): the image is paired with its real caption and
with one synthetic caption, and each pairing contributes a CLIP loss and a distillation loss:

    total = w_real * CLIP(x, y_real) + w_syn * CLIP(x, y_syn)
            + w_distill * (KD(real) + KD(synthetic))

Sharded (``axis_name`` given): as ``losses.contrastive.clip_loss``: each device computes its own
(b x B) rows in both directions against all-gathered columns (students gathered with gradient,
teachers without), the per-device sums are ``psum``-ed and the returned scalar is replicated.
Gradients: exact under ``jax.shard_map`` (check_vma on); inside ``jax.pmap`` ``axis_size`` times
the global gradient, undone by the usual ``pmean``. No gradient ever reaches the teacher
embeddings or the teacher scale (``stop_gradient`` here).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from losses.collectives import AxisName, all_gather_rows, axis_size, global_sum, similarity
from losses.contrastive import clip_loss

__all__ = [
    "MOBILECLIP_B_WEIGHTS",
    "MOBILECLIP_S_WEIGHTS",
    "MOBILECLIP_TEACHER_SCALE",
    "QUALITY_CAPTIONS_WEIGHTS",
    "ImageTextEmbeddings",
    "ReinforcedLossWeights",
    "reinforced_clip_loss",
    "similarity_distillation_loss",
]

# ml-mobileclip trains with a fixed teacher logit scale (``--distill-logit-scale 100``), not the
# teachers' own learned scales.
MOBILECLIP_TEACHER_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class ReinforcedLossWeights:
    """Weights of the reinforced loss terms (Python floats: they are configuration)."""

    real_clip: float
    synthetic_clip: float
    distill: float  # applied to the sum of the real- and synthetic-caption distillation terms


# ml-mobileclip's released recipes, ``--distill-loss-weights <clip> <distill>`` (the same pair is
# applied to the real and to the synthetic captions): 0.25 0.75 for the ViT-B/16 (MobileCLIP-B)
# run, 0.0 1.0 for the MobileCLIP-S* variants (the paper's L = (1 - lambda) CLIP + lambda KD).
MOBILECLIP_B_WEIGHTS = ReinforcedLossWeights(real_clip=0.25, synthetic_clip=0.25, distill=0.75)
MOBILECLIP_S_WEIGHTS = ReinforcedLossWeights(real_clip=0.0, synthetic_clip=0.0, distill=1.0)
# Paper 000 (CLIP with Quality Captions) trains its ViT-B/16 with CLIP losses on both the real and
# the synthetic captions and no distillation.
QUALITY_CAPTIONS_WEIGHTS = ReinforcedLossWeights(real_clip=1.0, synthetic_clip=1.0, distill=0.0)


class ImageTextEmbeddings(NamedTuple):
    """One model's local embeddings for a DataCompDR batch (a pytree: shard it with one spec).

    Student arrays are (local_batch, dim); teacher arrays (local_batch, dim) for one teacher or
    (local_batch, num_teachers, dim) for an ensemble. ``synthetic_text`` may be None when the
    batch has no synthetic captions.
    """

    image: jax.Array
    real_text: jax.Array
    synthetic_text: jax.Array | None = None


def _as_ensemble(teacher: jax.Array, name: str) -> jax.Array:
    """(batch, dim) -> (batch, 1, dim); (batch, teachers, dim) unchanged."""
    if teacher.ndim == 2:
        return teacher[:, None, :]
    if teacher.ndim == 3:
        return teacher
    raise ValueError(f"{name} must be (batch, dim) or (batch, teachers, dim), got {teacher.shape}")


def _teacher_log_probs(queries: jax.Array, keys: jax.Array, scales: jax.Array) -> jax.Array:
    """log(mean_k softmax_rows(scale_k * queries_k @ keys_k.T)): (b, K, d), (B, K, d) -> (b, B).

    Averaged in log space (logsumexp over teachers) so that rows far below a teacher's maximum
    keep their log-probability instead of underflowing to log(0) at scales of ~100.
    """
    per_teacher = jax.vmap(similarity, in_axes=(1, 1))(queries, keys)  # (K, b, B)
    log_probs = jax.nn.log_softmax(scales[:, None, None] * per_teacher, axis=-1)
    return jax.nn.logsumexp(log_probs, axis=0) - math.log(queries.shape[1])


def _summed_kl(teacher_log_probs: jax.Array, student_logits: jax.Array) -> jax.Array:
    """sum over rows of KL(teacher row || softmax(student row))."""
    student_log_probs = jax.nn.log_softmax(student_logits, axis=-1)
    teacher_probs = jnp.exp(teacher_log_probs)
    return jnp.sum(teacher_probs * (teacher_log_probs - student_log_probs))


def similarity_distillation_loss(
    student_image: jax.Array,
    student_text: jax.Array,
    teacher_image: jax.Array,
    teacher_text: jax.Array,
    student_scale: jax.Array,
    teacher_scale: jax.Array | float,
    *,
    axis_name: AxisName = None,
) -> jax.Array:
    """KL(teacher || student) between row-softmaxed global similarity matrices, both directions.

    Args:
      student_image: (local_batch, dim) L2-normalised student image embeddings of this device.
      student_text: (local_batch, dim) L2-normalised student text embeddings, row i pairs with
        image i.
      teacher_image: (local_batch, teacher_dim) or (local_batch, num_teachers, teacher_dim)
        L2-normalised teacher image embeddings (each teacher normalised on its own); no gradient.
      teacher_text: teacher text embeddings, same shape as ``teacher_image``; no gradient.
      student_scale: scalar multiplier of the student's similarities (already exponentiated).
      teacher_scale: scalar, or (num_teachers,) one scale per teacher; no gradient.
      axis_name: mesh/pmap axis name, or tuple of names, over which the batch is split; None for a
        single device.

    Returns:
      Scalar float32 loss (>= 0), identical on every device.
    """
    if student_image.ndim != 2 or student_image.shape != student_text.shape:
        raise ValueError(
            "student image and text must both be (batch, dim), got "
            f"{student_image.shape} and {student_text.shape}"
        )
    teacher_images = _as_ensemble(teacher_image, "teacher_image")
    teacher_texts = _as_ensemble(teacher_text, "teacher_text")
    if teacher_images.shape != teacher_texts.shape:
        raise ValueError(
            f"teacher image and text shapes differ: {teacher_image.shape} vs {teacher_text.shape}"
        )
    if teacher_images.shape[0] != student_image.shape[0]:
        raise ValueError(
            f"teacher batch {teacher_images.shape[0]} != student batch {student_image.shape[0]}"
        )

    images = student_image.astype(jnp.float32)
    texts = student_text.astype(jnp.float32)
    scale = jnp.asarray(student_scale, jnp.float32)
    teacher_images = jax.lax.stop_gradient(teacher_images.astype(jnp.float32))
    teacher_texts = jax.lax.stop_gradient(teacher_texts.astype(jnp.float32))
    num_teachers = teacher_images.shape[1]
    teacher_scales = jax.lax.stop_gradient(
        jnp.broadcast_to(jnp.asarray(teacher_scale, jnp.float32), (num_teachers,))
    )
    global_batch = images.shape[0] * axis_size(axis_name)

    # Local rows against gathered columns, as in clip_loss: image->text rows of this device's
    # images, text->image rows of this device's texts.
    student_i2t = scale * similarity(images, all_gather_rows(texts, axis_name))
    student_t2i = scale * similarity(texts, all_gather_rows(images, axis_name))
    teacher_i2t = _teacher_log_probs(
        teacher_images, all_gather_rows(teacher_texts, axis_name), teacher_scales
    )
    teacher_t2i = _teacher_log_probs(
        teacher_texts, all_gather_rows(teacher_images, axis_name), teacher_scales
    )
    local_total = _summed_kl(teacher_i2t, student_i2t) + _summed_kl(teacher_t2i, student_t2i)
    return global_sum(local_total, axis_name) / (2 * global_batch)


def reinforced_clip_loss(
    student: ImageTextEmbeddings,
    student_scale: jax.Array,
    teacher: ImageTextEmbeddings | None,
    weights: ReinforcedLossWeights,
    *,
    teacher_scale: jax.Array | float = MOBILECLIP_TEACHER_SCALE,
    axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of CLIP losses on real and synthetic captions and their distillation losses.

    Args:
      student: the student's local embeddings; ``synthetic_text`` None drops the synthetic terms.
      student_scale: the student's logit scale (already exponentiated), shared by all terms.
      teacher: the frozen teachers' embeddings of the same images and captions (ensemble axis
        allowed, see ``similarity_distillation_loss``); None when ``weights.distill`` is 0.
      weights: term weights, e.g. ``MOBILECLIP_B_WEIGHTS``.
      teacher_scale: scalar or (num_teachers,) teacher logit scale (ml-mobileclip: 100).
      axis_name: mesh/pmap axis name(s) over which the batch is split; None for one device.

    Returns:
      ``(total, parts)``: replicated float32 scalars; ``parts`` holds the unweighted terms
      ``clip_real``, ``clip_synthetic``, ``distill_real``, ``distill_synthetic`` (those computed).
    """
    has_synthetic = student.synthetic_text is not None
    if not has_synthetic and weights.synthetic_clip != 0:
        raise ValueError("weights.synthetic_clip is non-zero but there are no synthetic captions")
    if teacher is None and weights.distill != 0:
        raise ValueError("weights.distill is non-zero but no teacher embeddings were given")
    if teacher is not None and has_synthetic and teacher.synthetic_text is None:
        raise ValueError("the teacher needs embeddings of the synthetic captions too")

    clip = lambda text: clip_loss(student.image, text, student_scale, axis_name=axis_name)
    distill = lambda text, teacher_text: similarity_distillation_loss(
        student.image,
        text,
        teacher.image,
        teacher_text,
        student_scale,
        teacher_scale,
        axis_name=axis_name,
    )

    parts = {"clip_real": clip(student.real_text)}
    total = weights.real_clip * parts["clip_real"]
    if has_synthetic:
        parts["clip_synthetic"] = clip(student.synthetic_text)
        total += weights.synthetic_clip * parts["clip_synthetic"]
    if teacher is not None:
        parts["distill_real"] = distill(student.real_text, teacher.real_text)
        total += weights.distill * parts["distill_real"]
        if has_synthetic:
            parts["distill_synthetic"] = distill(student.synthetic_text, teacher.synthetic_text)
            total += weights.distill * parts["distill_synthetic"]
    return total, parts
