"""timm's Hub / ``local-dir:`` export directory, written and read for every timm export:
``model.safetensors`` (the state dict) and ``config.json`` (``architecture``, ``num_classes``,
``num_features``, ``global_pool``, ``model_args``, ``pretrained_cfg``). A user loads one with::

    import timm
    model = timm.create_model("local-dir:/path/to/export", pretrained=True).eval()

or, by hand::

    import json, timm
    from safetensors.torch import load_file
    config = json.load(open("/path/to/export/config.json"))
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    model.load_state_dict(load_file("/path/to/export/model.safetensors"), strict=True)

Images are NCHW, normalised as in training (``pretrained_cfg`` carries the mean and std).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.export.tree_io import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    StateDict,
    as_pair,
    write_json,
    write_safetensors,
)

WEIGHTS_FILE_NAME = "model.safetensors"
CONFIG_FILE_NAME = "config.json"


def timm_hub_config(
    architecture: str,
    model_args: Mapping[str, Any],
    *,
    image_size: int | tuple[int, int],
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
    std: tuple[float, float, float] = OPENAI_DATASET_STD,
    num_features: int | None = None,
) -> dict[str, Any]:
    """timm's Hub ``config.json`` content: architecture, model_args and pretrained_cfg (the input
    size and normalisation a user's preprocessing reads). ``num_features`` defaults to a ViT's
    ``embed_dim``."""
    height, width = as_pair(image_size)
    return {
        "architecture": architecture,
        "num_classes": model_args["num_classes"],
        "num_features": model_args["embed_dim"] if num_features is None else num_features,
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
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(path_dir / WEIGHTS_FILE_NAME, state)
    write_json(path_dir / CONFIG_FILE_NAME, config)
    return path_dir


def read_timm_config(path_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(path_dir) / CONFIG_FILE_NAME).read_text())


def read_timm_directory(path_dir: str | Path) -> tuple[dict[str, Any], StateDict]:
    """``(model_args, state_dict)`` of a timm Hub directory; ``num_classes`` and ``global_pool``
    written beside ``model_args`` (as timm's Hub configs do) fill in for missing arguments."""
    import safetensors.numpy

    config = read_timm_config(path_dir)
    model_args = dict(config.get("model_args", {}))
    for name in ("num_classes", "global_pool"):
        if name in config:
            model_args.setdefault(name, config[name])
    state = safetensors.numpy.load_file(str(Path(path_dir) / WEIGHTS_FILE_NAME))
    return model_args, state
