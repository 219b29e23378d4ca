"""Transformer building blocks shared by the image and text towers.

Parameters are float32 (``param_dtype``) while the arithmetic runs in ``dtype`` (bfloat16 on
accelerators): Flax casts the weights at use. LayerNorm statistics are always computed in float32 by
Flax, whatever ``dtype`` is, which is what keeps bf16 training stable.

Parameter names follow open_clip's (``ln_1``, ``attn``, ``mlp.c_fc``...) so that the export to
PyTorch is a renaming plus reshapes, and so that sharding rules read naturally.

EVA-02 options (all off by default, which is the CLIP block): rotary position embedding applied to
queries and keys (``rope_angles``, see models/rope.py), biases on queries and values but not
keys (``qkv_bias="qv"``), a LayerNorm on the attention output before its projection
(``attn_inner_norm``, parameter ``attn/inner_norm``), and a SwiGLU MLP with a LayerNorm on its
hidden units (``mlp_type="swiglu"``, parameters ``mlp/{fc1_g,fc1_x,norm,fc2}``, timm's names).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.rope import apply_rope

Dtype = Any

QKV_BIAS_OPTIONS = ("qkv", "qv", "none")
MLP_TYPES = ("gelu", "swiglu")
# Activations of the GELU MLP: exact (erf) GELU, or OpenAI CLIP's QuickGELU x * sigmoid(1.702 x)
# (open_clip's ``quick_gelu: true`` models, e.g. OpenAI's ViT-L/14).
ACTIVATIONS = ("gelu", "quick_gelu")

# Remat policies by config name. "none" keeps every activation; "full" recomputes the whole block in
# the backward pass; "dots_saveable" keeps matmul outputs (a middle ground for large models).
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def normal_init(stddev: float) -> Callable[..., jax.Array]:
    return nn.initializers.normal(stddev=stddev)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The MLP activation called ``name`` (see :data:`ACTIVATIONS`)."""
    if name == "gelu":
        return functools.partial(nn.gelu, approximate=False)
    if name == "quick_gelu":
        return quick_gelu
    raise ValueError(f"unknown activation {name!r}; choose from {ACTIVATIONS}")


def attention_weights(query: jax.Array, key: jax.Array, *, causal: bool = False) -> jax.Array:
    """(batch, heads, queries, keys) float32 softmax(q k^T / sqrt(head_dim)) over the keys.

    ``query`` and ``key`` are (batch, tokens, heads, head_dim), after any rotary embedding; with
    ``causal`` a query sees only itself and the keys before it (``dot_product_attention``'s mask).
    """
    query = query.astype(jnp.float32)
    key = key.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(jnp.float32(query.shape[-1]))
    if causal:
        allowed = jnp.tril(jnp.ones((query.shape[1], key.shape[1]), bool))
        logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


class MultiHeadAttention(nn.Module):
    """Self-attention; query/key/value projections laid out as (width, heads, head_dim).

    The (heads, head_dim) layout lets the sharding rules split heads over the ``model`` mesh axis.
    ``qkv_bias`` says which projections have a bias ("qkv", "qv": EVA-02's no key bias, "none");
    ``inner_norm`` adds a LayerNorm over all heads' outputs before the output projection (EVA-02's
    sub-LN, scale and bias shaped (heads, head_dim)). ``rope_angles`` rotates queries and keys.

    With the collection ``attention_weights`` mutable (``mutable=["attention_weights"]`` in
    ``apply``) the weights it attends with are sown as ``attention_weights/.../weights``, see
    :func:`attention_weights`; otherwise nothing is recorded.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    in_proj_std: float | None = None
    out_proj_std: float | None = None
    qkv_bias: str = "qkv"
    inner_norm: bool = False
    layer_norm_eps: float = 1e-5

    @nn.compact
    def __call__(
        self, x: jax.Array, *, causal: bool = False, rope_angles: jax.Array | None = None
    ) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        if self.qkv_bias not in QKV_BIAS_OPTIONS:
            raise ValueError(f"unknown qkv_bias {self.qkv_bias!r}; choose from {QKV_BIAS_OPTIONS}")
        head_dim = width // self.num_heads
        in_init = normal_init(self.in_proj_std or width**-0.5)
        project_in = functools.partial(
            nn.DenseGeneral,
            features=(self.num_heads, head_dim),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=in_init,
        )
        query = project_in(use_bias=self.qkv_bias != "none", name="query")(x)
        key = project_in(use_bias=self.qkv_bias == "qkv", name="key")(x)
        value = project_in(use_bias=self.qkv_bias != "none", name="value")(x)
        if rope_angles is not None:
            query = apply_rope(query, rope_angles)
            key = apply_rope(key, rope_angles)
        # Analysis only (e.g. mean attention distance): the fused kernel below does not expose its
        # weights, so they are recomputed explicitly; without the collection this costs nothing
        # and the output is the fused kernel's either way. Not at init, where every collection is
        # mutable: the weights must not end up among a model's variables.
        if self.is_mutable_collection("attention_weights") and not self.is_initializing():
            self.sow("attention_weights", "weights", attention_weights(query, key, causal=causal))
        # (batch, tokens, heads, head_dim) layout; XLA (or cuDNN on GPU) picks the kernel.
        attended = jax.nn.dot_product_attention(query, key, value, is_causal=causal)
        if self.inner_norm:
            attended = nn.LayerNorm(
                epsilon=self.layer_norm_eps,
                reduction_axes=(-2, -1),
                feature_axes=(-2, -1),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="inner_norm",
            )(attended)
        return nn.DenseGeneral(
            features=width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=normal_init(self.out_proj_std or width**-0.5),
            name="out",
        )(attended)


class Mlp(nn.Module):
    """Two-layer MLP; exact (erf) GELU as in open_clip's non-OpenAI models, or QuickGELU
    (``activation="quick_gelu"``, OpenAI's CLIP models)."""

    hidden_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    fc_std: float | None = None
    proj_std: float | None = None
    activation: str = "gelu"

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
        x = activation_fn(self.activation)(x)
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=normal_init(self.proj_std or width**-0.5),
            name="c_proj",
        )(x)


class SwiGluMlp(nn.Module):
    """SwiGLU MLP with a LayerNorm on the hidden units (EVA-02): fc2(norm(silu(fc1_g x) * fc1_x x)).

    Names follow timm's ``SwiGLU`` (``fc1_g`` is the gate). The hidden LayerNorm is the sub-LN
    ("NormFormer") that EVA-02 adds for training stability.
    """

    hidden_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    layer_norm_eps: float = 1e-6
    fc_std: float | None = None
    proj_std: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        fc_init = normal_init(self.fc_std or (2 * width) ** -0.5)
        gate = dense(self.hidden_dim, kernel_init=fc_init, name="fc1_g")(x)
        hidden = dense(self.hidden_dim, kernel_init=fc_init, name="fc1_x")(x)
        hidden = nn.silu(gate) * hidden
        hidden = nn.LayerNorm(
            epsilon=self.layer_norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="norm",
        )(hidden)
        return dense(width, kernel_init=normal_init(self.proj_std or width**-0.5), name="fc2")(
            hidden
        )


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    ``mlp_type`` "gelu" (CLIP) or "swiglu" (EVA-02); ``activation`` of the GELU MLP ("gelu" |
    "quick_gelu"); ``qkv_bias`` and ``attn_inner_norm`` as in :class:`MultiHeadAttention`;
    ``rope_angles`` (tokens or batch x tokens, head_dim // 2) rotate the queries and keys.
    """

    num_heads: int
    mlp_dim: int
    causal: bool = False
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    depth_for_init: int = 12
    mlp_type: str = "gelu"
    qkv_bias: str = "qkv"
    attn_inner_norm: bool = False
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array, rope_angles: jax.Array | None = None) -> jax.Array:
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
            qkv_bias=self.qkv_bias,
            inner_norm=self.attn_inner_norm,
            layer_norm_eps=self.layer_norm_eps,
            name="attn",
        )(layer_norm(name="ln_1")(x), causal=self.causal, rope_angles=rope_angles)
        if self.mlp_type == "gelu":
            mlp = Mlp(
                self.mlp_dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                proj_std=out_std,
                activation=self.activation,
                name="mlp",
            )
        elif self.mlp_type == "swiglu":
            if self.activation != "gelu":
                raise ValueError(
                    f"activation={self.activation!r} applies to the GELU MLP only; the SwiGLU "
                    "MLP's activation is SiLU"
                )
            mlp = SwiGluMlp(
                self.mlp_dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                layer_norm_eps=self.layer_norm_eps,
                proj_std=out_std,
                name="mlp",
            )
        else:
            raise ValueError(f"unknown mlp_type {self.mlp_type!r}; choose from {MLP_TYPES}")
        x = x + mlp(layer_norm(name="ln_2")(x))
        return x


class Transformer(nn.Module):
    """A stack of residual blocks named ``resblocks_<i>``; optional rematerialisation per block.

    ``rope_angles`` (optional) go to every block; the block options are those of
    :class:`ResidualBlock`.
    """

    depth: int
    num_heads: int
    mlp_dim: int
    causal: bool = False
    layer_norm_eps: float = 1e-5
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    mlp_type: str = "gelu"
    qkv_bias: str = "qkv"
    attn_inner_norm: bool = False
    activation: str = "gelu"

    @nn.compact
    def __call__(self, x: jax.Array, rope_angles: jax.Array | None = None) -> jax.Array:
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
                mlp_type=self.mlp_type,
                qkv_bias=self.qkv_bias,
                attn_inner_norm=self.attn_inner_norm,
                activation=self.activation,
                name=f"resblocks_{index}",
            )(x, rope_angles)
        return x
