"""open_clip's MobileCLIP image tower (``MobileCLIP-S1`` / ``-S2``, ``MobileCLIP2-S0``: a timm
``fastvit_mci*`` trunk) <-> models/mobileclip.py's ``MobileClipImageTower``: a tower family.

open_clip builds the tower as ``TimmModel``: with ``timm_proj: null`` and ``timm_pool: "avg"``
(the MobileCLIP configs) it calls ``timm.create_model(timm_model_name, num_classes=embed_dim,
global_pool="avg")``, so the trunk's own classifier ``visual.trunk.head.fc`` (a Linear *with*
bias, ``final width -> embed_dim``) is the CLIP projection and ``visual.head`` is an empty
``Sequential``. That is the JAX tower's ``head`` Dense, so the whole tower is timm's state dict
(fastvit_layout.py) under ``visual.trunk.``, BatchNorm ``batch_stats`` as running statistics. A
tower without projection (``output_dim=None``) is written with ``timm_proj: "none"``
(``num_classes=0``: no ``head.fc``), and ``embed_dim`` is then its final width.

open_clip passes nothing but the name (and pooling, classes, drop rates) to timm, so the tower
must be exactly one of timm's registered ``fastvit_mci0`` / ``fastvit_mci1`` / ``fastvit_mci2``
(models.mobileclip.MCI_VARIANTS, train-time form, timm's other fixed choices); any other tower is
refused with the fields that differ (pretrain.export.timm_fastvit.save_timm_fastvit exports it to
timm alone). The tower's GELU is exact whatever ``quick_gelu`` says (it concerns the text tower
only). The image size is the preprocessing size only: the network is convolutional, and
open_clip's MobileCLIP configs train and run at 256.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from models.mobileclip import MCI_VARIANTS, MobileClipImageTower
from pretrain.export import timm_fastvit
from pretrain.export.fastvit_layout import fastvit_leaves, final_width, timm_shapes, variant_fields
from pretrain.export.state_dict_shapes import BATCH_NORM_COUNTER, Shapes
from pretrain.export.tree_io import Entries, StateDict, as_pair, flatten, size_value, unflatten

TRUNK_PREFIX = "visual.trunk."
_JAX = "image_encoder/"
# timm's registered MobileCLIP trunks, by name, and the MCi variant each one is.
FASTVIT_TRUNKS = {f"fastvit_{variant}": variant for variant in MCI_VARIANTS}
# A parameter only this tower has: a two-tower tree holding it is a MobileCLIP one.
_MARKER = f"{_JAX}stem_0/conv_kxk_0/conv/kernel"


def is_tower(image_encoder: Any, timm_model_name: str | None) -> bool:
    """True for a ``MobileClipImageTower`` (or a mapping of its fields: ``depths`` and
    ``widths``)."""
    del timm_model_name  # checked against the tower's trunk by vision_cfg
    if isinstance(image_encoder, MobileClipImageTower):
        return True
    return isinstance(image_encoder, Mapping) and {"depths", "widths"} <= set(image_encoder)


def is_vision_cfg(vision_cfg: Mapping[str, Any]) -> bool:
    """True when open_clip builds one of timm's fastvit_mci* trunks from this ``vision_cfg``."""
    return vision_cfg.get("timm_model_name") in FASTVIT_TRUNKS


def is_params(params: Entries) -> bool:
    return params.has(_MARKER)


# --------------------------------------------------------------------------------------------------
# Config (tower <-> open_clip vision_cfg)
# --------------------------------------------------------------------------------------------------


def fastvit_trunk_name(image_encoder: Any) -> str:
    """The timm name (``fastvit_mci0/1/2``) of the registered trunk this tower is exactly.

    Raises ``ValueError`` with the differing ``FastVit`` arguments when it is none of them:
    open_clip builds a timm trunk from its name alone.
    """
    args = timm_fastvit.timm_model_args(image_encoder)  # raises for towers timm cannot hold
    mismatches = []
    for name, variant in FASTVIT_TRUNKS.items():
        fields = variant_fields(variant, args["num_classes"] or None)
        registered = timm_fastvit.timm_model_args(fields)
        differences = {
            key: (args.get(key), registered.get(key))
            for key in sorted(set(args) | set(registered))
            if args.get(key) != registered.get(key)
        }
        if not differences:
            return name
        mismatches.append(f"{name}: (ours, timm's) differ in {differences}")
    raise ValueError(
        "the MobileCLIP image tower is none of timm's registered fastvit_mci* trunks, which is "
        "all open_clip can build (by name); export the tower alone with "
        "pretrain.export.timm_fastvit.save_timm_fastvit instead. " + "; ".join(mismatches)
    )


def vision_cfg(
    image_encoder: Any,
    image_size: int | tuple[int, int],
    timm_model_name: str | None,
    text_activation: str,
) -> tuple[dict[str, Any], int]:
    """``(vision_cfg, embed_dim)`` as open_clip's MobileCLIP-S1/S2 configs write them."""
    del text_activation  # GELU inside timm
    name = fastvit_trunk_name(image_encoder)
    if timm_model_name not in (None, name):
        raise ValueError(
            f"timm_model_name={timm_model_name!r}, but the MobileCLIP image tower is timm's {name}"
        )
    output_dim = timm_fastvit.timm_model_args(image_encoder)["num_classes"]
    config = {
        "timm_model_name": name,
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        # null: the trunk's classifier projects (num_classes=embed_dim); "none": no projection.
        "timm_proj": None if output_dim else "none",
        "timm_drop": 0.0,
        "timm_drop_path": 0.0,
        "image_size": size_value(image_size),
    }
    width = final_width(variant_fields(FASTVIT_TRUNKS[name], None))
    return config, int(output_dim or width)


def vision_cfg_problems(vision_cfg: Mapping[str, Any]) -> list[str]:
    """None here: timm_pool and timm_proj are checked with the tower they build."""
    del vision_cfg
    return []


def _trunk_fields(vision_cfg: Mapping[str, Any], embed_dim: int) -> dict[str, Any]:
    """The (train-time) tower's fields that open_clip's TimmModel builds from ``vision_cfg``."""
    name = vision_cfg["timm_model_name"]
    if name not in FASTVIT_TRUNKS:
        raise ValueError(
            f"timm_model_name {name!r} is not a MobileCLIP trunk {list(FASTVIT_TRUNKS)}"
        )
    pool = vision_cfg.get("timm_pool", "avg")
    proj = vision_cfg.get("timm_proj", "linear")
    if pool != "avg":
        raise ValueError(f"timm_pool={pool!r}: the MobileCLIP tower average-pools ('avg')")
    if proj not in (None, "", "none"):
        raise ValueError(
            f"timm_proj={proj!r}: the MobileCLIP tower projects with the trunk's classifier "
            "(timm_proj null) or not at all ('none')"
        )
    # How many outputs TimmModel gives the trunk's classifier (0: none).
    classes = 0 if proj == "none" else int(embed_dim)
    return variant_fields(FASTVIT_TRUNKS[name], classes or None)


def jax_kwargs(
    vision_cfg: Mapping[str, Any], embed_dim: int, activation: str
) -> tuple[dict[str, Any], tuple[int, int]]:
    """``(MobileClipImageTower kwargs, (height, width))`` for a MobileCLIP ``vision_cfg``."""
    del activation  # GELU inside timm
    fields = _trunk_fields(vision_cfg, embed_dim)
    kwargs = {name: fields[name] for name in ("depths", "widths", "output_dim")}
    return kwargs, as_pair(vision_cfg.get("image_size", 224))


# --------------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------------


def state_dict_shapes(vision_cfg: Mapping[str, Any], embed_dim: int) -> Shapes:
    """Keys and shapes of open_clip's MobileCLIP image tower (``visual.trunk.*``)."""
    return timm_shapes(fastvit_leaves(_trunk_fields(vision_cfg, embed_dim)), TRUNK_PREFIX)


def to_torch(
    params: Entries, batch_stats: Entries, vision_cfg: Mapping[str, Any], embed_dim: int
) -> StateDict:
    """Take the image tower's entries from flat two-tower ``params`` and ``batch_stats``
    (``image_encoder/...``) and return them as open_clip's ``visual.trunk.*``."""
    if not is_vision_cfg(vision_cfg):
        raise ValueError(
            "a MobileCLIP image tower exports as a timm fastvit_mci* trunk: pass its model_config "
            "(open_clip_model_config(...))"
        )
    variables = {
        "params": unflatten(params.take_under(_JAX)),
        "batch_stats": unflatten(batch_stats.take_under(_JAX)),
    }
    trunk = timm_fastvit.to_timm_state_dict(variables, _trunk_fields(vision_cfg, embed_dim))
    return {f"{TRUNK_PREFIX}{key}": value for key, value in trunk.items()}


def from_torch(
    state: Entries, vision_cfg: Mapping[str, Any], embed_dim: int
) -> tuple[StateDict, StateDict]:
    """Take ``visual.trunk.*`` from an open_clip state dict: ``(flat params, flat batch_stats)``
    with ``image_encoder/...`` paths. Missing ``num_batches_tracked`` counters (converted
    checkpoints) are fine: the tower does not use them."""
    trunk = state.take_under(TRUNK_PREFIX)
    counter = re.compile(r"(.*)\.running_mean")
    for key in list(trunk):
        matched = counter.fullmatch(key)
        if matched:
            trunk.setdefault(f"{matched.group(1)}.{BATCH_NORM_COUNTER}", np.zeros((), np.int64))
    variables = timm_fastvit.from_timm_state_dict(trunk, _trunk_fields(vision_cfg, embed_dim))
    prefixed = lambda tree: {f"{_JAX}{key}": value for key, value in flatten(tree).items()}
    return prefixed(variables["params"]), prefixed(variables["batch_stats"])
