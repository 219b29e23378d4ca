"""Which timm ``VisionTransformer`` (``vision_transformer.py``) the project's CLIP-style ViT is:
its registered architecture name and ``model_args``.

LayerNorm eps cannot be a JSON model argument (``norm_layer`` is a class), so the architecture
name carries it: timm's ``vit_*_clip_*`` entry points bind 1e-5 (the ViT's default), its plain
``vit_*`` ones 1e-6; ``model_args`` fix every other detail. Rejected with the field's name: EVA-02
options (export those with timm_eva.py), a patch bias together with ln_pre (or neither), other
eps, position embeddings stored for another grid than the exported image size.
"""

from __future__ import annotations

from typing import Any

from pretrain.export.timm_common import POOL_TO_TIMM
from pretrain.export.tree_io import as_pair, mlp_ratio_for, size_value
from pretrain.export.vit_fields import vit_field, vit_mlp_dim

# timm's vit_*_clip_* entry points bind this eps into their LayerNorm; plain vit_* ones use timm's
# LayerNorm default.
CLIP_LAYER_NORM_EPS = 1e-5
TIMM_LAYER_NORM_EPS = 1e-6

# ViT fields timm's VisionTransformer (as exported here) cannot take, with the values it can and
# what to do instead.
_SUPPORTED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "rope": ((False,), "2-D RoPE: export with pretrain.export.timm_eva"),
    "mlp_type": (("gelu",), "SwiGLU: export with pretrain.export.timm_eva"),
    "qkv_bias": (("qkv", "none"), "timm's fused qkv has all three biases or none"),
    "attn_inner_norm": ((False,), "EVA-02's attention sub-LN: export with timm_eva"),
    "activation": (("gelu", "quick_gelu"), "timm act_layer gelu or quick_gelu"),
    "pool": (tuple(POOL_TO_TIMM), "timm global_pool token or avg"),
    "layer_norm_eps": (
        (CLIP_LAYER_NORM_EPS, TIMM_LAYER_NORM_EPS),
        "timm's vit_*_clip_* names give 1e-5, its other vit_* names 1e-6",
    ),
}
# Registered timm names (timm 1.0), by (width, patch): CLIP towers (eps 1e-5; those with a
# QuickGELU twin end in "_quickgelu_224") and plain ViTs (eps 1e-6).
_CLIP_NAMES = {
    (256, 16): "vit_xsmall_patch16_clip_224",
    (512, 16): "vit_medium_patch16_clip_224",
    (512, 32): "vit_medium_patch32_clip_224",
    (768, 16): "vit_base_patch16_clip_224",
    (768, 32): "vit_base_patch32_clip_224",
    (1024, 14): "vit_large_patch14_clip_224",
    (1280, 14): "vit_huge_patch14_clip_224",
}
_CLIP_QUICKGELU_NAMES = {
    (768, 16): "vit_base_patch16_clip_quickgelu_224",
    (768, 32): "vit_base_patch32_clip_quickgelu_224",
    (1024, 14): "vit_large_patch14_clip_quickgelu_224",
    (1280, 14): "vit_huge_patch14_clip_quickgelu_224",
}
_PLAIN_NAMES = {
    (192, 16): "vit_tiny_patch16_224",
    (384, 16): "vit_small_patch16_224",
    (768, 8): "vit_base_patch8_224",
    (768, 16): "vit_base_patch16_224",
    (768, 32): "vit_base_patch32_224",
    (1024, 14): "vit_large_patch14_224",
    (1024, 16): "vit_large_patch16_224",
    (1280, 14): "vit_huge_patch14_224",
}
ARCHITECTURE_NAMES = (
    *_CLIP_NAMES.values(),
    *_CLIP_QUICKGELU_NAMES.values(),
    *_PLAIN_NAMES.values(),
)


def check_supported(vit: Any) -> None:
    """Raise ``ValueError`` naming every ViT field timm's VisionTransformer cannot express."""
    problems = [
        f"{name}={vit_field(vit, name)!r} ({why})"
        for name, (supported, why) in _SUPPORTED_FIELDS.items()
        if vit_field(vit, name) not in supported
    ]
    pre_norm = bool(vit_field(vit, "pre_norm"))
    if bool(vit_field(vit, "patch_bias")) == pre_norm:
        problems.append(
            f"patch_bias={not pre_norm} with pre_norm={pre_norm} (timm's patch embedding has a "
            "bias exactly when there is no ln_pre)"
        )
    if problems:
        raise ValueError(
            "ViT options timm's VisionTransformer cannot express: " + ", ".join(problems)
        )


def timm_architecture(vit: Any) -> str:
    """The registered timm name closest to this ViT, with its LayerNorm eps (which only the name
    can carry); the model_args fix every other detail."""
    check_supported(vit)
    key = (int(vit_field(vit, "width")), int(vit_field(vit, "patch_size")))
    if float(vit_field(vit, "layer_norm_eps")) == TIMM_LAYER_NORM_EPS:
        return _PLAIN_NAMES.get(key, "vit_base_patch16_224")
    if vit_field(vit, "activation") == "quick_gelu":
        return _CLIP_QUICKGELU_NAMES.get(key, "vit_base_patch16_clip_quickgelu_224")
    return _CLIP_NAMES.get(key, "vit_base_patch16_clip_224")


def _num_classes(vit: Any, num_classes: int | None) -> int:
    output_dim = vit_field(vit, "output_dim")
    if num_classes is None:
        return 0 if output_dim is None else int(output_dim)
    if output_dim is not None and int(num_classes) != int(output_dim):
        raise ValueError(
            f"num_classes={num_classes}, but the ViT's own projection (timm's head) has "
            f"output_dim={output_dim}"
        )
    return int(num_classes)


def timm_model_args(
    vit: Any, *, image_size: int | tuple[int, int], num_classes: int | None = None
) -> dict[str, Any]:
    """The keyword arguments of ``timm.create_model(timm_architecture(vit), **args)`` that build
    timm's ``VisionTransformer`` equal to this ViT (a ``VisionTransformer`` or a mapping of its
    fields).

    ``image_size`` is the training resolution (the position embeddings fix the grid).
    ``num_classes``: the classifier's class count (case (a)), 0 for no head; ``None`` means the
    ViT's ``output_dim`` (its projection becomes the head), or 0 without one.
    """
    check_supported(vit)
    patch_size = int(vit_field(vit, "patch_size"))
    height, width_px = as_pair(image_size)
    if height % patch_size or width_px % patch_size:
        raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
    grid = (height // patch_size, width_px // patch_size)
    stored_grid = vit_field(vit, "pos_embed_grid")
    if stored_grid is not None and as_pair(stored_grid) != grid:
        raise ValueError(
            f"pos_embed_grid={stored_grid}, but image_size {image_size} gives a {grid} grid: "
            "export at the resolution the position embeddings are stored for"
        )
    width = int(vit_field(vit, "width"))
    args: dict[str, Any] = {
        "img_size": size_value(image_size),
        "patch_size": patch_size,
        "embed_dim": width,
        "depth": int(vit_field(vit, "depth")),
        "num_heads": int(vit_field(vit, "num_heads")),
        "mlp_ratio": mlp_ratio_for(width, vit_mlp_dim(vit)),
        "qkv_bias": vit_field(vit, "qkv_bias") == "qkv",
        "pre_norm": bool(vit_field(vit, "pre_norm")),
        "class_token": True,
        "global_pool": POOL_TO_TIMM[vit_field(vit, "pool")],
        # The ViT's ln_post normalises all tokens before pooling, also for "gap" (where timm would
        # otherwise norm after pooling).
        "fc_norm": False,
        "act_layer": vit_field(vit, "activation"),
        "num_classes": _num_classes(vit, num_classes),
    }
    if not vit_field(vit, "use_abs_pos"):
        args["pos_embed"] = "none"
    return args
