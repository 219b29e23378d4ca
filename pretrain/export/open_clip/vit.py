"""open_clip's own ViT image tower (``VisionTransformer``) <-> the project's ViT with its CLIP
options: the tower family of open_clip's ViT-B-16, ViT-L-14... configs.

====================================  =============================================================
JAX (``image_encoder/...``)            open_clip ``state_dict``
====================================  =============================================================
``class_embedding``                   ``visual.class_embedding``
``positional_embedding``              ``visual.positional_embedding`` (1 + patches, W)
``conv1/kernel`` (p, p, 3, W) HWIO    ``visual.conv1.weight`` (W, 3, p, p) OIHW, no bias
``ln_pre``, ``ln_post``               ``visual.ln_pre``, ``visual.ln_post``
``transformer/...``                   ``visual.transformer....`` (transformer.py)
``proj`` (W, E)                       ``visual.proj``: the same matrix, open_clip computes x @ proj
====================================  =============================================================

open_clip derives the heads as ``width // head_width``, so the config states ``head_width =
width / num_heads`` (any head count that divides the width round-trips). ``pool`` "cls" / "gap"
is ``pool_type`` "tok" / "avg"; ``activation="quick_gelu"`` is the config's ``quick_gelu``, one
flag for both towers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pretrain.export.open_clip import defaults
from pretrain.export.open_clip.transformer import (
    SUPPORTED_BLOCK_VALUES,
    transformer_from_torch,
    transformer_shapes,
    transformer_to_torch,
)
from pretrain.export.state_dict_shapes import Shapes, norm_shapes
from pretrain.export.tree_io import (
    Entries,
    StateDict,
    as_pair,
    conv_from_torch,
    conv_to_torch,
    layer_norm_from_torch,
    layer_norm_to_torch,
    module_field,
    size_value,
)
from pretrain.export.vit_fields import vit_field, vit_mlp_dim

# This project's ViT ``pool`` -> open_clip's ``vision_cfg.pool_type``.
POOL_TO_OPEN_CLIP = {"cls": "tok", "gap": "avg"}
POOL_FROM_OPEN_CLIP = {v: k for k, v in POOL_TO_OPEN_CLIP.items()}

# The ViT's EVA-02 options (models/vit.py) at their CLIP values; a ViT with other values exports
# as a timm trunk (eva_trunk.py).
CLIP_VIT_OPTIONS: dict[str, Any] = {
    "pre_norm": True,
    "patch_bias": False,
    "use_abs_pos": True,
    "rope": False,
    "mlp_type": "gelu",
    "qkv_bias": "qkv",
    "attn_inner_norm": False,
}

# open_clip vision_cfg fields whose other values change the network in ways this project's ViT
# cannot express, each with the values it supports.
_SUPPORTED_VISION_VALUES: dict[str, tuple[Any, ...]] = {
    **SUPPORTED_BLOCK_VALUES,
    "pool_type": ("tok", "avg"),
    "attentional_pool": (False,),
    "no_ln_pre": (False,),
    "pos_embed_type": ("learnable",),
}
_JAX = "image_encoder/"


def check_vit_tower(image_encoder: Any) -> int:
    """Check that ``image_encoder`` is a ViT that projects; returns its ``output_dim``."""
    for name in ("patch_size", "width", "depth", "num_heads"):
        if vit_field(image_encoder, name) is None:
            raise ValueError(
                f"image_encoder has no {name!r}: only ViT, ModifiedResNet and MobileCLIP image "
                "towers export to open_clip (other towers export through timm)"
            )
    # A mapping without output_dim does not project (the module's own default is 512).
    embed_dim = module_field(image_encoder, "output_dim")
    if embed_dim is None:
        raise ValueError(
            "image_encoder.output_dim is None: open_clip's ViT always has a `proj` matrix, so "
            "export a model whose image tower projects to the joint embedding"
        )
    return int(embed_dim)


def is_clip_vit(image_encoder: Any) -> bool:
    """True when the ViT (module or mapping of fields) has open_clip's ViT's options."""
    return all(
        vit_field(image_encoder, name) == clip_value
        for name, clip_value in CLIP_VIT_OPTIONS.items()
    )


def is_tower(image_encoder: Any, timm_model_name: str | None) -> bool:
    return timm_model_name is None and is_clip_vit(image_encoder)


def is_vision_cfg(vision_cfg: Mapping[str, Any]) -> bool:
    """open_clip builds its own ViT from every vision_cfg no other family claims."""
    del vision_cfg
    return True


def is_params(params: Entries) -> bool:
    """Any two-tower tree no other family claims (families.py asks this family last)."""
    del params
    return True


def vision_cfg(
    image_encoder: Any,
    image_size: int | tuple[int, int],
    timm_model_name: str | None,
    text_activation: str,
) -> tuple[dict[str, Any], int]:
    """``(vision_cfg, embed_dim)`` of open_clip's ViT for a CLIP-style ViT."""
    del timm_model_name  # None: the family's test
    embed_dim = check_vit_tower(image_encoder)
    field = lambda name: vit_field(image_encoder, name)
    if field("proj_bias"):
        raise ValueError("image_encoder.proj_bias: open_clip's ViT projects without a bias")
    width, heads = int(field("width")), int(field("num_heads"))
    if width % heads:
        raise ValueError(f"ViT width {width} is not divisible by num_heads {heads}")
    pool = field("pool")
    if pool not in POOL_TO_OPEN_CLIP:
        raise ValueError(f"ViT pool {pool!r} has no open_clip equivalent {list(POOL_TO_OPEN_CLIP)}")
    activation = defaults.activation_of(image_encoder)
    if activation != text_activation:
        raise ValueError(
            f"image activation {activation!r} != text activation {text_activation!r}: open_clip "
            "has one quick_gelu flag for both towers"
        )
    config = {
        "image_size": size_value(image_size),
        "layers": int(field("depth")),
        "width": width,
        "patch_size": int(field("patch_size")),
        "head_width": width // heads,
        "mlp_ratio": defaults.mlp_ratio(width, vit_mlp_dim(image_encoder)),
        "pool_type": POOL_TO_OPEN_CLIP[pool],
        **defaults.norm_kwargs(float(field("layer_norm_eps"))),
    }
    return config, embed_dim


def vision_cfg_problems(vision_cfg: Mapping[str, Any]) -> list[str]:
    """The vision_cfg fields open_clip's ViT reads with values this project's ViT lacks."""
    problems = defaults.unsupported_values(vision_cfg, _SUPPORTED_VISION_VALUES)
    problems += defaults.norm_kwargs_problems(vision_cfg, "vision_cfg")
    patch_size = vision_cfg.get("patch_size", 16)
    if isinstance(patch_size, list | tuple) and len(set(patch_size)) != 1:
        problems.append(f"non-square patch_size={patch_size!r}")
    return problems


def jax_kwargs(
    vision_cfg: Mapping[str, Any], embed_dim: int, activation: str
) -> tuple[dict[str, Any], tuple[int, int]]:
    """``(VisionTransformer kwargs, (height, width))`` for open_clip's ViT ``vision_cfg``."""
    width = int(vision_cfg.get("width", 768))
    kwargs = {
        "patch_size": as_pair(vision_cfg.get("patch_size", 16))[0],
        "width": width,
        "depth": int(vision_cfg.get("layers", 12)),
        "num_heads": width // int(vision_cfg.get("head_width", defaults.HEAD_WIDTH)),
        "mlp_dim": int(width * vision_cfg.get("mlp_ratio", defaults.MLP_RATIO)),
        "output_dim": embed_dim,
        "pool": POOL_FROM_OPEN_CLIP[vision_cfg.get("pool_type", "tok")],
        "layer_norm_eps": defaults.eps_of(vision_cfg),
    }
    if activation != "gelu":
        kwargs["activation"] = activation
    return kwargs, as_pair(vision_cfg.get("image_size", 224))


def state_dict_shapes(vision_cfg: Mapping[str, Any], embed_dim: int) -> Shapes:
    """Keys and shapes of open_clip's ``VisionTransformer`` (``visual.*``) for a config."""
    vit, (height, width_px) = jax_kwargs(vision_cfg, embed_dim, "gelu")
    patch, width = vit["patch_size"], vit["width"]
    return {
        "visual.class_embedding": (width,),
        "visual.positional_embedding": ((height // patch) * (width_px // patch) + 1, width),
        "visual.proj": (width, embed_dim),
        "visual.conv1.weight": (width, 3, patch, patch),
        **norm_shapes("visual.ln_pre", width),
        **transformer_shapes("visual.transformer.", vit["depth"], width, vit["mlp_dim"]),
        **norm_shapes("visual.ln_post", width),
    }


def to_torch(
    params: Entries, batch_stats: Entries, vision_cfg: Mapping[str, Any], embed_dim: int
) -> StateDict:
    """Take the image tower's entries (``image_encoder/...``), return ``visual.*``."""
    del batch_stats, vision_cfg, embed_dim  # the ViT has no running statistics; params say all
    take = params.take
    if not params.has(f"{_JAX}ln_pre/scale") or params.has(f"{_JAX}conv1/bias"):
        raise ValueError(
            "image_encoder is not open_clip's ViT (EVA options): pass the model_config of a timm "
            "trunk (open_clip_model_config(...)) to export it under visual.trunk"
        )
    state = {
        "visual.class_embedding": take(f"{_JAX}class_embedding"),
        "visual.positional_embedding": take(f"{_JAX}positional_embedding"),
        "visual.conv1.weight": conv_to_torch(take(f"{_JAX}conv1/kernel")),
        **layer_norm_to_torch(params, f"{_JAX}ln_pre", "visual.ln_pre"),
        **transformer_to_torch(params, f"{_JAX}transformer/", "visual.transformer."),
        **layer_norm_to_torch(params, f"{_JAX}ln_post", "visual.ln_post"),
    }
    if not params.has(f"{_JAX}proj"):
        raise ValueError("image_encoder has no `proj`: open_clip's ViT always projects")
    state["visual.proj"] = take(f"{_JAX}proj")
    return state


def from_torch(
    state: Entries, vision_cfg: Mapping[str, Any], embed_dim: int
) -> tuple[StateDict, StateDict]:
    """``(flat params, flat batch_stats (none))`` of the image tower from ``visual.*``."""
    num_heads = jax_kwargs(vision_cfg, embed_dim, "gelu")[0]["num_heads"]
    take = state.take
    params = {
        f"{_JAX}class_embedding": take("visual.class_embedding"),
        f"{_JAX}positional_embedding": take("visual.positional_embedding"),
        f"{_JAX}conv1/kernel": conv_from_torch(take("visual.conv1.weight")),
        **layer_norm_from_torch(state, "visual.ln_pre", f"{_JAX}ln_pre"),
        **transformer_from_torch(state, "visual.transformer.", f"{_JAX}transformer/", num_heads),
        **layer_norm_from_torch(state, "visual.ln_post", f"{_JAX}ln_post"),
        f"{_JAX}proj": take("visual.proj"),
    }
    return params, {}
