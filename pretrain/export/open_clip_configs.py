"""A few open_clip model configs by name, as data: a teacher can be named without its JSON file.

Copied from open_clip's ``model_configs/<name>.json`` (open_clip 3.x); the names are open_clip's.
OpenAI's pretrained ViT-L/14 weights need the "-quickgelu" config (open_clip's ``ViT-L-14`` with
``pretrained="openai"`` forces QuickGELU); "EVA01-g-14" is UTA's teacher (EVA01-CLIP-g/14), whose
image tower is timm's ``eva_giant_patch14_224`` (pretrain/export/open_clip/timm_trunks.py).
"""

from __future__ import annotations

import copy
from typing import Any

_TEXT_B = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
_TEXT_L = {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}
_TEXT_H = {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}


def _eva(embed_dim: int, image_size: int, trunk: str, text: dict[str, int]) -> dict[str, Any]:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "timm_model_name": trunk,
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": None,
        },
        "text_cfg": dict(text),
        "custom_text": True,
    }


_VIT_B_16 = {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16}
_VIT_L_14 = {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}
_VIT_L_14_336 = {**_VIT_L_14, "image_size": 336}

OPEN_CLIP_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-B-16": {"embed_dim": 512, "vision_cfg": _VIT_B_16, "text_cfg": _TEXT_B},
    "ViT-B-16-quickgelu": {
        "embed_dim": 512,
        "quick_gelu": True,
        "vision_cfg": _VIT_B_16,
        "text_cfg": _TEXT_B,
    },
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": _VIT_L_14, "text_cfg": _TEXT_L},
    "ViT-L-14-quickgelu": {
        "embed_dim": 768,
        "quick_gelu": True,
        "vision_cfg": _VIT_L_14,
        "text_cfg": _TEXT_L,
    },
    "ViT-L-14-336": {"embed_dim": 768, "vision_cfg": _VIT_L_14_336, "text_cfg": _TEXT_L},
    "ViT-L-14-336-quickgelu": {
        "embed_dim": 768,
        "quick_gelu": True,
        "vision_cfg": _VIT_L_14_336,
        "text_cfg": _TEXT_L,
    },
    "EVA01-g-14": _eva(1024, 224, "eva_giant_patch14_224", _TEXT_L),
    "EVA01-g-14-plus": _eva(1024, 224, "eva_giant_patch14_224", _TEXT_H),
    "EVA02-B-16": _eva(512, 224, "eva02_base_patch16_clip_224", _TEXT_B),
    "EVA02-L-14": _eva(768, 224, "eva02_large_patch14_clip_224", _TEXT_L),
    "EVA02-L-14-336": _eva(768, 336, "eva02_large_patch14_clip_336", _TEXT_L),
}


def open_clip_model_config_by_name(name: str) -> dict[str, Any]:
    """A copy of the model config open_clip registers under ``name``."""
    if name not in OPEN_CLIP_MODEL_CONFIGS:
        raise ValueError(
            f"unknown open_clip model {name!r}; known here: {sorted(OPEN_CLIP_MODEL_CONFIGS)} "
            "(or put the model's open_clip_config.json next to its weights)"
        )
    return copy.deepcopy(OPEN_CLIP_MODEL_CONFIGS[name])
