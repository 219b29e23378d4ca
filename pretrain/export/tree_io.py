"""Shared plumbing of the exporters: flat parameter paths, checked hand-out of entries, reading
model fields, Linear / LayerNorm conversions, atomic file writes and timm's Hub directory layout.
(The layouts themselves live in open_clip.py, timm_eva.py and timm_vit.py.)"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# The normalisation CLIP models are trained with (OpenAI's), written into exported configs.
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

# timm's Hub / ``local-dir:`` layout: the weights and the config (architecture + model_args).
TIMM_WEIGHTS_FILE_NAME = "model.safetensors"
TIMM_CONFIG_FILE_NAME = "config.json"

StateDict = dict[str, np.ndarray]
# Expected PyTorch state-dict entries: key -> shape.
Shapes = dict[str, tuple[int, ...]]
# PyTorch BatchNorm's buffer counting its updates (timm's and open_clip's state dicts carry it).
BATCH_NORM_COUNTER = "num_batches_tracked"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{"a/b": x} -> {"a": {"b": x}}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def unwrap_variables(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept ``variables`` ({"params": ...}) as well as the bare ``params`` tree."""
    return params["params"] if set(params) == {"params"} else params


def block_count(keys: list[str] | Any, pattern: str, what: str) -> int:
    """Number of blocks whose index ``pattern`` captures, checking they run 0..n-1."""
    found = sorted({int(m.group(1)) for key in keys if (m := re.match(pattern, key))})
    if found != list(range(len(found))):
        raise ValueError(f"{what}: block indices are not contiguous from 0: {found}")
    return len(found)


class Entries:
    """Hands out the entries of a flat mapping once each, so that unmapped leftovers (a layout
    mistake, or a model the format cannot hold) are reported instead of silently dropped."""

    def __init__(self, flat: Mapping[str, Any], convert: Callable[[Any], np.ndarray], what: str):
        self._remaining = dict(flat)
        self._convert = convert
        self._what = what

    def take(self, key: str) -> np.ndarray:
        if key not in self._remaining:
            raise KeyError(f"{self._what} has no {key!r}")
        return self._convert(self._remaining.pop(key))

    def has(self, key: str) -> bool:
        return key in self._remaining

    def keys_under(self, prefix: str) -> list[str]:
        return [key for key in self._remaining if key.startswith(prefix)]

    def block_count(self, pattern: str) -> int:
        return block_count(self._remaining, pattern, self._what)

    def check_all_taken(self) -> None:
        if self._remaining:
            raise ValueError(f"{self._what} entries with no mapping: {sorted(self._remaining)}")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name, so that an interrupted export never looks complete."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    temporary.replace(path)


# --------------------------------------------------------------------------------------------------
# Model fields
# --------------------------------------------------------------------------------------------------


def module_field(module: Any, name: str, default: Any = None) -> Any:
    """A field of a model given as a Flax module instance (a dataclass) or a mapping of fields."""
    if isinstance(module, Mapping):
        return module.get(name, default)
    return getattr(module, name, default)


def as_pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image or grid size as (height, width)."""
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


def size_value(value: int | tuple[int, int] | list[int]) -> int | list[int]:
    """A size as timm's JSON configs write it: an int when square, else [height, width]."""
    height, width = as_pair(value)
    return height if height == width else [height, width]


def mlp_ratio_for(width: int, mlp_dim: int) -> float:
    """An ``mlp_ratio`` for which timm's ``int(width * mlp_ratio)`` gives back ``mlp_dim``."""
    for ratio in (4 * 2 / 3, 4.0, mlp_dim / width, (mlp_dim + 0.5) / width):
        if int(width * ratio) == mlp_dim:
            return ratio
    raise ValueError(f"no mlp_ratio gives {mlp_dim} hidden units at width {width}")


# --------------------------------------------------------------------------------------------------
# Linear and LayerNorm (Flax Dense ``kernel`` (in, out) <-> torch Linear ``weight`` (out, in);
# Flax LayerNorm ``scale`` <-> torch ``weight``)
# --------------------------------------------------------------------------------------------------


def batch_norm_shapes(key: str, channels: int) -> Shapes:
    """The state-dict entries of a PyTorch BatchNorm2d named ``key``."""
    return {
        f"{key}.weight": (channels,),
        f"{key}.bias": (channels,),
        f"{key}.running_mean": (channels,),
        f"{key}.running_var": (channels,),
        f"{key}.{BATCH_NORM_COUNTER}": (),
    }


def linear_to_torch(entries: Entries, jax: str, torch: str, bias: bool = True) -> StateDict:
    state = {f"{torch}.weight": entries.take(f"{jax}/kernel").T}
    if bias:
        state[f"{torch}.bias"] = entries.take(f"{jax}/bias")
    return state


def layer_norm_to_torch(entries: Entries, jax: str, torch: str) -> StateDict:
    return {
        f"{torch}.weight": entries.take(f"{jax}/scale").reshape(-1),
        f"{torch}.bias": entries.take(f"{jax}/bias").reshape(-1),
    }


def vit_stem_to_timm(entries: Entries) -> StateDict:
    """The ViT stem in timm's names (vision_transformer.py and eva.py share them): class token,
    patch embedding (HWIO -> OIHW, bias if any), position embeddings, ``norm_pre`` (ln_pre)."""
    take = entries.take
    state: StateDict = {
        "cls_token": take("class_embedding").reshape(1, 1, -1),
        "patch_embed.proj.weight": take("conv1/kernel").transpose(3, 2, 0, 1),
    }
    if entries.has("conv1/bias"):
        state["patch_embed.proj.bias"] = take("conv1/bias")
    if entries.has("positional_embedding"):
        state["pos_embed"] = take("positional_embedding")[None]
    if entries.has("ln_pre/scale"):
        state.update(layer_norm_to_torch(entries, "ln_pre", "norm_pre"))
    return state


def linear_from_torch(entries: Entries, torch: str, jax: str, bias: bool = True) -> StateDict:
    flat = {f"{jax}/kernel": entries.take(f"{torch}.weight").T}
    if bias:
        flat[f"{jax}/bias"] = entries.take(f"{torch}.bias")
    return flat


def layer_norm_from_torch(
    entries: Entries, torch: str, jax: str, shape: tuple[int, ...] = (-1,)
) -> StateDict:
    return {
        f"{jax}/scale": entries.take(f"{torch}.weight").reshape(shape),
        f"{jax}/bias": entries.take(f"{torch}.bias").reshape(shape),
    }


# --------------------------------------------------------------------------------------------------
# timm's Hub directory (``timm.create_model("local-dir:<dir>", pretrained=True)``)
# --------------------------------------------------------------------------------------------------


def timm_hub_config(
    architecture: str,
    model_args: Mapping[str, Any],
    *,
    image_size: int | tuple[int, int],
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
    std: tuple[float, float, float] = OPENAI_DATASET_STD,
) -> dict[str, Any]:
    """timm's Hub ``config.json`` content: architecture, model_args and pretrained_cfg (the input
    size and normalisation a user's preprocessing reads)."""
    height, width = as_pair(image_size)
    return {
        "architecture": architecture,
        "num_classes": model_args["num_classes"],
        "num_features": model_args["embed_dim"],
        "global_pool": model_args["global_pool"],
        "model_args": dict(model_args),
        "pretrained_cfg": {
            "input_size": [3, height, width],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": model_args["num_classes"],
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def write_timm_directory(
    path_dir: str | Path, state: Mapping[str, np.ndarray], config: Mapping[str, Any]
) -> Path:
    """Write ``model.safetensors`` and ``config.json``; returns the directory."""
    from safetensors.numpy import save_file

    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(
        path_dir / TIMM_WEIGHTS_FILE_NAME,
        lambda path: save_file(dict(state), str(path), metadata={"format": "pt"}),
    )
    write_atomically(
        path_dir / TIMM_CONFIG_FILE_NAME,
        lambda path: path.write_text(json.dumps(config, indent=2) + "\n"),
    )
    return path_dir


def read_timm_directory(path_dir: str | Path) -> tuple[dict[str, Any], StateDict]:
    """``(model_args, state_dict)`` of a timm Hub directory; ``num_classes`` and ``global_pool``
    written beside ``model_args`` (as timm's Hub configs do) fill in for missing arguments."""
    import safetensors.numpy

    path_dir = Path(path_dir)
    config = json.loads((path_dir / TIMM_CONFIG_FILE_NAME).read_text())
    model_args = dict(config.get("model_args", {}))
    for name in ("num_classes", "global_pool"):
        if name in config:
            model_args.setdefault(name, config[name])
    return model_args, safetensors.numpy.load_file(str(path_dir / TIMM_WEIGHTS_FILE_NAME))
