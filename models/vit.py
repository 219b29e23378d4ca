"""CLIP-style Vision Transformer image tower.

images (B, H, W, 3), already normalised -> patch embedding (conv, no bias) -> [CLS] + patches
-> + learned position embeddings -> ln_pre -> pre-LN transformer -> ln_post -> pooled -> @ proj.

Returns ``(embedding, intermediates)``; intermediates hold named arrays that evaluators and dense
heads read: ``tokens`` (ln_post output, class token first), ``patch_tokens`` (the grid part of it),
``pre_logits`` (pooled, before the projection) and ``projected_patch_tokens``. Unused entries cost
nothing under jit: XLA removes what the caller does not read.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import Dtype, Transformer, normal_init

# Widths, depths and heads of the standard ViT sizes (MLP ratio 4).
VIT_SIZES: dict[str, dict[str, int]] = {
    "Ti": {"width": 192, "depth": 12, "num_heads": 3},
    "S": {"width": 384, "depth": 12, "num_heads": 6},
    "M": {"width": 512, "depth": 12, "num_heads": 8},
    "B": {"width": 768, "depth": 12, "num_heads": 12},
    "L": {"width": 1024, "depth": 24, "num_heads": 16},
    "H": {"width": 1280, "depth": 32, "num_heads": 16},
    "g": {"width": 1408, "depth": 40, "num_heads": 16},
}


def vit_variant(name: str) -> dict[str, int]:
    """Parse a variant name such as "B/16" or "L/14" into width, depth, num_heads and patch_size."""
    match = re.fullmatch(r"(\w+?)/(\d+)", name)
    if match is None or match.group(1) not in VIT_SIZES:
        raise ValueError(
            f"unknown ViT variant {name!r}; expected <size>/<patch>, sizes {list(VIT_SIZES)}"
        )
    return {**VIT_SIZES[match.group(1)], "patch_size": int(match.group(2))}


class VisionTransformer(nn.Module):
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int | None = None
    output_dim: int | None = 512
    pool: str = "cls"
    layer_norm_eps: float = 1e-5
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_variant(cls, variant: str, **kwargs: Any) -> VisionTransformer:
        """E.g. ``VisionTransformer.from_variant("L/14", output_dim=768)``; kwargs override."""
        return cls(**{**vit_variant(variant), **kwargs})

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, Any]]:
        del train  # no dropout or batch statistics in this tower
        batch, height, width_px, _ = images.shape
        if height % self.patch_size or width_px % self.patch_size:
            raise ValueError(
                f"image size {height}x{width_px} is not divisible by patch size {self.patch_size}"
            )
        scale = self.width**-0.5
        patches = nn.Conv(
            self.width,
            kernel_size=(self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv1",
        )(images.astype(self.dtype))
        grid_h, grid_w = patches.shape[1:3]
        patches = patches.reshape(batch, grid_h * grid_w, self.width)

        class_embedding = self.param(
            "class_embedding", normal_init(scale), (self.width,), self.param_dtype
        )
        positional_embedding = self.param(
            "positional_embedding",
            normal_init(scale),
            (1 + grid_h * grid_w, self.width),
            self.param_dtype,
        )
        class_token = jnp.broadcast_to(class_embedding, (batch, 1, self.width)).astype(self.dtype)
        x = jnp.concatenate([class_token, patches], axis=1)
        x = x + positional_embedding.astype(self.dtype)

        layer_norm = lambda name: nn.LayerNorm(
            epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = layer_norm("ln_pre")(x)
        x = Transformer(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim or 4 * self.width,
            layer_norm_eps=self.layer_norm_eps,
            remat_policy=self.remat_policy,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="transformer",
        )(x)

        if self.pool == "cls":
            # open_clip applies ln_post to all tokens, then pools the class token.
            tokens = layer_norm("ln_post")(x)
            pooled = tokens[:, 0]
        elif self.pool == "gap":
            tokens = layer_norm("ln_post")(x)
            pooled = tokens[:, 1:].mean(axis=1)
        else:
            raise ValueError(f"unknown pool {self.pool!r}; use 'cls' or 'gap'")

        intermediates: dict[str, Any] = {
            "tokens": tokens,
            "patch_tokens": tokens[:, 1:].reshape(batch, grid_h, grid_w, self.width),
            "pre_logits": pooled,
        }
        if self.output_dim is None:
            return pooled, intermediates
        proj = self.param(
            "proj", normal_init(scale), (self.width, self.output_dim), self.param_dtype
        )
        proj = proj.astype(self.dtype)
        intermediates["projected_patch_tokens"] = intermediates["patch_tokens"] @ proj
        return pooled @ proj, intermediates
