"""The timm ``Eva`` architectures that open_clip's EVA-CLIP models use as image towers, as data.

open_clip builds EVA-CLIP's image tower with ``timm.create_model(vision_cfg["timm_model_name"],
...)`` and keeps it under ``visual.trunk.*``. timm is not importable on the JAX side, so the
architecture each name stands for is written down here: the keyword arguments of timm's ``Eva``
that the name's entry point in ``timm/models/eva.py`` passes (timm 1.0), plus ``img_size`` where
the entry point leaves it to the default pretrained config (224 px for all of these).
``pretrain.export.timm_eva.vit_kwargs_from_timm`` turns them into the ViT's fields.

A trunk can also be named ``"local-dir:/path"``, timm's own way of building a model from a
directory's ``config.json`` (``architecture`` + ``model_args``, the layout
``pretrain.export.timm_eva.save_timm`` writes): timm takes ``model_args`` as keyword arguments of
the architecture's entry point, and so does :func:`trunk_model_args`. That is how an EVA tower
with no registered timm name (a small test tower, a UTA student) can sit in an open_clip config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pretrain.export import timm_eva, timm_hub

LOCAL_DIR_PREFIX = "local-dir:"

# timm Eva kwargs of each entry point (timm/models/eva.py). ``global_pool`` is the entry point's
# default; open_clip overrides it with ``timm_pool`` (and ``num_classes`` with ``embed_dim``).
_EVA01_GIANT = {
    "img_size": 224,
    "patch_size": 14,
    "embed_dim": 1408,
    "depth": 40,
    "num_heads": 16,
    "mlp_ratio": 6144 / 1408,
}
_EVA02_CLIP = {
    "qkv_fused": False,
    "mlp_ratio": 4 * 2 / 3,
    "swiglu_mlp": True,
    "scale_mlp": True,
    "scale_attn_inner": True,
    "use_rot_pos_emb": True,
    "ref_feat_shape": (16, 16),
    "global_pool": "token",
}
_EVA02_MIM = {
    "img_size": 224,
    "patch_size": 14,
    "depth": 12,
    "mlp_ratio": 4 * 2 / 3,
    "swiglu_mlp": True,
    "use_rot_pos_emb": True,
    "ref_feat_shape": (16, 16),
}
TIMM_EVA_TRUNKS: dict[str, dict[str, Any]] = {
    # EVA01-CLIP-g/14 (open_clip "EVA01-g-14" and "EVA01-g-14-plus" name this one).
    "eva_giant_patch14_224": dict(_EVA01_GIANT),
    # The same tower with token pooling by default ("only difference from non-CLIP is the pooling").
    "eva_giant_patch14_clip_224": {**_EVA01_GIANT, "global_pool": "token"},
    "eva02_base_patch16_clip_224": {
        **_EVA02_CLIP,
        "img_size": 224,
        "patch_size": 16,
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
    },
    "eva02_large_patch14_clip_224": {
        **_EVA02_CLIP,
        "img_size": 224,
        "patch_size": 14,
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
    },
    "eva02_large_patch14_clip_336": {
        **_EVA02_CLIP,
        "img_size": 336,
        "patch_size": 14,
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
    },
    # EVA-02 (MIM-pretrained) towers: the architectures pretrain.export.timm_eva names in the
    # config.json it writes, so that its export directories serve as local-dir trunks.
    "eva02_tiny_patch14_224": {**_EVA02_MIM, "embed_dim": 192, "num_heads": 3},
    "eva02_small_patch14_224": {**_EVA02_MIM, "embed_dim": 384, "num_heads": 6},
    "eva02_base_patch14_224": {
        **_EVA02_MIM,
        "embed_dim": 768,
        "num_heads": 12,
        "qkv_fused": False,
        "scale_mlp": True,
    },
    "eva02_large_patch14_224": {
        **_EVA02_MIM,
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
        "qkv_fused": False,
        "scale_mlp": True,
    },
    # EVA02-CLIP-E/14: residual post-norm blocks, which the project's ViT does not implement; listed
    # so that the rejection names the option (use_post_norm) rather than an unknown name.
    "eva02_enormous_patch14_clip_224": {
        "img_size": 224,
        "patch_size": 14,
        "embed_dim": 1792,
        "depth": 64,
        "num_heads": 16,
        "mlp_ratio": 15360 / 1792,
        "use_post_norm": True,
        "global_pool": "token",
    },
}


def _local_dir_model_args(directory: Path) -> dict[str, Any]:
    """timm's ``local-dir:`` semantics: the architecture's entry-point arguments, overridden by the
    directory's ``model_args`` (which timm passes as keyword arguments)."""
    config_path = directory / timm_hub.CONFIG_FILE_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"timm trunk local-dir:{directory} has no {config_path.name}")
    config = json.loads(config_path.read_text())
    architecture = config.get("architecture")
    if architecture not in TIMM_EVA_TRUNKS:
        raise ValueError(
            f"{config_path}: architecture {architecture!r} is not one of the timm EVA trunks "
            f"{sorted(TIMM_EVA_TRUNKS)}"
        )
    args = {**TIMM_EVA_TRUNKS[architecture], **config.get("model_args", {})}
    # timm fills img_size from the pretrained config when neither names it.
    input_size = (config.get("pretrained_cfg") or {}).get("input_size")
    if "img_size" not in config.get("model_args", {}) and input_size:
        args["img_size"] = list(input_size[-2:])
    return args


def trunk_model_args(timm_model_name: str) -> dict[str, Any]:
    """timm ``Eva`` kwargs for an open_clip ``vision_cfg.timm_model_name``: a name of
    :data:`TIMM_EVA_TRUNKS` or ``"local-dir:/path"`` (see the module docstring)."""
    if timm_model_name.startswith(LOCAL_DIR_PREFIX):
        return _local_dir_model_args(Path(timm_model_name.removeprefix(LOCAL_DIR_PREFIX)))
    if timm_model_name.startswith("hf-hub:"):
        raise ValueError(
            f"timm_model_name={timm_model_name!r}: download the trunk's config.json and name it "
            "with local-dir:/path instead (nothing is fetched from the Hub here)"
        )
    name = timm_model_name.split(".")[0]  # a ".tag" names pretrained weights, not architecture
    if name not in TIMM_EVA_TRUNKS:
        raise ValueError(
            f"timm_model_name={timm_model_name!r} is not a timm EVA trunk this project maps; "
            f"known: {sorted(TIMM_EVA_TRUNKS)} (or local-dir:/path to a timm config.json)"
        )
    return dict(TIMM_EVA_TRUNKS[name])


def trunk_state_dict_shapes(model_args: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the state dict timm's ``Eva`` builds from ``model_args``, in its own
    layout (fused q/k/v when ``qkv_fused``, timm's default)."""
    shapes = timm_eva.timm_state_dict_shapes(model_args)
    return timm_eva.fused_qkv_shapes(shapes) if model_args.get("qkv_fused", True) else shapes
