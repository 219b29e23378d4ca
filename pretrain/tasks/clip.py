"""CLIP / SigLIP task: two towers trained with a global-batch contrastive loss.

What is specific to CLIP lives here and nowhere else: the two-tower model built from the config, the
loss (``clip``, ``sigmoid``, ``sigmoid_ring``) applied under ``shard_map`` over the batch axes,
the temperature clamp, the image-text data pipeline and the zero-shot / retrieval evaluators.
Optional parts, each switched on by its config section: RangeAugment (``range_augment``),
DataCompDR-style reinforced training (``reinforced``) and CLIPTeX's pseudo-label heads
(``cliptex``, pretrain/components/pseudo_supervision.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from ml_collections import ConfigDict

from losses.contrastive import clip_loss
from losses.sigmoid import sigmoid_loss, sigmoid_loss_ring
from models.two_tower import TwoTowerModel
from pretrain import sharding
from pretrain import task as base
from pretrain.components import pseudo_supervision
from pretrain.components.pseudo_supervision import (
    PseudoSupervision,
    join_model_state,
    prepare_pseudo_labelled_data,
    split_model_state,
)
from pretrain.components.range_augment import RangeAugmentation
from pretrain.components.reinforced_training import ReinforcedTraining, prepare_reinforced_data
from pretrain.components.runs import run_params
from pretrain.components.teachers import build_teacher
from pretrain.components.two_tower import (
    BATCH_STATS,
    build_two_tower,
    check_same_tower,
    model_variables,
)
from pretrain.data import image_text
from pretrain.data.transforms import normalize_unit, unit_images
from pretrain.evaluate import image_text_eval
from pretrain.export import open_clip

LOSSES = {"clip": clip_loss, "sigmoid": sigmoid_loss, "sigmoid_ring": sigmoid_loss_ring}
# open_clip clamps the learned temperature so that the logit scale never exceeds 100.
MAX_LOG_LOGIT_SCALE = math.log(100.0)
# Parameters that only training uses: the exported model has none of them.
TRAINING_ONLY_PARAMS = ("range_augment", pseudo_supervision.PARAMS_KEY)


class Task(base.Task):
    batch_fields = ("image", "text")
    state_fields = RangeAugmentation.STATE_FIELDS + PseudoSupervision.STATE_FIELDS
    splits_loss = True
    image_tower_entry = "image"
    image_tower_params_key = "image_encoder"

    def __init__(self, config: ConfigDict, mesh: Mesh):
        super().__init__(config, mesh)
        if config.loss.name not in LOSSES:
            raise ValueError(f"config.loss.name={config.loss.name!r}; choose from {sorted(LOSSES)}")
        self.loss_name = config.loss.name
        self.model = build_two_tower(config.model, self.loss_name)
        self.image_size = int(config.data.image_size)
        self.context_length = int(config.model.text.context_length)
        self.range_augment = RangeAugmentation.from_config(config)
        # Synthetic captions and stored teacher embeddings (DataCompDR), when configured.
        self.reinforced = ReinforcedTraining.from_config(config)
        if self.reinforced is not None:
            self.batch_fields = (*Task.batch_fields, *self.reinforced.batch_fields())
        # CLIPTeX's heads trained on experts' pseudo-labels, when configured.
        self.pseudo = PseudoSupervision.from_config(config)
        if self.pseudo is not None:
            self.batch_fields = (*self.batch_fields, *self.pseudo.names)

    # -- model ---------------------------------------------------------------------------------

    def init_variables(self, rng: jax.Array) -> tuple[Any, Any]:
        """Parameters, and the BatchNorm statistics of towers that have them (ResNet, MCi) and
        of CLIPTeX's heads."""
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        tokens = jnp.zeros((1, self.context_length), jnp.int32)
        model_rng, augment_rng, heads_rng = jax.random.split(rng, 3)
        variables = self.model.init(model_rng, images, tokens)
        params, model_state = variables["params"], variables.get(BATCH_STATS)
        if self.range_augment is not None:
            params = {**params, "range_augment": self.range_augment.init(augment_rng, images)}
        if self.pseudo is not None:
            _, intermediates = self.model.apply(
                variables, images, method=TwoTowerModel.encode_image
            )
            heads, heads_state = self.pseudo.init(heads_rng, intermediates, self.image_size)
            params = {**params, pseudo_supervision.PARAMS_KEY: heads}
            model_state = join_model_state(model_state, heads_state)
        return params, model_state

    def _encode_unit_images(
        self, params: Any, images: jax.Array, tower_state: Any = None, train: bool = False
    ) -> tuple[jax.Array, dict[str, Any], Any]:
        """Embeddings of float images in [0, 1], normalised with CLIP's mean and std, the image
        tower's intermediates (its feature maps) and its BatchNorm statistics (updated from this
        batch when training)."""
        normalized = normalize_unit(images)
        variables = model_variables(params, tower_state)
        if train and tower_state is not None:
            (embeds, intermediates), updated = self.model.apply(
                variables,
                normalized,
                train=True,
                method=TwoTowerModel.encode_image,
                mutable=[BATCH_STATS],
            )
            return embeds, intermediates, updated[BATCH_STATS]
        embeds, intermediates = self.model.apply(
            variables, normalized, method=TwoTowerModel.encode_image
        )
        return embeds, intermediates, tower_state

    def encode_images(self, variables: Any, images_uint8: jax.Array) -> jax.Array:
        """Evaluation: ``variables`` = {"params", "model_state"} (see :meth:`evaluate`)."""
        images = unit_images(images_uint8)
        tower_state, _ = split_model_state(variables["model_state"])
        return self._encode_unit_images(variables["params"], images, tower_state)[0]

    def encode_texts(self, variables: Any, tokens: jax.Array) -> jax.Array:
        return self._encode_texts(variables["params"], tokens)

    def _encode_texts(self, params: Any, tokens: jax.Array) -> jax.Array:
        embeds, _ = self.model.apply({"params": params}, tokens, method=TwoTowerModel.encode_text)
        return embeds

    # -- loss ----------------------------------------------------------------------------------

    def embed(
        self, params: Any, batch: base.Batch, rng: jax.Array, frozen: Any = None
    ) -> dict[str, jax.Array]:
        del frozen
        return self._embed(params, batch, rng)[0]

    def _embed(
        self, params: Any, batch: base.Batch, rng: jax.Array, model_state: Any = None
    ) -> tuple[dict[str, jax.Array], Any]:
        images = unit_images(batch["image"])
        embeddings = {}
        if self.range_augment is not None:
            # The MSE per image, so that exact gradient accumulation carries it like an embedding.
            images, embeddings["augment_mse"] = self.range_augment.augment(params, images, rng)
        tower_state, heads_state = split_model_state(model_state)
        embeddings["image"], intermediates, tower_state = self._encode_unit_images(
            params, images, tower_state, train=True
        )
        if self.pseudo is not None:
            dropout_rng = jax.random.fold_in(rng, 1)  # not RangeAugment's draws
            losses, heads_state = self.pseudo.per_example_losses(
                params, heads_state, intermediates, batch, dropout_rng
            )
            embeddings.update(losses)
        model_state = join_model_state(tower_state, heads_state)
        embeddings["text"] = self._encode_texts(params, batch["text"])
        if self.reinforced is not None:
            if self.reinforced.synthetic_captions:
                embeddings["synthetic_text"] = self._encode_texts(params, batch["synthetic_text"])
            embeddings.update(self.reinforced.teacher_embeddings(batch))
        return embeddings, model_state

    def loss_from_embeddings(
        self,
        params: Any,
        embeddings: dict[str, jax.Array],
        rng: jax.Array,
        step: jax.Array,
        frozen: Any = None,
    ) -> base.LossOutput:
        del rng, frozen
        fixed_scale = self.config.loss.get("fixed_logit_scale")
        # A fixed temperature (UTA fine-tuning: 0.01, scale 100) when the towers start aligned.
        scale = jnp.float32(fixed_scale) if fixed_scale else jnp.exp(params["logit_scale"])
        if self.reinforced is not None:
            value, parts = self.reinforced.loss(self.mesh, embeddings, scale)
            metrics = {"logit_scale": scale, "contrastive_loss": parts["clip_real"], **parts}
        else:
            value, metrics = self._contrastive_loss(params, embeddings, scale)
        if self.pseudo is not None:
            value, pseudo_metrics = self.pseudo.loss(value, embeddings)
            metrics.update(pseudo_metrics)
        if "augment_mse" in embeddings:
            augment_loss, augment_metrics = self.range_augment.loss(
                params, embeddings["augment_mse"], step
            )
            value = value + augment_loss
            metrics.update(augment_metrics)
        return base.LossOutput(value, metrics)

    def _contrastive_loss(
        self, params: Any, embeddings: dict[str, jax.Array], scale: jax.Array
    ) -> tuple[jax.Array, base.Metrics]:
        """The configured CLIP / SigLIP loss of image and text embeddings over the global batch."""
        batch_spec = PartitionSpec(sharding.BATCH_AXES)
        loss = LOSSES[self.loss_name]
        scalars: tuple[jax.Array, ...] = (scale,)
        if self.loss_name.startswith("sigmoid"):
            scalars = (scale, params["logit_bias"])
        sharded_loss = jax.shard_map(
            functools.partial(loss, axis_name=sharding.BATCH_AXES),
            mesh=self.mesh,
            in_specs=(batch_spec, batch_spec, *([PartitionSpec()] * len(scalars))),
            out_specs=PartitionSpec(),
        )
        value = sharded_loss(embeddings["image"], embeddings["text"], *scalars)
        metrics = {"logit_scale": scale, "contrastive_loss": value}
        if len(scalars) == 2:
            metrics["logit_bias"] = scalars[1]
        return value, metrics

    def loss_fn(
        self,
        params: Any,
        batch: base.Batch,
        rng: jax.Array,
        step: jax.Array,
        frozen: Any = None,
        model_state: Any = None,
    ) -> base.LossOutput:
        embeddings, model_state = self._embed(params, batch, rng, model_state)
        loss, metrics, _ = self.loss_from_embeddings(params, embeddings, rng, step)
        return base.LossOutput(loss, metrics, model_state)

    def project_params(self, params: Any) -> Any:
        clamped = jnp.clip(params["logit_scale"], 0.0, MAX_LOG_LOGIT_SCALE)
        return {**params, "logit_scale": clamped}

    # -- data and evaluation -------------------------------------------------------------------

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        size = self.image_size
        spec = {
            "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
            "text": jax.ShapeDtypeStruct((batch_size, self.context_length), jnp.int32),
        }
        if self.reinforced is not None:
            spec.update(self.reinforced.batch_spec(batch_size, self.context_length))
        if self.pseudo is not None:
            spec.update(self.pseudo.batch_spec(batch_size, self.image_size))
        return spec

    def train_data_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"context_length": self.context_length}
        prepare_pseudo_labelled_data(self.config)  # CLIPTeX's (and CLIP-FT's) shards first
        if self.reinforced is not None:
            prepare_reinforced_data(self.config)  # the shards exist before they are opened
            options["source"] = image_text.make_source(
                self.config.data.train, read_reinforcements=True
            )
            options["record_fields"] = self.reinforced.record_fields()
        if self.pseudo is not None:
            options["source"] = image_text.make_source(
                self.config.data.train, read_members=self.pseudo.read_members()
            )
            options["record_fields"] = self.pseudo.record_fields()
        return options

    def load_pretrained(self) -> Any:
        """Towers initialised from earlier runs or CLIP weights (``config.init``).

        ``init.clip_from``: a CLIP (a teacher spec, see pretrain/components/teachers.py: a run
        of this project or open_clip weights) whose two towers and temperature start this one,
        e.g. CLIPTeX's and CLIP-FT's fine-tuning; ``init.image_from``: {config, workdir, step,
        subtree} of a run of this project (``subtree`` "" = its whole parameter tree, e.g. a UTA
        student; "image_encoder" for a CLIP run); ``init.text_from``: a teacher spec whose text
        tower is taken (UTA's contrastive fine-tuning: the image tower from the UTA run, the
        text tower from its teacher). A BatchNorm tower's running statistics start afresh.
        """
        init = self.config.get("init")
        if not init:
            return None
        pretrained = {}
        clip_from = init.get("clip_from")
        if clip_from:
            pretrained.update(self._pretrained_clip(clip_from))
        image_from = init.get("image_from")
        if image_from:
            if not image_from.get("workdir"):
                raise ValueError(
                    "config.init.image_from.workdir is empty: name the run whose image tower "
                    "initialises this one (e.g. --config.init.image_from.workdir=workdirs/uta)"
                )
            params = run_params(
                image_from.config,
                image_from.workdir,
                str(image_from.step),
                image_from.get("use_ema"),
            )
            for key in filter(None, image_from.get("subtree", "").split("/")):
                params = params[key]
            pretrained["image_encoder"] = params
        text_from = init.get("text_from")
        if text_from:
            teacher = self._checked_teacher(text_from, ("text",))
            pretrained["text_encoder"] = teacher.load()["text_encoder"]
        return pretrained or None

    def _checked_teacher(self, spec: ConfigDict, towers: tuple[str, ...]) -> Any:
        """The CLIP of a teacher spec, in float32, checked to have this model's ``towers``."""
        teacher = build_teacher(ConfigDict({**spec.to_dict(), "dtype": "float32"}))
        for tower in towers:
            check_same_tower(
                getattr(teacher.model, f"{tower}_encoder"),
                getattr(self.model, f"{tower}_encoder"),
                tower,
            )
        return teacher

    def _pretrained_clip(self, spec: ConfigDict) -> dict[str, Any]:
        """Both towers and the temperature (and SigLIP's bias) of the CLIP ``spec`` names."""
        source = spec.get("source")
        if (source == "workdir" and not spec.get("workdir")) or (
            source == "open_clip" and not spec.get("open_clip_dir")
        ):
            raise ValueError(
                "config.init.clip_from names no weights: set its workdir (a CLIP run of this "
                "project) or open_clip_dir (open_clip weights)"
            )
        params = self._checked_teacher(spec, ("image", "text")).load()
        keys = ("image_encoder", "text_encoder", "logit_scale", "logit_bias")
        return {key: params[key] for key in keys if key in params}

    def export(self, params: Any, directory: str, model_state: Any = None) -> str:
        """open_clip state dict (safetensors) + model config (pretrain/export/open_clip/): the
        image tower's family decides its layout (an EVA tower may bring a ``timm_trunk/``), a
        ResNet or MobileCLIP tower's ``model_state`` becomes its BatchNorm running statistics.
        Training-only parts (RangeAugment, CLIPTeX's heads) are left out: a plain CLIP."""
        params = {k: v for k, v in params.items() if k not in TRAINING_ONLY_PARAMS}
        model_state, _ = split_model_state(model_state)
        fixed_scale = self.config.loss.get("fixed_logit_scale")
        if fixed_scale:  # the scale the model was trained and is used with
            params["logit_scale"] = np.asarray(np.log(fixed_scale), np.float32)
        path = open_clip.save_two_tower_model(
            directory, self.model, params, image_size=self.image_size, batch_stats=model_state
        )
        return str(path)

    def make_evaluator(self) -> image_text_eval.ImageTextEvaluator:
        return image_text_eval.ImageTextEvaluator(
            self.config.eval,
            mesh=self.mesh,
            image_size=self.image_size,
            context_length=self.context_length,
            encode_images=self.encode_images,
            encode_texts=self.encode_texts,
        )

    def evaluate(
        self, params: Any, step: int, frozen: Any = None, model_state: Any = None
    ) -> dict[str, float]:
        del step, frozen
        return self.evaluator({"params": params, "model_state": model_state})
