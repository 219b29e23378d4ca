"""The image tower of a pretrained run, whatever its method: where its config entry and its
parameters sit in the run, and the part of them a new model's tower takes."""

from __future__ import annotations

from typing import Any

import numpy as np
from ml_collections import ConfigDict


def image_tower_spec(pretrained_config: ConfigDict) -> ConfigDict:
    """The image tower entry of a pretraining recipe (CLIP/CatLIP: model.image, UTA: student)."""
    model = pretrained_config.model
    for name in ("image", "student"):
        if name in model:
            return model[name]
    raise ValueError(f"the pretrained recipe's model has no image tower: {sorted(model.keys())}")


def image_tower_params(params: Any) -> Any:
    """The tower's subtree of a pretrained run's parameters."""
    return params.get("image_encoder", params)


def matching_subtree(params: Any, template: Any, path: str = "") -> Any:
    """``params`` restricted to the keys of ``template`` (a pretrained CLIP tower's projection is
    not used by the classifier), with a clear error for a missing or misshapen entry."""
    if isinstance(template, dict):
        missing = sorted(set(template) - set(params))
        if missing:
            raise ValueError(f"pretrained tower lacks {[f'{path}{k}' for k in missing]}")
        return {k: matching_subtree(params[k], v, f"{path}{k}/") for k, v in template.items()}
    if np.shape(params) != tuple(template.shape):
        raise ValueError(
            f"pretrained {path[:-1]} has shape {np.shape(params)}, the tower {template.shape}"
        )
    return np.asarray(params, template.dtype)
