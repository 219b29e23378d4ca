"""The MobileCLIP MCi image tower (``models.mobileclip``) <-> timm's ``fastvit_mci*``
(timm/models/fastvit.py), BatchNorm buffers included, in a timm Hub directory (timm_hub.py says
how to load one). The key layout is fastvit_layout.py's.

The train-time tower (``reparameterized=False``) is the one to export: timm builds it from
``config.json`` (``architecture`` + ``model_args``: ``layers``, ``embed_dims``, ``mlp_ratios``,
``se_downsamples``, ``token_mixers``, ``lkc_use_act``, ``cls_ratio``, ``num_classes`` =
``output_dim`` or 0, ``global_pool="avg"``) and loads the weights with ``strict=True``; timm's
own ``reparameterize_model`` then gives its inference form. An already re-parameterised tower
maps too (timm's ``inference_mode=True``), through :func:`to_timm_state_dict` /
:func:`from_timm_state_dict` only: timm's checkpoint filter renames keys of such a file when it
loads a directory, so :func:`save_timm_fastvit` writes the train-time form only.

Fixed by the ``fastvit_mci*`` entry points and checked here: four stages with RepCPE (7x7) before
the last, head width 32, BatchNorm eps 1e-5, GELU. In timm, ``model.forward_features(images)`` is
the final conv's output (the JAX tower's ``final_features``), ``model.forward_head(x,
pre_logits=True)`` the pooled ``pre_logits`` and ``model(images)`` the projected embedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.batchnorm import TORCH_BATCH_NORM_EPS
from models.mobileclip import MCI_VARIANTS, MobileClipImageTower
from pretrain.export.fastvit_layout import (
    FROM_TIMM,
    TO_TIMM,
    fastvit_leaves,
    final_width,
    jax_shapes,
    jax_variable_shapes,
    mci_fields,
)
from pretrain.export.state_dict_shapes import check_state_dict
from pretrain.export.timm_hub import read_timm_directory, timm_hub_config, write_timm_directory
from pretrain.export.tree_io import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    Entries,
    StateDict,
    as_arrays,
    flatten,
    unflatten,
)

__all__ = [
    "from_timm_state_dict",
    "load_timm_fastvit",
    "save_timm_fastvit",
    "timm_architecture",
    "timm_model_args",
    "to_timm_state_dict",
    "tower_from_timm_args",
]

# What timm's fastvit_mci0/1/2 entry points fix (not JSON model arguments).
TIMM_STAGES = 4
TIMM_POS_EMBS = (False, False, False, True)
TIMM_HEAD_DIM = 32
# The FastVit arguments of a tower that an export writes (and an import reads back).
_TOWER_ARGS = {
    "layers": "depths",
    "embed_dims": "widths",
    "se_downsamples": "se_downsamples",
    "token_mixers": "token_mixers",
    "cls_ratio": "cls_ratio",
}


# --------------------------------------------------------------------------------------------------
# Model arguments
# --------------------------------------------------------------------------------------------------


def _check_supported(fields: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming every field timm's fastvit_mci* cannot express."""
    problems = []
    if len(fields["depths"]) != TIMM_STAGES:
        problems.append(f"depths: timm's mci entry points build {TIMM_STAGES} stages")
    if fields["pos_embs"] != TIMM_POS_EMBS:
        problems.append(f"pos_embs: timm's mci entry points fix {TIMM_POS_EMBS}")
    if fields["head_dim"] != TIMM_HEAD_DIM:
        problems.append(f"head_dim: timm's FastViT attention uses {TIMM_HEAD_DIM}")
    if fields["bn_epsilon"] != TORCH_BATCH_NORM_EPS:
        problems.append(f"bn_epsilon: timm's BatchNorm2d uses {TORCH_BATCH_NORM_EPS}")
    if problems:
        raise ValueError("timm's fastvit_mci* cannot hold this tower: " + "; ".join(problems))


def _supported_fields(tower: Any) -> dict[str, Any]:
    fields = mci_fields(tower)
    _check_supported(fields)
    return fields


def timm_architecture(tower: Any) -> str:
    """``fastvit_mci0/1/2`` when the tower is one of them, else ``fastvit_mci0`` (the model
    arguments then set every size; the mci entry points differ in sizes only)."""
    fields = mci_fields(tower)
    for name, sizes in MCI_VARIANTS.items():
        if fields["depths"] == sizes["depths"] and fields["widths"] == sizes["widths"]:
            return f"fastvit_{name}"
    return "fastvit_mci0"


def timm_model_args(tower: Any) -> dict[str, Any]:
    """JSON-able ``FastVit`` keyword arguments (over the entry point's) that build this tower."""
    fields = _supported_fields(tower)
    args: dict[str, Any] = {}
    for timm_name, field in _TOWER_ARGS.items():
        value = fields[field]
        args[timm_name] = list(value) if isinstance(value, tuple | list) else value
    args["mlp_ratios"] = [float(fields["mlp_ratio"])] * len(fields["depths"])
    args["lkc_use_act"] = True
    args["num_classes"] = int(fields["output_dim"] or 0)
    args["global_pool"] = "avg"
    if fields["reparameterized"]:
        args["inference_mode"] = True
    return args


def tower_from_timm_args(model_args: Mapping[str, Any], **kwargs: Any) -> MobileClipImageTower:
    """The tower that :func:`timm_model_args` describes (kwargs: dtype, bn_groups...)."""
    ratios = set(model_args["mlp_ratios"])
    if len(ratios) != 1:
        raise ValueError(f"per-stage mlp_ratios {model_args['mlp_ratios']} are not supported")
    fields = {field: model_args[name] for name, field in _TOWER_ARGS.items() if name in model_args}
    fields = {key: tuple(v) if isinstance(v, list) else v for key, v in fields.items()}
    return MobileClipImageTower(
        **fields,
        mlp_ratio=float(ratios.pop()),
        output_dim=int(model_args.get("num_classes", 0)) or None,
        reparameterized=bool(model_args.get("inference_mode", False)),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# Variables (JAX {"params", "batch_stats"} <-> timm state dict)
# --------------------------------------------------------------------------------------------------


def to_timm_state_dict(
    variables: Mapping[str, Any],
    tower: Any,
    *,
    num_batches_tracked: int = 0,
    dtype: Any = np.float32,
) -> StateDict:
    """timm ``FastVit``'s state dict (NumPy, contiguous) for the tower's ``variables``
    (``{"params": ..., "batch_stats": ...}``, fully addressable). ``num_batches_tracked`` fills
    every BatchNorm's counter (e.g. the training step; timm reads it only with momentum=None).
    ``tower`` is the ``MobileClipImageTower`` (or a mapping of its fields)."""
    fields = _supported_fields(tower)
    if set(variables) != {"params", "batch_stats"}:
        raise ValueError(f"need the tower's params and batch_stats, got {sorted(variables)}")
    leaves = fastvit_leaves(fields)
    flat = flatten(variables)
    expected = jax_variable_shapes(leaves, fields["head_dim"])
    check_state_dict(flat, expected, mismatch="variables do not fit the tower")
    entries = Entries(flat, as_arrays(dtype), "MobileCLIP tower variables")
    state: StateDict = {}
    for leaf in leaves:
        if leaf.kind == "counter":
            state[leaf.timm] = np.asarray(num_batches_tracked, np.int64)
        else:
            values = [entries.take(key) for key in leaf.jax]
            state[leaf.timm] = np.ascontiguousarray(TO_TIMM[leaf.kind](values))
    entries.check_all_taken()
    return state


def from_timm_state_dict(
    state_dict: Mapping[str, Any], tower: Any, *, dtype: Any = np.float32
) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` of the tower from timm ``FastVit``'s state dict
    (NumPy arrays or CPU tensors); every key of timm's layout must be there and nothing else."""
    fields = _supported_fields(tower)
    leaves = fastvit_leaves(fields)
    counters = {leaf.timm for leaf in leaves if leaf.kind == "counter"}
    state = {
        key: np.asarray(value) if key in counters else np.asarray(value, dtype)
        for key, value in state_dict.items()
    }
    entries = Entries(state, lambda value: value, "timm FastViT state dict")
    flat: dict[str, np.ndarray] = {}
    for leaf in leaves:
        value = entries.take(leaf.timm)
        if leaf.kind == "counter":
            continue  # a counter, not a weight: PyTorch only reads it with momentum=None
        shapes = jax_shapes(leaf, fields["head_dim"])
        for key, converted in zip(leaf.jax, FROM_TIMM[leaf.kind](value, shapes)):
            flat[key] = np.ascontiguousarray(converted)
    entries.check_all_taken()
    expected = jax_variable_shapes(leaves, fields["head_dim"])
    check_state_dict(flat, expected, mismatch="timm FastViT state dict does not fit the tower")
    return unflatten(flat)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def timm_config(
    tower: Any,
    *,
    image_size: int | tuple[int, int],
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
    std: tuple[float, float, float] = OPENAI_DATASET_STD,
) -> dict[str, Any]:
    """timm's Hub ``config.json`` for the tower (architecture, model_args, pretrained_cfg)."""
    config = timm_hub_config(
        timm_architecture(tower),
        timm_model_args(tower),
        image_size=image_size,
        mean=mean,
        std=std,
        num_features=final_width(mci_fields(tower)),
    )
    config["pretrained_cfg"].update(
        {
            "fixed_input_size": False,  # convolutional: any size divisible by 32
            "first_conv": "stem.0.conv_kxk.0.conv",
            "classifier": "head.fc",
        }
    )
    return config


def save_timm_fastvit(
    directory: str | Path,
    variables: Mapping[str, Any],
    tower: Any,
    *,
    image_size: int | tuple[int, int],
    num_batches_tracked: int = 0,
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
    std: tuple[float, float, float] = OPENAI_DATASET_STD,
    dtype: Any = np.float32,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (timm's ``local-dir:`` / Hub layout) for the
    train-time tower's ``variables``; returns the directory. ``mean``/``std``: the normalisation
    the tower was trained with; ``image_size``: its training resolution."""
    if mci_fields(tower)["reparameterized"]:
        raise ValueError(
            "export the train-time tower (reparameterized=False): timm's checkpoint filter renames "
            "the keys of a re-parameterised file when loading a directory; timm re-parameterises "
            "after loading (timm.utils.reparameterize_model)"
        )
    state = to_timm_state_dict(
        variables, tower, num_batches_tracked=num_batches_tracked, dtype=dtype
    )
    config = timm_config(tower, image_size=image_size, mean=mean, std=std)
    return write_timm_directory(directory, state, config)


# The fields a directory's model_args fix, compared with a given tower's on loading.
_DESCRIBED_FIELDS = (
    *("depths", "widths", "token_mixers", "se_downsamples", "mlp_ratio", "cls_ratio"),
    *("output_dim", "reparameterized"),
)


def load_timm_fastvit(
    directory: str | Path, tower: Any | None = None, **tower_kwargs: Any
) -> tuple[dict[str, Any], MobileClipImageTower]:
    """``(variables, tower)`` from a timm FastViT export directory. Without ``tower`` it is the
    one the directory's ``model_args`` describe (``tower_kwargs``: dtype, bn_groups...); a given
    tower (or mapping of its fields) must be the one the directory describes."""
    model_args, state_dict = read_timm_directory(directory)
    described = tower_from_timm_args(model_args, **tower_kwargs)
    if tower is None:
        tower = described
    else:
        saved, given = mci_fields(described), mci_fields(tower)
        different = {
            name: (saved[name], given[name])
            for name in _DESCRIBED_FIELDS
            if saved[name] != given[name]
        }
        if different:
            raise ValueError(f"{directory} holds another tower: (saved, given) {different}")
        if not isinstance(tower, MobileClipImageTower):
            names = {field.name for field in dataclasses.fields(MobileClipImageTower)}
            tower = MobileClipImageTower(**{k: v for k, v in dict(tower).items() if k in names})
    return from_timm_state_dict(state_dict, tower), tower
