"""Two-tower (CLIP / SigLIP) model: any image tower + any text tower + a learned temperature.

Both towers follow the convention ``tower(inputs, train=...) -> (embedding, intermediates)``,
so a MobileCLIP or ResNet image tower plugs in without changes here. Embeddings are L2-normalised
in float32. ``logit_scale`` is stored as a log (open_clip's convention, which is also what the
exported state dict holds); the model returns the multiplicative scale. A ``logit_bias`` parameter
exists only for the sigmoid loss.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class TwoTowerModel(nn.Module):
    image_encoder: nn.Module
    text_encoder: nn.Module
    logit_scale_init: float = CLIP_LOGIT_SCALE_INIT
    logit_bias_init: float | None = None

    def encode_image(
        self, images: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, Any]]:
        embedding, intermediates = self.image_encoder(images, train=train)
        return l2_normalize(embedding), intermediates

    def encode_text(
        self, tokens: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, Any]]:
        embedding, intermediates = self.text_encoder(tokens, train=train)
        return l2_normalize(embedding), intermediates

    @nn.compact
    def __call__(
        self, images: jax.Array, tokens: jax.Array, *, train: bool = False
    ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
        image_embeds, image_intermediates = self.encode_image(images, train=train)
        text_embeds, text_intermediates = self.encode_text(tokens, train=train)
        log_scale = self.param(
            "logit_scale", nn.initializers.constant(self.logit_scale_init), (), jnp.float32
        )
        outputs = {
            "image_embeds": image_embeds,
            "text_embeds": text_embeds,
            "logit_scale": jnp.exp(log_scale),
        }
        if self.logit_bias_init is not None:
            outputs["logit_bias"] = self.param(
                "logit_bias", nn.initializers.constant(self.logit_bias_init), (), jnp.float32
            )
        return outputs, {"image": image_intermediates, "text": text_intermediates}
