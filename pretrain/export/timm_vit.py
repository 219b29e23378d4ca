"""The CLIP-style ViT image tower (e.g. CatLIP's classifier) <-> timm's ``VisionTransformer``
(``vision_transformer.py``), in a timm Hub directory (timm_hub.py says how to load one); the
model arguments and architecture names are timm_vit_args.py's.

The layout is timm_common.py's, with timm's fused attention: ``attn/{query,key,value}`` (W, H, D)
are ``blocks.i.attn.qkv.weight`` (3 H*D, W), rows [q | k | v], and ``qkv.bias`` (``qkv_bias``).
The head is one of: (a) a classifier given beside the ViT (``head=`` a Flax Dense's params
``{"kernel": (W, C), "bias": (C,)}`` or a ``(kernel, bias)`` pair), as CatLIP's ViT with
``output_dim=None`` followed by its synset classifier; (b) the ViT's own projection ``proj``
(``head.bias`` = ``proj_bias``, zero without); (c) none (``num_classes=0``: ``model(x)`` is the
pooled embedding). ``pool`` "cls" / "gap" is ``global_pool`` "token" / "avg" with
``fc_norm=False``; ``activation="quick_gelu"`` is ``act_layer="quick_gelu"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.export.state_dict_shapes import Shapes, check_state_dict
from pretrain.export.timm_common import vit_from_timm, vit_shapes, vit_to_timm
from pretrain.export.timm_hub import read_timm_directory, timm_hub_config, write_timm_directory
from pretrain.export.timm_vit_args import (
    ARCHITECTURE_NAMES,
    check_supported,
    timm_architecture,
    timm_model_args,
)
from pretrain.export.tree_io import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    Entries,
    StateDict,
    as_arrays,
    as_pair,
    contiguous_tree,
    flatten,
    heads_from_torch,
    heads_to_torch,
    unwrap_variables,
)
from pretrain.export.vit_fields import vit_field, vit_mlp_dim

__all__ = [
    "ARCHITECTURE_NAMES",
    "from_timm_state_dict",
    "load_timm_vit",
    "save_timm_vit",
    "timm_architecture",
    "timm_model_args",
    "timm_state_dict_shapes",
    "to_timm_state_dict",
]

ParamTree = Mapping[str, Any]
Head = Mapping[str, Any] | Sequence[Any]


def timm_state_dict_shapes(
    vit: Any, *, num_classes: int, num_positions: int | None = None
) -> Shapes:
    """Keys and shapes of timm's ``VisionTransformer`` state dict for this ViT. ``num_positions``
    (1 + patches) may be None: then the ``pos_embed`` length reads ``None`` and is not checked."""
    width = int(vit_field(vit, "width"))
    qkv_bias = vit_field(vit, "qkv_bias") == "qkv"

    def attention_shapes(prefix: str) -> Shapes:
        shapes: Shapes = {f"{prefix}.qkv.weight": (3 * width, width)}
        if qkv_bias:
            shapes[f"{prefix}.qkv.bias"] = (3 * width,)
        return shapes

    return vit_shapes(
        width=width,
        patch_size=int(vit_field(vit, "patch_size")),
        depth=int(vit_field(vit, "depth")),
        mlp_dim=vit_mlp_dim(vit),
        swiglu=False,
        patch_bias=bool(vit_field(vit, "patch_bias")),
        pre_norm=bool(vit_field(vit, "pre_norm")),
        positions=num_positions,
        use_abs_pos=bool(vit_field(vit, "use_abs_pos")),
        attention_shapes=attention_shapes,
        head_outputs=num_classes,
    )


def _check_shapes(state: Mapping[str, Any], expected: Shapes) -> None:
    check_state_dict(
        state, expected, mismatch="state dict does not match timm's VisionTransformer for this ViT"
    )


# --------------------------------------------------------------------------------------------------
# Parameters (JAX tree <-> timm state dict)
# --------------------------------------------------------------------------------------------------

_QKV = ("query", "key", "value")


def _qkv_to_timm(entries: Entries, jax: str, timm: str) -> StateDict:
    # timm's fused qkv rows are [q | k | v], each head-major.
    kernels = [entries.take(f"{jax}/{name}/kernel") for name in _QKV]
    state = {f"{timm}.qkv.weight": np.concatenate([heads_to_torch(k) for k in kernels])}
    if entries.has(f"{jax}/query/bias"):
        biases = [entries.take(f"{jax}/{name}/bias") for name in _QKV]
        state[f"{timm}.qkv.bias"] = np.concatenate([b.reshape(-1) for b in biases])
    return state


def _qkv_from_timm(num_heads: int):
    def qkv_from_timm(entries: Entries, timm: str, jax: str) -> StateDict:
        flat = {
            f"{jax}/{name}/kernel": heads_from_torch(weight, num_heads)
            for name, weight in zip(_QKV, np.split(entries.take(f"{timm}.qkv.weight"), 3))
        }
        if entries.has(f"{timm}.qkv.bias"):
            for name, bias in zip(_QKV, np.split(entries.take(f"{timm}.qkv.bias"), 3)):
                flat[f"{jax}/{name}/bias"] = bias.reshape(num_heads, -1)
        return flat

    return qkv_from_timm


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


def _head_outputs(state: Mapping[str, Any]) -> int:
    return state["head.weight"].shape[0] if "head.weight" in state else 0


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
    check_supported(vit)
    entries = Entries(flatten(unwrap_variables(vit_params)), as_arrays(dtype), "ViT params")
    take = entries.take
    state = vit_to_timm(entries, _qkv_to_timm)
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
    _check_shapes(state, timm_state_dict_shapes(vit, num_classes=_head_outputs(state)))
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
    check_supported(vit)
    state_dict = {key: np.asarray(value, dtype=dtype) for key, value in state_dict.items()}
    num_classes = _head_outputs(state_dict)
    output_dim = vit_field(vit, "output_dim")
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
    num_heads = int(vit_field(vit, "num_heads"))
    entries = Entries(state_dict, lambda value: value, "timm state dict")
    take = entries.take
    flat = vit_from_timm(
        entries,
        width=int(vit_field(vit, "width")),
        depth=int(vit_field(vit, "depth")),
        num_heads=num_heads,
        swiglu=False,
        attention_from_timm=_qkv_from_timm(num_heads),
    )
    head = None
    if entries.has("head.weight"):
        kernel, bias = take("head.weight").T, take("head.bias")
        if output_dim is None:
            head = {"kernel": np.ascontiguousarray(kernel), "bias": bias}
        else:
            flat["proj"] = kernel
            if vit_field(vit, "proj_bias"):
                flat["proj_bias"] = bias
            elif np.any(bias != 0):
                raise ValueError(
                    "timm head.bias is non-zero, but the ViT's projection has no bias "
                    "(proj_bias=False)"
                )
    entries.check_all_taken()
    return contiguous_tree(flat), head


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
    num_classes = _head_outputs(state)
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
