"""The project's ViT (``models.vit.VisionTransformer``) fields as the exporters read them: from
the module or from a mapping of its fields, models/vit.py's defaults filling in what a mapping
omits (None for the fields without a default)."""

from __future__ import annotations

import dataclasses
from typing import Any

from models.vit import VisionTransformer
from pretrain.export.tree_io import module_field

_DEFAULTS = {
    field.name: None if field.default is dataclasses.MISSING else field.default
    for field in dataclasses.fields(VisionTransformer)
}


def vit_field(vit: Any, name: str) -> Any:
    return module_field(vit, name, _DEFAULTS[name])


def vit_mlp_dim(vit: Any) -> int:
    """The MLP width (``mlp_dim`` None: 4 x width)."""
    return int(vit_field(vit, "mlp_dim") or 4 * int(vit_field(vit, "width")))
