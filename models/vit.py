"""Vision Transformer image tower: CLIP's ViT, and EVA-02's as options of the same module.

CLIP (the defaults): images (B, H, W, 3), already normalised -> patch embedding (conv, no bias)
-> [CLS] + patches -> + learned position embeddings -> ln_pre -> pre-LN transformer (GELU MLP) ->
ln_post -> pooled -> @ proj.

EVA-02 / UTA (``from_variant("eva02_base/16")`` etc., see :data:`EVA02_VARIANTS`): patch embedding
with a bias, no ln_pre, absolute position embeddings plus 2-D rotary embeddings in every attention
(models/rope.py), q/v biases without a key bias, SwiGLU MLP with a hidden LayerNorm, LayerNorm eps
1e-6, ln_post on all tokens and the class token pooled. The "uta_*" variants drop the attention's
inner LayerNorm that "eva02_*" (EVA-02-CLIP's tower) has.

Token dropping: ``__call__(images, keep_indices=...)`` embeds all patches (the cheap convolution),
keeps the given ones with their position embeddings and rotary angles, prepends the class token and
runs the transformer on 1 + K tokens only, so its cost falls with the mask ratio.

Returns ``(embedding, intermediates)``; intermediates hold named arrays that evaluators, dense heads
and tasks read:

* ``tokens`` (B, 1 + K, width): ln_post output, class token first; K = all patches (row-major)
  without ``keep_indices``, else the kept ones in ``keep_indices`` order;
* ``pre_logits`` (B, width): pooled, before the projection;
* ``projected_tokens`` (B, 1 + K, output_dim): ``tokens @ proj`` (only with a projection);
* without ``keep_indices`` only: ``patch_tokens`` (B, rows, cols, width), the grid part of
  ``tokens``, and ``projected_patch_tokens`` (with a projection).

Unused entries cost nothing under jit: XLA removes what the caller does not read.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import Dtype, Transformer, normal_init
from models.rope import DEFAULT_THETA, as_pair, rope_angles, with_prefix_tokens

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

# EVA-02 sizes (timm's eva02_{tiny,small,base,large}).
EVA02_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"width": 192, "depth": 12, "num_heads": 3},
    "small": {"width": 384, "depth": 12, "num_heads": 6},
    "base": {"width": 768, "depth": 12, "num_heads": 12},
    "large": {"width": 1024, "depth": 24, "num_heads": 16},
}
# SwiGLU hidden width = int(width * 4 * 2 / 3): the same parameter count as a GELU MLP of ratio 4.
EVA02_MLP_RATIO = 4 * 2 / 3
# EVA-02 pretrains on a 16 x 16 grid (224 px, patch 14); other grids scale their RoPE positions
# to it (timm's ref_feat_shape=(16, 16), also for the patch-16 EVA-02-CLIP towers).
EVA02_ROPE_REF_GRID = 16
# The architecture options shared by every EVA-02 variant; "eva02" adds the attention's inner LN.
EVA02_OPTIONS: dict[str, Any] = {
    "mlp_type": "swiglu",
    "qkv_bias": "qv",
    "layer_norm_eps": 1e-6,
    "rope": True,
    "rope_theta": DEFAULT_THETA,
    "rope_ref_grid": EVA02_ROPE_REF_GRID,
    "use_abs_pos": True,
    "pre_norm": False,
    "patch_bias": True,
    "pool": "cls",
}
# Variant families: "<family>_<size>/<patch>", e.g. "uta_large/16".
EVA02_VARIANTS: dict[str, dict[str, Any]] = {
    "eva02": {"attn_inner_norm": True},  # EVA-02-CLIP's vision tower (timm eva02_*_clip_*)
    "uta": {"attn_inner_norm": False},  # UTA's student: EVA-02 without the attention's inner LN
}


def resize_position_grid(
    positions: jax.Array, stored_grid: tuple[int, int], grid: tuple[int, int]
) -> jax.Array:
    """(rows * cols, width) position embeddings resized to another grid (bicubic, float32)."""
    width = positions.shape[-1]
    image = positions.astype(jnp.float32).reshape(*stored_grid, width)
    resized = jax.image.resize(image, (*grid, width), method="bicubic")
    return resized.reshape(grid[0] * grid[1], width)


def vit_variant(name: str) -> dict[str, int]:
    """Parse a variant name such as "B/16" or "L/14" into width, depth, num_heads and patch_size."""
    match = re.fullmatch(r"(\w+?)/(\d+)", name)
    if match is None or match.group(1) not in VIT_SIZES:
        raise ValueError(
            f"unknown ViT variant {name!r}; expected <size>/<patch>, sizes {list(VIT_SIZES)}"
        )
    return {**VIT_SIZES[match.group(1)], "patch_size": int(match.group(2))}


def eva02_variant(name: str) -> dict[str, Any]:
    """All VisionTransformer fields of an EVA-02-style variant such as "eva02_base/16" or
    "uta_large/16" (families :data:`EVA02_VARIANTS`, sizes :data:`EVA02_SIZES`)."""
    match = re.fullmatch(r"(\w+?)_(\w+)/(\d+)", name)
    if match is None or match.group(1) not in EVA02_VARIANTS or match.group(2) not in EVA02_SIZES:
        raise ValueError(
            f"unknown EVA-02 variant {name!r}; expected <family>_<size>/<patch> with families "
            f"{list(EVA02_VARIANTS)} and sizes {list(EVA02_SIZES)}"
        )
    size = EVA02_SIZES[match.group(2)]
    return {
        **size,
        "patch_size": int(match.group(3)),
        "mlp_dim": int(size["width"] * EVA02_MLP_RATIO),
        **EVA02_OPTIONS,
        **EVA02_VARIANTS[match.group(1)],
    }


def variant_fields(name: str) -> dict[str, Any]:
    """The fields of a CLIP ViT ("B/16") or EVA-02-style ("uta_base/16") variant."""
    family = re.match(r"(\w+?)_", name)
    if family is not None and family.group(1) in EVA02_VARIANTS:
        return eva02_variant(name)
    return vit_variant(name)


class VisionTransformer(nn.Module):
    """ViT image tower; the defaults are CLIP's (open_clip's ``VisionTransformer``).

    EVA-02 options: ``pre_norm`` (ln_pre after the embeddings), ``patch_bias`` (bias of the patch
    convolution ``conv1``), ``use_abs_pos`` (learned ``positional_embedding``), ``rope`` (2-D
    rotary embedding, frequencies from ``rope_theta``, positions scaled to ``rope_ref_grid`` when
    given), ``mlp_type`` ("gelu" | "swiglu"), ``qkv_bias`` ("qkv" | "qv" | "none"),
    ``attn_inner_norm`` and ``layer_norm_eps``. ``mlp_dim`` defaults to 4 * width.

    ``activation``: the GELU MLP's "gelu" (exact) or "quick_gelu" (OpenAI CLIP). ``proj_bias``
    adds a bias ``proj_bias`` (output_dim,) to the projection, as EVA-CLIP's towers have (their
    projection is timm's classifier ``head``, a Linear with a bias).
    """

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
    pre_norm: bool = True
    patch_bias: bool = False
    use_abs_pos: bool = True
    rope: bool = False
    rope_theta: float = DEFAULT_THETA
    rope_ref_grid: int | tuple[int, int] | None = None
    mlp_type: str = "gelu"
    qkv_bias: str = "qkv"
    attn_inner_norm: bool = False
    activation: str = "gelu"
    proj_bias: bool = False
    # The grid the position embeddings are stored for (None: the input's). Inputs on another grid
    # use them resized (bicubic), e.g. a teacher trained at 224 px fed 196 px images.
    pos_embed_grid: int | tuple[int, int] | None = None

    @classmethod
    def from_variant(cls, variant: str, **kwargs: Any) -> VisionTransformer:
        """E.g. ``VisionTransformer.from_variant("L/14", output_dim=768)`` or
        ``from_variant("uta_base/16", output_dim=None)``; kwargs override the variant's fields."""
        return cls(**{**variant_fields(variant), **kwargs})

    def _layer_norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(
            epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )

    def _embed_patches(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        batch, height, width_px, _ = images.shape
        if height % self.patch_size or width_px % self.patch_size:
            raise ValueError(
                f"image size {height}x{width_px} is not divisible by patch size {self.patch_size}"
            )
        patches = nn.Conv(
            self.width,
            kernel_size=(self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            use_bias=self.patch_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv1",
        )(images.astype(self.dtype))
        grid = (patches.shape[1], patches.shape[2])
        return patches.reshape(batch, grid[0] * grid[1], self.width), grid

    def _rope_angles(
        self, grid: tuple[int, int], keep_indices: jax.Array | None
    ) -> jax.Array | None:
        """(1 or B, 1 + K, head_dim // 2) float32 angles; the class token's are zero."""
        if not self.rope:
            return None
        angles = jnp.asarray(
            rope_angles(
                grid,
                self.width // self.num_heads,
                theta=self.rope_theta,
                ref_grid=self.rope_ref_grid,
            )
        )
        if keep_indices is not None:
            angles = angles[keep_indices]  # (B, K, head_dim // 2)
        else:
            angles = angles[None]
        return with_prefix_tokens(angles)

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        *,
        train: bool = False,
        keep_indices: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """``keep_indices``: optional int (B, K) indices of the patches to keep, row-major over the
        grid (0 .. rows * cols - 1); the transformer then runs on the class token and those K
        patches only. Indices are not range-checked: out-of-range ones give NaN tokens."""
        del train  # no dropout or batch statistics in this tower
        batch = images.shape[0]
        scale = self.width**-0.5
        patches, grid = self._embed_patches(images)

        class_embedding = self.param(
            "class_embedding", normal_init(scale), (self.width,), self.param_dtype
        )
        class_token = jnp.broadcast_to(class_embedding, (batch, 1, self.width)).astype(self.dtype)
        if self.use_abs_pos:
            stored_grid = as_pair(self.pos_embed_grid) if self.pos_embed_grid else grid
            positional_embedding = self.param(
                "positional_embedding",
                normal_init(scale),
                (1 + stored_grid[0] * stored_grid[1], self.width),
                self.param_dtype,
            )
            patch_positions = positional_embedding[1:]
            if stored_grid != grid:
                patch_positions = resize_position_grid(patch_positions, stored_grid, grid)
            class_token = class_token + positional_embedding[0].astype(self.dtype)
            patches = patches + patch_positions.astype(self.dtype)
        if keep_indices is not None:
            if keep_indices.ndim != 2 or keep_indices.shape[0] != batch:
                raise ValueError(
                    f"keep_indices must be (batch={batch}, kept), got shape {keep_indices.shape}"
                )
            patches = jnp.take_along_axis(patches, keep_indices[:, :, None], axis=1)
        x = jnp.concatenate([class_token, patches], axis=1)

        if self.pre_norm:
            x = self._layer_norm("ln_pre")(x)
        x = Transformer(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim or 4 * self.width,
            layer_norm_eps=self.layer_norm_eps,
            remat_policy=self.remat_policy,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            mlp_type=self.mlp_type,
            qkv_bias=self.qkv_bias,
            attn_inner_norm=self.attn_inner_norm,
            activation=self.activation,
            name="transformer",
        )(x, self._rope_angles(grid, keep_indices))

        # open_clip (and timm's eva with global_pool="token") apply the final norm to all tokens,
        # then pool.
        tokens = self._layer_norm("ln_post")(x)
        if self.pool == "cls":
            pooled = tokens[:, 0]
        elif self.pool == "gap":
            pooled = tokens[:, 1:].mean(axis=1)
        else:
            raise ValueError(f"unknown pool {self.pool!r}; use 'cls' or 'gap'")

        intermediates: dict[str, Any] = {"tokens": tokens, "pre_logits": pooled}
        if keep_indices is None:
            intermediates["patch_tokens"] = tokens[:, 1:].reshape(batch, *grid, self.width)
        if self.output_dim is None:
            return pooled, intermediates
        proj = self.param(
            "proj", normal_init(scale), (self.width, self.output_dim), self.param_dtype
        )
        proj = proj.astype(self.dtype)
        bias = 0
        if self.proj_bias:
            bias = self.param(
                "proj_bias", nn.initializers.zeros, (self.output_dim,), self.param_dtype
            ).astype(self.dtype)
        intermediates["projected_tokens"] = tokens @ proj + bias
        if keep_indices is None:
            intermediates["projected_patch_tokens"] = intermediates["patch_tokens"] @ proj + bias
        return pooled @ proj + bias, intermediates
