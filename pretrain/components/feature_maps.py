"""Spatial feature maps of any image tower, for dense heads.

Every tower of this project names its grids in its intermediates (models/vit.py, resnet.py,
mobileclip.py): a ViT (CLIP or EVA-02) its ``patch_tokens`` (B, rows, cols, width), the class
token left out and any grid, non-square ones included; a ResNet its ``stage_1`` .. ``stage_4`` and
an MCi tower its ``stage_0`` .. ``stage_3`` (strides 4 to 32). ``pyramid=False`` gives the last
map alone (a linear, DeepLabV3 or PSP head reads it); ``pyramid=True`` every stage, finest first
(an UperNet reads them; a ViT has one map, which the head's simple feature pyramid expands).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax

_STAGE = re.compile(r"stage_(\d+)$")


def stage_names(intermediates: Mapping[str, Any]) -> list[str]:
    """The intermediates that are stage outputs, finest (first stage) first."""
    stages = [(int(m.group(1)), name) for name in intermediates if (m := _STAGE.match(name))]
    return [name for _, name in sorted(stages)]


def feature_maps(intermediates: Mapping[str, Any], *, pyramid: bool = False) -> list[jax.Array]:
    """The tower's NHWC feature maps, coarsest last (see the module docstring)."""
    stages = stage_names(intermediates)
    if stages:
        names = stages if pyramid else stages[-1:]
    elif "patch_tokens" in intermediates:
        names = ["patch_tokens"]
    else:
        raise ValueError(
            f"the image tower gives no spatial feature map: its intermediates are "
            f"{sorted(intermediates)}"
        )
    return [intermediates[name] for name in names]


def tower_feature_maps(
    module: Any, variables: Mapping[str, Any], images: jax.Array, *, pyramid: bool = False
) -> list[jax.Array]:
    """Apply the tower (running BatchNorm statistics: ``train=False``) and return its maps."""
    _, intermediates = module.apply(dict(variables), images, train=False)
    return feature_maps(intermediates, pyramid=pyramid)
