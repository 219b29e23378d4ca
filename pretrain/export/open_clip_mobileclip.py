"""open_clip's MobileCLIP image tower (``MobileCLIP-S1`` / ``-S2``, ``MobileCLIP2-S0``: a timm
``fastvit_mci*`` trunk) <-> models/mobileclip.py's ``MobileClipImageTower``.

The image-tower half of the open_clip export for a ``TwoTowerModel`` whose image tower is an MCi
tower; pretrain/export/open_clip.py dispatches here for it and keeps the text tower (under
``text.``: open_clip's MobileCLIP configs say ``custom_text``), the logit scale and the files.

open_clip builds the tower as ``TimmModel``: with ``timm_proj: null`` and ``timm_pool: "avg"``
(both MobileCLIP configs) it calls ``timm.create_model(timm_model_name, num_classes=embed_dim,
global_pool="avg")``, so the trunk's own classifier ``visual.trunk.head.fc`` (a Linear *with*
bias, ``final width -> embed_dim``) is the CLIP projection and ``visual.head`` is an empty
``Sequential``. That is the JAX tower's ``head`` Dense, so the whole tower is timm's state dict
(pretrain/export/timm_fastvit.py) under ``visual.trunk.``:

==========================================  =====================================================
JAX                                          open_clip ``state_dict``
==========================================  =====================================================
``params/image_encoder/...``                 ``visual.trunk.<timm FastVit key>``
``batch_stats/image_encoder/.../{mean,var}`` ``visual.trunk....{running_mean,running_var}``
(none)                                       ``visual.trunk....num_batches_tracked`` (int64)
``params/image_encoder/head`` (W, E) + bias  ``visual.trunk.head.fc.weight`` (E, W), ``.bias``
==========================================  =====================================================

A tower without projection (``output_dim=None``) is written with ``timm_proj: "none"``
(``num_classes=0``: no ``head.fc``), and ``embed_dim`` is then its final width.

open_clip passes nothing but the name (and pooling, classes, drop rates) to timm, so the tower
must be exactly one of timm's registered ``fastvit_mci0`` / ``fastvit_mci1`` / ``fastvit_mci2``
(models.mobileclip.MCI_VARIANTS, train-time form, timm's other fixed choices); any other tower is
refused with the fields that differ (pretrain.export.timm_fastvit.save_timm_fastvit exports it to
timm alone). BatchNorm eps is timm's 1e-5; the tower's GELU is exact whatever ``quick_gelu`` says
(it concerns the text tower only). The image size is the preprocessing size only: the network is
convolutional, and open_clip's MobileCLIP configs train and run at 256.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from models.mobileclip import (
    DOWNSAMPLE_KERNEL,
    DOWNSAMPLE_SE_DIVISOR,
    DOWNSAMPLE_SE_RATIO,
    DOWNSAMPLE_SMALL_KERNEL,
    FINAL_SE_DIVISOR,
    FINAL_SE_RATIO,
    MCI_VARIANTS,
    POS_EMB_KERNEL,
    MobileClipImageTower,
    make_divisible,
)
from pretrain.export import timm_fastvit
from pretrain.export.state_dict_shapes import BATCH_NORM_COUNTER, Shapes, batch_norm_shapes
from pretrain.export.tree_io import Entries, StateDict, as_pair, flatten, size_value, unflatten

TRUNK_PREFIX = "visual.trunk."
JAX_PREFIX = "image_encoder/"
# timm's registered MobileCLIP trunks, by name, and the MCi variant each one is.
FASTVIT_TRUNKS = {f"fastvit_{variant}": variant for variant in MCI_VARIANTS}


def is_mobileclip_tower(image_encoder: Any) -> bool:
    """True for a ``MobileClipImageTower`` (or a mapping of its fields: ``depths`` and
    ``widths``)."""
    if isinstance(image_encoder, MobileClipImageTower):
        return True
    return isinstance(image_encoder, Mapping) and {"depths", "widths"} <= set(image_encoder)


def is_mobileclip_vision_cfg(vision_cfg: Mapping[str, Any]) -> bool:
    """True when open_clip builds one of timm's fastvit_mci* trunks from this ``vision_cfg``."""
    return vision_cfg.get("timm_model_name") in FASTVIT_TRUNKS


# --------------------------------------------------------------------------------------------------
# Config (tower <-> open_clip vision_cfg)
# --------------------------------------------------------------------------------------------------


def _registered_args(variant: str, num_classes: int) -> dict[str, Any]:
    tower = MobileClipImageTower.from_variant(variant, output_dim=num_classes or None)
    return timm_fastvit.timm_model_args(tower)


def fastvit_trunk_name(image_encoder: Any) -> str:
    """The timm name (``fastvit_mci0/1/2``) of the registered trunk this tower is exactly.

    Raises ``ValueError`` with the differing ``FastVit`` arguments when it is none of them:
    open_clip builds a timm trunk from its name alone.
    """
    args = timm_fastvit.timm_model_args(image_encoder)  # raises for towers timm cannot hold
    mismatches = []
    for name, variant in FASTVIT_TRUNKS.items():
        registered = _registered_args(variant, args["num_classes"])
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


def mobileclip_vision_cfg(
    image_encoder: Any, image_size: int | tuple[int, int]
) -> tuple[dict[str, Any], int]:
    """``(vision_cfg, embed_dim)`` as open_clip's MobileCLIP-S1/S2 configs write them."""
    name = fastvit_trunk_name(image_encoder)
    output_dim = timm_fastvit.timm_model_args(image_encoder)["num_classes"]
    tower = tower_of_trunk(name, output_dim)
    vision_cfg = {
        "timm_model_name": name,
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        # null: the trunk's classifier projects (num_classes=embed_dim); "none": no projection.
        "timm_proj": None if output_dim else "none",
        "timm_drop": 0.0,
        "timm_drop_path": 0.0,
        "image_size": size_value(image_size),
    }
    return vision_cfg, int(output_dim or tower.width)


def tower_of_trunk(timm_model_name: str, num_classes: int) -> MobileClipImageTower:
    """The (train-time) tower timm builds for ``timm_model_name`` with ``num_classes`` outputs
    (0: no classifier)."""
    if timm_model_name not in FASTVIT_TRUNKS:
        raise ValueError(
            f"timm_model_name {timm_model_name!r} is not a MobileCLIP trunk {list(FASTVIT_TRUNKS)}"
        )
    variant = FASTVIT_TRUNKS[timm_model_name]
    return MobileClipImageTower.from_variant(variant, output_dim=int(num_classes) or None)


def _trunk_classes(vision_cfg: Mapping[str, Any], embed_dim: int) -> int:
    """How many outputs open_clip's TimmModel gives the trunk's classifier (0: none)."""
    pool = vision_cfg.get("timm_pool", "avg")
    proj = vision_cfg.get("timm_proj", "linear")
    if pool != "avg":
        raise ValueError(f"timm_pool={pool!r}: the MobileCLIP tower average-pools ('avg')")
    if proj not in (None, "", "none"):
        raise ValueError(
            f"timm_proj={proj!r}: the MobileCLIP tower projects with the trunk's classifier "
            "(timm_proj null) or not at all ('none')"
        )
    return 0 if proj == "none" else int(embed_dim)


def tower_of_vision_cfg(vision_cfg: Mapping[str, Any], embed_dim: int) -> MobileClipImageTower:
    """The tower open_clip builds from a MobileCLIP ``vision_cfg`` (see
    :func:`is_mobileclip_vision_cfg`)."""
    return tower_of_trunk(vision_cfg["timm_model_name"], _trunk_classes(vision_cfg, embed_dim))


def jax_mobileclip_kwargs(
    vision_cfg: Mapping[str, Any], embed_dim: int
) -> tuple[dict[str, Any], tuple[int, int]]:
    """``(MobileClipImageTower kwargs, (height, width))`` for a MobileCLIP ``vision_cfg``."""
    tower = tower_of_vision_cfg(vision_cfg, embed_dim)
    kwargs = {
        "depths": tower.depths,
        "widths": tower.widths,
        "output_dim": tower.output_dim,
    }
    return kwargs, as_pair(vision_cfg.get("image_size", 224))


# --------------------------------------------------------------------------------------------------
# Keys and shapes (from timm's FastVit module layout, independent of the mapping below)
# --------------------------------------------------------------------------------------------------


def _conv_bn_shapes(key: str, out_channels: int, in_per_group: int, kernel: int) -> Shapes:
    """timm's ConvNormAct without activation: ``conv`` (bias-free) + ``bn``."""
    return {
        f"{key}.conv.weight": (out_channels, in_per_group, kernel, kernel),
        **batch_norm_shapes(f"{key}.bn", out_channels),
    }


def _squeeze_excite_shapes(key: str, channels: int, reduced: int) -> Shapes:
    return {
        f"{key}.fc1.weight": (reduced, channels, 1, 1),
        f"{key}.fc1.bias": (reduced,),
        f"{key}.fc2.weight": (channels, reduced, 1, 1),
        f"{key}.fc2.bias": (channels,),
    }


def _mobileone_shapes(
    key: str,
    in_channels: int,
    out_channels: int,
    kernel: int,
    *,
    stride: int = 1,
    groups: int = 1,
    se_reduced: int = 0,
    scale_branch: bool = True,
    conv_branches: int = 1,
) -> Shapes:
    """timm's train-time MobileOneBlock: an identity BatchNorm when the shape is kept, ``conv_kxk``
    branches, a 1x1 ``conv_scale`` branch for kernels above 1, optional squeeze-excitation."""
    in_per_group = in_channels // groups
    shapes: Shapes = {}
    if se_reduced:
        shapes.update(_squeeze_excite_shapes(f"{key}.se", out_channels, se_reduced))
    if in_channels == out_channels and stride == 1:
        shapes.update(batch_norm_shapes(f"{key}.identity", out_channels))
    for branch in range(conv_branches):
        shapes.update(
            _conv_bn_shapes(f"{key}.conv_kxk.{branch}", out_channels, in_per_group, kernel)
        )
    if kernel > 1 and scale_branch:
        shapes.update(_conv_bn_shapes(f"{key}.conv_scale", out_channels, in_per_group, 1))
    return shapes


def _conv_mlp_shapes(key: str, width: int, hidden: int) -> Shapes:
    return {
        # depthwise 7x7 conv + BN, then 1x1 convs with bias
        **_conv_bn_shapes(f"{key}.conv", width, 1, 7),
        f"{key}.fc1.weight": (hidden, width, 1, 1),
        f"{key}.fc1.bias": (hidden,),
        f"{key}.fc2.weight": (width, hidden, 1, 1),
        f"{key}.fc2.bias": (width,),
    }


def _patch_embed_shapes(key: str, width: int, use_se: bool) -> Shapes:
    """timm's PatchEmbed: a stride-2 large-kernel conv with one input channel per group (and a
    small-kernel branch, optional squeeze-excitation), then a 1x1 MobileOne block."""
    se_reduced = make_divisible(width * DOWNSAMPLE_SE_RATIO, DOWNSAMPLE_SE_DIVISOR)
    shapes = {
        **_conv_bn_shapes(f"{key}.proj.0.large_conv", width, 1, DOWNSAMPLE_KERNEL),
        **_conv_bn_shapes(f"{key}.proj.0.small_conv", width, 1, DOWNSAMPLE_SMALL_KERNEL),
        **_mobileone_shapes(f"{key}.proj.1", width, width, 1),
    }
    if use_se:
        shapes.update(_squeeze_excite_shapes(f"{key}.proj.0.se", width, se_reduced))
    return shapes


def _repmixer_block_shapes(key: str, width: int, hidden: int) -> Shapes:
    mixer = f"{key}.token_mixer"
    return {
        # the norm is a MobileOne block reduced to its identity BatchNorm
        **_mobileone_shapes(
            f"{mixer}.norm", width, width, 3, groups=width, scale_branch=False, conv_branches=0
        ),
        **_mobileone_shapes(f"{mixer}.mixer", width, width, 3, groups=width),
        f"{mixer}.layer_scale.gamma": (width, 1, 1),
        **_conv_mlp_shapes(f"{key}.mlp", width, hidden),
        f"{key}.layer_scale.gamma": (width, 1, 1),
    }


def _attention_block_shapes(key: str, width: int, hidden: int) -> Shapes:
    return {
        **batch_norm_shapes(f"{key}.norm", width),
        f"{key}.token_mixer.qkv.weight": (3 * width, width),  # no q/k/v bias
        f"{key}.token_mixer.proj.weight": (width, width),
        f"{key}.token_mixer.proj.bias": (width,),
        f"{key}.layer_scale_1.gamma": (width, 1, 1),
        **_conv_mlp_shapes(f"{key}.mlp", width, hidden),
        f"{key}.layer_scale_2.gamma": (width, 1, 1),
    }


def fastvit_state_dict_shapes(tower: MobileClipImageTower, prefix: str = TRUNK_PREFIX) -> Shapes:
    """Keys and shapes of timm's train-time ``FastVit`` state dict for an MCi tower of timm's
    fixed layout (RepMixer stages, attention in the last, RepCPE before it), BatchNorm buffers
    included, under ``prefix``."""
    stem = tower.widths[0]
    shapes: Shapes = {
        **_mobileone_shapes(f"{prefix}stem.0", 3, stem, 3, stride=2),
        **_mobileone_shapes(f"{prefix}stem.1", stem, stem, 3, stride=2, groups=stem),
        **_mobileone_shapes(f"{prefix}stem.2", stem, stem, 1),
    }
    previous = stem
    for index, (depth, width) in enumerate(zip(tower.depths, tower.widths)):
        stage = f"{prefix}stages.{index}"
        hidden = int(width * tower.mlp_ratio)
        if index > 0:
            shapes.update(
                _patch_embed_shapes(f"{stage}.downsample", width, tower.se_downsamples[index])
            )
        if tower.pos_embs[index]:
            shapes[f"{stage}.pos_emb.pos_enc.weight"] = (width, 1, POS_EMB_KERNEL, POS_EMB_KERNEL)
            shapes[f"{stage}.pos_emb.pos_enc.bias"] = (width,)
        block_shapes = (
            _attention_block_shapes
            if tower.token_mixers[index] == "attention"
            else _repmixer_block_shapes
        )
        for block in range(depth):
            shapes.update(block_shapes(f"{stage}.blocks.{block}", width, hidden))
        previous = width
    final = tower.width
    se_reduced = make_divisible(final * FINAL_SE_RATIO, FINAL_SE_DIVISOR)
    shapes.update(
        _mobileone_shapes(
            f"{prefix}final_conv", previous, final, 3, groups=previous, se_reduced=se_reduced
        )
    )
    if tower.output_dim:
        shapes[f"{prefix}head.fc.weight"] = (int(tower.output_dim), final)
        shapes[f"{prefix}head.fc.bias"] = (int(tower.output_dim),)
    return shapes


def mobileclip_state_dict_shapes(vision_cfg: Mapping[str, Any], embed_dim: int) -> Shapes:
    """Keys and shapes of open_clip's MobileCLIP image tower (``visual.*``) for a config."""
    return fastvit_state_dict_shapes(tower_of_vision_cfg(vision_cfg, embed_dim))


# --------------------------------------------------------------------------------------------------
# Parameters and running statistics (JAX trees <-> open_clip state dict)
# --------------------------------------------------------------------------------------------------


def _tower_variables(params: Entries, batch_stats: Entries) -> dict[str, Any]:
    """The image tower's ``{"params", "batch_stats"}``, taken out of the two-tower entries."""

    def take_tower(entries: Entries) -> dict[str, Any]:
        return unflatten(
            {
                key.removeprefix(JAX_PREFIX): entries.take(key)
                for key in entries.keys_under(JAX_PREFIX)
            }
        )

    return {"params": take_tower(params), "batch_stats": take_tower(batch_stats)}


def mobileclip_to_torch(
    params: Entries,
    batch_stats: Entries,
    tower: MobileClipImageTower,
    *,
    num_batches_tracked: int = 0,
) -> StateDict:
    """Take the image tower's entries from flat two-tower ``params`` and ``batch_stats``
    (``image_encoder/...`` paths) and return them as open_clip's ``visual.trunk.*``."""
    trunk = timm_fastvit.to_timm_state_dict(
        _tower_variables(params, batch_stats), tower, num_batches_tracked=num_batches_tracked
    )
    return {f"{TRUNK_PREFIX}{key}": value for key, value in trunk.items()}


def mobileclip_from_torch(
    state: Entries, tower: MobileClipImageTower
) -> tuple[StateDict, StateDict]:
    """Take ``visual.trunk.*`` from an open_clip state dict: ``(flat params, flat batch_stats)``
    with ``image_encoder/...`` paths. Missing ``num_batches_tracked`` counters (converted
    checkpoints) are fine: the tower does not use them."""
    trunk = {
        key.removeprefix(TRUNK_PREFIX): state.take(key) for key in state.keys_under(TRUNK_PREFIX)
    }
    counter = re.compile(r"(.*)\.running_mean")
    for key in list(trunk):
        matched = counter.fullmatch(key)
        if matched:
            trunk.setdefault(f"{matched.group(1)}.{BATCH_NORM_COUNTER}", np.zeros((), np.int64))
    variables = timm_fastvit.from_timm_state_dict(trunk, tower)
    prefixed = lambda tree: {f"{JAX_PREFIX}{key}": value for key, value in flatten(tree).items()}
    return prefixed(variables["params"]), prefixed(variables["batch_stats"])
