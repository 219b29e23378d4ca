"""Zero-shot classification and image<->text retrieval on the sets named in ``config.eval.sets``.

Each set is a source config (see ``pretrain.data.image_text``) plus:
  classnames  "synthetic_scenes" | "imagenet" | "tfds" (the builder's labels) | "" (no zero-shot)
  templates   "synthetic_scenes" | "openai_imagenet" | "simple_imagenet"
  captions    how many captions per image to use for retrieval (0: no retrieval)
  max_examples  evaluate on the first N examples (0: all)
Metrics are named ``<set>/zeroshot_top1``, ``<set>/image_to_text_R@5`` and so on.

The encoders are the task's (``encode_images(params, uint8 images)``, ``encode_texts(params,
tokens)``), jitted with the batch split over the data-parallel devices and replicated outputs. Every
process reads the whole evaluation set and computes the same metrics, so the collective encoders
see identical inputs everywhere; only process 0 writes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh
from ml_collections import ConfigDict

from pretrain import sharding
from pretrain.data import image_text
from pretrain.data.tokenizer import ClipTokenizer
from pretrain.evaluate import imagenet_prompts
from pretrain.evaluate.retrieval import evaluate_image_text

Encoder = Callable[[Any, jax.Array], jax.Array]


def class_names(set_config: Mapping[str, Any], source: Any) -> list[str] | None:
    kind = set_config.get("classnames", "")
    if not kind:
        return None
    if kind == "synthetic_scenes":
        from pretrain.data import scenes

        return list(scenes.CLASS_NAMES)
    if kind == "imagenet":
        return list(imagenet_prompts.IMAGENET_CLASSNAMES)
    if kind == "tfds":
        import tensorflow_datasets as tfds

        builder = tfds.builder(set_config["tfds_name"], data_dir=set_config.get("data_dir") or None)
        return [name.replace("_", " ") for name in builder.info.features["label"].names]
    raise ValueError(f"unknown classnames {kind!r}")


def label_wnids(set_config: Mapping[str, Any]) -> list[str] | None:
    """The WordNet ids of a TFDS set's labels when its label names are wnids (``imagenet2012``:
    "n01440764", ...), else None: CatLIP's Transfer Init then matches synsets exactly."""
    if set_config.get("source") != "tfds":
        return None
    import tensorflow_datasets as tfds

    builder = tfds.builder(set_config["tfds_name"], data_dir=set_config.get("data_dir") or None)
    feature = builder.info.features[set_config.get("label_field", "label")]
    names = list(getattr(feature, "names", []) or [])
    if names and all(re.fullmatch(r"n\d{8}", name) for name in names):
        return names
    return None


def prompt_templates(name: str) -> Sequence[str]:
    if name == "synthetic_scenes":
        from pretrain.data import scenes

        return scenes.ZERO_SHOT_TEMPLATES
    if name == "openai_imagenet":
        return imagenet_prompts.OPENAI_IMAGENET_TEMPLATES
    if name == "simple_imagenet":
        return imagenet_prompts.SIMPLE_IMAGENET_TEMPLATES
    raise ValueError(f"unknown templates {name!r}")


def dataset_not_found_error() -> type[Exception]:
    import tensorflow_datasets as tfds

    return tfds.core.registered.DatasetNotFoundError


def load_eval_source(name: str, set_config: Mapping[str, Any]) -> Any | None:
    """The source of an evaluation set, or None (with a warning) when its data is not there."""
    try:
        return image_text.make_source(set_config)
    except (FileNotFoundError, dataset_not_found_error()) as error:
        # Data that is not there (e.g. ImageNet not prepared for TFDS) must not stop a long
        # run: say so at start-up and go on. A wrong setting raises.
        logging.warning("eval set %r is not available and is skipped: %s", name, error)
        return None


def global_array_from_host(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A batch every process holds in full, placed split over the data-parallel devices."""
    target = sharding.batch_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


class ImageTextEvaluator:
    """Callable ``evaluator(params) -> metrics`` over all configured evaluation sets."""

    def __init__(
        self,
        eval_config: ConfigDict,
        *,
        mesh: Mesh,
        image_size: int,
        context_length: int,
        encode_images: Encoder,
        encode_texts: Encoder,
    ):
        self.mesh = mesh
        self.image_size = image_size
        self.context_length = context_length
        self.batch_size = int(eval_config.batch_size)
        shards = sharding.data_parallel_size(mesh)
        if self.batch_size % shards:
            raise ValueError(f"eval.batch_size {self.batch_size} must divide by {shards} devices")
        self.worker_count = int(eval_config.get("worker_count", 0))
        self.tokenizer = ClipTokenizer(context_length)
        replicated = sharding.replicated(mesh)
        self._encode_images = jax.jit(encode_images, out_shardings=replicated)
        self._encode_texts = jax.jit(encode_texts, out_shardings=replicated)
        self.sets = {name: self._load(name, cfg) for name, cfg in eval_config.sets.items()}
        self.sets = {name: loaded for name, loaded in self.sets.items() if loaded is not None}

    def _load(self, name: str, set_config: Mapping[str, Any]) -> dict[str, Any] | None:
        source = load_eval_source(name, set_config)
        if source is None:
            return None
        return {
            "source": source,
            "classnames": class_names(set_config, source),
            "templates": prompt_templates(set_config.get("templates", "openai_imagenet")),
            "captions": int(set_config.get("captions", 0)),
            "max_examples": int(set_config.get("max_examples", 0)) or None,
        }

    def __call__(self, params: Any) -> dict[str, float]:
        encode_image = lambda images: np.asarray(
            self._encode_images(params, global_array_from_host(images, self.mesh)), np.float32
        )
        encode_text = lambda tokens: np.asarray(
            self._encode_texts(params, global_array_from_host(tokens, self.mesh)), np.float32
        )
        results: dict[str, float] = {}
        for name, loaded in self.sets.items():
            batches = image_text.eval_batches(
                loaded["source"],
                image_size=self.image_size,
                context_length=self.context_length,
                batch_size=self.batch_size,
                max_examples=loaded["max_examples"],
                num_captions=loaded["captions"],
                worker_count=self.worker_count,
            )
            metrics = evaluate_image_text(
                encode_image,
                encode_text,
                self.tokenizer,
                batches,
                classnames=loaded["classnames"],
                templates=loaded["templates"],
                batch_size=self.batch_size,
            )
            results.update({f"{name}/{key}": value for key, value in metrics.items()})
        return results
