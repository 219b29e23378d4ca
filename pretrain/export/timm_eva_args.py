"""Which timm ``Eva`` (``eva.py``) the project's EVA-02-style ViT is: its registered architecture
name and ``model_args``, and back, the ViT's fields for timm ``model_args`` (arguments a config
omits take ``Eva``'s defaults). Options of timm's ``Eva`` the ViT does not have (layer scale,
register tokens, qk-norm, fc_norm pooling, other RoPE types...) are rejected with their
argument's name, and ViT options ``Eva`` lacks with the field's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pretrain.export.timm_common import POOL_FROM_TIMM, POOL_TO_TIMM
from pretrain.export.tree_io import as_pair, mlp_ratio_for, module_field, size_value
from pretrain.export.vit_fields import vit_field, vit_mlp_dim

# timm's eva uses its own LayerNorm, whose eps defaults to 1e-6 (a model_arg cannot change it).
TIMM_LAYER_NORM_EPS = 1e-6

# timm Eva.__init__ defaults for the arguments this mapping reads (a config.json may omit them).
_TIMM_EVA_DEFAULTS: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 16,
    "in_chans": 3,
    "num_classes": 1000,
    "global_pool": "avg",
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "qkv_bias": True,
    "qkv_fused": True,
    "mlp_ratio": 4.0,
    "swiglu_mlp": False,
    "scale_mlp": False,
    "scale_attn_inner": False,
    "use_abs_pos_emb": True,
    "use_rot_pos_emb": False,
    "rope_temperature": 10000.0,
    "ref_feat_shape": None,
    "use_pre_transformer_norm": False,
    "use_post_transformer_norm": None,
    "use_fc_norm": None,
}
# timm Eva arguments whose non-default values change the network in ways the ViT cannot express,
# each with the values this mapping supports.
_UNSUPPORTED_TIMM_ARGS: dict[str, tuple[Any, ...]] = {
    "in_chans": (3,),
    "num_kv_heads": (None,),
    "qk_norm": (False,),
    "swiglu_align_to": (0,),
    "attn_type": ("eva",),
    "init_values": (None,),
    "attn_only_layer_scale": (False,),
    "class_token": (True,),
    "num_reg_tokens": (0,),
    "no_embed_class": (False,),
    "rope_type": ("cat",),
    "rope_grid_offset": (0, 0.0),
    "rope_grid_indexing": ("ij",),
    "rope_rotate_half": (False,),
    "rope_mrope_section": (None,),
    "use_post_norm": (False,),
    "attn_pool_num_heads": (None,),
    "attn_pool_mlp_ratio": (None,),
    "dynamic_img_size": (False,),
    "dynamic_img_pad": (False,),
    "use_naflex": (None, False),
}


def timm_architecture(vit: Any) -> str:
    """The registered timm name closest to this ViT (the model_args fix every detail anyway)."""
    width = int(vit_field(vit, "width"))
    if vit_field(vit, "attn_inner_norm"):
        return {1024: "eva02_large_patch14_clip_224"}.get(width, "eva02_base_patch16_clip_224")
    names = {
        192: "eva02_tiny_patch14_224",
        384: "eva02_small_patch14_224",
        1024: "eva02_large_patch14_224",
    }
    return names.get(width, "eva02_base_patch14_224")


def timm_model_args(vit: Any, *, image_size: int | tuple[int, int]) -> dict[str, Any]:
    """The keyword arguments of ``timm.create_model(name, pretrained=False, **args)`` that build
    timm's ``Eva`` equal to this ViT (a ``VisionTransformer`` or a mapping of its fields).

    ``image_size`` is the training resolution (the position embeddings fix the grid). Raises
    ``ValueError`` naming the field when the ViT uses an option timm's ``Eva`` lacks.
    """
    problems = []
    width, num_heads = int(vit_field(vit, "width")), int(vit_field(vit, "num_heads"))
    if vit_field(vit, "qkv_bias") not in ("qv", "none"):
        # timm's separate k_proj has no bias; with RoPE a key bias is not softmax-invariant.
        problems.append("qkv_bias='qkv' (timm's eva has no key bias: use 'qv' or 'none')")
    eps = float(vit_field(vit, "layer_norm_eps"))
    if eps != TIMM_LAYER_NORM_EPS:
        problems.append(f"layer_norm_eps={eps} (timm's eva LayerNorm uses {TIMM_LAYER_NORM_EPS})")
    pre_norm = bool(vit_field(vit, "pre_norm"))
    if bool(vit_field(vit, "patch_bias")) == pre_norm:
        problems.append(
            f"patch_bias={not pre_norm} with pre_norm={pre_norm} (timm's patch embedding has a "
            "bias exactly when there is no pre-transformer norm)"
        )
    pool = vit_field(vit, "pool")
    if pool not in POOL_TO_TIMM:
        problems.append(f"pool={pool!r}")
    mlp_type = vit_field(vit, "mlp_type")
    if mlp_type not in ("gelu", "swiglu"):
        problems.append(f"mlp_type={mlp_type!r}")
    if problems:
        raise ValueError("ViT options timm's Eva cannot express: " + ", ".join(problems))

    mlp_dim = vit_mlp_dim(vit)
    # A mapping without output_dim has no projection here (the module's own default is 512).
    output_dim = module_field(vit, "output_dim")
    rope = bool(vit_field(vit, "rope"))
    ref_grid = vit_field(vit, "rope_ref_grid")
    return {
        "img_size": size_value(image_size),
        "patch_size": int(vit_field(vit, "patch_size")),
        "embed_dim": width,
        "depth": int(vit_field(vit, "depth")),
        "num_heads": num_heads,
        "qkv_bias": vit_field(vit, "qkv_bias") == "qv",
        "qkv_fused": False,
        "mlp_ratio": mlp_ratio_for(width, mlp_dim),
        "swiglu_mlp": mlp_type == "swiglu",
        # The project's SwiGLU always has its hidden LayerNorm (timm's SwiGLU + norm_layer).
        "scale_mlp": mlp_type == "swiglu",
        "scale_attn_inner": bool(vit_field(vit, "attn_inner_norm")),
        "use_abs_pos_emb": bool(vit_field(vit, "use_abs_pos")),
        "use_rot_pos_emb": rope,
        "rope_temperature": float(vit_field(vit, "rope_theta")),
        "ref_feat_shape": list(as_pair(ref_grid)) if rope and ref_grid is not None else None,
        "use_pre_transformer_norm": pre_norm,
        "use_post_transformer_norm": True,
        "use_fc_norm": False,
        "global_pool": POOL_TO_TIMM[pool],
        "class_token": True,
        "num_classes": 0 if output_dim is None else int(output_dim),
    }


def _check_supported(model_args: Mapping[str, Any]) -> None:
    problems = [
        f"{name}={model_args[name]!r}"
        for name, supported in _UNSUPPORTED_TIMM_ARGS.items()
        if name in model_args and model_args[name] not in supported
    ]
    args = {**_TIMM_EVA_DEFAULTS, **model_args}
    fc_norm = (
        args["use_fc_norm"] if args["use_fc_norm"] is not None else args["global_pool"] == "avg"
    )
    post_norm = args["use_post_transformer_norm"]
    post_norm = (not fc_norm) if post_norm is None else post_norm
    if fc_norm or not post_norm:
        problems.append(
            "use_fc_norm / use_post_transformer_norm: the ViT applies its final norm to all tokens "
            "before pooling (use_fc_norm=False, use_post_transformer_norm=True)"
        )
    if args["global_pool"] not in POOL_FROM_TIMM:
        problems.append(f"global_pool={args['global_pool']!r}")
    if args["swiglu_mlp"] != args["scale_mlp"]:
        problems.append(
            f"swiglu_mlp={args['swiglu_mlp']} with scale_mlp={args['scale_mlp']} (the ViT has "
            "SwiGLU with its hidden LayerNorm, or a plain GELU MLP)"
        )
    if problems:
        raise ValueError(
            "timm Eva options the project's ViT does not implement: " + ", ".join(problems)
        )


def vit_kwargs_from_timm(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """``VisionTransformer`` fields for timm ``Eva`` kwargs, plus ``"image_size"`` (height, width).

    Arguments a config omits take timm ``Eva``'s defaults; build the model with
    ``VisionTransformer(**{k: v for k, v in kwargs.items() if k != "image_size"})``.
    """
    _check_supported(model_args)
    args = {**_TIMM_EVA_DEFAULTS, **model_args}
    width = int(args["embed_dim"])
    ref = args["ref_feat_shape"]
    ref_grid = None if ref is None else as_pair(ref)
    if ref_grid is not None and ref_grid[0] == ref_grid[1]:
        ref_grid = ref_grid[0]
    num_classes = int(args["num_classes"])
    return {
        "patch_size": as_pair(args["patch_size"])[0],
        "width": width,
        "depth": int(args["depth"]),
        "num_heads": int(args["num_heads"]),
        "mlp_dim": int(width * float(args["mlp_ratio"])),
        "output_dim": num_classes if num_classes > 0 else None,
        "pool": POOL_FROM_TIMM[args["global_pool"]],
        "layer_norm_eps": TIMM_LAYER_NORM_EPS,
        "pre_norm": bool(args["use_pre_transformer_norm"]),
        "patch_bias": not args["use_pre_transformer_norm"],
        "use_abs_pos": bool(args["use_abs_pos_emb"]),
        "rope": bool(args["use_rot_pos_emb"]),
        "rope_theta": float(args["rope_temperature"]),
        "rope_ref_grid": ref_grid if args["use_rot_pos_emb"] else None,
        "mlp_type": "swiglu" if args["swiglu_mlp"] else "gelu",
        "qkv_bias": "qv" if args["qkv_bias"] else "none",
        "attn_inner_norm": bool(args["scale_attn_inner"]),
        "image_size": as_pair(args["img_size"]),
    }
