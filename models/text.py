"""CLIP text transformer: token + position embeddings, causal pre-LN transformer, pooled at EOT.

tokens (B, context) int32 -> embeddings -> transformer (causal) -> ln_final -> the token at
argmax(tokens) (end-of-text has the largest id in the CLIP vocabulary) -> @ text_projection.
With ``causal=False`` the tower attends both ways (MobileCLIP's text encoder option);
``activation="quick_gelu"`` is OpenAI CLIP's MLP activation (default: exact GELU).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import Dtype, Transformer, normal_init


class TextTransformer(nn.Module):
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int | None = None
    vocab_size: int = 49408
    context_length: int = 77
    output_dim: int | None = 512
    causal: bool = True
    layer_norm_eps: float = 1e-5
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str = "gelu"

    @nn.compact
    def __call__(
        self, tokens: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, Any]]:
        del train
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
        token_embedding = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=normal_init(0.02),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="token_embedding",
        )
        positional_embedding = self.param(
            "positional_embedding",
            normal_init(0.01),
            (self.context_length, self.width),
            self.param_dtype,
        )
        x = token_embedding(tokens) + positional_embedding[:length].astype(self.dtype)
        x = Transformer(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim or 4 * self.width,
            causal=self.causal,
            layer_norm_eps=self.layer_norm_eps,
            remat_policy=self.remat_policy,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            activation=self.activation,
            name="transformer",
        )(x)
        x = nn.LayerNorm(
            epsilon=self.layer_norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="ln_final",
        )(x)
        end_of_text = jnp.argmax(tokens, axis=-1)
        pooled = jnp.take_along_axis(x, end_of_text[:, None, None], axis=1)[:, 0]
        intermediates: dict[str, Any] = {"tokens": x, "pre_logits": pooled}
        if self.output_dim is None:
            return pooled, intermediates
        text_projection = self.param(
            "text_projection",
            normal_init(self.width**-0.5),
            (self.width, self.output_dim),
            self.param_dtype,
        )
        return pooled @ text_projection.astype(self.dtype), intermediates
