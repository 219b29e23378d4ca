"""CatLIP (paper 002): image-text pretraining recast as multi-label classification over synsets.

The caption's nouns become WordNet synsets (CoreNet's rule, pretrain/data/synsets/labels.py); the
synsets counted at least ``vocab.min_count`` times over the training data form the vocabulary
(pretrain/data/synsets/). The data workers turn each example's caption into a multi-hot
vector over the vocabulary (``labels``, uint8); the image tower (no text tower) with a linear
classifier is trained with binary cross-entropy summed over classes and averaged over the global
batch (losses/bce.py).

Evaluation without any training on the target: the classifier's columns are mapped to each
evaluation set's classes by Transfer Init (pretrain/components/transfer_init.py: exact, similar
synset, or the mean of a composed name's synsets) and the set is classified with that head
(``<set>/transfer_init_top1``): CatLIP's counterpart of CLIP's zero-shot accuracy. Linear probing
and fine-tuning, with Transfer Init or random heads, are the ``classify`` task
(pretrain/tasks/classify.py).

The vocabulary: ``vocab.path`` names a TSV written by
``python -m pretrain.data.synsets.vocabulary``; with ``vocab.build_if_missing`` (the ``:runlocal``
recipes) a missing file is built from ``data.train`` on first use (an empty path = a cache file
named after the data and threshold).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from ml_collections import ConfigDict

from losses.bce import multilabel_bce_loss
from models.heads import ImageClassifier
from pretrain import sharding
from pretrain import task as base
from pretrain.components import transfer_init
from pretrain.components.modules import build_module
from pretrain.components.range_augment import RangeAugmentation
from pretrain.data.synsets.labels import CaptionLabeler
from pretrain.data.synsets.vocabulary import (
    VocabEntry,
    read_vocabulary,
    vocabulary_from_config,
    write_vocabulary,
)
from pretrain.data.transforms import normalize, normalize_unit, unit_images
from pretrain.evaluate import image_text_eval
from pretrain.evaluate.classification import ClassificationEvaluator
from pretrain.export import timm_vit

VOCABULARY_FILE = "vocabulary.tsv"


def default_vocabulary_path(train_source: ConfigDict, min_count: int, max_size: int) -> Path:
    """A cache file named after what determines the vocabulary (the data and the pruning)."""
    key = json.dumps(
        {"source": train_source.to_dict(), "min_count": min_count, "max_size": max_size},
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "pretrain_image_encoders" / "catlip_vocab" / f"{digest}.tsv"


def resolve_vocabulary(config: ConfigDict) -> tuple[list[VocabEntry], str]:
    """The run's vocabulary and the file it was read from (built first if allowed and absent)."""
    vocab = config.vocab
    min_count, max_size = int(vocab.min_count), int(vocab.get("max_size", 0))
    path = vocab.get("path") or ""
    if not path:
        if not vocab.get("build_if_missing"):
            raise ValueError(
                "config.vocab.path is empty: build the vocabulary first with `python -m "
                "pretrain.data.synsets.vocabulary --config=<this recipe> --output=vocab.tsv` and "
                "set --config.vocab.path=vocab.tsv"
            )
        path = str(default_vocabulary_path(config.data.train, min_count, max_size))
    if not Path(path).exists():
        if not vocab.get("build_if_missing"):
            raise FileNotFoundError(f"config.vocab.path {path!r} does not exist")
        logging.info("building the CatLIP vocabulary from data.train into %s", path)
        entries, records = vocabulary_from_config(
            config.data.train,
            min_count=min_count,
            max_size=max_size,
            processes=int(vocab.get("build_processes", 1)),
        )
        logging.info("vocabulary: %d synsets from %d records", len(entries), records)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_vocabulary(path, entries)
    entries = read_vocabulary(path)
    if not entries:
        raise ValueError(f"the vocabulary {path} is empty: lower vocab.min_count")
    return entries, path


class MultiHotLabels:
    """Picklable grain caption field: caption -> ``{"labels": uint8 (vocabulary size,)}``."""

    def __init__(self, vocabulary: list[str]):
        self.labeler = CaptionLabeler(vocabulary)

    def __call__(self, caption: str) -> dict[str, np.ndarray]:
        return {"labels": self.labeler.multi_hot(caption)}


class Task(base.Task):
    batch_fields = ("image", "labels")
    # The classifier's size comes from the vocabulary.
    state_fields = (*RangeAugmentation.STATE_FIELDS, r"vocab\.(path|min_count|max_size)$")
    image_tower_entry = "image"
    image_tower_params_key = "image_encoder"

    def __init__(self, config: ConfigDict, mesh: Mesh):
        super().__init__(config, mesh)
        self.vocabulary, self.vocabulary_path = resolve_vocabulary(config)
        self.synset_ids = [entry.synset_id for entry in self.vocabulary]
        model = config.model
        dtype = jnp.dtype(model.dtype)
        self.model = ImageClassifier(
            image_encoder=build_module(
                model.image,
                output_dim=None,  # the classifier reads the pooled, normed class token
                dtype=dtype,
                param_dtype=jnp.dtype(model.param_dtype),
                remat_policy=model.remat_policy,
            ),
            num_classes=len(self.vocabulary),
            dtype=dtype,
            param_dtype=jnp.dtype(model.param_dtype),
        )
        self.image_size = int(config.data.image_size)
        self.range_augment = RangeAugmentation.from_config(config)
        self._matches: dict[str, list[transfer_init.ClassMatch]] = {}

    # -- model and loss -------------------------------------------------------------------------

    def init_variables(self, rng: jax.Array) -> tuple[Any, None]:
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        model_rng, augment_rng = jax.random.split(rng)
        params = self.model.init(model_rng, images)["params"]
        if self.range_augment is not None:
            params = {**params, "range_augment": self.range_augment.init(augment_rng, images)}
        return params, None

    def _unit_logits(self, params: Any, images: jax.Array) -> jax.Array:
        """Logits of float images in [0, 1]."""
        model_params = {k: v for k, v in params.items() if k != "range_augment"}
        logits, _ = self.model.apply({"params": model_params}, normalize_unit(images))
        return logits

    def logits(self, params: Any, images_uint8: jax.Array) -> jax.Array:
        return self._unit_logits(params, unit_images(images_uint8))

    def features(self, params: Any, images_uint8: jax.Array) -> jax.Array:
        images = normalize(images_uint8)
        model_params = {k: v for k, v in params.items() if k != "range_augment"}
        features, _ = self.model.apply(
            {"params": model_params}, images, method=ImageClassifier.features
        )
        return features.astype(jnp.float32)

    def loss_fn(
        self,
        params: Any,
        batch: base.Batch,
        rng: jax.Array,
        step: jax.Array,
        frozen: Any = None,
        model_state: Any = None,
    ) -> base.LossOutput:
        del frozen, model_state
        images = unit_images(batch["image"])
        if self.range_augment is not None:
            images, augment_mse = self.range_augment.augment(params, images, rng)
        logits = self._unit_logits(params, images)
        labels = batch["labels"]
        loss = sharding.batch_loss(multilabel_bce_loss, self.mesh, logits, labels)
        metrics = {"bce_loss": loss, **label_metrics(logits, labels)}
        if self.range_augment is not None:
            augment_loss, augment_metrics = self.range_augment.loss(params, augment_mse, step)
            loss = loss + augment_loss
            metrics.update(augment_metrics)
        return base.LossOutput(loss, metrics)

    # -- data -----------------------------------------------------------------------------------

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        size = self.image_size
        return {
            "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
            "labels": jax.ShapeDtypeStruct((batch_size, len(self.vocabulary)), jnp.uint8),
        }

    def train_data_options(self) -> dict[str, Any]:
        return {"caption_fields": MultiHotLabels(self.synset_ids)}

    # -- evaluation and export ------------------------------------------------------------------

    def class_matches(self, set_name: str, classnames: list[str]) -> list[transfer_init.ClassMatch]:
        """Transfer Init's mapping of a set's classes to vocabulary columns (computed once)."""
        if set_name not in self._matches:
            set_config = self.config.eval.sets[set_name]
            wnids = image_text_eval.label_wnids(set_config)
            matches = transfer_init.match_classes(
                classnames,
                self.synset_ids,
                wnids=wnids,
                alpha=float(self.config.transfer_init.alpha),
            )
            logging.info(
                "Transfer Init for %s: %s", set_name, transfer_init.summarize_matches(matches)
            )
            self._matches[set_name] = matches
        return self._matches[set_name]

    def make_evaluator(self) -> ClassificationEvaluator:
        evaluator = ClassificationEvaluator(
            self.config.eval,
            mesh=self.mesh,
            image_size=self.image_size,
            logits_fn=head_logits(self.features),
        )
        for name, loaded in evaluator.sets.items():
            self.class_matches(name, loaded["classnames"])
        return evaluator

    def evaluate(
        self, params: Any, step: int, frozen: Any = None, model_state: Any = None
    ) -> dict[str, float]:
        del step, frozen, model_state
        classifier = sharding.gather_to_host(params["classifier"], self.mesh)

        def variables_for_set(name: str, classnames: list[str]) -> Any:
            kernel, bias = transfer_init.transfer_classifier(
                np.asarray(classifier["kernel"], np.float32),
                np.asarray(classifier["bias"], np.float32),
                self.class_matches(name, classnames),
                rng=np.random.default_rng(0),
            )
            return {"params": params, "head": {"kernel": kernel, "bias": bias}}

        return self.evaluator(variables_for_set, prefix="transfer_init_")

    def export(self, params: Any, directory: str, model_state: Any = None) -> str:
        """timm ``vision_transformer`` layout with the synset classifier as its head, plus the
        vocabulary (the head's classes, in order) as ``vocabulary.tsv``."""
        classifier = params["classifier"]  # (range_augment's parameters are training-only)
        path = timm_vit.save_timm_vit(
            directory,
            params["image_encoder"],
            self.model.image_encoder,
            image_size=self.image_size,
            head=(np.asarray(classifier["kernel"]), np.asarray(classifier["bias"])),
        )
        write_vocabulary(Path(directory) / VOCABULARY_FILE, self.vocabulary)
        return str(path)


def head_logits(features_fn: Any) -> Any:
    """``(variables, images) -> features @ head`` for heads given per evaluation set."""

    def logits(variables: Any, images: jax.Array) -> jax.Array:
        features = features_fn(variables["params"], images)
        head = variables["head"]
        return features @ jnp.asarray(head["kernel"]) + jnp.asarray(head["bias"])

    return logits


def label_metrics(logits: jax.Array, labels: jax.Array) -> base.Metrics:
    """Training read-outs: positives per image, and how often the top class is a positive."""
    positives = labels.astype(jnp.float32)
    has_labels = positives.sum(axis=-1) > 0
    top = jnp.argmax(logits, axis=-1)
    top_is_positive = jnp.take_along_axis(positives, top[:, None], axis=-1)[:, 0]
    labelled = jnp.maximum(has_labels.sum(), 1)
    return {
        "labels_per_image": positives.sum(axis=-1).mean(),
        "images_without_labels": 1.0 - has_labels.mean(),
        "precision_at_1": (top_is_positive * has_labels).sum() / labelled,
    }
