"""Dense evaluation: a head's predictions on the sets of ``config.eval.sets``, and their metrics.

Each set is a dense source config (pretrain/data/dense: the embedded scenes, TFDS by name, a
folder or tar shards) plus ``max_examples`` (0: all). Images and labels are resized to
``config.data.eval_size`` (labels nearest); the task hands over ``predict_fn(variables, uint8
images, output_size)`` -> the target's predictions (class ids, depth, unit normals), jitted with
the batch split over the data-parallel devices and replicated outputs. As the other evaluators,
every process reads the whole set and computes the same metrics (host-side accumulators of
pretrain/evaluate/dense_metrics.py, fed the predictions of all rows), so the numbers do not depend
on the number of devices: a one-device and an eight-device evaluation agree exactly when their
predictions do. Metrics are ``<set>/<name>`` (``scenes/miou``, ``nyu/abs_rel``...).

With an ``output_dir`` (the run's workdir), process 0 also writes
``figures/<set>_step<step>.png``: the first ``figure_examples`` images beside their predicted
and true maps (pretrain/evaluate/dense_figures.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh
from ml_collections import ConfigDict

from pretrain import sharding
from pretrain.data import dense as dense_data
from pretrain.data.image_text import Prefix
from pretrain.evaluate.dense_figures import save_dense_figure
from pretrain.evaluate.image_text_eval import dataset_not_found_error, global_array_from_host

PredictFn = Callable[[Any, jax.Array, tuple[int, int]], jax.Array]


def load_dense_eval_source(name: str, set_config: Any) -> Any | None:
    """The source of a dense evaluation set, or None (with a warning) when its data is absent."""
    try:
        source = dense_data.make_dense_source(set_config)
    except (FileNotFoundError, dataset_not_found_error()) as error:
        logging.warning("dense eval set %r is not available and is skipped: %s", name, error)
        return None
    limit = int(set_config.get("max_examples", 0))
    return Prefix(source, limit) if limit else source


class DenseEvaluator:
    """``evaluator(variables, step=..., output_dir=...) -> metrics`` over the configured sets."""

    def __init__(
        self,
        eval_config: ConfigDict,
        *,
        mesh: Mesh,
        target: Any,
        augmentation: Any,
        predict_fn: PredictFn,
    ):
        self.mesh = mesh
        self.target = target
        self.augmentation = augmentation
        self.output_size = tuple(int(v) for v in augmentation.eval_size)
        self.batch_size = int(eval_config.batch_size)
        shards = sharding.data_parallel_size(mesh)
        if self.batch_size % shards:
            raise ValueError(f"eval.batch_size {self.batch_size} must divide by {shards} devices")
        self.worker_count = int(eval_config.get("worker_count", 0))
        self.figure_examples = int(eval_config.get("figure_examples", 4))
        self._predict = jax.jit(
            predict_fn, static_argnums=2, out_shardings=sharding.replicated(mesh)
        )
        loaded = {name: load_dense_eval_source(name, c) for name, c in eval_config.sets.items()}
        self.sets = {name: source for name, source in loaded.items() if source is not None}

    def _batches(self, source: Any) -> Any:
        return dense_data.dense_dataset(
            source,
            batch_size_per_process=self.batch_size,
            seed=0,
            train=False,
            targets=(self.target.name,),
            augmentation=self.augmentation,
            drop_remainder=False,
            workers=dense_data.Workers(count=self.worker_count),
            ignore_label=self.target.ignore_label,
        )

    def predictions(self, variables: Any, images: np.ndarray) -> np.ndarray:
        """The target's predictions for a host batch (padded to the compiled batch size)."""
        rows = images.shape[0]
        if rows < self.batch_size:  # one compiled shape: pad with copies of the last image
            filler = np.repeat(images[-1:], self.batch_size - rows, axis=0)
            images = np.concatenate([images, filler])
        predicted = self._predict(
            variables, global_array_from_host(images, self.mesh), self.output_size
        )
        return np.asarray(predicted)[:rows]

    def evaluate_set(
        self, variables: Any, source: Any, figure_path: Path | None = None
    ) -> dict[str, float]:
        metrics = self.target.metrics()
        shown: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for batch in self._batches(source):
            valid = np.asarray(batch["valid"], bool)
            if not valid.any():
                continue
            images, labels = batch["image"][valid], batch[self.target.name][valid]
            predicted = self.predictions(variables, images)
            metrics.update(predicted, labels)
            missing = self.figure_examples - len(shown)
            shown.extend(zip(images[:missing], predicted[:missing], labels[:missing]))
        if figure_path is not None and shown:
            images, predicted, labels = (np.stack(column) for column in zip(*shown))
            save_dense_figure(figure_path, self.target, images, predicted, labels)
        return metrics.result()

    def __call__(
        self, variables: Any, *, step: int = 0, output_dir: str | None = None
    ) -> dict[str, float]:
        results: dict[str, float] = {}
        write = output_dir is not None and jax.process_index() == 0 and self.figure_examples > 0
        for name, source in self.sets.items():
            figure = Path(output_dir) / "figures" / f"{name}_step{step}.png" if write else None
            for key, value in self.evaluate_set(variables, source, figure).items():
                results[f"{name}/{key}"] = float(value)
        return results
