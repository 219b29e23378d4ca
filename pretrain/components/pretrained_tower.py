"""The image tower of a pretrained run, whatever its method: where its config entry and its
parameters sit in the run, and the part of them a new model's tower takes."""

from __future__ import annotations

from typing import Any

import numpy as np
from ml_collections import ConfigDict

from pretrain.task import task_class


def image_tower_spec(pretrained_config: ConfigDict) -> ConfigDict:
    """The image tower's entry in a pretraining recipe (where its task says it is)."""
    entry = task_class(pretrained_config).image_tower_entry
    if entry is None or entry not in pretrained_config.model:
        raise ValueError(
            f"a {pretrained_config.task} run has no image tower: its model has "
            f"{sorted(pretrained_config.model.keys())}"
        )
    return pretrained_config.model[entry]


def image_tower_params(pretrained_config: ConfigDict, params: Any) -> Any:
    """The tower's subtree of a pretrained run's parameters."""
    key = task_class(pretrained_config).image_tower_params_key
    return params[key] if key else params


def matching_subtree(params: Any, template: Any, path: str = "") -> Any:
    """``params`` restricted to the keys of ``template`` (e.g. a pretrained tower's projection,
    which a new head does not use), with a clear error for a missing or misshapen entry."""
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
