"""open_clip's model config (``embed_dim``, ``quick_gelu``, ``vision_cfg``, ``text_cfg``,
``custom_text``, ``init_logit_bias``) <-> this project's two-tower hyper-parameters. The image
tower's part is its family's (families.py); the text tower's is text.py's. Options open_clip has
but the towers do not are rejected with their config field's name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pretrain.export.open_clip import defaults
from pretrain.export.open_clip.families import family_of_tower, family_of_vision_cfg
from pretrain.export.open_clip.text import text_cfg, text_cfg_problems, text_kwargs

# Top-level open_clip config fields this project's two-tower model cannot express, each with the
# values it supports.
_SUPPORTED_TOP_VALUES: dict[str, tuple[Any, ...]] = {
    "nonscalar_logit_scale": (False,),
    "multimodal_cfg": (None,),
}


def open_clip_model_config(
    image_encoder: Any,
    text_encoder: Any,
    *,
    image_size: int | tuple[int, int],
    init_logit_bias: float | None = None,
    timm_model_name: str | None = None,
) -> dict[str, Any]:
    """open_clip's model config for a JAX two-tower model.

    ``image_encoder`` / ``text_encoder`` are the tower module instances (e.g.
    ``model.image_encoder``) or mappings with the same field names. ``image_size`` is the training
    resolution (the towers do not store it). ``init_logit_bias`` is the model's
    ``logit_bias_init`` for a SigLIP model: its presence makes open_clip create the
    ``logit_bias`` parameter (the exported value overwrites it).

    The image tower's family (families.py) writes ``vision_cfg``: a CLIP-style ViT becomes
    open_clip's own ViT; an EVA-style ViT (or any ViT when ``timm_model_name`` is given) a timm
    trunk with its classifier head as the projection (``timm_proj: null``, ``custom_text:
    true``, as open_clip's EVA configs), ``timm_model_name`` naming it (a
    timm_trunks.TIMM_EVA_TRUNKS name or ``local-dir:/path``), else the registered trunk with
    exactly this architecture; a ``ModifiedResNet`` open_clip's (``image_size`` square, a
    multiple of 32); a ``MobileClipImageTower`` timm's registered ``fastvit_mci0/1/2`` trunk,
    as in open_clip's MobileCLIP configs (a given ``timm_model_name`` must be that name).
    """
    text_activation = defaults.activation_of(text_encoder)
    family = family_of_tower(image_encoder, timm_model_name)
    vision_cfg, embed_dim = family.vision_cfg(
        image_encoder, image_size, timm_model_name, text_activation
    )
    config: dict[str, Any] = {
        "embed_dim": int(embed_dim),
        "quick_gelu": text_activation == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg(text_encoder, embed_dim),
    }
    if family.timm_trunk:
        config["custom_text"] = True
    if init_logit_bias is not None:
        config["init_logit_bias"] = float(init_logit_bias)
    return config


def _check_supported(model_config: Mapping[str, Any]) -> None:
    """Reject open_clip options that change the network in ways the JAX towers cannot express."""
    vision_cfg = model_config.get("vision_cfg", {})
    problems = [
        *defaults.unsupported_values(model_config, _SUPPORTED_TOP_VALUES),
        *family_of_vision_cfg(vision_cfg).vision_cfg_problems(vision_cfg),
        *text_cfg_problems(model_config.get("text_cfg", {})),
    ]
    if problems:
        raise ValueError(
            "open_clip config options that the project's image/text towers do not implement: "
            + ", ".join(problems)
        )


def jax_model_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """How to build the JAX model that matches an open_clip model config.

    Returns ``{"image_encoder": the image tower's kwargs (VisionTransformer, ModifiedResNet or
    MobileClipImageTower, by its family), "text_encoder": TextTransformer kwargs,
    "logit_bias_init": float | None, "image_size": (height, width)}``; e.g.::

        kwargs = jax_model_kwargs(config)
        model = TwoTowerModel(VisionTransformer(**kwargs["image_encoder"]),
                              TextTransformer(**kwargs["text_encoder"]),
                              logit_bias_init=kwargs["logit_bias_init"])
    """
    _check_supported(model_config)
    vision_cfg = model_config["vision_cfg"]
    embed_dim = int(model_config["embed_dim"])
    activation = "quick_gelu" if model_config.get("quick_gelu", False) else "gelu"
    image_encoder, image_size = family_of_vision_cfg(vision_cfg).jax_kwargs(
        vision_cfg, embed_dim, activation
    )
    return {
        "image_encoder": image_encoder,
        "text_encoder": text_kwargs(model_config["text_cfg"], embed_dim, activation),
        "logit_bias_init": model_config.get("init_logit_bias"),
        "image_size": image_size,
    }
