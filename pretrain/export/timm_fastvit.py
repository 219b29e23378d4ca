"""Export the MobileCLIP MCi image tower (``models.mobileclip``) to timm's ``fastvit_mci*``
(timm/models/fastvit.py), BatchNorm buffers included; import back.

The JAX tower's module names are timm's, so the mapping is mostly a renaming of paths:

===========================================  ===========================================
JAX (``params`` / ``batch_stats`` paths)     timm ``FastVit`` ``state_dict``
===========================================  ===========================================
``stem_0`` .. ``stem_2``, ``stages_i``,      ``stem.0`` .. ``stem.2``, ``stages.i``,
``blocks_j``, ``conv_kxk_0``, ``proj_0/1``   ``blocks.j``, ``conv_kxk.0``, ``proj.0/1``
Conv ``kernel`` HWIO (I = in / groups)       ``weight`` OIHW
BatchNorm ``scale``, ``bias``                ``weight``, ``bias``
BatchNorm ``batch_stats`` ``mean``, ``var``  ``running_mean``, ``running_var``, and
                                             ``num_batches_tracked`` (int64 scalar)
``mlp/c_fc``, ``mlp/c_proj`` (Dense)         ``mlp.fc1``, ``mlp.fc2`` (1x1 convs)
``se/fc1``, ``se/fc2`` (Dense)               ``se.fc1``, ``se.fc2`` (1x1 convs)
``layer_scale``, ``layer_scale_1/2`` (C,)    ``layer_scale.gamma`` ... (C, 1, 1)
``attn/{query,key,value}`` (C, H, 32)        ``token_mixer.qkv.weight`` (3C, C), [q|k|v]
``attn/out`` (H, 32, C) + bias               ``token_mixer.proj`` (C, C) + bias
``head`` Dense (width, out) + bias           ``head.fc`` (out, width) + bias
===========================================  ===========================================

The train-time tower (``reparameterized=False``) is the one to export: timm builds it from
``config.json`` (``architecture`` + ``model_args``: ``layers``, ``embed_dims``, ``mlp_ratios``,
``se_downsamples``, ``token_mixers``, ``lkc_use_act``, ``cls_ratio``, ``num_classes`` =
``output_dim`` or 0, ``global_pool="avg"``) and loads the weights with ``strict=True``; timm's own
``reparameterize_model`` then gives its inference form. The state dict of an already
re-parameterised tower maps too (``reparam_conv`` keys, timm's ``inference_mode=True``), through
:func:`to_timm_state_dict` / :func:`from_timm_state_dict` only: timm's checkpoint filter renames
keys of such a file when it loads a Hub/``local-dir:`` directory, so :func:`save_timm_fastvit`
writes the train-time form only.

Fixed by the ``fastvit_mci*`` entry points and checked here: four stages with RepCPE (7x7) before
the last, head width 32, BatchNorm eps 1e-5 (timm's ``nn.BatchNorm2d`` default), GELU. A user
loads an export with::

    import timm
    model = timm.create_model("local-dir:/path/to/export", pretrained=True).eval()

then ``model.forward_features(images)`` is the final conv's output (NCHW; the JAX tower's
``final_features``), ``model.forward_head(x, pre_logits=True)`` the pooled ``pre_logits`` and
``model(images)`` the projected embedding. Images are NCHW, normalised as in training.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.batchnorm import TORCH_BATCH_NORM_EPS
from models.mobileclip import MCI_VARIANTS, MobileClipImageTower
from pretrain.export.tree_io import (
    BATCH_NORM_COUNTER,
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    Entries,
    StateDict,
    flatten,
    module_field,
    read_timm_directory,
    timm_hub_config,
    unflatten,
    write_timm_directory,
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

# Path segments that differ: Flax's "<name>_<i>" children are timm's "<name>.<i>" list entries.
_INDEXED = re.compile(r"^(stem|stages|blocks|conv_kxk|proj)_(\d+)$")
_RENAMED = {"attn": "token_mixer", "c_fc": "fc1", "c_proj": "fc2", "head": "head.fc"}
# Dense layers that are 1x1 convolutions in timm.
_POINTWISE_PARENTS = ("c_fc", "c_proj", "fc1", "fc2")


# --------------------------------------------------------------------------------------------------
# Model arguments
# --------------------------------------------------------------------------------------------------


def _field(tower: Any, name: str) -> Any:
    default = MobileClipImageTower.__dataclass_fields__[name].default
    return module_field(tower, name, default)


def _check_supported(tower: Any) -> None:
    """Raise ``ValueError`` naming every field timm's fastvit_mci* cannot express."""
    problems = []
    if len(_field(tower, "depths")) != TIMM_STAGES:
        problems.append(f"depths: timm's mci entry points build {TIMM_STAGES} stages")
    if tuple(_field(tower, "pos_embs")) != TIMM_POS_EMBS:
        problems.append(f"pos_embs: timm's mci entry points fix {TIMM_POS_EMBS}")
    if _field(tower, "head_dim") != TIMM_HEAD_DIM:
        problems.append(f"head_dim: timm's FastViT attention uses {TIMM_HEAD_DIM}")
    if _field(tower, "bn_epsilon") != TORCH_BATCH_NORM_EPS:
        problems.append(f"bn_epsilon: timm's BatchNorm2d uses {TORCH_BATCH_NORM_EPS}")
    if problems:
        raise ValueError("timm's fastvit_mci* cannot hold this tower: " + "; ".join(problems))


def timm_architecture(tower: Any) -> str:
    """``fastvit_mci0/1/2`` when the tower is one of them, else ``fastvit_mci0`` (the model
    arguments then set every size; the mci entry points differ in sizes only)."""
    for name, sizes in MCI_VARIANTS.items():
        if tuple(_field(tower, "depths")) == sizes["depths"] and (
            tuple(_field(tower, "widths")) == sizes["widths"]
        ):
            return f"fastvit_{name}"
    return "fastvit_mci0"


def timm_model_args(tower: Any) -> dict[str, Any]:
    """JSON-able ``FastVit`` keyword arguments (over the entry point's) that build this tower."""
    _check_supported(tower)
    stages = len(_field(tower, "depths"))
    args: dict[str, Any] = {}
    for timm_name, field in _TOWER_ARGS.items():
        value = _field(tower, field)
        args[timm_name] = list(value) if isinstance(value, tuple | list) else value
    args["mlp_ratios"] = [float(_field(tower, "mlp_ratio"))] * stages
    args["lkc_use_act"] = True
    args["num_classes"] = int(_field(tower, "output_dim") or 0)
    args["global_pool"] = "avg"
    if _field(tower, "reparameterized"):
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
# The key mapping (one list of pairs, used both ways)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Pair:
    jax: tuple[str, ...]  # flat "params/..." or "batch_stats/..." keys
    timm: str
    kind: str  # how values convert, see _TO_TIMM / _FROM_TIMM


def _timm_module(path: list[str]) -> str:
    parts = []
    for segment in path:
        indexed = _INDEXED.match(segment)
        if indexed:
            parts.append(f"{indexed.group(1)}.{indexed.group(2)}")
        else:
            parts.append(_RENAMED.get(segment, segment))
    return ".".join(parts)


def _leaf_pair(key: str, shape: tuple[int, ...]) -> _Pair:
    collection, *path, leaf = key.split("/")
    module = _timm_module(path)
    if collection == "batch_stats":
        names = {"mean": "running_mean", "var": "running_var"}
        return _Pair((key,), f"{module}.{names[leaf]}", "vector")
    if collection != "params":
        raise ValueError(f"timm's FastViT has no place for the {collection!r} collection ({key})")
    if leaf == "kernel" and len(shape) == 4:
        return _Pair((key,), f"{module}.weight", "conv")
    if leaf == "kernel" and len(shape) == 2:
        kind = "pointwise" if path[-1] in _POINTWISE_PARENTS else "linear"
        return _Pair((key,), f"{module}.weight", kind)
    if leaf in ("bias", "scale") and len(shape) == 1:
        return _Pair((key,), f"{module}.{'weight' if leaf == 'scale' else 'bias'}", "vector")
    if leaf.startswith("layer_scale") and len(shape) == 1:
        return _Pair((key,), f"{_timm_module([*path, leaf])}.gamma", "layer_scale")
    raise ValueError(f"no timm FastViT key for {key} {shape}")


def _pairs(shapes: Mapping[str, tuple[int, ...]]) -> list[_Pair]:
    """Every JAX leaf (flat key -> shape) paired with its timm key."""
    pairs = []
    for key, shape in shapes.items():
        attention = re.fullmatch(r"(params/.*/attn)/(query|key|value|out)/(kernel|bias)", key)
        if attention is None:
            pairs.append(_leaf_pair(key, shape))
            continue
        prefix, projection, leaf = attention.groups()
        timm = _timm_module(prefix.split("/")[1:])
        if projection == "out":
            kind = "attention_out" if leaf == "kernel" else "vector"
            pairs.append(
                _Pair((key,), f"{timm}.proj.{'weight' if leaf == 'kernel' else 'bias'}", kind)
            )
        elif (projection, leaf) == ("query", "kernel"):
            qkv = tuple(f"{prefix}/{name}/kernel" for name in ("query", "key", "value"))
            pairs.append(_Pair(qkv, f"{timm}.qkv.weight", "qkv"))
        elif leaf == "bias":
            raise ValueError(f"timm's FastViT attention has no q/k/v bias: {key}")
    return pairs


def _batch_norm_modules(shapes: Mapping[str, Any]) -> list[str]:
    """timm module names of every BatchNorm (one ``num_batches_tracked`` each)."""
    return [
        _timm_module(key.split("/")[1:-1])
        for key in shapes
        if key.startswith("batch_stats/") and key.endswith("/mean")
    ]


def _qkv_to_timm(kernels: list[np.ndarray]) -> np.ndarray:
    # (C, H, D) -> (H*D, C) per projection, rows [q | k | v] (timm reshapes to (3, H, D)).
    return np.concatenate([kernel.reshape(kernel.shape[0], -1).T for kernel in kernels])


_TO_TIMM: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {
    "conv": lambda a: a[0].transpose(3, 2, 0, 1),
    "linear": lambda a: a[0].T,
    "pointwise": lambda a: a[0].T[:, :, None, None],
    "vector": lambda a: a[0],
    "layer_scale": lambda a: a[0].reshape(-1, 1, 1),
    "qkv": _qkv_to_timm,
    "attention_out": lambda a: a[0].reshape(-1, a[0].shape[-1]).T,
}
_FROM_TIMM: dict[str, Callable[[np.ndarray, list[tuple[int, ...]]], list[np.ndarray]]] = {
    "conv": lambda w, s: [w.transpose(2, 3, 1, 0)],
    "linear": lambda w, s: [w.T],
    "pointwise": lambda w, s: [w.reshape(w.shape[:2]).T],
    "vector": lambda w, s: [w],
    "layer_scale": lambda w, s: [w.reshape(-1)],
    "qkv": lambda w, s: [part.T.reshape(shape) for part, shape in zip(np.split(w, 3), s)],
    "attention_out": lambda w, s: [w.T.reshape(s[0])],
}


def _tower_shapes(tower: MobileClipImageTower) -> dict[str, tuple[int, ...]]:
    """Flat JAX variable shapes of the tower (abstract evaluation: nothing is computed)."""
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(tower.init, jax.random.key(0), images)
    return {key: tuple(leaf.shape) for key, leaf in flatten(shapes).items()}


def _as_tower(tower: Any) -> MobileClipImageTower:
    if isinstance(tower, MobileClipImageTower):
        return tower
    fields = MobileClipImageTower.__dataclass_fields__
    return MobileClipImageTower(**{k: v for k, v in dict(tower).items() if k in fields})


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
    tower = _as_tower(tower)
    _check_supported(tower)
    if set(variables) != {"params", "batch_stats"}:
        raise ValueError(f"need the tower's params and batch_stats, got {sorted(variables)}")
    flat = flatten(variables)
    entries = Entries(flat, lambda value: np.asarray(value, dtype), "MobileCLIP tower variables")
    expected = _tower_shapes(tower)
    if set(flat) != set(expected):
        missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
        raise ValueError(
            f"variables do not fit the tower: missing {missing[:6]}, extra {extra[:6]}"
        )
    state: StateDict = {}
    for pair in _pairs(expected):
        values = [entries.take(key) for key in pair.jax]
        for key, value in zip(pair.jax, values):
            if value.shape != expected[key]:
                raise ValueError(f"{key}: shape {value.shape}, the tower wants {expected[key]}")
        state[pair.timm] = np.ascontiguousarray(_TO_TIMM[pair.kind](values))
    entries.check_all_taken()
    for module in _batch_norm_modules(expected):
        state[f"{module}.{BATCH_NORM_COUNTER}"] = np.asarray(num_batches_tracked, np.int64)
    return state


def from_timm_state_dict(
    state_dict: Mapping[str, Any], tower: Any, *, dtype: Any = np.float32
) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ...}`` of the tower from timm ``FastVit``'s state dict
    (NumPy arrays or CPU tensors); every key of timm's layout must be there and nothing else."""
    tower = _as_tower(tower)
    _check_supported(tower)
    expected = _tower_shapes(tower)
    counters = {f"{m}.{BATCH_NORM_COUNTER}" for m in _batch_norm_modules(expected)}
    state = {
        key: np.asarray(value) if key in counters else np.asarray(value, dtype)
        for key, value in state_dict.items()
    }
    entries = Entries(state, lambda value: value, "timm FastViT state dict")
    flat: dict[str, np.ndarray] = {}
    for pair in _pairs(expected):
        shapes = [expected[key] for key in pair.jax]
        for key, value in zip(pair.jax, _FROM_TIMM[pair.kind](entries.take(pair.timm), shapes)):
            if value.shape != expected[key]:
                raise ValueError(
                    f"{pair.timm}: gives {key} shape {value.shape}, want {expected[key]}"
                )
            flat[key] = np.ascontiguousarray(value)
    for key in counters:
        entries.take(key)  # a counter, not a weight: PyTorch only reads it with momentum=None
    entries.check_all_taken()
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
    tower = _as_tower(tower)
    model_args = timm_model_args(tower)
    # timm_hub_config reads a ViT's ``embed_dim``; FastViT's feature width is the final conv's.
    config = timm_hub_config(
        timm_architecture(tower),
        {**model_args, "embed_dim": tower.width},
        image_size=image_size,
        mean=mean,
        std=std,
    )
    config["model_args"] = model_args
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
    tower = _as_tower(tower)
    if tower.reparameterized:
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


def load_timm_fastvit(
    directory: str | Path, tower: Any | None = None, **tower_kwargs: Any
) -> tuple[dict[str, Any], MobileClipImageTower]:
    """``(variables, tower)`` from a timm FastViT export directory. Without ``tower`` it is built
    from the directory's ``model_args`` (``tower_kwargs``: dtype, bn_groups...); a given tower
    must be the one the directory describes."""
    model_args, state_dict = read_timm_directory(directory)
    described = tower_from_timm_args(model_args, **tower_kwargs)
    if tower is None:
        tower = described
    else:
        tower = _as_tower(tower)
        compared = (
            *("depths", "widths", "token_mixers", "se_downsamples", "mlp_ratio", "cls_ratio"),
            *("output_dim", "reparameterized"),
        )
        different = {
            name: (getattr(described, name), getattr(tower, name))
            for name in compared
            if getattr(described, name) != getattr(tower, name)
        }
        if different:
            raise ValueError(f"{directory} holds another tower: (saved, given) {different}")
    return from_timm_state_dict(state_dict, tower), tower
