"""open_clip's config defaults (``CLIPVisionCfg`` / ``CLIPTextCfg``) and the small rules by which
this project's tower fields become those config values and back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pretrain.export.tree_io import mlp_ratio_for, module_field

LAYER_NORM_EPS = 1e-5
HEAD_WIDTH = 64
TEXT_HEADS = 8
MLP_RATIO = 4.0
ACTIVATIONS = ("gelu", "quick_gelu")


def norm_kwargs(eps: float) -> dict[str, Any]:
    """The config entry for a LayerNorm eps (none for open_clip's own)."""
    return {} if eps == LAYER_NORM_EPS else {"norm_kwargs": {"eps": eps}}


def eps_of(tower_cfg: Mapping[str, Any]) -> float:
    """The LayerNorm eps a ``vision_cfg`` / ``text_cfg`` gives its tower."""
    return float((tower_cfg.get("norm_kwargs") or {}).get("eps", LAYER_NORM_EPS))


def mlp_ratio(width: int, mlp_dim: int) -> float:
    """An ``mlp_ratio`` for which open_clip's ``int(width * mlp_ratio)`` gives back ``mlp_dim``."""
    return mlp_ratio_for(width, mlp_dim, preferred=())


def activation_of(tower: Any) -> str:
    """A transformer tower's activation, which must be one open_clip's ``quick_gelu`` flag says."""
    activation = module_field(tower, "activation", "gelu") or "gelu"
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} has no open_clip equivalent")
    return activation


def unsupported_values(
    section: Mapping[str, Any], supported: Mapping[str, tuple[Any, ...]]
) -> list[str]:
    """``name=value`` for each field of a config section whose value is not a supported one (an
    absent field takes open_clip's default, the first supported value)."""
    return [
        f"{name}={section[name]!r}"
        for name, values in supported.items()
        if section.get(name, values[0]) not in values
    ]


def norm_kwargs_problems(section: Mapping[str, Any], section_name: str) -> list[str]:
    """A ``norm_kwargs`` entry that sets more than the eps the towers have."""
    norm_kwargs = section.get("norm_kwargs") or {}
    if set(norm_kwargs) - {"eps"}:
        return [f"{section_name}.norm_kwargs={norm_kwargs!r} (only eps is supported)"]
    return []
