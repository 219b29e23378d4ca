"""open_clip's ``Transformer`` (pre-LN ``ResidualAttentionBlock`` s), which its ViT and its text
tower share with this project's: the mapping both ways and the state-dict shapes.

====================================  =============================================================
JAX (``.../resblocks_i/...``)          open_clip (``...resblocks.i....``)
====================================  =============================================================
``ln_1``, ``ln_2`` ``scale``, bias    ``ln_1``, ``ln_2`` ``weight``, ``bias``
``attn/{query,key,value}`` (W, H, D)  ``attn.in_proj_weight`` (3W, W) rows [q | k | v], head-major
                                      and ``attn.in_proj_bias`` (3W,)
``attn/out/kernel`` (H, D, W)         ``attn.out_proj.weight`` (W, H*D), and its bias
``mlp/c_fc``, ``mlp/c_proj`` kernel   ``mlp.c_fc``, ``mlp.c_proj`` ``weight`` (transposed)
====================================  =============================================================
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from pretrain.export.state_dict_shapes import Shapes, linear_shapes, norm_shapes
from pretrain.export.tree_io import (
    Entries,
    StateDict,
    heads_from_torch,
    heads_out_from_torch,
    heads_out_to_torch,
    heads_to_torch,
    layer_norm_from_torch,
    layer_norm_to_torch,
    linear_from_torch,
    linear_to_torch,
)

_QKV = ("query", "key", "value")

# open_clip block options (in vision_cfg and text_cfg alike) whose other values change the blocks
# in ways this project's cannot express, each with the values it supports.
SUPPORTED_BLOCK_VALUES: dict[str, tuple[Any, ...]] = {
    "ls_init_value": (None,),
    "final_ln_after_pool": (False,),
    "act_kwargs": (None,),
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
}


def _block_to_torch(entries: Entries, jax: str, torch: str) -> StateDict:
    kernels = [entries.take(f"{jax}/attn/{name}/kernel") for name in _QKV]
    biases = [entries.take(f"{jax}/attn/{name}/bias") for name in _QKV]
    return {
        **layer_norm_to_torch(entries, f"{jax}/ln_1", f"{torch}.ln_1"),
        f"{torch}.attn.in_proj_weight": np.concatenate([heads_to_torch(k) for k in kernels]),
        f"{torch}.attn.in_proj_bias": np.concatenate([bias.reshape(-1) for bias in biases]),
        f"{torch}.attn.out_proj.weight": heads_out_to_torch(entries.take(f"{jax}/attn/out/kernel")),
        f"{torch}.attn.out_proj.bias": entries.take(f"{jax}/attn/out/bias"),
        **layer_norm_to_torch(entries, f"{jax}/ln_2", f"{torch}.ln_2"),
        **linear_to_torch(entries, f"{jax}/mlp/c_fc", f"{torch}.mlp.c_fc"),
        **linear_to_torch(entries, f"{jax}/mlp/c_proj", f"{torch}.mlp.c_proj"),
    }


def _block_from_torch(entries: Entries, torch: str, jax: str, num_heads: int) -> StateDict:
    in_weights = np.split(entries.take(f"{torch}.attn.in_proj_weight"), 3)  # each (W, W)
    in_biases = np.split(entries.take(f"{torch}.attn.in_proj_bias"), 3)
    block: StateDict = layer_norm_from_torch(entries, f"{torch}.ln_1", f"{jax}/ln_1")
    for name, weight, bias in zip(_QKV, in_weights, in_biases):
        block[f"{jax}/attn/{name}/kernel"] = heads_from_torch(weight, num_heads)
        block[f"{jax}/attn/{name}/bias"] = bias.reshape(num_heads, -1)
    out = entries.take(f"{torch}.attn.out_proj.weight")
    block[f"{jax}/attn/out/kernel"] = heads_out_from_torch(out, num_heads)
    block[f"{jax}/attn/out/bias"] = entries.take(f"{torch}.attn.out_proj.bias")
    block.update(layer_norm_from_torch(entries, f"{torch}.ln_2", f"{jax}/ln_2"))
    block.update(linear_from_torch(entries, f"{torch}.mlp.c_fc", f"{jax}/mlp/c_fc"))
    block.update(linear_from_torch(entries, f"{torch}.mlp.c_proj", f"{jax}/mlp/c_proj"))
    return block


def transformer_to_torch(params: Entries, jax_prefix: str, torch_prefix: str) -> StateDict:
    """Take every block under ``jax_prefix`` (``.../transformer/``), return them in open_clip's
    names under ``torch_prefix``."""
    state: StateDict = {}
    for index in range(params.block_count(re.escape(jax_prefix) + r"resblocks_(\d+)/")):
        jax, torch = f"{jax_prefix}resblocks_{index}", f"{torch_prefix}resblocks.{index}"
        state.update(_block_to_torch(params, jax, torch))
    return state


def transformer_from_torch(
    state: Entries, torch_prefix: str, jax_prefix: str, num_heads: int
) -> StateDict:
    """The inverse of :func:`transformer_to_torch`; ``num_heads`` is not in the weights."""
    flat: StateDict = {}
    for index in range(state.block_count(re.escape(torch_prefix) + r"resblocks\.(\d+)\.")):
        torch, jax = f"{torch_prefix}resblocks.{index}", f"{jax_prefix}resblocks_{index}"
        flat.update(_block_from_torch(state, torch, jax, num_heads))
    return flat


def transformer_shapes(prefix: str, depth: int, width: int, mlp_dim: int) -> Shapes:
    """Keys and shapes of open_clip's ``Transformer`` under ``prefix`` (``...transformer.``)."""
    shapes: Shapes = {}
    for index in range(depth):
        block = f"{prefix}resblocks.{index}"
        shapes.update(
            {
                **norm_shapes(f"{block}.ln_1", width),
                f"{block}.attn.in_proj_weight": (3 * width, width),
                f"{block}.attn.in_proj_bias": (3 * width,),
                **linear_shapes(f"{block}.attn.out_proj", width, width),
                **norm_shapes(f"{block}.ln_2", width),
                **linear_shapes(f"{block}.mlp.c_fc", mlp_dim, width),
                **linear_shapes(f"{block}.mlp.c_proj", width, mlp_dim),
            }
        )
    return shapes
