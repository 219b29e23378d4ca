"""A timm ``Eva`` trunk as open_clip's image tower (EVA-CLIP: "EVA01-g-14", "EVA02-B-16",
"EVA02-L-14"...) <-> the project's ViT with its EVA options: a tower family.

open_clip's ``TimmModel`` builds the trunk from ``vision_cfg.timm_model_name`` (timm_trunks.py
says which architecture each name is) and keeps it under ``visual.trunk.*``, in timm_eva.py's
layout (fused q/k/v when the architecture says ``qkv_fused``). With ``timm_proj: null`` (all of
open_clip's EVA configs) the trunk is built with ``num_classes=embed_dim`` and
``global_pool=timm_pool``, so the projection is its classifier ``visual.trunk.head`` (a Linear
*with* a bias: the ViT's ``proj`` and ``proj_bias``) and ``visual.head`` is empty; with
``timm_proj: "linear"`` it is ``visual.head.proj`` (a bias only with ``timm_proj_bias``). timm
towers ignore ``quick_gelu`` (open_clip: "timm models always use native GELU"); it then applies to
the text tower only. open_clip's configs say ``custom_text: true`` for these (CustomTextCLIP).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.export import timm_eva
from pretrain.export.open_clip import timm_trunks
from pretrain.export.open_clip.vit import check_vit_tower
from pretrain.export.state_dict_shapes import Shapes, linear_shapes
from pretrain.export.tree_io import (
    Entries,
    StateDict,
    as_pair,
    flatten,
    size_value,
    unflatten,
)
from pretrain.export.vit_fields import vit_field, vit_mlp_dim

TRUNK_PREFIX = "visual.trunk."
_JAX = "image_encoder/"

# The ViT fields a timm trunk fixes.
_TRUNK_VIT_FIELDS = (
    *("patch_size", "width", "depth", "num_heads", "mlp_dim", "pool", "layer_norm_eps"),
    *("pre_norm", "patch_bias", "use_abs_pos", "rope", "rope_theta", "rope_ref_grid"),
    *("mlp_type", "qkv_bias", "attn_inner_norm", "activation"),
)


def _comparable_vit_fields(vit: Any) -> dict[str, Any]:
    fields = {name: vit_field(vit, name) for name in _TRUNK_VIT_FIELDS}
    fields["mlp_dim"] = vit_mlp_dim(vit)
    fields["layer_norm_eps"] = float(fields["layer_norm_eps"])
    if fields["rope"]:
        ref = fields["rope_ref_grid"]
        fields["rope_ref_grid"] = None if ref is None else as_pair(ref)
        fields["rope_theta"] = float(fields["rope_theta"])
    else:
        del fields["rope_ref_grid"], fields["rope_theta"]
    return fields


# --------------------------------------------------------------------------------------------------
# Config (ViT <-> vision_cfg)
# --------------------------------------------------------------------------------------------------


def is_tower(image_encoder: Any, timm_model_name: str | None) -> bool:
    """Any ViT that open_clip's own ViT cannot be (families.py asks that first), or one named a
    trunk."""
    del image_encoder, timm_model_name
    return True


def is_vision_cfg(vision_cfg: Mapping[str, Any]) -> bool:
    """A timm trunk (families.py asks the MobileCLIP trunks first)."""
    return bool(vision_cfg.get("timm_model_name"))


def is_params(params: Entries) -> bool:
    """Never from the parameters alone: an EVA ViT's look like open_clip's ViT's."""
    del params
    return False


def vision_cfg_problems(vision_cfg: Mapping[str, Any]) -> list[str]:
    """None here: open_clip builds a timm tower from timm_* fields alone ("a valid model name
    overrides layers, width, patch_size"), which timm_trunk_wiring checks."""
    del vision_cfg
    return []


def _resolved_norms(args: Mapping[str, Any]) -> dict[str, bool]:
    """timm Eva's norm placement, fixed at construction from the pool it was built with."""
    global_pool = args.get("global_pool", "avg")
    fc_norm = args.get("use_fc_norm")
    fc_norm = global_pool == "avg" if fc_norm is None else bool(fc_norm)
    post_norm = args.get("use_post_transformer_norm")
    post_norm = (not fc_norm) if post_norm is None else bool(post_norm)
    return {"use_fc_norm": fc_norm, "use_post_transformer_norm": post_norm}


def timm_trunk_wiring(vision_cfg: Mapping[str, Any], embed_dim: int) -> dict[str, Any]:
    """How open_clip's ``TimmModel`` builds a timm EVA image tower from ``vision_cfg``.

    Returns ``{"trunk_args": timm Eva kwargs of visual.trunk, "projection": "trunk_head" |
    "head_proj" | None, "proj_bias": bool, "image_encoder": VisionTransformer kwargs,
    "image_size": (height, width)}``. The rules are TimmModel's: ``timm_proj`` null/"" or "none"
    -> the trunk is created with ``num_classes=embed_dim`` (0 for "none") and
    ``global_pool=timm_pool``, its classifier ``head`` (Linear with bias) projects; "linear" ->
    the trunk is created with its own defaults, then ``reset_classifier(0, global_pool=timm_pool)``
    (the norm placement stays that of construction) and ``visual.head.proj`` projects.
    """
    name = vision_cfg["timm_model_name"]
    base = timm_trunks.trunk_model_args(name)
    pool = vision_cfg.get("timm_pool", "avg")
    proj = vision_cfg.get("timm_proj", "linear")
    if pool not in ("token", "avg"):
        raise ValueError(f"timm_pool={pool!r}: the ViT pools with 'token' or 'avg'")
    if proj not in (None, "", "none", "linear"):
        raise ValueError(f"timm_proj={proj!r}: supported are null, 'none' and 'linear'")
    if proj == "linear":
        trunk_args = {**base, **_resolved_norms(base), "global_pool": pool, "num_classes": 0}
        projection = "head_proj"
        proj_bias = bool(vision_cfg.get("timm_proj_bias", False))
    else:
        num_classes = 0 if proj == "none" else int(embed_dim)
        trunk_args = {**base, "global_pool": pool, "num_classes": num_classes}
        projection = "trunk_head" if num_classes else None
        proj_bias = bool(num_classes)
    try:
        vit = timm_eva.vit_kwargs_from_timm(trunk_args)
    except ValueError as error:
        raise ValueError(f"timm_model_name={name!r}: {error}") from error
    trunk_size = vit.pop("image_size")
    image_size = as_pair(vision_cfg.get("image_size", 224))
    if image_size != trunk_size:
        raise ValueError(
            f"vision_cfg.image_size {image_size} != {name}'s img_size {trunk_size} (open_clip "
            "does not pass the image size to a timm trunk)"
        )
    vit["output_dim"] = int(embed_dim) if projection else None
    vit["proj_bias"] = proj_bias
    return {
        "trunk_args": trunk_args,
        "projection": projection,
        "proj_bias": proj_bias,
        "image_encoder": vit,
        "image_size": image_size,
    }


def vision_cfg(
    image_encoder: Any,
    image_size: int | tuple[int, int],
    timm_model_name: str | None,
    text_activation: str,
) -> tuple[dict[str, Any], int]:
    """``(vision_cfg, embed_dim)`` of a timm EVA trunk with the image encoder's architecture: the
    given ``timm_model_name`` (a timm_trunks.TIMM_EVA_TRUNKS name or ``local-dir:/path``), else
    the first registered trunk that matches exactly."""
    del text_activation  # the trunk keeps timm's GELU
    embed_dim = check_vit_tower(image_encoder)
    wanted = _comparable_vit_fields(image_encoder)
    candidates = [timm_model_name] if timm_model_name else list(timm_trunks.TIMM_EVA_TRUNKS)
    mismatches = []
    for name in candidates:
        config = {
            "image_size": size_value(image_size),
            "timm_model_name": name,
            "timm_model_pretrained": False,
            "timm_pool": "token" if wanted["pool"] == "cls" else "avg",
            "timm_proj": None,
        }
        try:
            wiring = timm_trunk_wiring(config, embed_dim)
        except ValueError as error:
            mismatches.append(f"{name}: {error}")
            continue
        built = _comparable_vit_fields(wiring["image_encoder"])
        differences = {k: (wanted[k], built.get(k)) for k in wanted if wanted[k] != built.get(k)}
        if not differences:
            return config, embed_dim
        mismatches.append(f"{name}: (ours, trunk's) differ in {differences}")
    raise ValueError(
        "no timm EVA trunk has the image encoder's architecture; name one with "
        "timm_model_name= (e.g. local-dir:/path to a timm config.json written by "
        "pretrain.export.timm_eva.save_timm). Tried: " + "; ".join(mismatches)
    )


def export_trunk(
    directory: Path,
    image_encoder: Any,
    params: Mapping[str, Any],
    image_size: int | tuple[int, int],
) -> str:
    """The ``timm_model_name`` for exporting this ViT (of a two-tower model's ``params``): the
    registered trunk with its architecture, else the tower's own timm export written to
    ``directory/timm_trunk`` (as ``local-dir:``; open_clip then needs that folder where it
    loads)."""
    try:
        return vision_cfg(image_encoder, image_size, None, "gelu")[0]["timm_model_name"]
    except ValueError:
        trunk_dir = Path(directory) / "timm_trunk"
        timm_eva.save_timm(trunk_dir, params["image_encoder"], image_encoder, image_size=image_size)
        return f"local-dir:{trunk_dir.resolve()}"


def jax_kwargs(
    vision_cfg: Mapping[str, Any], embed_dim: int, activation: str
) -> tuple[dict[str, Any], tuple[int, int]]:
    """``(VisionTransformer kwargs, (height, width))``: timm towers keep their own (exact) GELU
    whatever ``quick_gelu`` says."""
    del activation
    wiring = timm_trunk_wiring(vision_cfg, embed_dim)
    return wiring["image_encoder"], wiring["image_size"]


# --------------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------------


def state_dict_shapes(vision_cfg: Mapping[str, Any], embed_dim: int) -> Shapes:
    wiring = timm_trunk_wiring(vision_cfg, embed_dim)
    trunk = timm_trunks.trunk_state_dict_shapes(wiring["trunk_args"])
    shapes = {f"{TRUNK_PREFIX}{key}": shape for key, shape in trunk.items()}
    if wiring["projection"] == "head_proj":
        vit = wiring["image_encoder"]
        bias = wiring["proj_bias"]
        shapes.update(linear_shapes("visual.head.proj", vit["output_dim"], vit["width"], bias))
    return shapes


def to_torch(
    params: Entries, batch_stats: Entries, vision_cfg: Mapping[str, Any], embed_dim: int
) -> StateDict:
    """The ViT as open_clip's timm trunk (``visual.trunk.*``) and projection (see the wiring)."""
    del batch_stats  # a ViT has no running statistics
    wiring = timm_trunk_wiring(vision_cfg, embed_dim)
    image = unflatten(params.take_under(_JAX))
    proj_bias = image.pop("proj_bias", None)
    # timm_eva maps the bias-free projection to head.weight with a zero head.bias.
    trunk = timm_eva.to_timm_state_dict(image)
    state: StateDict = {}
    projection = wiring["projection"]
    if projection is None and "head.weight" in trunk:
        raise ValueError("image_encoder has a `proj`, but the trunk's config has no projection")
    if projection == "trunk_head" and proj_bias is not None:
        trunk["head.bias"] = proj_bias
    if projection == "head_proj":
        state["visual.head.proj.weight"] = trunk.pop("head.weight")
        trunk.pop("head.bias")
        if wiring["proj_bias"]:
            state["visual.head.proj.bias"] = (
                np.zeros(state["visual.head.proj.weight"].shape[0], np.float32)
                if proj_bias is None
                else proj_bias
            )
        elif proj_bias is not None and np.any(proj_bias != 0):
            raise ValueError("image_encoder/proj_bias is non-zero, but timm_proj_bias is false")
    if wiring["trunk_args"].get("qkv_fused", True):
        trunk = timm_eva.fuse_qkv(trunk)
    state.update({f"{TRUNK_PREFIX}{key}": value for key, value in trunk.items()})
    return state


def from_torch(
    state: Entries, vision_cfg: Mapping[str, Any], embed_dim: int
) -> tuple[StateDict, StateDict]:
    """``(flat params, flat batch_stats (none))`` of the ViT from the trunk and projection."""
    wiring = timm_trunk_wiring(vision_cfg, embed_dim)
    trunk = timm_eva.split_qkv(state.take_under(TRUNK_PREFIX))
    proj_bias = None
    if wiring["projection"] == "trunk_head":
        # timm_eva reads a bias-free projection; the head's bias becomes the ViT's proj_bias.
        proj_bias = trunk["head.bias"]
        trunk["head.bias"] = np.zeros_like(proj_bias)
    image = timm_eva.from_timm_state_dict(trunk, model_args=wiring["trunk_args"])
    flat = {f"{_JAX}{key}": value for key, value in flatten(image).items()}
    if wiring["projection"] == "head_proj":
        flat[f"{_JAX}proj"] = state.take("visual.head.proj.weight").T
        if wiring["proj_bias"]:
            proj_bias = state.take("visual.head.proj.bias")
    if proj_bias is not None:
        flat[f"{_JAX}proj_bias"] = proj_bias
    return flat, {}
