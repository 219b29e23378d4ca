"""Transformer building blocks shared by the image and text towers.

Parameters are float32 (``param_dtype``) while the arithmetic runs in ``dtype`` (bfloat16 on
accelerators): Flax casts the weights at use. LayerNorm statistics are always computed in float32 by
Flax, whatever ``dtype`` is, which is what keeps bf16 training stable.

Parameter names follow open_clip's (``ln_1``, ``attn``, ``mlp.c_fc``...) so that the export to
PyTorch is a renaming plus reshapes, and so that sharding rules read naturally.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Remat policies by config name. "none" keeps every activation; "full" recomputes the whole block in
# the backward pass; "dots_saveable" keeps matmul outputs (a middle ground for large models).
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def normal_init(stddev: float) -> Callable[..., jax.Array]:
    return nn.initializers.normal(stddev=stddev)


class MultiHeadAttention(nn.Module):
    """Self-attention; query/key/value projections laid out as (width, heads, head_dim).

    The (heads, head_dim) layout lets the sharding rules split heads over the ``model`` mesh axis.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    in_proj_std: float | None = None
    out_proj_std: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, causal: bool = False) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        in_init = normal_init(self.in_proj_std or width**-0.5)
        project_in = functools.partial(
            nn.DenseGeneral,
            features=(self.num_heads, head_dim),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=in_init,
        )
        query = project_in(name="query")(x)
        key = project_in(name="key")(x)
        value = project_in(name="value")(x)
        # (batch, tokens, heads, head_dim) layout; XLA (or cuDNN on GPU) picks the kernel.
        attended = jax.nn.dot_product_attention(query, key, value, is_causal=causal)
        return nn.DenseGeneral(
            features=width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=normal_init(self.out_proj_std or width**-0.5),
            name="out",
        )(attended)


class Mlp(nn.Module):
    """Two-layer MLP with exact (erf) GELU, as in open_clip's non-OpenAI models."""

    hidden_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    fc_std: float | None = None
    proj_std: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(
            self.hidden_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=normal_init(self.fc_std or (2 * width) ** -0.5),
            name="c_fc",
        )(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=normal_init(self.proj_std or width**-0.5),
            name="c_proj",
        )(x)


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    num_heads: int
    mlp_dim: int
    causal: bool = False
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    depth_for_init: int = 12

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        # Residual-branch outputs are scaled down with depth so that activations do not grow
        # with the number of blocks at initialisation (open_clip's text-tower scheme).
        out_std = width**-0.5 * (2 * self.depth_for_init) ** -0.5
        layer_norm = functools.partial(
            nn.LayerNorm,
            epsilon=self.layer_norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = x + MultiHeadAttention(
            self.num_heads,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            out_proj_std=out_std,
            name="attn",
        )(layer_norm(name="ln_1")(x), causal=self.causal)
        x = x + Mlp(
            self.mlp_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            proj_std=out_std,
            name="mlp",
        )(layer_norm(name="ln_2")(x))
        return x


class Transformer(nn.Module):
    """A stack of residual blocks named ``resblocks_<i>``; optional rematerialisation per block."""

    depth: int
    num_heads: int
    mlp_dim: int
    causal: bool = False
    layer_norm_eps: float = 1e-5
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block_cls = ResidualBlock
        if self.remat_policy != "none":
            if self.remat_policy not in REMAT_POLICIES:
                raise ValueError(
                    f"unknown remat_policy {self.remat_policy!r}; "
                    f"choose from {['none', *REMAT_POLICIES]}"
                )
            block_cls = nn.remat(ResidualBlock, policy=REMAT_POLICIES[self.remat_policy])
        for index in range(self.depth):
            x = block_cls(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                causal=self.causal,
                layer_norm_eps=self.layer_norm_eps,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                depth_for_init=self.depth,
                name=f"resblocks_{index}",
            )(x)
        return x
