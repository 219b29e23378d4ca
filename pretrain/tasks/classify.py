"""Transfer learning of a pretrained image tower: linear probing and full fine-tuning.

The image tower comes from a run of this project (``transfer.pretrained``: its recipe, workdir,
step; CatLIP, CLIP or UTA runs alike, any tower under ``image_encoder`` or at the top level), is
built exactly as that run built it, and gets a new linear classifier over the labelled training
set's classes (``data.train`` with ``classnames``):

* ``transfer.mode="linear_probe"``: the tower is frozen (a frozen variable of the train state: no
  gradient, no optimizer state) and only the classifier trains (paper 002, Table 7 (a));
* ``"finetune"``: tower and classifier train together (Table 7 (b)).

``transfer.head_init="transfer"`` initialises the classifier by Transfer Init from a CatLIP run's
synset classifier (pretrain/components/transfer_init.py: exact synset, similar synset, mean of a
composed name's synsets, else random; the counts are logged), ``"random"`` as usual. Loss: softmax
cross-entropy with label smoothing (Appendix A) over the global batch. Evaluation: top-1 / top-5
on ``config.eval.sets``. Export: the tower and the classifier in timm's vision_transformer layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from ml_collections import ConfigDict

from losses.classification import softmax_cross_entropy_loss
from models.heads import ClassifierHead
from pretrain import sharding
from pretrain import task as base
from pretrain.components import transfer_init
from pretrain.components.modules import build_module
from pretrain.components.pretrained_tower import (
    image_tower_params,
    image_tower_spec,
    matching_subtree,
)
from pretrain.components.runs import restore_run, run_config
from pretrain.data import image_text
from pretrain.data.transforms import normalize
from pretrain.evaluate import image_text_eval
from pretrain.evaluate.classification import ClassificationEvaluator
from pretrain.export import timm_vit

MODES = ("linear_probe", "finetune")
HEAD_INITS = ("transfer", "random")


class Task(base.Task):
    batch_fields = ("image", "label")
    # What is trained and what is frozen, and the tower's shapes.
    state_fields = (r"transfer\.(mode|pretrained\.(config|workdir))$",)

    def __init__(self, config: ConfigDict, mesh: Mesh):
        super().__init__(config, mesh)
        transfer = config.transfer
        if transfer.mode not in MODES:
            raise ValueError(f"transfer.mode={transfer.mode!r}; choose from {MODES}")
        if transfer.head_init not in HEAD_INITS:
            raise ValueError(f"transfer.head_init={transfer.head_init!r}; choose {HEAD_INITS}")
        self.mode = transfer.mode
        pretrained = transfer.pretrained
        self.pretrained_config = run_config(pretrained.workdir, pretrained.get("config", ""))
        dtype = jnp.dtype(config.model.dtype)
        self.encoder = build_module(
            image_tower_spec(self.pretrained_config),
            output_dim=None,
            dtype=dtype,
            param_dtype=jnp.dtype(config.model.param_dtype),
            remat_policy=config.model.remat_policy,
        )
        self.image_size = int(
            config.data.get("image_size") or self.pretrained_config.data.image_size
        )
        train_source = config.data.train
        self.classnames = image_text_eval.class_names(train_source, None)
        if not self.classnames:
            raise ValueError("data.train needs classnames (e.g. 'synthetic_scenes', 'imagenet')")
        self.wnids = image_text_eval.label_wnids(train_source)
        self.head = ClassifierHead(
            len(self.classnames), dtype=dtype, param_dtype=jnp.dtype(config.model.param_dtype)
        )
        self._pretrained: tuple[base.Task, Any] | None = None

    # -- parameters -----------------------------------------------------------------------------

    def _encoder_template(self) -> Any:
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return jax.eval_shape(self.encoder.init, jax.random.key(0), images)["params"]

    def init_variables(self, rng: jax.Array) -> tuple[Any, None]:
        encoder_rng, head_rng = jax.random.split(rng)
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        params = dict(self.head.init(head_rng, jnp.zeros((1, self.encoder.width)))["params"])
        if self.mode == "finetune":
            params["image_encoder"] = self.encoder.init(encoder_rng, images)["params"]
        return params, None

    def frozen_spec(self) -> Any:
        if self.mode != "linear_probe":
            return None
        return {"image_encoder": self._encoder_template()}

    def _pretrained_run(self) -> tuple[base.Task, Any]:
        if self._pretrained is None:
            spec = self.config.transfer.pretrained
            self._pretrained = restore_run(
                spec.get("config", ""), spec.workdir, str(spec.step), spec.get("use_ema")
            )
        return self._pretrained

    def _pretrained_tower(self) -> Any:
        _, params = self._pretrained_run()
        return matching_subtree(
            image_tower_params(self.pretrained_config, params), self._encoder_template()
        )

    def load_frozen(self) -> Any:
        if self.mode != "linear_probe":
            return None
        return {"image_encoder": self._pretrained_tower()}

    def load_pretrained(self) -> Any:
        pretrained = {}
        if self.mode == "finetune":
            pretrained["image_encoder"] = self._pretrained_tower()
        if self.config.transfer.head_init == "transfer":
            pretrained["classifier"] = self.transfer_head()
        return pretrained

    def transfer_head(self) -> dict[str, np.ndarray]:
        """Transfer Init of the classifier from a CatLIP run's synset classifier."""
        task, params = self._pretrained_run()
        vocabulary = getattr(task, "synset_ids", None)
        if vocabulary is None or "classifier" not in params:
            raise ValueError(
                "transfer.head_init='transfer' needs a CatLIP run (a synset classifier and its "
                f"vocabulary); {self.config.transfer.pretrained.workdir} is a "
                f"{self.pretrained_config.task} run"
            )
        matches = transfer_init.match_classes(
            self.classnames,
            vocabulary,
            wnids=self.wnids,
            alpha=float(self.config.transfer.alpha),
        )
        logging.info("Transfer Init: %s", transfer_init.summarize_matches(matches))
        table = transfer_init.format_matches(matches, vocabulary)
        logging.info("Transfer Init per class:\n%s", table)
        kernel, bias = transfer_init.transfer_classifier(
            np.asarray(params["classifier"]["kernel"], np.float32),
            np.asarray(params["classifier"]["bias"], np.float32),
            matches,
            rng=np.random.default_rng(int(self.config.seed)),
        )
        return {"kernel": kernel, "bias": bias}

    # -- model and loss -------------------------------------------------------------------------

    def logits(self, params: Any, images_uint8: jax.Array, frozen: Any = None) -> jax.Array:
        tower = params["image_encoder"] if self.mode == "finetune" else frozen["image_encoder"]
        images = normalize(images_uint8)
        features, _ = self.encoder.apply({"params": tower}, images)
        if self.mode == "linear_probe":
            features = jax.lax.stop_gradient(features)
        return self.head.apply({"params": {"classifier": params["classifier"]}}, features)

    def loss_fn(
        self,
        params: Any,
        batch: base.Batch,
        rng: jax.Array,
        step: jax.Array,
        frozen: Any = None,
        model_state: Any = None,
    ) -> base.LossOutput:
        del rng, step, model_state
        logits = self.logits(params, batch["image"], frozen)
        labels = batch["label"]
        loss = sharding.batch_loss(
            softmax_cross_entropy_loss,
            self.mesh,
            logits,
            labels,
            label_smoothing=float(self.config.transfer.label_smoothing),
        )
        accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
        return base.LossOutput(loss, {"train_top1": accuracy})

    # -- data -----------------------------------------------------------------------------------

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        size = self.image_size
        return {
            "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        }

    def train_data_options(self) -> dict[str, Any]:
        train = self.config.data.train
        source = image_text.make_source(train)
        limit = int(train.get("max_examples", 0))
        if limit:  # a fraction of the labelled data (the paper's data-efficiency curves)
            source = image_text.Prefix(source, limit)
        return {"image_size": self.image_size, "source": source}

    # -- evaluation and export ------------------------------------------------------------------

    def make_evaluator(self) -> ClassificationEvaluator:
        evaluator = ClassificationEvaluator(
            self.config.eval,
            mesh=self.mesh,
            image_size=self.image_size,
            logits_fn=lambda v, images: self.logits(v["params"], images, v["frozen"]),
        )
        for name, loaded in evaluator.sets.items():
            if len(loaded["classnames"]) != len(self.classnames):
                raise ValueError(
                    f"eval set {name!r} has {len(loaded['classnames'])} classes, the "
                    f"training set {len(self.classnames)}"
                )
        return evaluator

    def evaluate(
        self, params: Any, step: int, frozen: Any = None, model_state: Any = None
    ) -> dict[str, float]:
        del step, model_state
        return self.evaluator(lambda name, classnames: {"params": params, "frozen": frozen})

    def export(self, params: Any, directory: str, model_state: Any = None) -> str:
        """A fine-tuned tower with its classifier in timm's vision_transformer layout."""
        if self.mode != "finetune":
            raise ValueError(
                "a linear probe trains only params['classifier']; its tower is the pretrained "
                "run's: export that run, the classifier is in this run's checkpoint"
            )
        classifier = params["classifier"]
        head = (np.asarray(classifier["kernel"]), np.asarray(classifier["bias"]))
        path = timm_vit.save_timm_vit(
            directory, params["image_encoder"], self.encoder, image_size=self.image_size, head=head
        )
        (Path(directory) / "classnames.txt").write_text("\n".join(self.classnames) + "\n")
        return str(path)
