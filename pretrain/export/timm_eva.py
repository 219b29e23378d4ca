"""Export the EVA-02-style ViT image tower (e.g. UTA's student) to timm's ``eva.py``; import back.

A ``models.vit.VisionTransformer`` built with the EVA-02 options (``from_variant("uta_base/16")``,
``"eva02_large/16"``...) maps one-to-one onto timm's ``Eva`` class with ``qkv_fused=False`` (the
separate q/k/v projections of timm's eva02 models):

=======================================  ==========================================================
JAX (Flax ``params`` of the ViT)          timm ``Eva`` ``state_dict``
=======================================  ==========================================================
``class_embedding`` (W,)                 ``cls_token`` (1, 1, W)
``positional_embedding`` (1 + N, W)      ``pos_embed`` (1, 1 + N, W)
``conv1/{kernel,bias}`` HWIO             ``patch_embed.proj.{weight,bias}`` OIHW
``ln_pre``                               ``norm_pre`` (only when ``pre_norm``)
``transformer/resblocks_i/ln_1, ln_2``   ``blocks.i.norm1, norm2``
``attn/{query,key,value}`` (W, H, D)     ``blocks.i.attn.{q,k,v}_proj.weight`` (H*D, W), no k bias
``attn/inner_norm`` (H, D)               ``blocks.i.attn.norm`` (H*D,) (``scale_attn_inner``)
``attn/out`` (H, D, W)                   ``blocks.i.attn.proj`` (W, H*D)
``mlp/{fc1_g,fc1_x,norm,fc2}``           ``blocks.i.mlp.{fc1_g,fc1_x,norm,fc2}`` (SwiGLU + sub-LN)
``mlp/{c_fc,c_proj}``                    ``blocks.i.mlp.{fc1,fc2}`` (GELU MLP)
``ln_post``                              ``norm`` (timm applies it to all tokens, then pools)
``proj`` (W, O), no bias                 ``head.weight`` (O, W) and a zero ``head.bias``
Dense ``kernel`` (in, out)               Linear ``weight`` (out, in); LayerNorm ``scale`` = weight
=======================================  ==========================================================

The rotary embedding has no weights: timm rebuilds it from ``use_rot_pos_emb``,
``rope_temperature`` and ``ref_feat_shape`` with the same layout (models/rope.py). ``pool="cls"`` is
timm's ``global_pool="token"`` and ``"gap"`` its ``"avg"``, both with ``use_fc_norm=False`` (the
final norm on all tokens, as ``forward_features`` returns them).

An export directory holds ``model.safetensors`` and ``config.json`` (timm's Hub layout:
``architecture``, ``num_classes``, ``num_features``, ``pretrained_cfg``, ``model_args``). A user
loads it with either of::

    import timm
    model = timm.create_model("local-dir:/path/to/export", pretrained=True)

    import json, timm
    from safetensors.torch import load_file
    config = json.load(open("/path/to/export/config.json"))
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    model.load_state_dict(load_file("/path/to/export/model.safetensors"), strict=True)

then ``model.forward_features(images)`` gives the normed tokens (class token first) and
``model(images)`` the pooled (and projected, with a head) embedding. Images are NCHW, normalised as
in training (``pretrained_cfg`` carries the mean and std).

``from_timm_state_dict`` / ``load_timm`` go the other way (also from timm's fused ``qkv`` +
``q_bias``/``v_bias`` layout); ``vit_kwargs_from_timm`` says which ViT to build for timm
``model_args``. Options of timm's ``Eva`` the ViT does not have (layer scale, register tokens,
qk-norm, fc_norm pooling, other RoPE types...) are rejected with their argument's name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.export.tree_io import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    TIMM_CONFIG_FILE_NAME,
    TIMM_WEIGHTS_FILE_NAME,
    Entries,
    as_pair,
    flatten,
    layer_norm_from_torch,
    layer_norm_to_torch,
    linear_from_torch,
    linear_to_torch,
    mlp_ratio_for,
    module_field,
    read_timm_directory,
    size_value,
    timm_hub_config,
    unflatten,
    unwrap_variables,
    vit_stem_to_timm,
    write_timm_directory,
)

WEIGHTS_FILE_NAME = TIMM_WEIGHTS_FILE_NAME
CONFIG_FILE_NAME = TIMM_CONFIG_FILE_NAME
# timm's eva uses its own LayerNorm, whose eps defaults to 1e-6 (a model_arg cannot change it).
TIMM_LAYER_NORM_EPS = 1e-6

_POOL_TO_TIMM = {"cls": "token", "gap": "avg"}
_POOL_FROM_TIMM = {v: k for k, v in _POOL_TO_TIMM.items()}

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

ParamTree = Mapping[str, Any]
StateDict = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------------
# Model arguments (JAX ViT fields <-> timm Eva kwargs)
# --------------------------------------------------------------------------------------------------


def timm_architecture(vit: Any) -> str:
    """The registered timm name closest to this ViT (the model_args fix every detail anyway)."""
    width = int(module_field(vit, "width"))
    if module_field(vit, "attn_inner_norm", False):
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
    width, num_heads = int(module_field(vit, "width")), int(module_field(vit, "num_heads"))
    if module_field(vit, "qkv_bias", "qkv") not in ("qv", "none"):
        # timm's separate k_proj has no bias; with RoPE a key bias is not softmax-invariant.
        problems.append("qkv_bias='qkv' (timm's eva has no key bias: use 'qv' or 'none')")
    eps = float(module_field(vit, "layer_norm_eps", 1e-5))
    if eps != TIMM_LAYER_NORM_EPS:
        problems.append(f"layer_norm_eps={eps} (timm's eva LayerNorm uses {TIMM_LAYER_NORM_EPS})")
    pre_norm = bool(module_field(vit, "pre_norm", True))
    if bool(module_field(vit, "patch_bias", False)) == pre_norm:
        problems.append(
            f"patch_bias={not pre_norm} with pre_norm={pre_norm} (timm's patch embedding has a "
            "bias exactly when there is no pre-transformer norm)"
        )
    pool = module_field(vit, "pool", "cls")
    if pool not in _POOL_TO_TIMM:
        problems.append(f"pool={pool!r}")
    mlp_type = module_field(vit, "mlp_type", "gelu")
    if mlp_type not in ("gelu", "swiglu"):
        problems.append(f"mlp_type={mlp_type!r}")
    if problems:
        raise ValueError("ViT options timm's Eva cannot express: " + ", ".join(problems))

    mlp_dim = int(module_field(vit, "mlp_dim") or 4 * width)
    output_dim = module_field(vit, "output_dim")
    rope = bool(module_field(vit, "rope", False))
    ref_grid = module_field(vit, "rope_ref_grid")
    return {
        "img_size": size_value(image_size),
        "patch_size": int(module_field(vit, "patch_size")),
        "embed_dim": width,
        "depth": int(module_field(vit, "depth")),
        "num_heads": num_heads,
        "qkv_bias": module_field(vit, "qkv_bias", "qkv") == "qv",
        "qkv_fused": False,
        "mlp_ratio": mlp_ratio_for(width, mlp_dim),
        "swiglu_mlp": mlp_type == "swiglu",
        # The project's SwiGLU always has its hidden LayerNorm (timm's SwiGLU + norm_layer).
        "scale_mlp": mlp_type == "swiglu",
        "scale_attn_inner": bool(module_field(vit, "attn_inner_norm", False)),
        "use_abs_pos_emb": bool(module_field(vit, "use_abs_pos", True)),
        "use_rot_pos_emb": rope,
        "rope_temperature": float(module_field(vit, "rope_theta", 10000.0)),
        "ref_feat_shape": list(as_pair(ref_grid)) if rope and ref_grid is not None else None,
        "use_pre_transformer_norm": pre_norm,
        "use_post_transformer_norm": True,
        "use_fc_norm": False,
        "global_pool": _POOL_TO_TIMM[pool],
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
    if args["global_pool"] not in _POOL_FROM_TIMM:
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
        "pool": _POOL_FROM_TIMM[args["global_pool"]],
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


def timm_state_dict_shapes(model_args: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the state dict timm's ``Eva`` builds from ``model_args``.

    Written from timm's module layout, independently of the parameter mapping, so that arguments
    and weights that disagree fail at export time rather than at the user's ``load_state_dict``.
    """
    kwargs = vit_kwargs_from_timm(model_args)
    width, patch = kwargs["width"], kwargs["patch_size"]
    height, image_width = kwargs["image_size"]
    tokens = 1 + (height // patch) * (image_width // patch)
    hidden = kwargs["mlp_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, width),
        "patch_embed.proj.weight": (width, 3, patch, patch),
        "norm.weight": (width,),
        "norm.bias": (width,),
    }
    if kwargs["patch_bias"]:
        shapes["patch_embed.proj.bias"] = (width,)
    if kwargs["use_abs_pos"]:
        shapes["pos_embed"] = (1, tokens, width)
    if kwargs["pre_norm"]:
        shapes.update({"norm_pre.weight": (width,), "norm_pre.bias": (width,)})
    for index in range(kwargs["depth"]):
        block = f"blocks.{index}"
        for norm in ("norm1", "norm2"):
            shapes.update({f"{block}.{norm}.weight": (width,), f"{block}.{norm}.bias": (width,)})
        for name in ("q_proj", "k_proj", "v_proj"):
            shapes[f"{block}.attn.{name}.weight"] = (width, width)
        if kwargs["qkv_bias"] == "qv":
            shapes.update(
                {f"{block}.attn.q_proj.bias": (width,), f"{block}.attn.v_proj.bias": (width,)}
            )
        if kwargs["attn_inner_norm"]:
            shapes.update(
                {f"{block}.attn.norm.weight": (width,), f"{block}.attn.norm.bias": (width,)}
            )
        shapes.update(
            {f"{block}.attn.proj.weight": (width, width), f"{block}.attn.proj.bias": (width,)}
        )
        fc1_names = ("fc1_g", "fc1_x") if kwargs["mlp_type"] == "swiglu" else ("fc1",)
        for name in fc1_names:
            shapes.update(
                {
                    f"{block}.mlp.{name}.weight": (hidden, width),
                    f"{block}.mlp.{name}.bias": (hidden,),
                }
            )
        if kwargs["mlp_type"] == "swiglu":
            shapes.update(
                {f"{block}.mlp.norm.weight": (hidden,), f"{block}.mlp.norm.bias": (hidden,)}
            )
        shapes.update(
            {f"{block}.mlp.fc2.weight": (width, hidden), f"{block}.mlp.fc2.bias": (width,)}
        )
    if kwargs["output_dim"] is not None:
        shapes.update(
            {"head.weight": (kwargs["output_dim"], width), "head.bias": (kwargs["output_dim"],)}
        )
    return shapes


def check_state_dict_matches_args(
    state_dict: Mapping[str, Any], model_args: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or mis-shaped key."""
    expected = timm_state_dict_shapes(model_args)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{key}: {tuple(np.shape(state_dict[key]))} != {expected[key]}"
        for key in sorted(set(expected) & set(state_dict))
        if tuple(np.shape(state_dict[key])) != expected[key]
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            "state dict does not match the timm Eva arguments: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
            f"wrong shapes {mis_shaped[:8]}"
        )


# --------------------------------------------------------------------------------------------------
# Parameters (JAX tree <-> timm state dict)
# --------------------------------------------------------------------------------------------------


def _attention_to_timm(jax_params: Entries, jax: str, timm: str) -> StateDict:
    state: StateDict = {}
    for jax_name, timm_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        kernel = jax_params.take(f"{jax}/{jax_name}/kernel")  # (W, H, D)
        # torch splits the projected width into heads head-major, as the (H, D) reshape does.
        state[f"{timm}.{timm_name}.weight"] = kernel.reshape(kernel.shape[0], -1).T
        if jax_params.has(f"{jax}/{jax_name}/bias"):
            state[f"{timm}.{timm_name}.bias"] = jax_params.take(f"{jax}/{jax_name}/bias").reshape(
                -1
            )
    if jax_params.has(f"{jax}/inner_norm/scale"):
        state.update(layer_norm_to_torch(jax_params, f"{jax}/inner_norm", f"{timm}.norm"))
    out_kernel = jax_params.take(f"{jax}/out/kernel")  # (H, D, W)
    state[f"{timm}.proj.weight"] = out_kernel.reshape(-1, out_kernel.shape[-1]).T
    state[f"{timm}.proj.bias"] = jax_params.take(f"{jax}/out/bias")
    return state


def _mlp_to_timm(jax_params: Entries, jax: str, timm: str) -> StateDict:
    if jax_params.has(f"{jax}/c_fc/kernel"):
        return {
            **linear_to_torch(jax_params, f"{jax}/c_fc", f"{timm}.fc1"),
            **linear_to_torch(jax_params, f"{jax}/c_proj", f"{timm}.fc2"),
        }
    return {
        **linear_to_torch(jax_params, f"{jax}/fc1_g", f"{timm}.fc1_g"),
        **linear_to_torch(jax_params, f"{jax}/fc1_x", f"{timm}.fc1_x"),
        **layer_norm_to_torch(jax_params, f"{jax}/norm", f"{timm}.norm"),
        **linear_to_torch(jax_params, f"{jax}/fc2", f"{timm}.fc2"),
    }


def to_timm_state_dict(
    params: ParamTree,
    *,
    model_args: Mapping[str, Any] | None = None,
    dtype: Any = np.float32,
) -> StateDict:
    """Map the ViT's ``params`` (or ``variables``) to timm ``Eva``'s state dict (NumPy arrays).

    Pass the image tower's own tree (``params["image_encoder"]`` of a two-tower model). Leaves
    must be fully addressable (gather sharded arrays first). A parameter timm has no place for
    raises ``ValueError``; with ``model_args`` (:func:`timm_model_args`) the result is also checked
    against the keys and shapes timm builds.
    """
    entries = Entries(
        flatten(unwrap_variables(params)), lambda v: np.asarray(v, dtype=dtype), "ViT params"
    )
    take = entries.take
    state: StateDict = vit_stem_to_timm(entries)
    depth = entries.block_count(r"transformer/resblocks_(\d+)/")
    for index in range(depth):
        jax, timm = f"transformer/resblocks_{index}", f"blocks.{index}"
        state.update(layer_norm_to_torch(entries, f"{jax}/ln_1", f"{timm}.norm1"))
        state.update(_attention_to_timm(entries, f"{jax}/attn", f"{timm}.attn"))
        state.update(layer_norm_to_torch(entries, f"{jax}/ln_2", f"{timm}.norm2"))
        state.update(_mlp_to_timm(entries, f"{jax}/mlp", f"{timm}.mlp"))
    state.update(layer_norm_to_torch(entries, "ln_post", "norm"))
    if entries.has("proj"):
        proj = take("proj")  # (W, O): the ViT projects without a bias
        state["head.weight"] = proj.T
        state["head.bias"] = np.zeros(proj.shape[1], dtype)
    entries.check_all_taken()
    # Transposes leave strided views; safetensors and torch want contiguous buffers.
    state = {key: np.ascontiguousarray(value) for key, value in state.items()}
    if model_args is not None:
        check_state_dict_matches_args(state, model_args)
    return state


def _split_fused_qkv(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """timm's fused layout (``attn.qkv.weight`` rows [q | k | v], ``q_bias``, ``v_bias``) as
    separate projections, so both layouts import the same way."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(blocks\.\d+\.attn)\.(qkv\.weight|q_bias|v_bias)", key)
        if match is None:
            out[key] = value
        elif match.group(2) == "qkv.weight":
            for name, part in zip(("q", "k", "v"), np.split(np.asarray(value), 3, axis=0)):
                out[f"{match.group(1)}.{name}_proj.weight"] = part
        else:
            out[f"{match.group(1)}.{match.group(2)[0]}_proj.bias"] = value
    return out


def from_timm_state_dict(
    state_dict: Mapping[str, Any],
    *,
    model_args: Mapping[str, Any],
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Map timm ``Eva``'s state dict (NumPy arrays) to the ViT's ``params`` tree.

    ``model_args`` are the timm kwargs (the head count is not in the weights). The exact inverse of
    :func:`to_timm_state_dict`; a fused-qkv state dict (``attn.qkv`` + ``q_bias``/``v_bias``) is
    accepted too. A non-zero ``head.bias`` raises (the ViT's projection has no bias).
    """
    state_dict = _split_fused_qkv(
        {key: value for key, value in state_dict.items() if not key.startswith("rope.")}
    )
    check_state_dict_matches_args(state_dict, model_args)
    kwargs = vit_kwargs_from_timm(model_args)
    num_heads = kwargs["num_heads"]
    width = kwargs["width"]
    head_dim = width // num_heads
    entries = Entries(state_dict, lambda v: np.asarray(v, dtype=dtype), "timm state dict")
    take = entries.take

    flat: StateDict = {
        "class_embedding": take("cls_token").reshape(width),
        "conv1/kernel": take("patch_embed.proj.weight").transpose(2, 3, 1, 0),
    }
    if entries.has("patch_embed.proj.bias"):
        flat["conv1/bias"] = take("patch_embed.proj.bias")
    if entries.has("pos_embed"):
        flat["positional_embedding"] = take("pos_embed")[0]
    if entries.has("norm_pre.weight"):
        flat.update(layer_norm_from_torch(entries, "norm_pre", "ln_pre"))
    for index in range(kwargs["depth"]):
        timm, jax = f"blocks.{index}", f"transformer/resblocks_{index}"
        flat.update(layer_norm_from_torch(entries, f"{timm}.norm1", f"{jax}/ln_1"))
        for timm_name, jax_name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            weight = take(f"{timm}.attn.{timm_name}.weight")  # (H*D, W)
            flat[f"{jax}/attn/{jax_name}/kernel"] = weight.T.reshape(width, num_heads, head_dim)
            if entries.has(f"{timm}.attn.{timm_name}.bias"):
                bias = take(f"{timm}.attn.{timm_name}.bias")
                flat[f"{jax}/attn/{jax_name}/bias"] = bias.reshape(num_heads, head_dim)
        if entries.has(f"{timm}.attn.norm.weight"):
            inner_norm = layer_norm_from_torch(
                entries, f"{timm}.attn.norm", f"{jax}/attn/inner_norm", (num_heads, head_dim)
            )
            flat.update(inner_norm)
        flat[f"{jax}/attn/out/kernel"] = take(f"{timm}.attn.proj.weight").T.reshape(
            num_heads, head_dim, width
        )
        flat[f"{jax}/attn/out/bias"] = take(f"{timm}.attn.proj.bias")
        flat.update(layer_norm_from_torch(entries, f"{timm}.norm2", f"{jax}/ln_2"))
        if kwargs["mlp_type"] == "swiglu":
            flat.update(linear_from_torch(entries, f"{timm}.mlp.fc1_g", f"{jax}/mlp/fc1_g"))
            flat.update(linear_from_torch(entries, f"{timm}.mlp.fc1_x", f"{jax}/mlp/fc1_x"))
            flat.update(layer_norm_from_torch(entries, f"{timm}.mlp.norm", f"{jax}/mlp/norm"))
            flat.update(linear_from_torch(entries, f"{timm}.mlp.fc2", f"{jax}/mlp/fc2"))
        else:
            flat.update(linear_from_torch(entries, f"{timm}.mlp.fc1", f"{jax}/mlp/c_fc"))
            flat.update(linear_from_torch(entries, f"{timm}.mlp.fc2", f"{jax}/mlp/c_proj"))
    flat.update(layer_norm_from_torch(entries, "norm", "ln_post"))
    if entries.has("head.weight"):
        head_bias = take("head.bias")
        if np.any(head_bias != 0):
            raise ValueError(
                "timm head.bias is non-zero, but the ViT's projection `proj` has no bias"
            )
        flat["proj"] = take("head.weight").T
    entries.check_all_taken()
    return unflatten({key: np.ascontiguousarray(value) for key, value in flat.items()})


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def timm_config(
    vit: Any,
    *,
    image_size: int | tuple[int, int],
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
    std: tuple[float, float, float] = OPENAI_DATASET_STD,
) -> dict[str, Any]:
    """timm's Hub ``config.json`` content for this ViT: architecture, model_args, pretrained_cfg."""
    model_args = timm_model_args(vit, image_size=image_size)
    return timm_hub_config(
        timm_architecture(vit), model_args, image_size=image_size, mean=mean, std=std
    )


def save_timm(
    path_dir: str | Path,
    params: ParamTree,
    vit: Any,
    *,
    image_size: int | tuple[int, int],
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
    std: tuple[float, float, float] = OPENAI_DATASET_STD,
    dtype: Any = np.float32,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (timm's local-dir / Hub layout); returns the
    directory. ``vit`` is the ``VisionTransformer`` (or a mapping of its fields), ``params`` its
    parameter tree, ``mean``/``std`` the normalisation the model was trained with."""
    config = timm_config(vit, image_size=image_size, mean=mean, std=std)
    state = to_timm_state_dict(params, model_args=config["model_args"], dtype=dtype)
    return write_timm_directory(path_dir, state, config)


def load_timm(path_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a timm export directory (ours, or a timm eva Hub snapshot with complete model_args):
    ``(model_args, params)``; ``vit_kwargs_from_timm(model_args)`` says which ViT to build."""
    model_args, state_dict = read_timm_directory(path_dir)
    return model_args, from_timm_state_dict(state_dict, model_args=model_args)
