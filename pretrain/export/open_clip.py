"""Export the project's CLIP / SigLIP two-tower models (ViT, ResNet or MobileCLIP image tower) to
PyTorch open_clip, and import back.

The JAX parameter tree (``models.two_tower.TwoTowerModel`` with a ``VisionTransformer`` image tower
and a ``TextTransformer`` text tower) maps one-to-one onto open_clip's ``CLIP`` class; only the
layouts differ:

====================================  =============================================================
JAX (Flax ``params``)                  open_clip ``state_dict``
====================================  =============================================================
``conv1/kernel`` (p, p, 3, W) HWIO    ``visual.conv1.weight`` (W, 3, p, p) OIHW
Dense ``kernel`` (in, out)            Linear ``weight`` (out, in)
``attn/{query,key,value}`` (W, H, D)  ``attn.in_proj_weight`` (3W, W) rows [q | k | v], head-major
``attn/out/kernel`` (H, D, W)         ``attn.out_proj.weight`` (W, H*D)
LayerNorm ``scale``                   LayerNorm ``weight``
``proj`` / ``text_projection``        the same matrix: open_clip computes ``x @ proj`` too
``logit_scale`` (a log)               ``logit_scale`` (a log); ``logit_bias`` as is (SigLIP)
====================================  =============================================================

An export directory holds ``open_clip_model.safetensors`` and ``open_clip_config.json``
(``{"model_cfg": ..., "preprocess_cfg": ...}``), the two files open_clip reads from a local
directory or from a Hugging Face Hub repository. A user loads it with::

    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:/path/to/export")
    tokenizer = open_clip.get_tokenizer("local-dir:/path/to/export")
    model.eval()

(after uploading the directory's files to a Hub repository: ``"hf-hub:<user>/<repo>"`` instead).
When ``save_open_clip`` is given a ``name``, it also writes ``<name>.json``, the bare model config
that open_clip's registry takes::

    open_clip.add_model_config("/path/to/export/<name>.json")
    weights = "/path/to/export/open_clip_model.safetensors"
    model = open_clip.create_model("<name>", pretrained=weights)

The reverse direction, ``load_open_clip`` / ``from_open_clip_state_dict``, turns an open_clip
checkpoint (safetensors, or a torch ``.pt``/``.bin`` when torch is installed) into this project's
parameter tree, and ``jax_model_kwargs`` says how to build the matching JAX model.

Everything is derived from the parameter tree and the config (depth from the number of blocks,
heads from the ``(W, H, D)`` kernels), so any width, depth, patch size and image size works, not
only ViT-B/16. ``quick_gelu: true`` (OpenAI's models) is the towers' ``activation="quick_gelu"``.

EVA-CLIP (open_clip "EVA01-g-14", "EVA02-B-16", "EVA02-L-14"...): the image tower is a timm ``Eva``
(``vision_cfg.timm_model_name``, architectures in pretrain/export/timm_trunks.py) under
``visual.trunk.*``, mapped by pretrain/export/timm_eva.py onto the ViT's EVA options. With
``timm_proj: null`` (all of open_clip's EVA configs) open_clip builds the trunk with
``num_classes=embed_dim`` and ``global_pool=timm_pool``, so the projection is the trunk's
classifier ``visual.trunk.head`` (a Linear *with* a bias: the ViT's ``proj`` and ``proj_bias``)
and ``visual.head`` is empty; with ``timm_proj: "linear"`` it is ``visual.head.proj`` (a bias only
with ``timm_proj_bias``). timm towers ignore ``quick_gelu`` (open_clip: "timm models always use
native GELU"); it then applies to the text tower only. ``custom_text: true`` (CustomTextCLIP, as
the EVA configs say) keeps the same text tower under ``text.``.

ResNet (open_clip "RN50", "RN101", "RN50x4"...): a ``models.resnet.ModifiedResNet`` image tower
maps onto open_clip's ``ModifiedResNet`` (``vision_cfg.layers`` a list), mapped by
pretrain/export/open_clip_resnet.py. Its BatchNorm running statistics are the Flax
``batch_stats`` collection, so the export takes them (``batch_stats=``, or a ``variables`` dict
with both collections) and the import returns both (``from_open_clip_variables``,
``load_open_clip_variables``; the params-only functions refuse such a model rather than drop the
statistics).

MobileCLIP (open_clip "MobileCLIP-S1", "MobileCLIP-S2", and "MobileCLIP2-S0" with fastvit_mci0):
a ``models.mobileclip.MobileClipImageTower`` that is exactly timm's
``fastvit_mci0/1/2`` becomes that timm trunk under ``visual.trunk.*`` with its classifier
``head.fc`` as the projection (``timm_pool: avg``, ``timm_proj: null``, ``custom_text: true``),
mapped by pretrain/export/open_clip_mobileclip.py; like the ResNet, its BatchNorm statistics
travel as ``batch_stats``.

Options open_clip has but this project's towers do not (layer scale, attentional pooling, other
timm or Hugging Face towers...) are rejected with their config field's name.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.export import open_clip_mobileclip, open_clip_resnet, timm_eva, timm_trunks
from pretrain.export.tree_io import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    Entries,
    block_count,
    flatten,
    unflatten,
    unwrap_variables,
    write_atomically,
)

WEIGHTS_FILE_NAME = "open_clip_model.safetensors"
CONFIG_FILE_NAME = "open_clip_config.json"
# open_clip's defaults (OpenAI CLIP's normalisation); a recipe trained with other statistics passes
# its own through ``preprocess_cfg``.
OPEN_CLIP_LAYER_NORM_EPS = 1e-5
OPEN_CLIP_HEAD_WIDTH = 64
OPEN_CLIP_TEXT_HEADS = 8
OPEN_CLIP_MLP_RATIO = 4.0

# Pooling names: this project's ViT ``pool`` field -> open_clip's ``vision_cfg.pool_type``.
_VISION_POOL_TO_OPEN_CLIP = {"cls": "tok", "gap": "avg"}
_VISION_POOL_FROM_OPEN_CLIP = {v: k for k, v in _VISION_POOL_TO_OPEN_CLIP.items()}

# The ViT's EVA-02 options (models/vit.py) at their CLIP values; other values export through timm
# (pretrain/export/timm_eva.py), not open_clip.
_CLIP_VIT_OPTIONS: dict[str, Any] = {
    "pre_norm": True,
    "patch_bias": False,
    "use_abs_pos": True,
    "rope": False,
    "mlp_type": "gelu",
    "qkv_bias": "qkv",
    "attn_inner_norm": False,
}

# open_clip config fields whose non-default values change the network in ways this project's towers
# cannot express. Each maps to the value(s) this mapping supports.
_UNSUPPORTED_VISION_FIELDS: dict[str, tuple[Any, ...]] = {
    "pool_type": ("tok", "avg"),
    "ls_init_value": (None,),
    "attentional_pool": (False,),
    "no_ln_pre": (False,),
    "pos_embed_type": ("learnable",),
    "final_ln_after_pool": (False,),
    "act_kwargs": (None,),
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
}
_UNSUPPORTED_TEXT_FIELDS: dict[str, tuple[Any, ...]] = {
    "ls_init_value": (None,),
    "embed_cls": (False,),
    "final_ln_after_pool": (False,),
    "pool_type": ("argmax",),
    "proj_bias": (False,),
    "act_kwargs": (None,),
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
    "hf_model_name": (None,),
}
_UNSUPPORTED_TOP_FIELDS: dict[str, tuple[Any, ...]] = {
    "nonscalar_logit_scale": (False,),
    "multimodal_cfg": (None,),
}

ParamTree = Mapping[str, Any]
# The Flax variable collections an exported model may carry.
VARIABLE_COLLECTIONS = {"params", "batch_stats"}
StateDict = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------------
# Model config (JAX hyper-parameters <-> open_clip model_cfg JSON)
# --------------------------------------------------------------------------------------------------


def _field(tower: Any, name: str, default: Any = None) -> Any:
    """A hyper-parameter of a tower given as a Flax module instance (a dataclass) or a mapping."""
    if isinstance(tower, Mapping):
        return tower.get(name, default)
    return getattr(tower, name, default)


def _mlp_ratio(width: int, mlp_dim: int) -> float:
    """An ``mlp_ratio`` for which open_clip's ``int(width * mlp_ratio)`` gives back ``mlp_dim``.

    A plain ``mlp_dim / width`` can land a hair below the integer after the multiplication
    (e.g. 2.6667-style ratios) and open_clip truncates, so nudge by half a unit when it does.
    """
    ratio = mlp_dim / width
    if int(width * ratio) != mlp_dim:
        ratio = (mlp_dim + 0.5) / width
    return ratio


def _norm_kwargs(eps: float) -> dict[str, Any]:
    return {} if eps == OPEN_CLIP_LAYER_NORM_EPS else {"norm_kwargs": {"eps": eps}}


def _image_size_value(image_size: int | tuple[int, int] | list[int]) -> int | list[int]:
    if isinstance(image_size, int):
        return image_size
    height, width = image_size
    return height if height == width else [int(height), int(width)]


def _activation_of(tower: Any) -> str:
    activation = _field(tower, "activation", "gelu") or "gelu"
    if activation not in ("gelu", "quick_gelu"):
        raise ValueError(f"activation {activation!r} has no open_clip equivalent")
    return activation


def _native_vision_cfg(image_encoder: Any, image_size: int | tuple[int, int]) -> dict[str, Any]:
    """``vision_cfg`` of open_clip's own ViT (the CLIP options of the project's ViT)."""
    eva_options = {
        name: _field(image_encoder, name, clip_value)
        for name, clip_value in _CLIP_VIT_OPTIONS.items()
        if _field(image_encoder, name, clip_value) != clip_value
    }
    if eva_options:
        raise ValueError(
            f"image_encoder uses EVA-02 options {eva_options} that open_clip's ViT lacks, and "
            "no timm EVA trunk was asked for"
        )
    if _field(image_encoder, "proj_bias", False):
        raise ValueError("image_encoder.proj_bias: open_clip's ViT projects without a bias")
    vision_width = int(_field(image_encoder, "width"))
    vision_heads = int(_field(image_encoder, "num_heads"))
    if vision_width % vision_heads:
        raise ValueError(f"ViT width {vision_width} is not divisible by num_heads {vision_heads}")
    pool = _field(image_encoder, "pool", "cls")
    if pool not in _VISION_POOL_TO_OPEN_CLIP:
        raise ValueError(
            f"ViT pool {pool!r} has no open_clip equivalent {list(_VISION_POOL_TO_OPEN_CLIP)}"
        )
    vision_mlp_dim = _field(image_encoder, "mlp_dim") or 4 * vision_width
    return {
        "image_size": _image_size_value(image_size),
        "layers": int(_field(image_encoder, "depth")),
        "width": vision_width,
        "patch_size": int(_field(image_encoder, "patch_size")),
        "head_width": vision_width // vision_heads,
        "mlp_ratio": _mlp_ratio(vision_width, int(vision_mlp_dim)),
        "pool_type": _VISION_POOL_TO_OPEN_CLIP[pool],
        **_norm_kwargs(float(_field(image_encoder, "layer_norm_eps", OPEN_CLIP_LAYER_NORM_EPS))),
    }


# The ViT fields a timm trunk fixes, with the ViT's defaults (models/vit.py) for a tower given as a
# mapping that omits some; mlp_dim None means 4 * width.
_TRUNK_VIT_FIELDS: dict[str, Any] = {
    "patch_size": None,
    "width": None,
    "depth": None,
    "num_heads": None,
    "mlp_dim": None,
    "pool": "cls",
    "layer_norm_eps": 1e-5,
    "pre_norm": True,
    "patch_bias": False,
    "use_abs_pos": True,
    "rope": False,
    "rope_theta": 10000.0,
    "rope_ref_grid": None,
    "mlp_type": "gelu",
    "qkv_bias": "qkv",
    "attn_inner_norm": False,
    "activation": "gelu",
}


def _comparable_vit_fields(vit: Any) -> dict[str, Any]:
    fields = {name: _field(vit, name, default) for name, default in _TRUNK_VIT_FIELDS.items()}
    fields["mlp_dim"] = int(fields["mlp_dim"] or 4 * int(fields["width"]))
    fields["layer_norm_eps"] = float(fields["layer_norm_eps"])
    if fields["rope"]:
        ref = fields["rope_ref_grid"]
        fields["rope_ref_grid"] = None if ref is None else _as_pair(ref)
        fields["rope_theta"] = float(fields["rope_theta"])
    else:
        del fields["rope_ref_grid"], fields["rope_theta"]
    return fields


def _trunk_vision_cfg(
    image_encoder: Any, image_size: int | tuple[int, int], timm_model_name: str | None
) -> dict[str, Any]:
    """``vision_cfg`` of a timm EVA trunk with the image encoder's architecture: the given
    ``timm_model_name``, else the first of timm_trunks.TIMM_EVA_TRUNKS that matches exactly."""
    embed_dim = int(_field(image_encoder, "output_dim"))
    wanted = _comparable_vit_fields(image_encoder)
    candidates = [timm_model_name] if timm_model_name else list(timm_trunks.TIMM_EVA_TRUNKS)
    mismatches = []
    for name in candidates:
        vision_cfg = {
            "image_size": _image_size_value(image_size),
            "timm_model_name": name,
            "timm_model_pretrained": False,
            "timm_pool": "token" if wanted["pool"] == "cls" else "avg",
            "timm_proj": None,
        }
        try:
            wiring = timm_trunk_wiring(vision_cfg, embed_dim)
        except ValueError as error:
            mismatches.append(f"{name}: {error}")
            continue
        built = _comparable_vit_fields(wiring["image_encoder"])
        differences = {k: (wanted[k], built.get(k)) for k in wanted if wanted[k] != built.get(k)}
        if not differences:
            return vision_cfg
        mismatches.append(f"{name}: (ours, trunk's) differ in {differences}")
    raise ValueError(
        "no timm EVA trunk has the image encoder's architecture; name one with "
        "timm_model_name= (e.g. local-dir:/path to a timm config.json written by "
        "pretrain.export.timm_eva.save_timm). Tried: " + "; ".join(mismatches)
    )


def is_open_clip_vit(image_encoder: Any) -> bool:
    """True when the ViT is open_clip's own (CLIP-style) ViT, not one needing a timm trunk."""
    return all(
        _field(image_encoder, name, clip_value) == clip_value
        for name, clip_value in _CLIP_VIT_OPTIONS.items()
    )


def registered_timm_trunk(image_encoder: Any, image_size: int | tuple[int, int]) -> str | None:
    """The timm_trunks.TIMM_EVA_TRUNKS name with exactly this ViT's architecture, if any."""
    try:
        return _trunk_vision_cfg(image_encoder, image_size, None)["timm_model_name"]
    except ValueError:
        return None


def _vit_vision_cfg(
    image_encoder: Any,
    image_size: int | tuple[int, int],
    timm_model_name: str | None,
    text_activation: str,
) -> tuple[dict[str, Any], int]:
    """``(vision_cfg, embed_dim)`` of a ViT image tower: open_clip's own ViT or a timm trunk."""
    for name in ("patch_size", "width", "depth", "num_heads"):
        if _field(image_encoder, name) is None:
            raise ValueError(
                f"image_encoder has no {name!r}: only ViT, ModifiedResNet and MobileCLIP image "
                "towers export to open_clip (other towers export through timm)"
            )
    embed_dim = _field(image_encoder, "output_dim")
    if embed_dim is None:
        raise ValueError(
            "image_encoder.output_dim is None: open_clip's ViT always has a `proj` matrix, so "
            "export a model whose image tower projects to the joint embedding"
        )
    is_clip_vit = is_open_clip_vit(image_encoder)
    if is_clip_vit and timm_model_name is None:
        vision_cfg = _native_vision_cfg(image_encoder, image_size)
        if _activation_of(image_encoder) != text_activation:
            raise ValueError(
                f"image activation {_activation_of(image_encoder)!r} != text activation "
                f"{text_activation!r}: open_clip has one quick_gelu flag for both towers"
            )
    else:
        vision_cfg = _trunk_vision_cfg(image_encoder, image_size, timm_model_name)
    return vision_cfg, int(embed_dim)


def open_clip_model_config(
    image_encoder: Any,
    text_encoder: Any,
    *,
    image_size: int | tuple[int, int],
    init_logit_bias: float | None = None,
    timm_model_name: str | None = None,
) -> dict[str, Any]:
    """open_clip's model config (``embed_dim``, ``vision_cfg``, ``text_cfg``...) for a JAX model.

    ``image_encoder`` / ``text_encoder`` are the ``VisionTransformer`` / ``TextTransformer`` module
    instances (e.g. ``model.image_encoder``) or mappings with the same field names. ``image_size``
    is the training resolution (the ViT does not store it; its position embeddings fix it).
    ``init_logit_bias`` is the model's ``logit_bias_init`` for a SigLIP model: its presence makes
    open_clip create the ``logit_bias`` parameter (the exported value overwrites it).

    A CLIP-style ViT becomes open_clip's own ViT. open_clip derives its heads as
    ``width // head_width``, so the config states ``head_width = width / num_heads`` (any head
    count that divides the width round-trips); the text tower takes ``heads`` directly. An
    EVA-style ViT (or any ViT when ``timm_model_name`` is given) becomes a timm trunk with its
    classifier head as the projection (``timm_proj: null``, ``custom_text: true``, as open_clip's
    EVA configs): ``timm_model_name`` names it (a timm_trunks.TIMM_EVA_TRUNKS name or
    ``local-dir:/path``), else the registered trunk with exactly this architecture is found.

    A ``models.resnet.ModifiedResNet`` image tower becomes open_clip's ``ModifiedResNet`` (see
    pretrain/export/open_clip_resnet.py); ``image_size`` must then be square, a multiple of 32.
    A ``models.mobileclip.MobileClipImageTower`` becomes timm's registered ``fastvit_mci0/1/2``
    trunk, as in open_clip's MobileCLIP-S1/S2 configs (see pretrain/export/open_clip_mobileclip.py);
    a given ``timm_model_name`` must be that name.
    """
    text_activation = _activation_of(text_encoder)
    if open_clip_mobileclip.is_mobileclip_tower(image_encoder):
        # GELU inside timm whatever quick_gelu says: the flag then concerns the text tower alone.
        vision_cfg, embed_dim = open_clip_mobileclip.mobileclip_vision_cfg(
            image_encoder, image_size
        )
        if timm_model_name not in (None, vision_cfg["timm_model_name"]):
            raise ValueError(
                f"timm_model_name={timm_model_name!r}, but the MobileCLIP image tower is timm's "
                f"{vision_cfg['timm_model_name']}"
            )
    elif open_clip_resnet.is_resnet_tower(image_encoder):
        if timm_model_name is not None:
            raise ValueError("timm_model_name applies to ViT image towers, not to a ResNet")
        # A ReLU tower: open_clip's quick_gelu flag then concerns the text tower alone.
        vision_cfg = open_clip_resnet.resnet_vision_cfg(image_encoder, image_size)
        embed_dim = open_clip_resnet.embed_dim_of(image_encoder)
    else:
        vision_cfg, embed_dim = _vit_vision_cfg(
            image_encoder, image_size, timm_model_name, text_activation
        )

    text_width = int(_field(text_encoder, "width"))
    text_mlp_dim = _field(text_encoder, "mlp_dim") or 4 * text_width
    text_output_dim = _field(text_encoder, "output_dim")
    if text_output_dim is not None and text_output_dim != embed_dim:
        raise ValueError(
            f"text_encoder.output_dim {text_output_dim} != image_encoder.output_dim {embed_dim}: "
            "open_clip has one embed_dim for both towers"
        )
    if text_output_dim is None and text_width != embed_dim:
        raise ValueError(
            f"the text tower has no projection, so its width {text_width} must equal embed_dim "
            f"{embed_dim}"
        )
    text_cfg = {
        "context_length": int(_field(text_encoder, "context_length")),
        "vocab_size": int(_field(text_encoder, "vocab_size")),
        "width": text_width,
        "heads": int(_field(text_encoder, "num_heads")),
        "layers": int(_field(text_encoder, "depth")),
        "mlp_ratio": _mlp_ratio(text_width, int(text_mlp_dim)),
        "no_causal_mask": not _field(text_encoder, "causal", True),
        **({} if text_output_dim is not None else {"proj_type": "none"}),
        **_norm_kwargs(float(_field(text_encoder, "layer_norm_eps", OPEN_CLIP_LAYER_NORM_EPS))),
    }
    config: dict[str, Any] = {
        "embed_dim": int(embed_dim),
        "quick_gelu": text_activation == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }
    if "timm_model_name" in vision_cfg:
        config["custom_text"] = True
    if init_logit_bias is not None:
        config["init_logit_bias"] = float(init_logit_bias)
    return config


def _check_supported(model_config: Mapping[str, Any]) -> None:
    """Reject open_clip options that change the network in ways the JAX towers cannot express."""
    problems = []
    vision_cfg = model_config.get("vision_cfg", {})
    # open_clip builds a timm tower from timm_* fields alone ("a valid model name overrides
    # layers, width, patch_size"); timm_trunk_wiring checks those.
    is_timm = bool(vision_cfg.get("timm_model_name"))
    # open_clip's ModifiedResNet reads only image_size, layers, width and head_width.
    is_resnet = open_clip_resnet.is_resnet_vision_cfg(vision_cfg)
    for section, fields in (
        (model_config, _UNSUPPORTED_TOP_FIELDS),
        ({} if is_timm or is_resnet else vision_cfg, _UNSUPPORTED_VISION_FIELDS),
        (model_config.get("text_cfg", {}), _UNSUPPORTED_TEXT_FIELDS),
    ):
        for name, supported in fields.items():
            if section.get(name, supported[0]) not in supported:
                problems.append(f"{name}={section[name]!r}")
    for section_name in ("text_cfg",) if is_timm or is_resnet else ("vision_cfg", "text_cfg"):
        norm_kwargs = model_config.get(section_name, {}).get("norm_kwargs") or {}
        if set(norm_kwargs) - {"eps"}:
            problems.append(f"{section_name}.norm_kwargs={norm_kwargs!r} (only eps is supported)")
    patch_size = vision_cfg.get("patch_size", 16)
    if not is_timm and isinstance(patch_size, list | tuple) and len(set(patch_size)) != 1:
        problems.append(f"non-square patch_size={patch_size!r}")
    if problems:
        raise ValueError(
            "open_clip config options that the project's image/text towers do not implement: "
            + ", ".join(problems)
        )


def _as_pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


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
    image_size = _as_pair(vision_cfg.get("image_size", 224))
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


def jax_model_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """How to build the JAX model that matches an open_clip model config.

    Returns ``{"image_encoder": VisionTransformer kwargs (ModifiedResNet kwargs for a ResNet
    config, see open_clip_resnet.is_resnet_vision_cfg; MobileClipImageTower kwargs for a
    MobileCLIP one, see open_clip_mobileclip.is_mobileclip_vision_cfg), "text_encoder":
    TextTransformer kwargs,
    "logit_bias_init": float | None, "image_size": (height, width)}``; e.g.::

        kwargs = jax_model_kwargs(config)
        model = TwoTowerModel(VisionTransformer(**kwargs["image_encoder"]),
                              TextTransformer(**kwargs["text_encoder"]),
                              logit_bias_init=kwargs["logit_bias_init"])
    """
    _check_supported(model_config)
    vision_cfg = model_config["vision_cfg"]
    text_cfg = model_config["text_cfg"]
    embed_dim = int(model_config["embed_dim"])
    activation = "quick_gelu" if model_config.get("quick_gelu", False) else "gelu"
    if open_clip_mobileclip.is_mobileclip_vision_cfg(vision_cfg):
        image_encoder, image_size = open_clip_mobileclip.jax_mobileclip_kwargs(
            vision_cfg, embed_dim
        )
    elif vision_cfg.get("timm_model_name"):
        wiring = timm_trunk_wiring(vision_cfg, embed_dim)
        # timm towers keep their own (exact) GELU whatever quick_gelu says.
        image_encoder = wiring["image_encoder"]
        image_size = wiring["image_size"]
    elif open_clip_resnet.is_resnet_vision_cfg(vision_cfg):
        image_encoder, image_size = open_clip_resnet.jax_resnet_kwargs(vision_cfg, embed_dim)
    else:
        vision_width = int(vision_cfg.get("width", 768))
        head_width = int(vision_cfg.get("head_width", OPEN_CLIP_HEAD_WIDTH))
        image_encoder = {
            "patch_size": _as_pair(vision_cfg.get("patch_size", 16))[0],
            "width": vision_width,
            "depth": int(vision_cfg.get("layers", 12)),
            "num_heads": vision_width // head_width,
            "mlp_dim": int(vision_width * vision_cfg.get("mlp_ratio", OPEN_CLIP_MLP_RATIO)),
            "output_dim": embed_dim,
            "pool": _VISION_POOL_FROM_OPEN_CLIP[vision_cfg.get("pool_type", "tok")],
            "layer_norm_eps": _eps(vision_cfg),
        }
        if activation != "gelu":
            image_encoder["activation"] = activation
        image_size = _as_pair(vision_cfg.get("image_size", 224))
    text_width = int(text_cfg.get("width", 512))
    no_text_projection = text_cfg.get("proj_type", "linear") == "none"
    text_encoder = {
        "width": text_width,
        "depth": int(text_cfg.get("layers", 12)),
        "num_heads": int(text_cfg.get("heads", OPEN_CLIP_TEXT_HEADS)),
        "mlp_dim": int(text_width * text_cfg.get("mlp_ratio", OPEN_CLIP_MLP_RATIO)),
        "vocab_size": int(text_cfg.get("vocab_size", 49408)),
        "context_length": int(text_cfg.get("context_length", 77)),
        "output_dim": None if no_text_projection else embed_dim,
        "causal": not text_cfg.get("no_causal_mask", False),
        "layer_norm_eps": _eps(text_cfg),
    }
    if activation != "gelu":
        text_encoder["activation"] = activation
    return {
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "logit_bias_init": model_config.get("init_logit_bias"),
        "image_size": image_size,
    }


def _eps(tower_cfg: Mapping[str, Any]) -> float:
    return float((tower_cfg.get("norm_kwargs") or {}).get("eps", OPEN_CLIP_LAYER_NORM_EPS))


def _block_shapes(prefix: str, width: int, mlp_dim: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.ln_1.weight": (width,),
        f"{prefix}.ln_1.bias": (width,),
        f"{prefix}.attn.in_proj_weight": (3 * width, width),
        f"{prefix}.attn.in_proj_bias": (3 * width,),
        f"{prefix}.attn.out_proj.weight": (width, width),
        f"{prefix}.attn.out_proj.bias": (width,),
        f"{prefix}.ln_2.weight": (width,),
        f"{prefix}.ln_2.bias": (width,),
        f"{prefix}.mlp.c_fc.weight": (mlp_dim, width),
        f"{prefix}.mlp.c_fc.bias": (mlp_dim,),
        f"{prefix}.mlp.c_proj.weight": (width, mlp_dim),
        f"{prefix}.mlp.c_proj.bias": (width,),
    }


def _native_vision_shapes(vision: Mapping[str, Any], image_size: tuple[int, int]) -> dict:
    patch = vision["patch_size"]
    grid = (image_size[0] // patch) * (image_size[1] // patch)
    width = vision["width"]
    shapes: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (width,),
        "visual.positional_embedding": (grid + 1, width),
        "visual.proj": (width, vision["output_dim"]),
        "visual.conv1.weight": (width, 3, patch, patch),
        "visual.ln_pre.weight": (width,),
        "visual.ln_pre.bias": (width,),
    }
    for index in range(vision["depth"]):
        shapes.update(
            _block_shapes(f"visual.transformer.resblocks.{index}", width, vision["mlp_dim"])
        )
    shapes.update({"visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,)})
    return shapes


def _trunk_vision_shapes(wiring: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes = {
        f"visual.trunk.{key}": shape
        for key, shape in timm_trunks.trunk_state_dict_shapes(wiring["trunk_args"]).items()
    }
    if wiring["projection"] == "head_proj":
        vit = wiring["image_encoder"]
        shapes["visual.head.proj.weight"] = (vit["output_dim"], vit["width"])
        if wiring["proj_bias"]:
            shapes["visual.head.proj.bias"] = (vit["output_dim"],)
    return shapes


def _text_key(key: str, custom_text: bool) -> str:
    return f"text.{key}" if custom_text else key


def open_clip_state_dict_shapes(model_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the state dict open_clip's ``CLIP`` (or ``CustomTextCLIP``, with
    ``custom_text``) class builds from a config.

    Written from open_clip's module layout, independently of the parameter mapping, so that a
    config and a set of weights that disagree fail at export time instead of at the user's
    ``load_state_dict``.
    """
    kwargs = jax_model_kwargs(model_config)
    vision_cfg = model_config["vision_cfg"]
    if open_clip_mobileclip.is_mobileclip_vision_cfg(vision_cfg):
        shapes = open_clip_mobileclip.mobileclip_state_dict_shapes(
            vision_cfg, int(model_config["embed_dim"])
        )
    elif vision_cfg.get("timm_model_name"):
        shapes = _trunk_vision_shapes(timm_trunk_wiring(vision_cfg, int(model_config["embed_dim"])))
    elif open_clip_resnet.is_resnet_vision_cfg(vision_cfg):
        shapes = open_clip_resnet.resnet_state_dict_shapes(
            kwargs["image_encoder"], kwargs["image_size"]
        )
    else:
        shapes = _native_vision_shapes(kwargs["image_encoder"], kwargs["image_size"])
    text = kwargs["text_encoder"]
    text_width = text["width"]
    text_shapes: dict[str, tuple[int, ...]] = {
        "positional_embedding": (text["context_length"], text_width),
        "token_embedding.weight": (text["vocab_size"], text_width),
        "ln_final.weight": (text_width,),
        "ln_final.bias": (text_width,),
    }
    if text["output_dim"] is not None:
        text_shapes["text_projection"] = (text_width, text["output_dim"])
    for index in range(text["depth"]):
        text_shapes.update(
            _block_shapes(f"transformer.resblocks.{index}", text_width, text["mlp_dim"])
        )
    custom_text = bool(model_config.get("custom_text", False))
    shapes.update({_text_key(key, custom_text): shape for key, shape in text_shapes.items()})
    shapes["logit_scale"] = ()
    if kwargs["logit_bias_init"] is not None:
        shapes["logit_bias"] = ()
    return shapes


# BatchNorm's batch counter: open_clip's modules have it (a strict load wants it), but it carries
# nothing this project's models use, so checkpoints converted without it import as well.
_BATCH_COUNTER = re.compile(r".*\.num_batches_tracked")


def check_state_dict_matches_config(
    state_dict: Mapping[str, Any],
    model_config: Mapping[str, Any],
    *,
    allow_missing_counters: bool = False,
) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or mis-shaped key.

    ``allow_missing_counters``: BatchNorm ``num_batches_tracked`` entries may be absent (import).
    """
    expected = open_clip_state_dict_shapes(model_config)
    missing = sorted(
        key
        for key in set(expected) - set(state_dict)
        if not (allow_missing_counters and _BATCH_COUNTER.fullmatch(key))
    )
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{key}: {tuple(np.shape(state_dict[key]))} != {expected[key]}"
        for key in sorted(set(expected) & set(state_dict))
        if tuple(np.shape(state_dict[key])) != expected[key]
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            "state dict does not match the open_clip config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
            f"wrong shapes {mis_shaped[:8]}"
        )


# --------------------------------------------------------------------------------------------------
# Parameters (JAX tree <-> open_clip state dict)
# --------------------------------------------------------------------------------------------------


def _linear_to_torch(take: Callable[[str], np.ndarray], jax: str, torch: str) -> StateDict:
    return {f"{torch}.weight": take(f"{jax}/kernel").T, f"{torch}.bias": take(f"{jax}/bias")}


def _layer_norm_to_torch(take: Callable[[str], np.ndarray], jax: str, torch: str) -> StateDict:
    return {f"{torch}.weight": take(f"{jax}/scale"), f"{torch}.bias": take(f"{jax}/bias")}


def _block_to_torch(take: Callable[[str], np.ndarray], jax: str, torch: str) -> StateDict:
    """One pre-LN residual block; q, k, v (W, H, D) kernels stack into the (3W, W) in_proj."""
    kernels = [take(f"{jax}/attn/{name}/kernel") for name in ("query", "key", "value")]
    biases = [take(f"{jax}/attn/{name}/bias") for name in ("query", "key", "value")]
    width = kernels[0].shape[0]
    out_kernel = take(f"{jax}/attn/out/kernel")  # (H, D, W)
    return {
        **_layer_norm_to_torch(take, f"{jax}/ln_1", f"{torch}.ln_1"),
        # torch splits the projected width into heads head-major, as the (H, D) reshape does.
        f"{torch}.attn.in_proj_weight": np.concatenate(
            [kernel.reshape(width, -1).T for kernel in kernels], axis=0
        ),
        f"{torch}.attn.in_proj_bias": np.concatenate([bias.reshape(-1) for bias in biases]),
        f"{torch}.attn.out_proj.weight": out_kernel.reshape(-1, out_kernel.shape[-1]).T,
        f"{torch}.attn.out_proj.bias": take(f"{jax}/attn/out/bias"),
        **_layer_norm_to_torch(take, f"{jax}/ln_2", f"{torch}.ln_2"),
        **_linear_to_torch(take, f"{jax}/mlp/c_fc", f"{torch}.mlp.c_fc"),
        **_linear_to_torch(take, f"{jax}/mlp/c_proj", f"{torch}.mlp.c_proj"),
    }


def _transformer_to_torch(params: Entries, jax_prefix: str, torch_prefix: str) -> StateDict:
    depth = block_count(
        params.keys_under(jax_prefix), re.escape(jax_prefix) + r"resblocks_(\d+)/", "JAX params"
    )
    state: StateDict = {}
    for index in range(depth):
        state.update(
            _block_to_torch(
                params.take, f"{jax_prefix}resblocks_{index}", f"{torch_prefix}resblocks.{index}"
            )
        )
    return state


def _vision_to_torch(params: Entries) -> StateDict:
    take = params.take
    if not params.has("image_encoder/ln_pre/scale") or params.has("image_encoder/conv1/bias"):
        raise ValueError(
            "image_encoder is not open_clip's ViT (EVA options): pass the model_config of a timm "
            "trunk (open_clip_model_config(...)) to export it under visual.trunk"
        )
    state = {
        "visual.class_embedding": take("image_encoder/class_embedding"),
        "visual.positional_embedding": take("image_encoder/positional_embedding"),
        # HWIO -> OIHW
        "visual.conv1.weight": take("image_encoder/conv1/kernel").transpose(3, 2, 0, 1),
        **_layer_norm_to_torch(take, "image_encoder/ln_pre", "visual.ln_pre"),
        **_transformer_to_torch(params, "image_encoder/transformer/", "visual.transformer."),
        **_layer_norm_to_torch(take, "image_encoder/ln_post", "visual.ln_post"),
    }
    if not params.has("image_encoder/proj"):
        raise ValueError("image_encoder has no `proj`: open_clip's ViT always projects")
    state["visual.proj"] = take("image_encoder/proj")
    return state


def _vision_trunk_to_torch(params: Entries, wiring: Mapping[str, Any]) -> StateDict:
    """The ViT as open_clip's timm trunk (``visual.trunk.*``) and projection (see the wiring)."""
    image = unflatten(
        {
            key.removeprefix("image_encoder/"): params.take(key)
            for key in params.keys_under("image_encoder/")
        }
    )
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
    state.update({f"visual.trunk.{key}": value for key, value in trunk.items()})
    return state


def _text_to_torch(params: Entries) -> StateDict:
    take = params.take
    state = {
        "token_embedding.weight": take("text_encoder/token_embedding/embedding"),
        "positional_embedding": take("text_encoder/positional_embedding"),
        **_transformer_to_torch(params, "text_encoder/transformer/", "transformer."),
        **_layer_norm_to_torch(take, "text_encoder/ln_final", "ln_final"),
    }
    if params.has("text_encoder/text_projection"):
        state["text_projection"] = take("text_encoder/text_projection")
    return state


# A parameter only each BatchNorm image tower has (their running statistics must come along).
_RESNET_MARKER = "image_encoder/attnpool/positional_embedding"
_MOBILECLIP_MARKER = "image_encoder/stem_0/conv_kxk_0/conv/kernel"


def _split_variables(
    params: ParamTree, batch_stats: ParamTree | None
) -> tuple[ParamTree, ParamTree | None]:
    """``(params, batch_stats)`` from a bare ``params`` tree or a ``variables`` dict holding
    ``params`` and possibly ``batch_stats``."""
    if isinstance(params, Mapping) and "params" in params and set(params) <= VARIABLE_COLLECTIONS:
        if batch_stats is not None and "batch_stats" in params:
            raise ValueError("batch_stats given twice: as an argument and inside the variables")
        return params["params"], params.get("batch_stats", batch_stats)
    return params, batch_stats


def to_open_clip_state_dict(
    params: ParamTree,
    *,
    model_config: Mapping[str, Any] | None = None,
    dtype: Any = np.float32,
    batch_stats: ParamTree | None = None,
) -> StateDict:
    """Map a JAX two-tower parameter tree to open_clip's ``CLIP`` state dict (NumPy arrays).

    ``params`` is the ``params`` collection (or the ``variables`` dict holding it, with
    ``batch_stats`` for a BatchNorm image tower), with JAX or NumPy leaves; they must be fully
    addressable (gather sharded arrays first). Every leaf must map: a parameter open_clip has no
    place for raises ``ValueError``. When ``model_config`` is given, the result is checked against
    the keys and shapes that config builds in open_clip; it is required for an image tower
    exported as a timm trunk, and its ``custom_text`` puts the text tower under ``text.``
    (CustomTextCLIP).

    ``batch_stats``: the ``batch_stats`` collection (BatchNorm running means and variances) of a
    ``ModifiedResNet`` or MobileCLIP image tower, which become the ``running_mean`` /
    ``running_var`` buffers (the model's state in training, e.g. the trainer's ``model_state``);
    required for those towers. A MobileCLIP tower also needs ``model_config`` (its timm trunk).
    """
    params, batch_stats = _split_variables(params, batch_stats)
    convert = lambda value: np.asarray(value, dtype=dtype)
    params_consumer = Entries(flatten(unwrap_variables(params)), convert, "JAX parameter")
    stats_consumer = Entries(flatten(batch_stats or {}), convert, "JAX batch_stats")
    vision_cfg = (model_config or {}).get("vision_cfg", {})
    is_resnet = params_consumer.has(_RESNET_MARKER)
    is_mobileclip = params_consumer.has(_MOBILECLIP_MARKER)
    if (is_resnet or is_mobileclip) and batch_stats is None:
        raise ValueError(
            "the image tower's BatchNorm running statistics are needed: pass batch_stats= (the "
            "model's `batch_stats` collection)"
        )
    if open_clip_mobileclip.is_mobileclip_vision_cfg(vision_cfg):
        tower = open_clip_mobileclip.tower_of_vision_cfg(vision_cfg, int(model_config["embed_dim"]))
        state = open_clip_mobileclip.mobileclip_to_torch(params_consumer, stats_consumer, tower)
    elif is_mobileclip:
        raise ValueError(
            "a MobileCLIP image tower exports as a timm fastvit_mci* trunk: pass its model_config "
            "(open_clip_model_config(...))"
        )
    elif vision_cfg.get("timm_model_name"):
        wiring = timm_trunk_wiring(vision_cfg, int(model_config["embed_dim"]))
        state = _vision_trunk_to_torch(params_consumer, wiring)
    elif is_resnet:
        state = open_clip_resnet.resnet_to_torch(params_consumer, stats_consumer)
    else:
        state = _vision_to_torch(params_consumer)
    custom_text = bool((model_config or {}).get("custom_text", False))
    state.update(
        {
            _text_key(key, custom_text): value
            for key, value in _text_to_torch(params_consumer).items()
        }
    )
    state["logit_scale"] = params_consumer.take("logit_scale")
    if params_consumer.has("logit_bias"):
        state["logit_bias"] = params_consumer.take("logit_bias")
    params_consumer.check_all_taken()
    stats_consumer.check_all_taken()
    # Transposes leave strided views; safetensors and torch want contiguous buffers. Integer
    # buffers (BatchNorm's num_batches_tracked) keep their int64.
    state = {
        key: np.asarray(value, dtype=None if value.dtype.kind in "iu" else dtype, order="C")
        for key, value in state.items()
    }
    if model_config is not None:
        check_state_dict_matches_config(state, model_config)
    return state


def _linear_from_torch(take: Callable[[str], np.ndarray], torch: str, jax: str) -> StateDict:
    return {f"{jax}/kernel": take(f"{torch}.weight").T, f"{jax}/bias": take(f"{torch}.bias")}


def _layer_norm_from_torch(take: Callable[[str], np.ndarray], torch: str, jax: str) -> StateDict:
    return {f"{jax}/scale": take(f"{torch}.weight"), f"{jax}/bias": take(f"{torch}.bias")}


def _block_from_torch(
    take: Callable[[str], np.ndarray], torch: str, jax: str, num_heads: int
) -> StateDict:
    in_weight = take(f"{torch}.attn.in_proj_weight")  # (3W, W)
    in_bias = take(f"{torch}.attn.in_proj_bias")
    width = in_weight.shape[1]
    head_dim = width // num_heads
    block: StateDict = {**_layer_norm_from_torch(take, f"{torch}.ln_1", f"{jax}/ln_1")}
    for name, weight, bias in zip(
        ("query", "key", "value"), np.split(in_weight, 3, axis=0), np.split(in_bias, 3)
    ):
        block[f"{jax}/attn/{name}/kernel"] = weight.T.reshape(width, num_heads, head_dim)
        block[f"{jax}/attn/{name}/bias"] = bias.reshape(num_heads, head_dim)
    block[f"{jax}/attn/out/kernel"] = take(f"{torch}.attn.out_proj.weight").T.reshape(
        num_heads, head_dim, width
    )
    block[f"{jax}/attn/out/bias"] = take(f"{torch}.attn.out_proj.bias")
    block.update(_layer_norm_from_torch(take, f"{torch}.ln_2", f"{jax}/ln_2"))
    block.update(_linear_from_torch(take, f"{torch}.mlp.c_fc", f"{jax}/mlp/c_fc"))
    block.update(_linear_from_torch(take, f"{torch}.mlp.c_proj", f"{jax}/mlp/c_proj"))
    return block


def _transformer_from_torch(
    state: Entries, torch_prefix: str, jax_prefix: str, num_heads: int
) -> StateDict:
    pattern = re.escape(torch_prefix) + r"resblocks\.(\d+)\."
    depth = block_count(state.keys_under(torch_prefix), pattern, "state dict")
    flat: StateDict = {}
    for index in range(depth):
        flat.update(
            _block_from_torch(
                state.take,
                f"{torch_prefix}resblocks.{index}",
                f"{jax_prefix}resblocks_{index}",
                num_heads,
            )
        )
    return flat


def _vision_from_torch(state: Entries, num_heads: int) -> StateDict:
    take = state.take
    return {
        "image_encoder/class_embedding": take("visual.class_embedding"),
        "image_encoder/positional_embedding": take("visual.positional_embedding"),
        "image_encoder/conv1/kernel": take("visual.conv1.weight").transpose(2, 3, 1, 0),
        **_layer_norm_from_torch(take, "visual.ln_pre", "image_encoder/ln_pre"),
        **_transformer_from_torch(
            state, "visual.transformer.", "image_encoder/transformer/", num_heads
        ),
        **_layer_norm_from_torch(take, "visual.ln_post", "image_encoder/ln_post"),
        "image_encoder/proj": take("visual.proj"),
    }


def _vision_trunk_from_torch(state: Entries, wiring: Mapping[str, Any]) -> StateDict:
    trunk = timm_eva.split_qkv(
        {
            key.removeprefix("visual.trunk."): state.take(key)
            for key in state.keys_under("visual.trunk.")
        }
    )
    proj_bias = None
    if wiring["projection"] == "trunk_head":
        # timm_eva reads a bias-free projection; the head's bias becomes the ViT's proj_bias.
        proj_bias = trunk["head.bias"]
        trunk["head.bias"] = np.zeros_like(proj_bias)
    image = timm_eva.from_timm_state_dict(trunk, model_args=wiring["trunk_args"])
    flat = {f"image_encoder/{key}": value for key, value in flatten(image).items()}
    if wiring["projection"] == "head_proj":
        flat["image_encoder/proj"] = state.take("visual.head.proj.weight").T
        if wiring["proj_bias"]:
            proj_bias = state.take("visual.head.proj.bias")
    if proj_bias is not None:
        flat["image_encoder/proj_bias"] = proj_bias
    return flat


# State-dict entries that are not parameters: OpenAI's checkpoints record these hyper-parameters
# as tensors, and older timm versions saved the (recomputed) rotary tables of EVA trunks.
_DERIVED_ENTRIES = re.compile(
    r"(input_resolution|context_length|vocab_size|visual\.trunk\.rope\..*)"
)


def _in_config_layout(
    state_dict: Mapping[str, Any], model_config: Mapping[str, Any]
) -> dict[str, Any]:
    """Text keys as the config's model class has them: under ``text.`` for CustomTextCLIP, at the
    top for CLIP (open_clip itself converts between the two when loading); derived entries
    dropped."""
    custom_text = bool(model_config.get("custom_text", False))
    return {
        _text_key(
            key.removeprefix("text."), custom_text and not key.startswith(("visual.", "logit_"))
        ): value
        for key, value in state_dict.items()
        if not _DERIVED_ENTRIES.fullmatch(key)
    }


def _strip_custom_text_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """open_clip's CustomTextCLIP keeps the (same) text tower under ``text.``; CLIP at the top."""
    return {key.removeprefix("text."): value for key, value in state_dict.items()}


def from_open_clip_state_dict(
    state_dict: Mapping[str, Any],
    *,
    model_config: Mapping[str, Any],
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Map an open_clip ``CLIP`` / ``CustomTextCLIP`` state dict (NumPy arrays) to this project's
    ``params`` tree.

    The config is needed for the head counts, which a state dict does not record, and for a timm
    trunk's architecture. The exact inverse of :func:`to_open_clip_state_dict`: a round trip
    returns the same arrays. A ResNet or MobileCLIP image tower also has BatchNorm running
    statistics, which are not parameters: use :func:`from_open_clip_variables` for it (this
    function refuses it rather than drop them).
    """
    variables = from_open_clip_variables(state_dict, model_config=model_config, dtype=dtype)
    if "batch_stats" in variables:
        raise ValueError(
            "this open_clip model has BatchNorm running statistics (a ResNet or MobileCLIP image "
            "tower): import it with from_open_clip_variables (or load_open_clip_variables)"
        )
    return variables["params"]


def from_open_clip_variables(
    state_dict: Mapping[str, Any],
    *,
    model_config: Mapping[str, Any],
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Map an open_clip state dict to this project's ``variables``: ``{"params": ...}``, plus
    ``"batch_stats"`` (BatchNorm ``running_mean`` / ``running_var`` as ``mean`` / ``var``) for a
    ResNet or MobileCLIP image tower. ``num_batches_tracked`` counters are read if present and
    dropped."""
    state_dict = _in_config_layout(state_dict, model_config)
    check_state_dict_matches_config(state_dict, model_config, allow_missing_counters=True)
    kwargs = jax_model_kwargs(model_config)
    state = Entries(
        _strip_custom_text_prefix(state_dict),
        lambda value: np.asarray(value, dtype=dtype),
        "open_clip state dict",
    )
    take = state.take
    vision_cfg = model_config["vision_cfg"]
    stats: StateDict = {}
    if open_clip_mobileclip.is_mobileclip_vision_cfg(vision_cfg):
        tower = open_clip_mobileclip.tower_of_vision_cfg(vision_cfg, int(model_config["embed_dim"]))
        flat, stats = open_clip_mobileclip.mobileclip_from_torch(state, tower)
    elif vision_cfg.get("timm_model_name"):
        wiring = timm_trunk_wiring(vision_cfg, int(model_config["embed_dim"]))
        flat = _vision_trunk_from_torch(state, wiring)
    elif open_clip_resnet.is_resnet_vision_cfg(vision_cfg):
        num_heads = kwargs["image_encoder"]["num_heads"]
        flat, stats = open_clip_resnet.resnet_from_torch(state, num_heads)
    else:
        flat = _vision_from_torch(state, kwargs["image_encoder"]["num_heads"])
    flat.update(
        {
            "text_encoder/token_embedding/embedding": take("token_embedding.weight"),
            "text_encoder/positional_embedding": take("positional_embedding"),
            **_transformer_from_torch(
                state,
                "transformer.",
                "text_encoder/transformer/",
                kwargs["text_encoder"]["num_heads"],
            ),
            **_layer_norm_from_torch(take, "ln_final", "text_encoder/ln_final"),
            "logit_scale": take("logit_scale"),
        }
    )
    if state.has("text_projection"):
        flat["text_encoder/text_projection"] = take("text_projection")
    if state.has("logit_bias"):
        flat["logit_bias"] = take("logit_bias")
    state.check_all_taken()
    as_tree = lambda entries: unflatten(
        {key: np.asarray(value, order="C") for key, value in entries.items()}
    )
    variables = {"params": as_tree(flat)}
    if stats:
        variables["batch_stats"] = as_tree(stats)
    return variables


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def default_preprocess_config(image_size: int | list[int]) -> dict[str, Any]:
    """open_clip's ``preprocess_cfg`` (resize, crop, normalise) with OpenAI's statistics."""
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def save_open_clip(
    path_dir: str | Path,
    params: ParamTree,
    model_config: Mapping[str, Any],
    name: str | None = None,
    *,
    preprocess_cfg: Mapping[str, Any] | None = None,
    dtype: Any = np.float32,
    batch_stats: ParamTree | None = None,
) -> Path:
    """Write an open_clip export directory; returns its path.

    Files: ``open_clip_model.safetensors`` (the state dict), ``open_clip_config.json``
    (``{"model_cfg", "preprocess_cfg"}``, what ``local-dir:`` and ``hf-hub:`` read) and, when
    ``name`` is given, ``<name>.json`` (the bare model config for ``open_clip.add_model_config``).
    ``preprocess_cfg`` entries override the defaults (OpenAI mean/std, bicubic, the model's size).
    ``params`` and ``batch_stats`` as in :func:`to_open_clip_state_dict` (``batch_stats`` for a
    ResNet or MobileCLIP image tower).
    """
    from safetensors.numpy import save_file

    state = to_open_clip_state_dict(
        params, model_config=model_config, dtype=dtype, batch_stats=batch_stats
    )
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    image_size = model_config["vision_cfg"]["image_size"]
    config = {
        "model_cfg": dict(model_config),
        "preprocess_cfg": {**default_preprocess_config(image_size), **(preprocess_cfg or {})},
    }
    write_atomically(
        path_dir / WEIGHTS_FILE_NAME,
        lambda path: save_file(state, str(path), metadata={"format": "pt"}),
    )
    _write_json(path_dir / CONFIG_FILE_NAME, config)
    if name is not None:
        if not re.fullmatch(r"[\w.\-]+", name):
            raise ValueError(
                f"model name {name!r} must be a plain file stem (letters, digits, -_.)"
            )
        _write_json(path_dir / f"{name}.json", dict(model_config))
    return path_dir


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    write_atomically(path, lambda file: file.write_text(json.dumps(content, indent=2) + "\n"))


def _load_safetensors(path: Path) -> StateDict:
    import safetensors.numpy

    try:
        return safetensors.numpy.load_file(str(path))
    except (KeyError, TypeError, ValueError):
        # safetensors' NumPy reader has no bfloat16; its Flax reader does (ml_dtypes on the host).
        import safetensors.flax

        return {
            key: np.asarray(value) for key, value in safetensors.flax.load_file(str(path)).items()
        }


def _load_torch_file(path: Path) -> StateDict:
    try:
        import torch
    except ImportError as error:
        # The JAX environment has no torch on purpose (its CUDA wheels conflict with JAX's).
        raise ImportError(
            f"reading {path} needs PyTorch, which this environment does not have; safetensors "
            'files do not. Convert it once where torch is installed: python -c "import torch; '
            "from safetensors.torch import save_file; "
            f"sd = torch.load('{path}', map_location='cpu'); "
            "sd = sd.get('state_dict', sd); "
            "save_file({k.removeprefix('module.'): v.contiguous() for k, v in sd.items() "
            f"if torch.is_tensor(v)}}, '{path.with_name(WEIGHTS_FILE_NAME)}')\" "
            "(or pip install torch, CPU wheel)"
        ) from error
    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    # open_clip training checkpoints wrap the weights; DDP prefixes every key with "module.".
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    return {
        key.removeprefix("module."): value.detach().float().numpy()
        for key, value in checkpoint.items()
        if hasattr(value, "detach")
    }


def load_open_clip_weights(path: str | Path) -> StateDict:
    """Read an open_clip state dict: safetensors with NumPy; .pt, .pth and .bin need torch."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        return _load_torch_file(path)
    raise ValueError(
        f"unknown checkpoint format {path.suffix!r}: use .safetensors, .pt, .pth or .bin"
    )


# The names open_clip and the Hugging Face Hub give the weights of a model, in order of preference.
WEIGHTS_FILE_NAMES = (
    WEIGHTS_FILE_NAME,
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def find_open_clip_weights(path_dir: str | Path) -> Path:
    """The weights file of a model directory: one of :data:`WEIGHTS_FILE_NAMES` (open_clip's and
    the Hub's names, safetensors first), else its only ``.safetensors``/``.bin``/``.pt``/``.pth``
    file."""
    path_dir = Path(path_dir)
    for name in WEIGHTS_FILE_NAMES:
        if (path_dir / name).is_file():
            return path_dir / name
    candidates = sorted(
        path for path in path_dir.iterdir() if path.is_file() and path.suffix in WEIGHTS_SUFFIXES
    )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(
            f"no open_clip weights in {path_dir}: expected {', '.join(WEIGHTS_FILE_NAMES)} or a "
            f"single file ending in {', '.join(WEIGHTS_SUFFIXES)}"
        )
    raise FileNotFoundError(
        f"several weight files in {path_dir} ({', '.join(p.name for p in candidates)}): keep one, "
        f"or name it {WEIGHTS_FILE_NAME}"
    )


def read_model_config(path_dir: str | Path) -> dict[str, Any] | None:
    """The model config of ``path_dir/open_clip_config.json`` (``{"model_cfg": ...}`` or a bare
    model config), or ``None`` when the directory has none."""
    config_path = Path(path_dir) / CONFIG_FILE_NAME
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    return config.get("model_cfg", config)


def load_open_clip(
    path_dir: str | Path, model_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read an open_clip model directory (ours or a Hub snapshot): ``(model_cfg, params)``.

    ``model_config`` (e.g. from pretrain/export/open_clip_configs.py) replaces the directory's
    ``open_clip_config.json``, which is then not needed. A model with BatchNorm (a ResNet or
    MobileCLIP image tower) needs :func:`load_open_clip_variables`.
    """
    model_config, variables = load_open_clip_variables(path_dir, model_config)
    if "batch_stats" in variables:
        raise ValueError(
            f"{path_dir} holds BatchNorm running statistics (a ResNet or MobileCLIP image tower): "
            "read it with load_open_clip_variables"
        )
    return model_config, variables["params"]


def load_open_clip_variables(
    path_dir: str | Path, model_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`load_open_clip` for any model: ``(model_cfg, variables)``, the variables holding
    ``params`` and, for a ResNet or MobileCLIP image tower, ``batch_stats``."""
    if model_config is None:
        model_config = read_model_config(path_dir)
        if model_config is None:
            raise FileNotFoundError(
                f"{path_dir} has no {CONFIG_FILE_NAME}: pass the model config (or, for a teacher, "
                "name the model with teacher.open_clip_model)"
            )
    model_config = dict(model_config)
    state_dict = load_open_clip_weights(find_open_clip_weights(path_dir))
    return model_config, from_open_clip_variables(state_dict, model_config=model_config)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

_LOAD_SNIPPET = """\
Load an export directory in PyTorch:

  import open_clip
  model, _, preprocess = open_clip.create_model_and_transforms("local-dir:/path/to/export")
  tokenizer = open_clip.get_tokenizer("local-dir:/path/to/export")

or, with a named config (written by save_open_clip(..., name=NAME)):

  open_clip.add_model_config("/path/to/export/NAME.json")
  weights = "/path/to/export/open_clip_model.safetensors"
  model = open_clip.create_model("NAME", pretrained=weights)
"""


def _check_directory(path_dir: Path) -> None:
    config = json.loads((path_dir / CONFIG_FILE_NAME).read_text())
    model_config = config.get("model_cfg", config)
    state_dict = load_open_clip_weights(find_open_clip_weights(path_dir))
    check_state_dict_matches_config(state_dict, model_config)
    count = sum(int(np.prod(np.shape(value))) for value in state_dict.values())
    print(
        f"{path_dir}: {len(state_dict)} tensors, {count:,} parameters, consistent with its config"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.export.open_clip",
        description="Export the project's CLIP/SigLIP ViT models to open_clip (PyTorch).",
        epilog=_LOAD_SNIPPET,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check", help="check that an export directory's weights match its config (no torch needed)"
    )
    check.add_argument("directory", type=Path)
    arguments = parser.parse_args(argv)
    if arguments.command == "check":
        _check_directory(arguments.directory)


if __name__ == "__main__":
    main()
