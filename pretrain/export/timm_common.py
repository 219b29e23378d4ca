"""The parts of the project's ViT that timm's ``vision_transformer.py`` and ``eva.py`` lay out
alike: the stem, the blocks' norms, output projection and MLP, the final norm and the head, in
both directions and as state-dict shapes. Each of timm_vit.py and timm_eva.py adds its own
attention (fused ``qkv`` or separate ``q/k/v_proj``) and head rules.

=======================================  ==========================================================
JAX (Flax ``params`` of the ViT)          timm ``state_dict``
=======================================  ==========================================================
``class_embedding`` (W,)                 ``cls_token`` (1, 1, W)
``positional_embedding`` (1 + N, W)      ``pos_embed`` (1, 1 + N, W)
``conv1/{kernel,bias}`` HWIO             ``patch_embed.proj.{weight,bias}`` OIHW
``ln_pre``                               ``norm_pre`` (only when ``pre_norm``)
``transformer/resblocks_i/ln_1, ln_2``   ``blocks.i.norm1, norm2``
``attn/out`` (H, D, W)                   ``blocks.i.attn.proj`` (W, H*D)
``mlp/{c_fc,c_proj}``                    ``blocks.i.mlp.{fc1,fc2}`` (GELU MLP)
``mlp/{fc1_g,fc1_x,norm,fc2}``           ``blocks.i.mlp.{fc1_g,fc1_x,norm,fc2}`` (SwiGLU + sub-LN)
``ln_post``                              ``norm`` (timm applies it to all tokens, then pools)
``proj`` (W, O)                          ``head.weight`` (O, W)
=======================================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable

from pretrain.export.state_dict_shapes import Shapes, linear_shapes, norm_shapes
from pretrain.export.tree_io import (
    Entries,
    StateDict,
    conv_from_torch,
    conv_to_torch,
    heads_out_from_torch,
    heads_out_to_torch,
    layer_norm_from_torch,
    layer_norm_to_torch,
    linear_from_torch,
    linear_to_torch,
)

# The ViT's ``pool`` -> timm's ``global_pool``.
POOL_TO_TIMM = {"cls": "token", "gap": "avg"}
POOL_FROM_TIMM = {timm: ours for ours, timm in POOL_TO_TIMM.items()}
_JAX_BLOCKS = r"transformer/resblocks_(\d+)/"

# (entries, JAX attention path, timm attention path) -> the q/k/v part of the attention.
AttentionMapping = Callable[[Entries, str, str], StateDict]


def _block_paths(index: int) -> tuple[str, str]:
    return f"transformer/resblocks_{index}", f"blocks.{index}"


def _mlp_to_timm(entries: Entries, jax: str, timm: str) -> StateDict:
    if entries.has(f"{jax}/c_fc/kernel"):
        return {
            **linear_to_torch(entries, f"{jax}/c_fc", f"{timm}.fc1"),
            **linear_to_torch(entries, f"{jax}/c_proj", f"{timm}.fc2"),
        }
    return {
        **linear_to_torch(entries, f"{jax}/fc1_g", f"{timm}.fc1_g"),
        **linear_to_torch(entries, f"{jax}/fc1_x", f"{timm}.fc1_x"),
        **layer_norm_to_torch(entries, f"{jax}/norm", f"{timm}.norm"),
        **linear_to_torch(entries, f"{jax}/fc2", f"{timm}.fc2"),
    }


def _mlp_from_timm(entries: Entries, timm: str, jax: str, swiglu: bool) -> StateDict:
    if not swiglu:
        return {
            **linear_from_torch(entries, f"{timm}.fc1", f"{jax}/c_fc"),
            **linear_from_torch(entries, f"{timm}.fc2", f"{jax}/c_proj"),
        }
    return {
        **linear_from_torch(entries, f"{timm}.fc1_g", f"{jax}/fc1_g"),
        **linear_from_torch(entries, f"{timm}.fc1_x", f"{jax}/fc1_x"),
        **layer_norm_from_torch(entries, f"{timm}.norm", f"{jax}/norm"),
        **linear_from_torch(entries, f"{timm}.fc2", f"{jax}/fc2"),
    }


def vit_to_timm(entries: Entries, attention_to_timm: AttentionMapping) -> StateDict:
    """Everything but the head, taken from the ViT's flat ``params`` entries."""
    take = entries.take
    state: StateDict = {
        "cls_token": take("class_embedding").reshape(1, 1, -1),
        "patch_embed.proj.weight": conv_to_torch(take("conv1/kernel")),
    }
    if entries.has("conv1/bias"):
        state["patch_embed.proj.bias"] = take("conv1/bias")
    if entries.has("positional_embedding"):
        state["pos_embed"] = take("positional_embedding")[None]
    if entries.has("ln_pre/scale"):
        state.update(layer_norm_to_torch(entries, "ln_pre", "norm_pre"))
    for index in range(entries.block_count(_JAX_BLOCKS)):
        jax, timm = _block_paths(index)
        state.update(layer_norm_to_torch(entries, f"{jax}/ln_1", f"{timm}.norm1"))
        state.update(attention_to_timm(entries, f"{jax}/attn", f"{timm}.attn"))
        state[f"{timm}.attn.proj.weight"] = heads_out_to_torch(take(f"{jax}/attn/out/kernel"))
        state[f"{timm}.attn.proj.bias"] = take(f"{jax}/attn/out/bias")
        state.update(layer_norm_to_torch(entries, f"{jax}/ln_2", f"{timm}.norm2"))
        state.update(_mlp_to_timm(entries, f"{jax}/mlp", f"{timm}.mlp"))
    state.update(layer_norm_to_torch(entries, "ln_post", "norm"))
    return state


def vit_from_timm(
    entries: Entries,
    *,
    width: int,
    depth: int,
    num_heads: int,
    swiglu: bool,
    attention_from_timm: AttentionMapping,
) -> StateDict:
    """Everything but the head, as the ViT's flat ``params``; ``attention_from_timm`` takes
    (entries, timm attention path, JAX attention path)."""
    take = entries.take
    flat: StateDict = {
        "class_embedding": take("cls_token").reshape(width),
        "conv1/kernel": conv_from_torch(take("patch_embed.proj.weight")),
    }
    if entries.has("patch_embed.proj.bias"):
        flat["conv1/bias"] = take("patch_embed.proj.bias")
    if entries.has("pos_embed"):
        flat["positional_embedding"] = take("pos_embed")[0]
    if entries.has("norm_pre.weight"):
        flat.update(layer_norm_from_torch(entries, "norm_pre", "ln_pre"))
    for index in range(depth):
        jax, timm = _block_paths(index)
        flat.update(layer_norm_from_torch(entries, f"{timm}.norm1", f"{jax}/ln_1"))
        flat.update(attention_from_timm(entries, f"{timm}.attn", f"{jax}/attn"))
        out = take(f"{timm}.attn.proj.weight")
        flat[f"{jax}/attn/out/kernel"] = heads_out_from_torch(out, num_heads)
        flat[f"{jax}/attn/out/bias"] = take(f"{timm}.attn.proj.bias")
        flat.update(layer_norm_from_torch(entries, f"{timm}.norm2", f"{jax}/ln_2"))
        flat.update(_mlp_from_timm(entries, f"{timm}.mlp", f"{jax}/mlp", swiglu))
    flat.update(layer_norm_from_torch(entries, "norm", "ln_post"))
    return flat


def vit_shapes(
    *,
    width: int,
    patch_size: int,
    depth: int,
    mlp_dim: int,
    swiglu: bool,
    patch_bias: bool,
    pre_norm: bool,
    positions: int | None,
    use_abs_pos: bool,
    attention_shapes: Callable[[str], Shapes],
    head_outputs: int,
) -> Shapes:
    """Keys and shapes of timm's state dict, written from timm's module layout (independently of
    the mapping above). ``positions`` (1 + patches) None: any ``pos_embed`` length;
    ``attention_shapes(prefix)``: the q/k/v part of one block's attention."""
    shapes: Shapes = {
        "cls_token": (1, 1, width),
        "patch_embed.proj.weight": (width, 3, patch_size, patch_size),
        **norm_shapes("norm", width),
    }
    if patch_bias:
        shapes["patch_embed.proj.bias"] = (width,)
    if use_abs_pos:
        shapes["pos_embed"] = (1, positions, width)
    if pre_norm:
        shapes.update(norm_shapes("norm_pre", width))
    fc1_names = ("fc1_g", "fc1_x") if swiglu else ("fc1",)
    for index in range(depth):
        block = f"blocks.{index}"
        shapes.update(norm_shapes(f"{block}.norm1", width))
        shapes.update(attention_shapes(f"{block}.attn"))
        shapes.update(linear_shapes(f"{block}.attn.proj", width, width))
        shapes.update(norm_shapes(f"{block}.norm2", width))
        for name in fc1_names:
            shapes.update(linear_shapes(f"{block}.mlp.{name}", mlp_dim, width))
        if swiglu:
            shapes.update(norm_shapes(f"{block}.mlp.norm", mlp_dim))
        shapes.update(linear_shapes(f"{block}.mlp.fc2", width, mlp_dim))
    if head_outputs > 0:
        shapes.update(linear_shapes("head", head_outputs, width))
    return shapes
