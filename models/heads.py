"""Heads on an image tower: a linear classifier (CatLIP's synset classifier, transfer learning).

``ImageClassifier(image_encoder, num_classes)`` runs any image tower that follows the towers'
convention ``tower(images, train=...) -> (pooled, intermediates)`` (built with
``output_dim=None``, so ``pooled`` is the pre-logits feature: a ViT's class token after its final
LayerNorm) and applies a Dense layer with a bias. Parameters: ``{"image_encoder": ...,
"classifier": {"kernel": (width, num_classes), "bias": (num_classes,)}}``. Logits are returned
in float32 (losses over tens of thousands of classes sum many small terms).

``ClassifierHead`` alone is the head of a linear probe over frozen features.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import Dtype

# ViT-style classifier initialisation (timm / CoreNet: small normal weights, zero bias).
CLASSIFIER_INIT_STD = 0.02


def classifier_layer(num_classes: int, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
    """The Dense layer named ``classifier`` that both modules below use."""
    return nn.Dense(
        num_classes,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(CLASSIFIER_INIT_STD),
        name="classifier",
    )


class ClassifierHead(nn.Module):
    """features (B, width) -> float32 logits (B, num_classes); params ``{"classifier": ...}``."""

    num_classes: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        layer = classifier_layer(self.num_classes, self.dtype, self.param_dtype)
        return layer(features.astype(self.dtype)).astype(jnp.float32)


class ImageClassifier(nn.Module):
    """An image tower (``output_dim=None``) followed by a linear classifier."""

    image_encoder: nn.Module
    num_classes: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def features(
        self, images: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, Any]]:
        return self.image_encoder(images, train=train)

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, Any]]:
        features, intermediates = self.features(images, train=train)
        layer = classifier_layer(self.num_classes, self.dtype, self.param_dtype)
        logits = layer(features.astype(self.dtype)).astype(jnp.float32)
        return logits, {**intermediates, "pre_logits": features}
