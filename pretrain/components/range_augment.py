"""RangeAugment as a task component: learned photometric augmentation steered to a target PSNR.

Used by the CLIP and CatLIP tasks (papers 000 and 002 train with it). ``config.range_augment``:
``enabled``, ``operations`` (of models/range_augment.py), ``target_psnr`` (start, end), the
annealing ``curriculum`` and ``alpha`` (the weight of the PSNR loss). Its magnitudes are parameters
of the task (``params["range_augment"]``), trained with the model and dropped on export.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from losses.range_augment import image_mse, psnr_target_loss, target_mse_schedule
from models.range_augment import RangeAugment

PARAMS_KEY = "range_augment"


def _psnr(mse: jax.Array) -> jax.Array:
    return 20 * jnp.log10(255.0) - 10 * jnp.log10(jnp.maximum(mse, 1e-10))


class RangeAugmentation:
    """Build with :func:`from_config` (None when disabled)."""

    # Config fields that shape a task's saved state when it uses RangeAugment (its parameters).
    STATE_FIELDS = (r"range_augment\.(enabled|operations)$",)

    def __init__(self, settings: ConfigDict, total_steps: int):
        self.settings = settings
        self.total_steps = total_steps
        self.module = RangeAugment(tuple(settings.operations))

    @classmethod
    def from_config(cls, config: ConfigDict) -> RangeAugmentation | None:
        settings = config.get("range_augment")
        if not settings or not settings.enabled:
            return None
        return cls(settings, int(config.total_steps))

    def init(self, rng: jax.Array, images: jax.Array) -> Any:
        return self.module.init(rng, images, rng)["params"]

    def augment(
        self, params: Any, images: jax.Array, rng: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(augmented images, per-image MSE to the originals); images in [0, 1]."""
        augmented = self.module.apply({"params": params[PARAMS_KEY]}, images, rng)
        return augmented, image_mse(images, augmented)

    def loss(self, params: Any, mse: jax.Array, step: jax.Array) -> tuple[jax.Array, dict]:
        """The pull of the augmented images' PSNR towards the annealed target, and read-outs."""
        start_psnr, end_psnr = self.settings.target_psnr
        target = target_mse_schedule(
            step, self.total_steps, start_psnr, end_psnr, self.settings.curriculum
        )
        loss = psnr_target_loss(mse, target, alpha=float(self.settings.alpha))
        metrics = {
            "range_augment/loss": loss,
            "range_augment/psnr": _psnr(mse).mean(),
            "range_augment/target_psnr": _psnr(target),
        }
        ranges = self.module.apply(
            {"params": params[PARAMS_KEY]}, method=RangeAugment.magnitude_ranges
        )
        for name, (low, high) in ranges.items():
            metrics[f"range_augment/{name}_low"] = low
            metrics[f"range_augment/{name}_high"] = high
        return loss, metrics
