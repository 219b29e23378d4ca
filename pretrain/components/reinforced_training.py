"""Reinforced (DataCompDR-style) CLIP training: synthetic captions and a teacher ensemble's stored
embeddings, as paper 000 and MobileCLIP train. The CLIP task trains this way when
``config.reinforced.enabled``.

Each training example carries, besides its image and a real caption, one synthetic caption
(``synthetic_text``) and, for distillation, the teacher ensemble's stored embeddings of the very
view of the image it sees and of both captions (``teacher_image``, ``teacher_text``,
``teacher_synthetic_text``; see ``pretrain.components.reinforcements``). The loss is
``losses.distill.reinforced_clip_loss`` over the global batch:

    real_clip_weight * CLIP(real) + synthetic_clip_weight * CLIP(synthetic)
    + distill_weight * (KD(real) + KD(synthetic))

Config (``config.reinforced``): ``enabled``; ``real_clip_weight``, ``synthetic_clip_weight``,
``distill_weight``; ``synthetic_captions`` (use them at all); ``teacher_embed_dim`` (D of the
stored embeddings: the ensemble's embeddings side by side, e.g. DataCompDR's 2 x 768 = 1536);
``num_teachers`` (how many equal parts D splits into, each L2-normalised on its own);
``teacher_logit_scale`` (MobileCLIP distils at a fixed 100).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec
from ml_collections import ConfigDict

from losses.distill import ImageTextEmbeddings, ReinforcedLossWeights, reinforced_clip_loss
from pretrain import sharding
from pretrain.components.reinforcements import ReinforcementFields
from pretrain.data.webdataset.shard_job import check_same_job

TEACHER_FIELDS = ("teacher_image", "teacher_text", "teacher_synthetic_text")


@dataclasses.dataclass(frozen=True)
class ReinforcedTraining:
    """What reinforced training adds to the CLIP task: batch fields and the loss."""

    weights: ReinforcedLossWeights
    synthetic_captions: bool
    teacher_embed_dim: int
    num_teachers: int
    teacher_logit_scale: float

    @classmethod
    def from_config(cls, config: ConfigDict) -> ReinforcedTraining | None:
        section = config.get("reinforced")
        if not section or not section.get("enabled"):
            return None
        if config.loss.name != "clip":
            raise ValueError(
                f"reinforced training distils softmax similarities: config.loss.name must be "
                f"'clip', not {config.loss.name!r}"
            )
        weights = ReinforcedLossWeights(
            real_clip=float(section.real_clip_weight),
            synthetic_clip=float(section.synthetic_clip_weight),
            distill=float(section.distill_weight),
        )
        synthetic = bool(section.synthetic_captions)
        if weights.synthetic_clip and not synthetic:
            raise ValueError(
                "config.reinforced.synthetic_clip_weight is non-zero but synthetic_captions is off"
            )
        teacher_dim, num_teachers = int(section.teacher_embed_dim), int(section.num_teachers)
        if weights.distill and (num_teachers < 1 or teacher_dim % num_teachers):
            raise ValueError(
                f"config.reinforced.teacher_embed_dim={teacher_dim} does not split into "
                f"num_teachers={num_teachers} equal parts"
            )
        return cls(
            weights=weights,
            synthetic_captions=synthetic,
            teacher_embed_dim=teacher_dim,
            num_teachers=num_teachers,
            teacher_logit_scale=float(section.teacher_logit_scale),
        )

    @property
    def uses_teacher(self) -> bool:
        return self.weights.distill != 0

    def record_fields(self) -> ReinforcementFields:
        """The pipeline's record plug-in that makes these batch fields from a record's stored
        reinforcements."""
        return ReinforcementFields(
            synthetic_captions=self.synthetic_captions, teacher_embeddings=self.uses_teacher
        )

    def batch_fields(self) -> tuple[str, ...]:
        fields = ("synthetic_text",) if self.synthetic_captions else ()
        if self.uses_teacher:
            fields += TEACHER_FIELDS if self.synthetic_captions else TEACHER_FIELDS[:2]
        return fields

    def batch_spec(self, batch_size: int, context_length: int) -> dict[str, jax.ShapeDtypeStruct]:
        spec = {}
        for name in self.batch_fields():
            if name == "synthetic_text":
                spec[name] = jax.ShapeDtypeStruct((batch_size, context_length), jnp.int32)
            else:
                spec[name] = jax.ShapeDtypeStruct((batch_size, self.teacher_embed_dim), jnp.float32)
        return spec

    def teacher_embeddings(self, batch: Any) -> dict[str, jax.Array]:
        """The batch's stored teacher embeddings as (b, num_teachers, D / num_teachers), each
        teacher's part L2-normalised (stored ones usually are already; this makes sure)."""
        out = {}
        for name in self.batch_fields():
            if name.startswith("teacher_"):
                values = batch[name].astype(jnp.float32)
                parts = values.reshape(values.shape[0], self.num_teachers, -1)
                norms = jnp.linalg.norm(parts, axis=-1, keepdims=True)
                out[name] = parts / jnp.maximum(norms, 1e-12)
        return out

    def loss(
        self, mesh: Mesh, embeddings: dict[str, jax.Array], scale: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The weighted reinforced loss over the global batch and its unweighted parts."""
        student = ImageTextEmbeddings(
            embeddings["image"], embeddings["text"], embeddings.get("synthetic_text")
        )
        teacher = None
        if self.uses_teacher:
            teacher = ImageTextEmbeddings(
                embeddings["teacher_image"],
                embeddings["teacher_text"],
                embeddings.get("teacher_synthetic_text"),
            )
        batch_spec = PartitionSpec(sharding.BATCH_AXES)
        sharded = jax.shard_map(
            functools.partial(
                reinforced_clip_loss,
                weights=self.weights,
                teacher_scale=self.teacher_logit_scale,
                axis_name=sharding.BATCH_AXES,
            ),
            mesh=mesh,
            in_specs=(batch_spec, PartitionSpec(), batch_spec),
            out_specs=PartitionSpec(),
        )
        return sharded(student, scale, teacher)


def prepare_reinforced_data(config: ConfigDict) -> None:
    """Make the reinforced shards first when the recipe says so (``reinforce.build_if_missing``,
    the :runlocal recipes) and they are not complete yet; process 0 makes them (resuming)."""
    settings = config.get("reinforce")
    if not settings or not settings.get("build_if_missing"):
        return
    from pretrain import reinforce  # the teacher models are needed only here

    if reinforce.is_complete(settings.output_dir):
        # Made earlier: by this very job (same data, teachers, views), else it is an error.
        check_same_job(
            Path(settings.output_dir), reinforce.JOB_FILE, reinforce.job_description(settings)
        )
        return
    if jax.process_index() == 0:
        logging.info("making the reinforced shards in %s", settings.output_dir)
        reinforce.reinforce(config)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("reinforced shards made")
