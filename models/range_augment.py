"""RangeAugment: photometric augmentation on the accelerator with learnable magnitude ranges.

Paper 000 (Table 11) trains CLIP with RangeAugment (Mehta et al., 2022, arXiv:2212.10553): each
operation's magnitude is drawn per image from a uniform range [low, high] whose ends are
parameters trained with the model. The model's loss pulls the ranges towards weak augmentation;
an image-similarity loss (``losses/range_augment.py``) pulls them towards a target PSNR between
the augmented and the original image, which is annealed during training (40 dB -> 20 dB).

Operations (images in [0, 1], NHWC), each applied to a random half of the batch, in a random
order, then clipped to [0, 1]:
  brightness  x * m
  contrast    (1 - m) * mean_c(x) + m * x     (per-image, per-channel mean over pixels)
  noise       x + m * N(0, 1)                 (m is the noise's standard deviation)
The range ends are stored unconstrained and mapped through ``sigmoid`` into fixed intervals
(brightness/contrast low in [0.1, 0.9], high in [1.1, 10]; noise low in [0, 5e-5], high in
[1e-4, 1]), with CoreNet's initial values, so the ranges stay valid whatever the optimizer does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# (bounds of low, bounds of high, initial raw low, initial raw high), per operation.
RANGES: dict[str, tuple[tuple[float, float], tuple[float, float], float, float]] = {
    "brightness": ((0.1, 0.9), (1.1, 10.0), 0.5, 1.5),
    "contrast": ((0.1, 0.9), (1.1, 10.0), 0.5, 1.5),
    "noise": ((0.0, 5e-5), (1e-4, 1.0), 0.0, 0.1),
}


def squash(raw: jax.Array, bounds: tuple[float, float]) -> jax.Array:
    """Map an unconstrained value into (low, high) smoothly."""
    low, high = bounds
    return low + (high - low) * jax.nn.sigmoid(raw)


def brightness(images: jax.Array, magnitude: jax.Array, rng: jax.Array) -> jax.Array:
    del rng
    return images * magnitude


def contrast(images: jax.Array, magnitude: jax.Array, rng: jax.Array) -> jax.Array:
    del rng
    channel_mean = images.mean(axis=(1, 2), keepdims=True)
    return (1.0 - magnitude) * channel_mean + magnitude * images


def noise(images: jax.Array, magnitude: jax.Array, rng: jax.Array) -> jax.Array:
    return images + magnitude * jax.random.normal(rng, images.shape, images.dtype)


OPERATIONS: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "brightness": brightness,
    "contrast": contrast,
    "noise": noise,
}


class RangeAugment(nn.Module):
    """``RangeAugment(operations)(images_01, rng) -> augmented images in [0, 1]``."""

    operations: tuple[str, ...] = ("brightness", "contrast", "noise")
    apply_fraction: float = 0.5

    def setup(self) -> None:
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"unknown RangeAugment operations {sorted(unknown)}")
        self.raw_ranges = {
            name: (
                self.param(f"{name}_low", nn.initializers.constant(RANGES[name][2]), ()),
                self.param(f"{name}_high", nn.initializers.constant(RANGES[name][3]), ()),
            )
            for name in self.operations
        }

    def magnitude_ranges(self) -> dict[str, tuple[jax.Array, jax.Array]]:
        """The current (low, high) of every operation."""
        return {
            name: (squash(raw_low, RANGES[name][0]), squash(raw_high, RANGES[name][1]))
            for name, (raw_low, raw_high) in self.raw_ranges.items()
        }

    def __call__(self, images: jax.Array, rng: jax.Array) -> jax.Array:
        ranges = self.magnitude_ranges()
        batch = images.shape[0]
        chosen_count = max(1, int(batch * self.apply_fraction))
        order_rng, *op_rngs = jax.random.split(rng, 1 + len(self.operations))

        def apply(name: str, x: jax.Array, op_rng: jax.Array) -> jax.Array:
            pick_rng, draw_rng, op_own_rng = jax.random.split(op_rng, 3)
            # A random subset of exactly `chosen_count` images gets this operation.
            chosen = jax.random.permutation(pick_rng, batch) < chosen_count
            low, high = ranges[name]
            uniform = jax.random.uniform(draw_rng, (batch, 1, 1, 1), x.dtype)
            magnitude = low + uniform * (high - low)
            changed = OPERATIONS[name](x, magnitude, op_own_rng)
            return jnp.where(chosen[:, None, None, None], changed, x)

        def in_order(order: tuple[int, ...]) -> Callable[[jax.Array], jax.Array]:
            def run(x: jax.Array) -> jax.Array:
                for position in order:
                    x = apply(self.operations[position], x, op_rngs[position])
                return x

            return run

        orders = list(itertools.permutations(range(len(self.operations))))
        choice = jax.random.randint(order_rng, (), 0, len(orders))
        augmented = jax.lax.switch(choice, [in_order(order) for order in orders], images)
        return jnp.clip(augmented, 0.0, 1.0)
