"""The one table of image-tower families an open_clip export knows, and how to find a tower's.

A family is one kind of image tower (open_clip's own ViT, a timm EVA trunk, the ModifiedResNet,
MobileCLIP's FastViT trunk) with everything the export needs about it: how to recognise it (from a
JAX tower, from an open_clip ``vision_cfg``, from a two-tower parameter tree), its ``vision_cfg``
both ways, its ``visual.*`` state-dict shapes, and its parameters both ways: the functions
:class:`TowerFamily` lists, which each family's module (vit.py, eva_trunk.py, resnet.py,
mobileclip.py) defines. config.py, state_dict.py and two_tower.py ask this table; they never test
a tower's kind themselves.

Lookups take the first family that recognises a tower, so the order matters where the tests
overlap: MobileCLIP's trunks are timm trunks too, and open_clip's own ViT takes every
``vision_cfg`` (and every parameter tree) no other family claims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from pretrain.export.open_clip import eva_trunk, mobileclip, resnet, vit
from pretrain.export.state_dict_shapes import Shapes
from pretrain.export.tree_io import Entries, StateDict

ImageSize = int | tuple[int, int]
VisionCfg = Mapping[str, Any]


def _no_trunk(directory: Path, tower: Any, params: Any, image_size: ImageSize) -> None:
    """Towers that name no timm trunk of their own."""
    del directory, tower, params, image_size


@dataclasses.dataclass(frozen=True)
class TowerFamily:
    """One kind of image tower: what recognises it and what translates it."""

    name: str
    # (tower, timm_model_name asked for) -> whether the JAX tower (module or field mapping) is one.
    is_tower: Callable[[Any, str | None], bool]
    is_vision_cfg: Callable[[VisionCfg], bool]
    # Whether flat two-tower ``params`` entries show this family (a parameter only it has).
    is_params: Callable[[Entries], bool]
    # True: open_clip builds the tower through timm (its TimmModel), from the config's
    # timm_model_name: an export picks the family by its config, as the parameters do not show it,
    # and the config says custom_text (CustomTextCLIP), as open_clip's own do.
    timm_trunk: bool
    # Whether the tower has BatchNorm running statistics (the ``batch_stats`` collection).
    has_batch_stats: bool
    # (tower, image_size, timm_model_name, text activation) -> (vision_cfg, embed_dim).
    vision_cfg: Callable[[Any, ImageSize, str | None, str], tuple[dict[str, Any], int]]
    # vision_cfg -> the fields this family reads whose values the tower cannot express.
    vision_cfg_problems: Callable[[VisionCfg], list[str]]
    # (vision_cfg, embed_dim, activation) -> (JAX tower kwargs, (height, width)).
    jax_kwargs: Callable[[VisionCfg, int, str], tuple[dict[str, Any], tuple[int, int]]]
    # (vision_cfg, embed_dim) -> keys and shapes of ``visual.*``.
    state_dict_shapes: Callable[[VisionCfg, int], Shapes]
    # (params, batch_stats, vision_cfg, embed_dim) -> ``visual.*``, taking ``image_encoder/...``.
    to_torch: Callable[[Entries, Entries, VisionCfg, int], StateDict]
    # (state, vision_cfg, embed_dim) -> (flat params, flat batch_stats) of ``image_encoder/...``.
    from_torch: Callable[[Entries, VisionCfg, int], tuple[StateDict, StateDict]]
    # (export directory, tower, the two-tower params, image_size) -> the timm_model_name the
    # export names, writing the trunk's own files when it needs them; None: the tower names none.
    export_trunk: Callable[[Path, Any, Any, ImageSize], str | None] = _no_trunk


# The functions every family module defines (export_trunk only where a family needs it).
_FUNCTIONS = (
    *("is_tower", "is_vision_cfg", "is_params", "vision_cfg", "vision_cfg_problems"),
    *("jax_kwargs", "state_dict_shapes", "to_torch", "from_torch"),
)


def _family(module: ModuleType, *, timm_trunk: bool, has_batch_stats: bool) -> TowerFamily:
    """The family a module implements (its name is the module's)."""
    return TowerFamily(
        name=module.__name__.rsplit(".", 1)[-1],
        timm_trunk=timm_trunk,
        has_batch_stats=has_batch_stats,
        export_trunk=getattr(module, "export_trunk", _no_trunk),
        **{name: getattr(module, name) for name in _FUNCTIONS},
    )


MOBILECLIP = _family(mobileclip, timm_trunk=True, has_batch_stats=True)
RESNET = _family(resnet, timm_trunk=False, has_batch_stats=True)
OPEN_CLIP_VIT = _family(vit, timm_trunk=False, has_batch_stats=False)
EVA_TRUNK = _family(eva_trunk, timm_trunk=True, has_batch_stats=False)

# Asked in order by each lookup below (the tower test and the config test each put the catch-all
# last: EVA_TRUNK takes any ViT open_clip's ViT cannot be, OPEN_CLIP_VIT any other config).
FAMILIES: tuple[TowerFamily, ...] = (MOBILECLIP, RESNET, OPEN_CLIP_VIT, EVA_TRUNK)
_BY_CONFIG: tuple[TowerFamily, ...] = (MOBILECLIP, EVA_TRUNK, RESNET, OPEN_CLIP_VIT)


def family_of_tower(image_encoder: Any, timm_model_name: str | None = None) -> TowerFamily:
    """The family of a JAX image tower; ``timm_model_name`` asks for a ViT as a timm trunk."""
    return next(f for f in FAMILIES if f.is_tower(image_encoder, timm_model_name))


def family_of_vision_cfg(vision_cfg: VisionCfg) -> TowerFamily:
    """The family open_clip builds from a ``vision_cfg``."""
    return next(f for f in _BY_CONFIG if f.is_vision_cfg(vision_cfg))


def family_to_export(vision_cfg: VisionCfg, params: Entries) -> TowerFamily:
    """The family a two-tower parameter tree exports as: the config's when it names a timm trunk
    (the parameters of an EVA ViT look like open_clip's ViT's), else the one the parameters show
    (ResNet and MobileCLIP towers have parameters only they have)."""
    return next(
        family
        for family in _BY_CONFIG
        if (family.timm_trunk and vision_cfg and family.is_vision_cfg(vision_cfg))
        or family.is_params(params)
    )
