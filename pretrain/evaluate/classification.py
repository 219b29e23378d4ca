"""Top-1 / top-5 accuracy of an image classifier on the labelled sets of ``config.eval.sets``.

Each set is a source config (see ``pretrain.data.image_text``) with labelled records plus
``classnames`` ("synthetic_scenes" | "imagenet" | "tfds") and ``max_examples`` (0: all). The task
hands over ``logits_fn(variables, uint8 images) -> (n, num_classes)`` logits, and for every set the
variables to use (so a task can give each set its own head, e.g. CatLIP's Transfer-Init head for
the set's classes). Metrics are ``<set>/<prefix>top1`` and ``<set>/<prefix>top5`` in percent.

As the image-text evaluator, every process reads the whole set; the jitted classifier sees the
batch split over the data-parallel devices and returns replicated logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from pretrain import sharding
from pretrain.data import image_text
from pretrain.evaluate.image_text_eval import (
    class_names,
    global_array_from_host,
    load_eval_source,
)
from pretrain.evaluate.zeroshot import true_class_ranks

LogitsFn = Callable[[Any, jax.Array], jax.Array]


def accuracy_counts(logits: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> np.ndarray:
    """How many rows have their label among the top-k logits, for each k (ties pessimistic)."""
    ranks = true_class_ranks(np.asarray(logits, np.float64), np.asarray(labels))
    return np.array([(ranks < k).sum() for k in ks], np.int64)


class ClassificationEvaluator:
    """``evaluator(variables_for_set, prefix) -> metrics`` over the configured labelled sets."""

    def __init__(
        self,
        eval_config: ConfigDict,
        *,
        mesh: Mesh,
        image_size: int,
        logits_fn: LogitsFn,
        ks: tuple[int, ...] = (1, 5),
    ):
        self.mesh = mesh
        self.image_size = image_size
        self.ks = ks
        self.batch_size = int(eval_config.batch_size)
        shards = sharding.data_parallel_size(mesh)
        if self.batch_size % shards:
            raise ValueError(f"eval.batch_size {self.batch_size} must divide by {shards} devices")
        self.worker_count = int(eval_config.get("worker_count", 0))
        self._logits = jax.jit(logits_fn, out_shardings=sharding.replicated(mesh))
        loaded = {name: self._load(name, cfg) for name, cfg in eval_config.sets.items()}
        self.sets = {name: value for name, value in loaded.items() if value is not None}

    def _load(self, name: str, set_config: Mapping[str, Any]) -> dict[str, Any] | None:
        source = load_eval_source(name, set_config)
        if source is None:
            return None
        names = class_names(set_config, source)
        if not names:
            raise ValueError(f"eval set {name!r} needs classnames for classification")
        return {
            "source": source,
            "classnames": names,
            "max_examples": int(set_config.get("max_examples", 0)) or None,
        }

    def _padded_logits(self, variables: Any, images: np.ndarray) -> np.ndarray:
        rows = images.shape[0]
        if rows < self.batch_size:  # one compiled shape: pad with copies of the last image
            filler = np.repeat(images[-1:], self.batch_size - rows, axis=0)
            images = np.concatenate([images, filler])
        logits = self._logits(variables, global_array_from_host(images, self.mesh))
        return np.asarray(logits, np.float32)[:rows]

    def evaluate_set(self, name: str, variables: Any) -> dict[str, float]:
        loaded = self.sets[name]
        correct = np.zeros(len(self.ks), np.int64)
        total = 0
        batches = image_text.eval_batches(
            loaded["source"],
            image_size=self.image_size,
            context_length=0,
            with_text=False,
            batch_size=self.batch_size,
            max_examples=loaded["max_examples"],
            worker_count=self.worker_count,
        )
        for batch in batches:
            if "label" not in batch:
                raise ValueError(f"eval set {name!r} has no labels")
            logits = self._padded_logits(variables, batch["image"])
            correct += accuracy_counts(logits, batch["label"], self.ks)
            total += len(batch["label"])
        return {f"top{k}": 100.0 * float(c) / max(total, 1) for k, c in zip(self.ks, correct)}

    def __call__(
        self, variables_for_set: Callable[[str, list[str]], Any], prefix: str = ""
    ) -> dict[str, float]:
        results: dict[str, float] = {}
        for name, loaded in self.sets.items():
            variables = variables_for_set(name, loaded["classnames"])
            for key, value in self.evaluate_set(name, variables).items():
                results[f"{name}/{prefix}{key}"] = value
        return results
