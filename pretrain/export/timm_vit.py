"""Export the CLIP-style ViT image tower (e.g. CatLIP's classifier) to timm's
``vision_transformer.py``; import back.

A ``models.vit.VisionTransformer`` with its CLIP options (the defaults: ln_pre and no patch bias,
pre-LN blocks with fused-able q/k/v biases, GELU or QuickGELU MLP, class token, learned position
embeddings, ln_post on all tokens, "cls" or "gap" pooling) maps one-to-one onto timm's
``VisionTransformer``:

=======================================  ==========================================================
JAX (Flax ``params`` of the ViT)          timm ``VisionTransformer`` ``state_dict``
=======================================  ==========================================================
``class_embedding`` (W,)                 ``cls_token`` (1, 1, W)
``positional_embedding`` (1 + N, W)      ``pos_embed`` (1, 1 + N, W) (``pos_embed="none"`` without)
``conv1/kernel`` HWIO (no bias)          ``patch_embed.proj.weight`` OIHW (timm drops the bias
                                         exactly when ``pre_norm=True``)
``ln_pre``                               ``norm_pre`` (``pre_norm=True``)
``transformer/resblocks_i/ln_1, ln_2``   ``blocks.i.norm1, norm2``
``attn/{query,key,value}`` (W, H, D)     ``blocks.i.attn.qkv.weight`` (3 H*D, W), rows [q | k | v],
                                         and ``qkv.bias`` (3 H*D,) (``qkv_bias``)
``attn/out`` (H, D, W)                   ``blocks.i.attn.proj`` (W, H*D)
``mlp/{c_fc,c_proj}``                    ``blocks.i.mlp.{fc1,fc2}``
``ln_post``                              ``norm`` (timm applies it to all tokens, then pools)
``proj`` (W, O) [+ ``proj_bias`` (O,)]   ``head.weight`` (O, W), ``head.bias`` (zero without bias)
a classifier Dense (W, C) + (C,)         ``head.weight`` (C, W), ``head.bias`` (C,)
Dense ``kernel`` (in, out)               Linear ``weight`` (out, in); LayerNorm ``scale`` = weight
=======================================  ==========================================================

The head is one of: (a) a classifier given beside the ViT (``head=`` a Flax Dense's params
``{"kernel": (W, C), "bias": (C,)}`` or a ``(kernel, bias)`` pair), as CatLIP's ViT with
``output_dim=None`` followed by its synset classifier; (b) the ViT's own projection ``proj``
(CLIP image towers; ``num_classes = output_dim``); (c) none (``num_classes=0``: ``model(x)`` is
the pooled embedding). ``pool="cls"`` is timm's ``global_pool="token"`` and ``"gap"`` its
``"avg"`` (mean of the patch tokens), both with ``fc_norm=False``: the final norm on all tokens,
as ``forward_features`` returns them. ``activation="quick_gelu"`` is ``act_layer="quick_gelu"``.

LayerNorm eps cannot be a JSON model argument in timm (``norm_layer`` is a class), so it comes
from the architecture name: timm's ``vit_*_clip_*`` entry points bind eps 1e-5 (CLIP's, the ViT's
default ``layer_norm_eps``), its plain ``vit_*`` ones use timm's LayerNorm default 1e-6.
``model_args`` fix every other detail, whatever the name's own size.

Not expressible here (rejected with the field's name): EVA-02 options (2-D RoPE, SwiGLU,
q/v-only biases, the attention's inner LayerNorm; export those with ``timm_eva``), a patch bias
together with ln_pre (or neither), other LayerNorm eps, position embeddings stored for a grid
other than the exported image size.

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
``model(images)`` the head's logits (or the pooled embedding without a head). Images are NCHW,
normalised as in training (``pretrained_cfg`` carries the mean and std).

``from_timm_state_dict`` / ``load_timm_vit`` go the other way, for a given ViT, returning the
classifier separately when the ViT has no projection of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.export.tree_io import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    Entries,
    StateDict,
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

__all__ = [
    "from_timm_state_dict",
    "load_timm_vit",
    "save_timm_vit",
    "timm_architecture",
    "timm_model_args",
    "timm_state_dict_shapes",
    "to_timm_state_dict",
]

# timm's vit_*_clip_* entry points bind this eps into their LayerNorm; plain vit_* ones use timm's
# LayerNorm default.
CLIP_LAYER_NORM_EPS = 1e-5
TIMM_LAYER_NORM_EPS = 1e-6

_POOL_TO_TIMM = {"cls": "token", "gap": "avg"}

# ViT fields timm's VisionTransformer (as exported here) cannot take, with the values it can and
# what to do instead.
_SUPPORTED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "rope": ((False,), "2-D RoPE: export with pretrain.export.timm_eva"),
    "mlp_type": (("gelu",), "SwiGLU: export with pretrain.export.timm_eva"),
    "qkv_bias": (("qkv", "none"), "timm's fused qkv has all three biases or none"),
    "attn_inner_norm": ((False,), "EVA-02's attention sub-LN: export with timm_eva"),
    "activation": (("gelu", "quick_gelu"), "timm act_layer gelu or quick_gelu"),
    "pool": (tuple(_POOL_TO_TIMM), "timm global_pool token or avg"),
    "layer_norm_eps": (
        (CLIP_LAYER_NORM_EPS, TIMM_LAYER_NORM_EPS),
        "timm's vit_*_clip_* names give 1e-5, its other vit_* names 1e-6",
    ),
}
# Field defaults of models.vit.VisionTransformer, for ViTs given as mappings of fields.
_VIT_DEFAULTS: dict[str, Any] = {
    "mlp_dim": None,
    "output_dim": 512,
    "pool": "cls",
    "layer_norm_eps": 1e-5,
    "pre_norm": True,
    "patch_bias": False,
    "use_abs_pos": True,
    "rope": False,
    "mlp_type": "gelu",
    "qkv_bias": "qkv",
    "attn_inner_norm": False,
    "activation": "gelu",
    "proj_bias": False,
    "pos_embed_grid": None,
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

ParamTree = Mapping[str, Any]
Head = Mapping[str, Any] | Sequence[Any]


# --------------------------------------------------------------------------------------------------
# Model arguments
# --------------------------------------------------------------------------------------------------


def _field(vit: Any, name: str) -> Any:
    return module_field(vit, name, _VIT_DEFAULTS.get(name))


def _check_supported(vit: Any) -> None:
    """Raise ``ValueError`` naming every ViT field timm's VisionTransformer cannot express."""
    problems = [
        f"{name}={_field(vit, name)!r} ({why})"
        for name, (supported, why) in _SUPPORTED_FIELDS.items()
        if _field(vit, name) not in supported
    ]
    pre_norm = bool(_field(vit, "pre_norm"))
    if bool(_field(vit, "patch_bias")) == pre_norm:
        problems.append(
            f"patch_bias={not pre_norm} with pre_norm={pre_norm} (timm's patch embedding has a "
            "bias exactly when there is no ln_pre)"
        )
    if problems:
        raise ValueError(
            "ViT options timm's VisionTransformer cannot express: " + ", ".join(problems)
        )


def _mlp_dim(vit: Any) -> int:
    return int(_field(vit, "mlp_dim") or 4 * int(_field(vit, "width")))


def timm_architecture(vit: Any) -> str:
    """The registered timm name closest to this ViT, with its LayerNorm eps (which only the name
    can carry); the model_args fix every other detail."""
    _check_supported(vit)
    key = (int(_field(vit, "width")), int(_field(vit, "patch_size")))
    if float(_field(vit, "layer_norm_eps")) == TIMM_LAYER_NORM_EPS:
        return _PLAIN_NAMES.get(key, "vit_base_patch16_224")
    if _field(vit, "activation") == "quick_gelu":
        return _CLIP_QUICKGELU_NAMES.get(key, "vit_base_patch16_clip_quickgelu_224")
    return _CLIP_NAMES.get(key, "vit_base_patch16_clip_224")


def _num_classes(vit: Any, num_classes: int | None) -> int:
    output_dim = _field(vit, "output_dim")
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
    ViT's ``output_dim`` (its projection becomes the head), or 0 without one. Raises
    ``ValueError`` naming the fields timm's VisionTransformer cannot express.
    """
    _check_supported(vit)
    patch_size = int(_field(vit, "patch_size"))
    height, width_px = as_pair(image_size)
    if height % patch_size or width_px % patch_size:
        raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
    grid = (height // patch_size, width_px // patch_size)
    stored_grid = _field(vit, "pos_embed_grid")
    if stored_grid is not None and as_pair(stored_grid) != grid:
        raise ValueError(
            f"pos_embed_grid={stored_grid}, but image_size {image_size} gives a {grid} grid: "
            "export at the resolution the position embeddings are stored for"
        )
    width = int(_field(vit, "width"))
    args: dict[str, Any] = {
        "img_size": size_value(image_size),
        "patch_size": patch_size,
        "embed_dim": width,
        "depth": int(_field(vit, "depth")),
        "num_heads": int(_field(vit, "num_heads")),
        "mlp_ratio": mlp_ratio_for(width, _mlp_dim(vit)),
        "qkv_bias": _field(vit, "qkv_bias") == "qkv",
        "pre_norm": bool(_field(vit, "pre_norm")),
        "class_token": True,
        "global_pool": _POOL_TO_TIMM[_field(vit, "pool")],
        # The ViT's ln_post normalises all tokens before pooling, also for "gap" (where timm would
        # otherwise norm after pooling).
        "fc_norm": False,
        "act_layer": _field(vit, "activation"),
        "num_classes": _num_classes(vit, num_classes),
    }
    if not _field(vit, "use_abs_pos"):
        args["pos_embed"] = "none"
    return args


def timm_state_dict_shapes(
    vit: Any, *, num_classes: int, num_positions: int | None = None
) -> dict[str, tuple[int | None, ...]]:
    """Keys and shapes of timm's ``VisionTransformer`` state dict for this ViT, written from timm's
    module layout (independently of the mapping). ``num_positions`` (1 + patches) may be None:
    then the ``pos_embed`` length reads ``None`` and is not checked."""
    width, patch = int(_field(vit, "width")), int(_field(vit, "patch_size"))
    hidden = _mlp_dim(vit)
    norm = lambda name: {f"{name}.weight": (width,), f"{name}.bias": (width,)}
    shapes: dict[str, tuple[int | None, ...]] = {
        "cls_token": (1, 1, width),
        "patch_embed.proj.weight": (width, 3, patch, patch),
        **norm("norm"),
    }
    if _field(vit, "patch_bias"):
        shapes["patch_embed.proj.bias"] = (width,)
    if _field(vit, "use_abs_pos"):
        shapes["pos_embed"] = (1, num_positions, width)
    if _field(vit, "pre_norm"):
        shapes.update(norm("norm_pre"))
    for index in range(int(_field(vit, "depth"))):
        block = f"blocks.{index}"
        shapes.update(norm(f"{block}.norm1"))
        shapes[f"{block}.attn.qkv.weight"] = (3 * width, width)
        if _field(vit, "qkv_bias") == "qkv":
            shapes[f"{block}.attn.qkv.bias"] = (3 * width,)
        shapes[f"{block}.attn.proj.weight"] = (width, width)
        shapes[f"{block}.attn.proj.bias"] = (width,)
        shapes.update(norm(f"{block}.norm2"))
        shapes[f"{block}.mlp.fc1.weight"] = (hidden, width)
        shapes[f"{block}.mlp.fc1.bias"] = (hidden,)
        shapes[f"{block}.mlp.fc2.weight"] = (width, hidden)
        shapes[f"{block}.mlp.fc2.bias"] = (width,)
    if num_classes > 0:
        shapes["head.weight"] = (num_classes, width)
        shapes["head.bias"] = (num_classes,)
    return shapes


def _check_shapes(state: Mapping[str, Any], expected: Mapping[str, tuple[int | None, ...]]) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or mis-shaped key."""

    def fits(shape: tuple[int, ...], wanted: tuple[int | None, ...]) -> bool:
        return len(shape) == len(wanted) and all(w is None or s == w for s, w in zip(shape, wanted))

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [
        f"{key}: {tuple(np.shape(state[key]))} != {expected[key]}"
        for key in sorted(set(expected) & set(state))
        if not fits(tuple(np.shape(state[key])), expected[key])
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            "state dict does not match timm's VisionTransformer for this ViT: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
            f"wrong shapes {mis_shaped[:8]}"
        )


# --------------------------------------------------------------------------------------------------
# Parameters (JAX tree <-> timm state dict)
# --------------------------------------------------------------------------------------------------


def _attention_to_timm(entries: Entries, jax: str, timm: str) -> StateDict:
    kernels = [entries.take(f"{jax}/{name}/kernel") for name in ("query", "key", "value")]
    # (W, H, D) -> (H*D, W): torch splits the projected width into heads head-major, as the
    # (H, D) reshape does; timm's qkv rows are [q | k | v].
    state = {f"{timm}.qkv.weight": np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels])}
    if entries.has(f"{jax}/query/bias"):
        biases = [entries.take(f"{jax}/{name}/bias") for name in ("query", "key", "value")]
        state[f"{timm}.qkv.bias"] = np.concatenate([b.reshape(-1) for b in biases])
    out_kernel = entries.take(f"{jax}/out/kernel")  # (H, D, W)
    state[f"{timm}.proj.weight"] = out_kernel.reshape(-1, out_kernel.shape[-1]).T
    state[f"{timm}.proj.bias"] = entries.take(f"{jax}/out/bias")
    return state


def _head_arrays(head: Head, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (W, C), bias (C,)) from a Flax Dense's params or a (kernel, bias) pair."""
    if isinstance(head, Mapping):
        head = unwrap_variables(head)
        if set(head) != {"kernel", "bias"}:
            raise ValueError(f"head must hold a Dense's 'kernel' and 'bias', got {sorted(head)}")
        kernel, bias = head["kernel"], head["bias"]
    else:
        kernel, bias = head
    kernel, bias = np.asarray(kernel, dtype), np.asarray(bias, dtype)
    if kernel.ndim != 2 or bias.shape != kernel.shape[1:]:
        raise ValueError(
            f"head kernel must be (width, classes) and bias (classes,), got {kernel.shape} and "
            f"{bias.shape}"
        )
    return kernel, bias


def to_timm_state_dict(
    vit_params: ParamTree, vit: Any, head: Head | None = None, *, dtype: Any = np.float32
) -> StateDict:
    """Map the ViT's ``params`` (or ``variables``) and an optional classifier ``head`` to timm
    ``VisionTransformer``'s state dict (NumPy arrays, contiguous).

    ``vit`` is the ``VisionTransformer`` (or a mapping of its fields). Pass the image tower's own
    tree (``params["image_encoder"]`` of a two-tower model); leaves must be fully addressable
    (gather sharded arrays first). A ViT with its own projection takes no ``head``. Raises
    ``ValueError`` for options timm cannot express, parameters timm has no place for, and keys or
    shapes other than timm's.
    """
    _check_supported(vit)
    entries = Entries(
        flatten(unwrap_variables(vit_params)), lambda v: np.asarray(v, dtype=dtype), "ViT params"
    )
    take = entries.take
    state: StateDict = vit_stem_to_timm(entries)
    for index in range(entries.block_count(r"transformer/resblocks_(\d+)/")):
        jax, timm = f"transformer/resblocks_{index}", f"blocks.{index}"
        state.update(layer_norm_to_torch(entries, f"{jax}/ln_1", f"{timm}.norm1"))
        state.update(_attention_to_timm(entries, f"{jax}/attn", f"{timm}.attn"))
        state.update(layer_norm_to_torch(entries, f"{jax}/ln_2", f"{timm}.norm2"))
        state.update(linear_to_torch(entries, f"{jax}/mlp/c_fc", f"{timm}.mlp.fc1"))
        state.update(linear_to_torch(entries, f"{jax}/mlp/c_proj", f"{timm}.mlp.fc2"))
    state.update(layer_norm_to_torch(entries, "ln_post", "norm"))
    if entries.has("proj"):
        if head is not None:
            raise ValueError("the ViT has its own projection `proj`: it is the head, pass no head")
        proj = take("proj")  # (W, O), used as x @ proj (+ proj_bias)
        state["head.weight"] = proj.T
        has_bias = entries.has("proj_bias")
        state["head.bias"] = take("proj_bias") if has_bias else np.zeros(proj.shape[1], dtype)
    elif head is not None:
        kernel, bias = _head_arrays(head, dtype)
        state["head.weight"], state["head.bias"] = kernel.T, bias
    entries.check_all_taken()
    # Transposes leave strided views; safetensors and torch want contiguous buffers.
    state = {key: np.ascontiguousarray(value) for key, value in state.items()}
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    _check_shapes(state, timm_state_dict_shapes(vit, num_classes=num_classes))
    return state


def from_timm_state_dict(
    state_dict: Mapping[str, Any], vit: Any, *, dtype: Any = np.float32
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Map timm ``VisionTransformer``'s state dict to ``(vit_params, head)`` for the given ViT.

    The exact inverse of :func:`to_timm_state_dict`. With a projection (``output_dim``) timm's
    head becomes ``proj`` (and ``proj_bias``; without one the head bias must be zero) and
    ``head`` is None; without, timm's head (if any) is returned as a Dense's params
    ``{"kernel": (W, C), "bias": (C,)}``. Values may be NumPy arrays or CPU torch tensors.
    """
    _check_supported(vit)
    state_dict = {key: np.asarray(value, dtype=dtype) for key, value in state_dict.items()}
    num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    output_dim = _field(vit, "output_dim")
    if output_dim is not None and num_classes != int(output_dim):
        raise ValueError(
            f"the ViT projects to output_dim={output_dim}, but timm's head has {num_classes} "
            "outputs"
        )
    num_positions = state_dict["pos_embed"].shape[1] if "pos_embed" in state_dict else None
    _check_shapes(
        state_dict,
        timm_state_dict_shapes(vit, num_classes=num_classes, num_positions=num_positions),
    )
    width, num_heads = int(_field(vit, "width")), int(_field(vit, "num_heads"))
    head_dim = width // num_heads
    entries = Entries(state_dict, lambda v: v, "timm state dict")
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
    for index in range(int(_field(vit, "depth"))):
        timm, jax = f"blocks.{index}", f"transformer/resblocks_{index}"
        flat.update(layer_norm_from_torch(entries, f"{timm}.norm1", f"{jax}/ln_1"))
        names = ("query", "key", "value")
        for name, weight in zip(names, np.split(take(f"{timm}.attn.qkv.weight"), 3)):
            flat[f"{jax}/attn/{name}/kernel"] = weight.T.reshape(width, num_heads, head_dim)
        if entries.has(f"{timm}.attn.qkv.bias"):
            for name, bias in zip(names, np.split(take(f"{timm}.attn.qkv.bias"), 3)):
                flat[f"{jax}/attn/{name}/bias"] = bias.reshape(num_heads, head_dim)
        flat[f"{jax}/attn/out/kernel"] = take(f"{timm}.attn.proj.weight").T.reshape(
            num_heads, head_dim, width
        )
        flat[f"{jax}/attn/out/bias"] = take(f"{timm}.attn.proj.bias")
        flat.update(layer_norm_from_torch(entries, f"{timm}.norm2", f"{jax}/ln_2"))
        flat.update(linear_from_torch(entries, f"{timm}.mlp.fc1", f"{jax}/mlp/c_fc"))
        flat.update(linear_from_torch(entries, f"{timm}.mlp.fc2", f"{jax}/mlp/c_proj"))
    flat.update(layer_norm_from_torch(entries, "norm", "ln_post"))
    head = None
    if entries.has("head.weight"):
        kernel, bias = take("head.weight").T, take("head.bias")
        if output_dim is None:
            head = {"kernel": np.ascontiguousarray(kernel), "bias": bias}
        else:
            flat["proj"] = kernel
            if _field(vit, "proj_bias"):
                flat["proj_bias"] = bias
            elif np.any(bias != 0):
                raise ValueError(
                    "timm head.bias is non-zero, but the ViT's projection has no bias "
                    "(proj_bias=False)"
                )
    entries.check_all_taken()
    return unflatten({key: np.ascontiguousarray(value) for key, value in flat.items()}), head


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def save_timm_vit(
    directory: str | Path,
    vit_params: ParamTree,
    vit: Any,
    *,
    image_size: int | tuple[int, int],
    head: Head | None = None,
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
    std: tuple[float, float, float] = OPENAI_DATASET_STD,
    dtype: Any = np.float32,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (timm's local-dir / Hub layout); returns the
    directory. ``vit`` is the ``VisionTransformer`` (or a mapping of its fields), ``vit_params``
    its parameter tree, ``head`` an optional classifier (see :func:`to_timm_state_dict`),
    ``mean``/``std`` the normalisation the model was trained with."""
    state = to_timm_state_dict(vit_params, vit, head, dtype=dtype)
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    model_args = timm_model_args(vit, image_size=image_size, num_classes=num_classes)
    height, width = as_pair(image_size)
    patch = model_args["patch_size"]
    num_positions = 1 + (height // patch) * (width // patch)
    # The position embeddings must be stored for this resolution's grid (timm checks at load).
    _check_shapes(
        state,
        timm_state_dict_shapes(vit, num_classes=num_classes, num_positions=num_positions),
    )
    config = timm_hub_config(
        timm_architecture(vit), model_args, image_size=image_size, mean=mean, std=std
    )
    return write_timm_directory(directory, state, config)


def load_timm_vit(
    directory: str | Path, vit: Any
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Read a timm ViT export directory into ``(vit_params, head)`` for the given ViT; the
    directory's ``model_args`` must describe that ViT."""
    model_args, state_dict = read_timm_directory(directory)
    expected = timm_model_args(
        vit, image_size=model_args["img_size"], num_classes=model_args["num_classes"]
    )
    different = {
        name: (model_args[name], value)
        for name, value in expected.items()
        if name in model_args and model_args[name] != value
    }
    if different:
        raise ValueError(f"{directory} holds another ViT: (saved, given) {different}")
    return from_timm_state_dict(state_dict, vit)
