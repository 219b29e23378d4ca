"""The EVA-02-style ViT image tower (e.g. UTA's student) <-> timm's ``Eva`` (``eva.py``), in a
timm Hub directory (timm_hub.py says how to load one); the model arguments are timm_eva_args.py's.

A ``models.vit.VisionTransformer`` with the EVA-02 options (``from_variant("uta_base/16")``,
``"eva02_large/16"``...) is timm's ``Eva`` with ``qkv_fused=False``; the layout is
timm_common.py's, with separate projections: ``attn/{query,key,value}`` (W, H, D) are
``blocks.i.attn.{q,k,v}_proj.weight`` (H*D, W) (no key bias), ``attn/inner_norm`` (H, D) is
``blocks.i.attn.norm`` (``scale_attn_inner``), and the bias-free ``proj`` is ``head.weight`` with
a zero ``head.bias``. timm's fused layout (``attn.qkv.weight`` rows [q | k | v] with ``q_bias`` /
``v_bias``, EVA-01's) converts with :func:`split_qkv` / :func:`fuse_qkv`.

The rotary embedding has no weights: timm rebuilds it from ``use_rot_pos_emb``,
``rope_temperature`` and ``ref_feat_shape`` with the same layout (models/rope.py). ``pool``
"cls" / "gap" is ``global_pool`` "token" / "avg" with ``use_fc_norm=False``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.export.state_dict_shapes import Shapes, check_state_dict, linear_shapes, norm_shapes
from pretrain.export.timm_common import vit_from_timm, vit_shapes, vit_to_timm
from pretrain.export.timm_eva_args import (
    TIMM_LAYER_NORM_EPS,
    timm_architecture,
    timm_model_args,
    vit_kwargs_from_timm,
)
from pretrain.export.timm_hub import read_timm_directory, timm_hub_config, write_timm_directory
from pretrain.export.tree_io import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    Entries,
    StateDict,
    as_arrays,
    contiguous_tree,
    flatten,
    heads_from_torch,
    heads_to_torch,
    layer_norm_from_torch,
    layer_norm_to_torch,
    unwrap_variables,
)

__all__ = [
    "TIMM_LAYER_NORM_EPS",
    "check_state_dict_matches_args",
    "from_timm_state_dict",
    "fuse_qkv",
    "fused_qkv_shapes",
    "load_timm",
    "save_timm",
    "split_qkv",
    "timm_architecture",
    "timm_config",
    "timm_model_args",
    "timm_state_dict_shapes",
    "to_timm_state_dict",
    "vit_kwargs_from_timm",
]

ParamTree = Mapping[str, Any]


def timm_state_dict_shapes(model_args: Mapping[str, Any]) -> Shapes:
    """Keys and shapes of the state dict timm's ``Eva`` builds from ``model_args``, in the separate
    q/k/v layout (the one this module writes)."""
    kwargs = vit_kwargs_from_timm(model_args)
    width, patch = kwargs["width"], kwargs["patch_size"]
    height, image_width = kwargs["image_size"]

    def attention_shapes(prefix: str) -> Shapes:
        shapes: Shapes = {}
        for name in ("q_proj", "k_proj", "v_proj"):
            bias = kwargs["qkv_bias"] == "qv" and name != "k_proj"
            shapes.update(linear_shapes(f"{prefix}.{name}", width, width, bias=bias))
        if kwargs["attn_inner_norm"]:
            shapes.update(norm_shapes(f"{prefix}.norm", width))
        return shapes

    return vit_shapes(
        width=width,
        patch_size=patch,
        depth=kwargs["depth"],
        mlp_dim=kwargs["mlp_dim"],
        swiglu=kwargs["mlp_type"] == "swiglu",
        patch_bias=kwargs["patch_bias"],
        pre_norm=kwargs["pre_norm"],
        positions=1 + (height // patch) * (image_width // patch),
        use_abs_pos=kwargs["use_abs_pos"],
        attention_shapes=attention_shapes,
        head_outputs=kwargs["output_dim"] or 0,
    )


def check_state_dict_matches_args(
    state_dict: Mapping[str, Any], model_args: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or mis-shaped key."""
    check_state_dict(
        state_dict,
        timm_state_dict_shapes(model_args),
        mismatch="state dict does not match the timm Eva arguments",
    )


# --------------------------------------------------------------------------------------------------
# Parameters (JAX tree <-> timm state dict)
# --------------------------------------------------------------------------------------------------

_PROJECTIONS = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))


def _attention_to_timm(entries: Entries, jax: str, timm: str) -> StateDict:
    state: StateDict = {}
    for jax_name, timm_name in _PROJECTIONS:
        state[f"{timm}.{timm_name}.weight"] = heads_to_torch(
            entries.take(f"{jax}/{jax_name}/kernel")
        )
        if entries.has(f"{jax}/{jax_name}/bias"):
            bias = entries.take(f"{jax}/{jax_name}/bias")
            state[f"{timm}.{timm_name}.bias"] = bias.reshape(-1)
    if entries.has(f"{jax}/inner_norm/scale"):
        state.update(layer_norm_to_torch(entries, f"{jax}/inner_norm", f"{timm}.norm"))
    return state


def _attention_from_timm(num_heads: int):
    def attention_from_timm(entries: Entries, timm: str, jax: str) -> StateDict:
        flat: StateDict = {}
        for jax_name, timm_name in _PROJECTIONS:
            weight = entries.take(f"{timm}.{timm_name}.weight")  # (H*D, W)
            flat[f"{jax}/{jax_name}/kernel"] = heads_from_torch(weight, num_heads)
            if entries.has(f"{timm}.{timm_name}.bias"):
                bias = entries.take(f"{timm}.{timm_name}.bias")
                flat[f"{jax}/{jax_name}/bias"] = bias.reshape(num_heads, -1)
        if entries.has(f"{timm}.norm.weight"):
            inner_norm = (f"{timm}.norm", f"{jax}/inner_norm", (num_heads, -1))
            flat.update(layer_norm_from_torch(entries, *inner_norm))
        return flat

    return attention_from_timm


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
    entries = Entries(flatten(unwrap_variables(params)), as_arrays(dtype), "ViT params")
    state = vit_to_timm(entries, _attention_to_timm)
    if entries.has("proj"):
        proj = entries.take("proj")  # (W, O): the ViT projects without a bias
        state["head.weight"] = proj.T
        state["head.bias"] = np.zeros(proj.shape[1], dtype)
    entries.check_all_taken()
    # Transposes leave strided views; safetensors and torch want contiguous buffers.
    state = {key: np.ascontiguousarray(value) for key, value in state.items()}
    if model_args is not None:
        check_state_dict_matches_args(state, model_args)
    return state


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
    state_dict = split_qkv(
        {key: value for key, value in state_dict.items() if not key.startswith("rope.")}
    )
    check_state_dict_matches_args(state_dict, model_args)
    kwargs = vit_kwargs_from_timm(model_args)
    entries = Entries(state_dict, as_arrays(dtype), "timm state dict")
    flat = vit_from_timm(
        entries,
        width=kwargs["width"],
        depth=kwargs["depth"],
        num_heads=kwargs["num_heads"],
        swiglu=kwargs["mlp_type"] == "swiglu",
        attention_from_timm=_attention_from_timm(kwargs["num_heads"]),
    )
    if entries.has("head.weight"):
        if np.any(entries.take("head.bias") != 0):
            raise ValueError(
                "timm head.bias is non-zero, but the ViT's projection `proj` has no bias"
            )
        flat["proj"] = entries.take("head.weight").T
    entries.check_all_taken()
    return contiguous_tree(flat)


# timm's fused attention (``attn.qkv.weight`` rows [q | k | v], ``q_bias``, ``v_bias``) and the
# separate one (``attn.{q,k,v}_proj``).
_FUSED_KEY = re.compile(r"(.*blocks\.\d+\.attn)\.(qkv\.weight|q_bias|v_bias)")
_SEPARATE_KEY = re.compile(r"(.*\.attn)\.([qkv])_proj\.(weight|bias)")


def split_qkv(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """timm's fused attention weights as separate ``q_proj``/``k_proj``/``v_proj``; other entries
    unchanged."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        match = _FUSED_KEY.fullmatch(key)
        if match is None:
            out[key] = value
        elif match.group(2) == "qkv.weight":
            for name, part in zip("qkv", np.split(np.asarray(value), 3, axis=0)):
                out[f"{match.group(1)}.{name}_proj.weight"] = part
        else:
            out[f"{match.group(1)}.{match.group(2)[0]}_proj.bias"] = value
    return out


def fuse_qkv(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`split_qkv`. The key projection must have no bias (timm's fused
    attention keeps a zero ``k_bias`` buffer)."""
    out = {key: value for key, value in state_dict.items() if not _SEPARATE_KEY.fullmatch(key)}
    prefixes = sorted(
        {
            m.group(1)
            for key in state_dict
            if (m := _SEPARATE_KEY.fullmatch(key)) and m.group(2) == "q"
        }
    )
    for prefix in prefixes:
        if f"{prefix}.k_proj.bias" in state_dict:
            raise ValueError(f"{prefix}: timm's fused attention has no key bias")
        out[f"{prefix}.qkv.weight"] = np.concatenate(
            [np.asarray(state_dict[f"{prefix}.{name}_proj.weight"]) for name in "qkv"], axis=0
        )
        for name in "qv":
            if f"{prefix}.{name}_proj.bias" in state_dict:
                out[f"{prefix}.{name}_bias"] = state_dict[f"{prefix}.{name}_proj.bias"]
    return out


def fused_qkv_shapes(shapes: Mapping[str, Any]) -> Shapes:
    """:func:`timm_state_dict_shapes` in timm's fused layout (``qkv_fused=True``)."""
    fused: Shapes = {}
    for key, shape in shapes.items():
        match = _SEPARATE_KEY.fullmatch(key)
        if match is None:
            fused[key] = shape
        elif match.group(3) == "bias":
            fused[f"{match.group(1)}.{match.group(2)}_bias"] = shape
        elif match.group(2) == "q":
            fused[f"{match.group(1)}.qkv.weight"] = (3 * shape[0], shape[1])
    return fused


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
