"""open_clip's ``ModifiedResNet`` image tower (RN50, RN101, RN50x4...) <-> models/resnet.py's:
a tower family. The layout is one-to-one:

==========================================  =====================================================
JAX (``image_encoder/...``)                  open_clip ``state_dict`` (``visual....``)
==========================================  =====================================================
``conv{1,2,3}/kernel`` HWIO (params)         ``conv{1,2,3}.weight`` OIHW (the stem)
``bn{1,2,3}/{scale,bias}`` (params)          ``bn{1,2,3}.{weight,bias}``
``bn{1,2,3}/{mean,var}`` (batch_stats)       ``bn{1,2,3}.{running_mean,running_var}``
(none)                                       ``bn{1,2,3}.num_batches_tracked`` (int64, written 0)
``layer{s}_{i}/{conv,bn}{1,2,3}``            ``layer{s}.{i}.{conv,bn}{1,2,3}``
``layer{s}_{i}/downsample_{0,1}``            ``layer{s}.{i}.downsample.{0,1}`` (conv, BatchNorm)
``attnpool/positional_embedding``            ``attnpool.positional_embedding`` (1 + g*g, 32W)
``attnpool/{q,k,v}_proj`` (32W, H, D)        ``attnpool.{q,k,v}_proj.weight`` (H*D, 32W), biases
``attnpool/c_proj`` (H, D, E)                ``attnpool.c_proj.weight`` (E, H*D), bias
==========================================  =====================================================

BatchNorm running statistics live in Flax's ``batch_stats`` collection, not in ``params``.
``num_batches_tracked`` only matters to torch for ``momentum=None`` (a cumulative average),
which open_clip's ResNet does not use; exports write 0.

Config: ``vision_cfg = {"image_size": S, "layers": [..4 counts..], "width": W, "head_width":
32 W / heads, "patch_size": null}`` (open_clip builds a ``ModifiedResNet`` when ``layers`` is a
list, with ``heads = 32 W // head_width`` and an attention-pool grid of ``S // 32``). open_clip
fixes BatchNorm eps at 1e-5 and the activation at ReLU: ``quick_gelu`` concerns the text tower
only. The image size must be square and a multiple of 32 (open_clip sizes the position
embeddings as ``(S // 32)**2 + 1``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from pretrain.export.open_clip import defaults
from pretrain.export.state_dict_shapes import Shapes, batch_norm_shapes, linear_shapes
from pretrain.export.tree_io import (
    Entries,
    StateDict,
    as_pair,
    conv_from_torch,
    conv_to_torch,
    heads_from_torch,
    heads_out_from_torch,
    heads_out_to_torch,
    heads_to_torch,
    module_field,
)

# models/resnet.py's constants, restated: pretrain/export/ reads models through their fields and
# parameter trees only.
BOTTLENECK_EXPANSION = 4
FEATURE_WIDTH_FACTOR = 32
DOWNSAMPLING = 32
OPEN_CLIP_BATCH_NORM_EPS = 1e-5
STAGES = 4
_JAX, _TORCH = "image_encoder/", "visual."
# A parameter only this tower has: a two-tower tree holding it is a ResNet's.
_MARKER = f"{_JAX}attnpool/positional_embedding"


def is_tower(image_encoder: Any, timm_model_name: str | None) -> bool:
    """True for a ModifiedResNet (a module or a mapping of its fields): it has stage ``layers``."""
    del timm_model_name  # a ResNet with one is refused by vision_cfg
    return isinstance(module_field(image_encoder, "layers"), list | tuple)


def is_vision_cfg(vision_cfg: Mapping[str, Any]) -> bool:
    """True when open_clip builds a ModifiedResNet from this ``vision_cfg`` (``layers`` a list)."""
    return not vision_cfg.get("timm_model_name") and isinstance(
        vision_cfg.get("layers"), list | tuple
    )


def is_params(params: Entries) -> bool:
    return params.has(_MARKER)


def feature_width(width: int) -> int:
    """Channels of the final feature map (open_clip's ``embed_dim`` of the attention pool)."""
    return width * FEATURE_WIDTH_FACTOR


def embed_dim_of(image_encoder: Any) -> int:
    """The tower's output width: ``output_dim``, or the feature width when it is None."""
    output_dim = module_field(image_encoder, "output_dim")
    if output_dim:
        return int(output_dim)
    return feature_width(int(module_field(image_encoder, "width")))


def _square_image_size(image_size: int | tuple[int, int] | list[int]) -> int:
    height, width = as_pair(image_size)
    if height != width or height % DOWNSAMPLING:
        raise ValueError(
            f"image size {image_size}: open_clip's ModifiedResNet takes one square size, a "
            f"multiple of {DOWNSAMPLING} (its attention pool has (size // 32)**2 + 1 positions)"
        )
    return height


def vision_cfg(
    image_encoder: Any,
    image_size: int | tuple[int, int],
    timm_model_name: str | None,
    text_activation: str,
) -> tuple[dict[str, Any], int]:
    """``(vision_cfg, embed_dim)`` for a ModifiedResNet (module instance or mapping of fields).
    Its activation is ReLU whatever ``text_activation``: open_clip's ``quick_gelu`` then concerns
    the text tower alone."""
    del text_activation
    if timm_model_name is not None:
        raise ValueError("timm_model_name applies to ViT image towers, not to a ResNet")
    layers = [int(count) for count in module_field(image_encoder, "layers")]
    if len(layers) != STAGES:
        raise ValueError(f"ResNet layers {layers}: open_clip's ModifiedResNet has {STAGES} stages")
    width = int(module_field(image_encoder, "width"))
    num_heads = int(module_field(image_encoder, "num_heads"))
    features = feature_width(width)
    head_width = features // num_heads if features % num_heads == 0 else 0
    if not head_width or features // head_width != num_heads:
        raise ValueError(
            f"{num_heads} attention-pool heads: open_clip computes heads as {features} // "
            "head_width, which no integer head_width turns into this count"
        )
    eps = float(module_field(image_encoder, "batch_norm_eps", OPEN_CLIP_BATCH_NORM_EPS))
    if eps != OPEN_CLIP_BATCH_NORM_EPS:
        raise ValueError(
            f"batch_norm_eps {eps}: open_clip's ModifiedResNet uses torch's 1e-5 (not configurable)"
        )
    size = _square_image_size(image_size)
    stored_grid = module_field(image_encoder, "pos_embed_grid")
    if stored_grid and as_pair(stored_grid) != (size // DOWNSAMPLING,) * 2:
        raise ValueError(
            f"pos_embed_grid {stored_grid} != image size {size} // {DOWNSAMPLING}: open_clip "
            "sizes the attention pool's position embeddings from the image size"
        )
    config = {
        "image_size": size,
        "layers": layers,
        "width": width,
        "head_width": head_width,
        "patch_size": None,
    }
    return config, embed_dim_of(image_encoder)


def vision_cfg_problems(vision_cfg: Mapping[str, Any]) -> list[str]:
    """None: open_clip's ModifiedResNet reads only image_size, layers, width and head_width."""
    del vision_cfg
    return []


def jax_kwargs(
    vision_cfg: Mapping[str, Any], embed_dim: int, activation: str
) -> tuple[dict[str, Any], tuple[int, int]]:
    """``(ModifiedResNet kwargs, (size, size))`` for an open_clip ResNet ``vision_cfg``."""
    del activation  # ReLU
    image_size = vision_cfg.get("image_size", 224)
    if not isinstance(image_size, int):
        raise ValueError(f"vision_cfg.image_size {image_size!r}: a ModifiedResNet takes an int")
    width = int(vision_cfg.get("width", 64))
    head_width = int(vision_cfg.get("head_width", defaults.HEAD_WIDTH))
    kwargs = {
        "layers": tuple(int(count) for count in vision_cfg["layers"]),
        "width": width,
        "num_heads": feature_width(width) // head_width,
        "output_dim": int(embed_dim),
    }
    return kwargs, (image_size, image_size)


# --------------------------------------------------------------------------------------------------
# Keys and shapes (from open_clip's module layout, independent of the mapping below)
# --------------------------------------------------------------------------------------------------


def _conv_shapes(key: str, out_channels: int, in_channels: int, kernel: int) -> Shapes:
    return {f"{key}.weight": (out_channels, in_channels, kernel, kernel)}


def state_dict_shapes(vision_cfg: Mapping[str, Any], embed_dim: int) -> Shapes:
    """Keys and shapes of open_clip's ``ModifiedResNet`` (``visual.*``, BatchNorm buffers too)."""
    image_encoder, image_size = jax_kwargs(vision_cfg, embed_dim, "relu")
    prefix = _TORCH
    width = int(image_encoder["width"])
    shapes: Shapes = {}
    stem = ((width // 2, 3), (width // 2, width // 2), (width, width // 2))
    for index, (out_channels, in_channels) in enumerate(stem, start=1):
        shapes.update(_conv_shapes(f"{prefix}conv{index}", out_channels, in_channels, 3))
        shapes.update(batch_norm_shapes(f"{prefix}bn{index}", out_channels))
    in_channels = width
    for stage, blocks in enumerate(image_encoder["layers"], start=1):
        planes = width * 2 ** (stage - 1)
        out_channels = planes * BOTTLENECK_EXPANSION
        for index in range(blocks):
            block = f"{prefix}layer{stage}.{index}"
            for conv, (out_c, in_c, kernel) in enumerate(
                ((planes, in_channels, 1), (planes, planes, 3), (out_channels, planes, 1)),
                start=1,
            ):
                shapes.update(_conv_shapes(f"{block}.conv{conv}", out_c, in_c, kernel))
                shapes.update(batch_norm_shapes(f"{block}.bn{conv}", out_c))
            if (stage > 1 and index == 0) or in_channels != out_channels:
                shapes.update(_conv_shapes(f"{block}.downsample.0", out_channels, in_channels, 1))
                shapes.update(batch_norm_shapes(f"{block}.downsample.1", out_channels))
            in_channels = out_channels
    features = feature_width(width)
    grid = image_size[0] // DOWNSAMPLING
    embed_dim = int(image_encoder.get("output_dim") or features)
    shapes[f"{prefix}attnpool.positional_embedding"] = (grid * grid + 1, features)
    for name in ("q_proj", "k_proj", "v_proj"):
        shapes.update(linear_shapes(f"{prefix}attnpool.{name}", features, features))
    shapes.update(linear_shapes(f"{prefix}attnpool.c_proj", embed_dim, features))
    return shapes


# --------------------------------------------------------------------------------------------------
# Parameters and running statistics (JAX trees <-> open_clip state dict)
# --------------------------------------------------------------------------------------------------

# The convolutions and BatchNorms of one block (or of the stem): (JAX name, torch name).
_BLOCK_LAYERS = (
    ("conv1", "bn1", "conv1", "bn1"),
    ("conv2", "bn2", "conv2", "bn2"),
    ("conv3", "bn3", "conv3", "bn3"),
    ("downsample_0", "downsample_1", "downsample.0", "downsample.1"),
)


def _conv_bn_to_torch(
    params: Entries, stats: Entries, jax_conv: str, jax_bn: str, torch_conv: str, torch_bn: str
) -> StateDict:
    return {
        f"{torch_conv}.weight": conv_to_torch(params.take(f"{jax_conv}/kernel")),
        f"{torch_bn}.weight": params.take(f"{jax_bn}/scale"),
        f"{torch_bn}.bias": params.take(f"{jax_bn}/bias"),
        f"{torch_bn}.running_mean": stats.take(f"{jax_bn}/mean"),
        f"{torch_bn}.running_var": stats.take(f"{jax_bn}/var"),
        f"{torch_bn}.num_batches_tracked": np.zeros((), np.int64),
    }


def _conv_bn_from_torch(
    state: Entries, jax_conv: str, jax_bn: str, torch_conv: str, torch_bn: str
) -> tuple[StateDict, StateDict]:
    params = {
        f"{jax_conv}/kernel": conv_from_torch(state.take(f"{torch_conv}.weight")),
        f"{jax_bn}/scale": state.take(f"{torch_bn}.weight"),
        f"{jax_bn}/bias": state.take(f"{torch_bn}.bias"),
    }
    stats = {
        f"{jax_bn}/mean": state.take(f"{torch_bn}.running_mean"),
        f"{jax_bn}/var": state.take(f"{torch_bn}.running_var"),
    }
    if state.has(f"{torch_bn}.num_batches_tracked"):
        state.take(f"{torch_bn}.num_batches_tracked")  # a counter torch ignores here
    return params, stats


def _layer_names(blocks_per_stage: list[int]) -> list[tuple[str, str, str, str]]:
    """(JAX conv, JAX BatchNorm, torch conv, torch BatchNorm) names, relative to the towers'
    prefixes, of the stem and every block. A stage's first block changes the channel count (and
    from stage 2 on the resolution), so it alone has a ``downsample`` shortcut."""
    names = [(f"conv{i}", f"bn{i}", f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
    for stage, blocks in enumerate(blocks_per_stage, start=1):
        for index in range(blocks):
            jax_block, torch_block = f"layer{stage}_{index}/", f"layer{stage}.{index}."
            layers = _BLOCK_LAYERS if index == 0 else _BLOCK_LAYERS[:3]
            names.extend(
                (jax_block + jax_conv, jax_block + jax_bn, torch_block + conv, torch_block + bn)
                for jax_conv, jax_bn, conv, bn in layers
            )
    return names


def to_torch(
    params: Entries, batch_stats: Entries, vision_cfg: Mapping[str, Any], embed_dim: int
) -> StateDict:
    """Take the tower's entries from flat two-tower ``params`` and ``batch_stats``
    (``image_encoder/...``) and return them in open_clip's names and layouts (``visual.*``)."""
    del vision_cfg, embed_dim  # the parameters say everything
    blocks_per_stage = [
        params.block_count(re.escape(f"{_JAX}layer{stage}_") + r"(\d+)/")
        for stage in range(1, STAGES + 1)
    ]
    state: StateDict = {}
    for jax_conv, jax_bn, torch_conv, torch_bn in _layer_names(blocks_per_stage):
        state.update(
            _conv_bn_to_torch(
                params,
                batch_stats,
                _JAX + jax_conv,
                _JAX + jax_bn,
                _TORCH + torch_conv,
                _TORCH + torch_bn,
            )
        )
    pool, torch_pool = f"{_JAX}attnpool/", f"{_TORCH}attnpool."
    state[f"{torch_pool}positional_embedding"] = params.take(f"{pool}positional_embedding")
    for name in ("q_proj", "k_proj", "v_proj"):
        state[f"{torch_pool}{name}.weight"] = heads_to_torch(params.take(f"{pool}{name}/kernel"))
        state[f"{torch_pool}{name}.bias"] = params.take(f"{pool}{name}/bias").reshape(-1)
    state[f"{torch_pool}c_proj.weight"] = heads_out_to_torch(params.take(f"{pool}c_proj/kernel"))
    state[f"{torch_pool}c_proj.bias"] = params.take(f"{pool}c_proj/bias")
    return state


def from_torch(
    state: Entries, vision_cfg: Mapping[str, Any], embed_dim: int
) -> tuple[StateDict, StateDict]:
    """Take ``visual.*`` from an open_clip state dict: ``(flat params, flat batch_stats)`` with
    ``image_encoder/...`` paths; the config gives the attention pool's head count (a state dict
    does not record it)."""
    num_heads = jax_kwargs(vision_cfg, embed_dim, "relu")[0]["num_heads"]
    params: StateDict = {}
    stats: StateDict = {}
    blocks_per_stage = [
        state.block_count(re.escape(f"{_TORCH}layer{stage}.") + r"(\d+)\.")
        for stage in range(1, STAGES + 1)
    ]
    for jax_conv, jax_bn, torch_conv, torch_bn in _layer_names(blocks_per_stage):
        block_params, block_stats = _conv_bn_from_torch(
            state, _JAX + jax_conv, _JAX + jax_bn, _TORCH + torch_conv, _TORCH + torch_bn
        )
        params.update(block_params)
        stats.update(block_stats)
    pool, torch_pool = f"{_JAX}attnpool/", f"{_TORCH}attnpool."
    params[f"{pool}positional_embedding"] = state.take(f"{torch_pool}positional_embedding")
    for name in ("q_proj", "k_proj", "v_proj"):
        weight = state.take(f"{torch_pool}{name}.weight")  # (heads * head_dim, width)
        params[f"{pool}{name}/kernel"] = heads_from_torch(weight, num_heads)
        bias = state.take(f"{torch_pool}{name}.bias")
        params[f"{pool}{name}/bias"] = bias.reshape(num_heads, -1)
    weight = state.take(f"{torch_pool}c_proj.weight")  # (embed_dim, heads * head_dim)
    params[f"{pool}c_proj/kernel"] = heads_out_from_torch(weight, num_heads)
    params[f"{pool}c_proj/bias"] = state.take(f"{torch_pool}c_proj.bias")
    return params, stats
