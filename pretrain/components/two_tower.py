"""The CLIP two-tower model from a config: built for training (the CLIP task), for teachers and
for reinforcement, and checked before one run's tower initialises another's."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from ml_collections import ConfigDict

from models.two_tower import (
    CLIP_LOGIT_SCALE_INIT,
    SIGLIP_LOGIT_BIAS_INIT,
    SIGLIP_LOGIT_SCALE_INIT,
    TwoTowerModel,
)
from pretrain.components.modules import build_module

# Flax's collection of BatchNorm running statistics (the train state's "model_state").
BATCH_STATS = "batch_stats"


def model_variables(params: Any, model_state: Any) -> dict[str, Any]:
    """Flax variables of the two-tower model: parameters (+ BatchNorm statistics if any)."""
    return (
        {"params": params} if model_state is None else {"params": params, BATCH_STATS: model_state}
    )


def build_two_tower(model_config: ConfigDict, loss_name: str) -> TwoTowerModel:
    """The CLIP/SigLIP model described by ``config.model``."""
    common = {
        "output_dim": int(model_config.embed_dim),
        "dtype": jnp.dtype(model_config.dtype),
        "param_dtype": jnp.dtype(model_config.param_dtype),
        "remat_policy": model_config.remat_policy,
    }
    sigmoid = loss_name.startswith("sigmoid")
    return TwoTowerModel(
        image_encoder=build_module(model_config.image, **common),
        text_encoder=build_module(model_config.text, **common),
        logit_scale_init=SIGLIP_LOGIT_SCALE_INIT if sigmoid else CLIP_LOGIT_SCALE_INIT,
        logit_bias_init=SIGLIP_LOGIT_BIAS_INIT if sigmoid else None,
    )


# Fields of a tower that change what its weights compute (not only their shapes).
TOWER_FIELDS = (
    "width",
    "depth",
    "num_heads",
    "mlp_dim",
    "vocab_size",
    "context_length",
    "output_dim",
    "causal",
    "activation",
    "layer_norm_eps",
)


def check_same_tower(source: Any, target: Any, name: str) -> None:
    """Weights of ``source`` may initialise ``target``: same architecture, not only same shapes."""
    differences = [
        f"{field}: {getattr(source, field)!r} vs {getattr(target, field)!r}"
        for field in TOWER_FIELDS
        if hasattr(source, field) and getattr(source, field) != getattr(target, field, None)
    ]
    if differences:
        raise ValueError(
            f"the {name} tower to initialise from differs from config.model.{name}: "
            + "; ".join(differences)
        )
