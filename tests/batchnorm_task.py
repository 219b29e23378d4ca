"""A minimal task whose model has BatchNorm, for the trainer's model-state tests: a conv, a
BatchNorm and a linear classifier over the tiny scenes' 48 labels."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from configs.catlip_transfer import get_config as transfer_config
from pretrain import task as base

SEEN_MODEL_STATES: list[Any] = []  # what evaluate() received, for the tests to inspect


class ConvBatchNormClassifier(nn.Module):
    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Conv(8, (3, 3), strides=(2, 2))(images)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(48)(nn.relu(x).mean(axis=(1, 2)))


class Task(base.Task):
    batch_fields = ("image", "label")

    def __init__(self, config: ConfigDict, mesh: Any):
        super().__init__(config, mesh)
        self.model = ConvBatchNormClassifier()

    def _images(self, images_uint8: jax.Array) -> jax.Array:
        return images_uint8.astype(jnp.float32) / 255.0 - 0.5

    def init_variables(self, rng: jax.Array) -> tuple[Any, Any]:
        variables = self.model.init(rng, jnp.zeros((2, 32, 32, 3)), train=False)
        return variables["params"], variables["batch_stats"]

    def loss_fn(self, params, batch, rng, step, frozen=None, model_state=None):
        logits, updated = self.model.apply(
            {"params": params, "batch_stats": model_state},
            self._images(batch["image"]),
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return base.LossOutput(loss, {}, updated["batch_stats"])

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {
            "image": jax.ShapeDtypeStruct((batch_size, 32, 32, 3), jnp.uint8),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        }

    def evaluate(self, params, step, frozen=None, model_state=None) -> dict[str, float]:
        SEEN_MODEL_STATES.append(jax.device_get(model_state))
        mean = jax.tree.leaves(model_state)[0]
        return {"running_mean_norm": float(jnp.linalg.norm(mean))}

    def export(self, params, directory, model_state=None) -> str:
        SEEN_MODEL_STATES.append(jax.device_get(model_state))
        return directory


def get_config(arg: str | None = None) -> ConfigDict:
    config = transfer_config("runlocal")  # borrowed for its optimizer, data and checkpoint fields
    config.task = "batchnorm_task"
    config.total_steps = 6
    config.batch_size = 16
    config.ema_decay = 0.5
    config.data.image_size = 32
    config.data.train.update({"scenes_config": "tiny", "max_examples": 0})
    config.eval.update({"every_steps": 3, "at_start": False, "include_ema": True, "sets": {}})
    config.checkpoint.update({"every_steps": 3, "keep": 2, "best_metric": ""})
    config.log_every_steps = 3
    return config
