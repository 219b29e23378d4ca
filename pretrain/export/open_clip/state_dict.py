"""A JAX two-tower model's variables <-> open_clip's ``CLIP`` / ``CustomTextCLIP`` state dict, and
the keys and shapes a config builds in open_clip. The image tower's part is its family's
(families.py), the text tower's text.py's; here are the logit scale and bias, the text keys'
place (top level for CLIP, under ``text.`` for CustomTextCLIP: open_clip's ``custom_text``), the
BatchNorm ``batch_stats`` collection and the final check against the config.

``logit_scale`` is a log in both, ``logit_bias`` (SigLIP) as is. Every leaf must map: a
parameter open_clip has no place for raises ``ValueError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from pretrain.export.open_clip.config import jax_model_kwargs
from pretrain.export.open_clip.families import family_of_vision_cfg, family_to_export
from pretrain.export.open_clip.text import text_from_torch, text_shapes, text_to_torch
from pretrain.export.state_dict_shapes import Shapes, check_state_dict, is_batch_norm_counter
from pretrain.export.tree_io import (
    Entries,
    StateDict,
    as_arrays,
    flatten,
    unflatten,
    unwrap_variables,
)

ParamTree = Mapping[str, Any]
# The Flax variable collections an exported model may carry.
VARIABLE_COLLECTIONS = {"params", "batch_stats"}
# State-dict entries that are not parameters: OpenAI's checkpoints record these hyper-parameters
# as tensors, and older timm versions saved the (recomputed) rotary tables of EVA trunks.
_DERIVED_ENTRIES = re.compile(
    r"(input_resolution|context_length|vocab_size|visual\.trunk\.rope\..*)"
)


def _text_key(key: str, custom_text: bool) -> str:
    return f"text.{key}" if custom_text else key


def open_clip_state_dict_shapes(model_config: Mapping[str, Any]) -> Shapes:
    """The keys and shapes of the state dict open_clip's ``CLIP`` (or ``CustomTextCLIP``, with
    ``custom_text``) class builds from a config, written from open_clip's module layout, so that
    a config and a set of weights that disagree fail at export time."""
    kwargs = jax_model_kwargs(model_config)
    vision_cfg = model_config["vision_cfg"]
    embed_dim = int(model_config["embed_dim"])
    shapes = family_of_vision_cfg(vision_cfg).state_dict_shapes(vision_cfg, embed_dim)
    custom_text = bool(model_config.get("custom_text", False))
    for key, shape in text_shapes(kwargs["text_encoder"]).items():
        shapes[_text_key(key, custom_text)] = shape
    shapes["logit_scale"] = ()
    if kwargs["logit_bias_init"] is not None:
        shapes["logit_bias"] = ()
    return shapes


def check_state_dict_matches_config(
    state_dict: Mapping[str, Any],
    model_config: Mapping[str, Any],
    *,
    allow_missing_counters: bool = False,
) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or mis-shaped key.

    ``allow_missing_counters``: BatchNorm ``num_batches_tracked`` entries may be absent (import):
    open_clip's modules have them (a strict load wants them), but they carry nothing this
    project's models use, so checkpoints converted without them import as well.
    """
    check_state_dict(
        state_dict,
        open_clip_state_dict_shapes(model_config),
        mismatch="state dict does not match the open_clip config",
        may_be_missing=is_batch_norm_counter if allow_missing_counters else lambda key: False,
    )


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _split_variables(
    params: ParamTree, batch_stats: ParamTree | None
) -> tuple[ParamTree, ParamTree | None]:
    """``(params, batch_stats)`` from a bare ``params`` tree or a ``variables`` dict holding
    ``params`` and possibly ``batch_stats``."""
    if isinstance(params, Mapping) and "params" in params and set(params) <= VARIABLE_COLLECTIONS:
        if batch_stats is not None and "batch_stats" in params:
            raise ValueError("batch_stats given twice: as an argument and inside the variables")
        return params["params"], params.get("batch_stats", batch_stats)
    return params, batch_stats


def to_open_clip_state_dict(
    params: ParamTree,
    *,
    model_config: Mapping[str, Any] | None = None,
    dtype: Any = np.float32,
    batch_stats: ParamTree | None = None,
) -> StateDict:
    """Map a JAX two-tower parameter tree to open_clip's state dict (NumPy arrays).

    ``params`` is the ``params`` collection (or the ``variables`` dict holding it, with
    ``batch_stats`` for a BatchNorm image tower), with JAX or NumPy leaves; they must be fully
    addressable (gather sharded arrays first). When ``model_config`` is given, the result is
    checked against the keys and shapes that config builds in open_clip; it is required for an
    image tower exported as a timm trunk (EVA, MobileCLIP), and its ``custom_text`` puts the text
    tower under ``text.``.

    ``batch_stats``: the ``batch_stats`` collection (BatchNorm running means and variances) of a
    ``ModifiedResNet`` or MobileCLIP image tower, which become the ``running_mean`` /
    ``running_var`` buffers (the model's state in training, e.g. the trainer's ``model_state``);
    required for those towers.
    """
    params, batch_stats = _split_variables(params, batch_stats)
    params_entries = Entries(flatten(unwrap_variables(params)), as_arrays(dtype), "JAX parameter")
    stats_entries = Entries(flatten(batch_stats or {}), as_arrays(dtype), "JAX batch_stats")
    vision_cfg = (model_config or {}).get("vision_cfg", {})
    family = family_to_export(vision_cfg, params_entries)
    if family.has_batch_stats and batch_stats is None:
        raise ValueError(
            "the image tower's BatchNorm running statistics are needed: pass batch_stats= (the "
            "model's `batch_stats` collection)"
        )
    embed_dim = int((model_config or {}).get("embed_dim", 0))
    state = family.to_torch(params_entries, stats_entries, vision_cfg, embed_dim)
    custom_text = bool((model_config or {}).get("custom_text", False))
    for key, value in text_to_torch(params_entries).items():
        state[_text_key(key, custom_text)] = value
    state["logit_scale"] = params_entries.take("logit_scale")
    if params_entries.has("logit_bias"):
        state["logit_bias"] = params_entries.take("logit_bias")
    params_entries.check_all_taken()
    stats_entries.check_all_taken()
    # Transposes leave strided views; safetensors and torch want contiguous buffers. Integer
    # buffers (BatchNorm's num_batches_tracked) keep their int64.
    state = {
        key: np.asarray(value, dtype=None if value.dtype.kind in "iu" else dtype, order="C")
        for key, value in state.items()
    }
    if model_config is not None:
        check_state_dict_matches_config(state, model_config)
    return state


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


def _in_config_layout(
    state_dict: Mapping[str, Any], model_config: Mapping[str, Any]
) -> dict[str, Any]:
    """Text keys as the config's model class has them: under ``text.`` for CustomTextCLIP, at the
    top for CLIP (open_clip itself converts between the two when loading); derived entries
    dropped."""
    custom_text = bool(model_config.get("custom_text", False))
    return {
        _text_key(
            key.removeprefix("text."), custom_text and not key.startswith(("visual.", "logit_"))
        ): value
        for key, value in state_dict.items()
        if not _DERIVED_ENTRIES.fullmatch(key)
    }


def from_open_clip_state_dict(
    state_dict: Mapping[str, Any],
    *,
    model_config: Mapping[str, Any],
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Map an open_clip ``CLIP`` / ``CustomTextCLIP`` state dict (NumPy arrays) to this project's
    ``params`` tree.

    The config is needed for the head counts, which a state dict does not record, and for a timm
    trunk's architecture. The exact inverse of :func:`to_open_clip_state_dict`: a round trip
    returns the same arrays. A ResNet or MobileCLIP image tower also has BatchNorm running
    statistics, which are not parameters: use :func:`from_open_clip_variables` for it (this
    function refuses it rather than drop them).
    """
    variables = from_open_clip_variables(state_dict, model_config=model_config, dtype=dtype)
    if "batch_stats" in variables:
        raise ValueError(
            "this open_clip model has BatchNorm running statistics (a ResNet or MobileCLIP image "
            "tower): import it with from_open_clip_variables (or load_open_clip_variables)"
        )
    return variables["params"]


def from_open_clip_variables(
    state_dict: Mapping[str, Any],
    *,
    model_config: Mapping[str, Any],
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Map an open_clip state dict to this project's ``variables``: ``{"params": ...}``, plus
    ``"batch_stats"`` (BatchNorm ``running_mean`` / ``running_var`` as ``mean`` / ``var``) for a
    ResNet or MobileCLIP image tower. ``num_batches_tracked`` counters are read if present and
    dropped."""
    state_dict = _in_config_layout(state_dict, model_config)
    check_state_dict_matches_config(state_dict, model_config, allow_missing_counters=True)
    kwargs = jax_model_kwargs(model_config)
    # CustomTextCLIP keeps the (same) text tower under ``text.``; CLIP at the top.
    state = Entries(
        {key.removeprefix("text."): value for key, value in state_dict.items()},
        as_arrays(dtype),
        "open_clip state dict",
    )
    vision_cfg = model_config["vision_cfg"]
    family = family_of_vision_cfg(vision_cfg)
    flat, stats = family.from_torch(state, vision_cfg, int(model_config["embed_dim"]))
    flat.update(text_from_torch(state, kwargs["text_encoder"]["num_heads"]))
    flat["logit_scale"] = state.take("logit_scale")
    if state.has("logit_bias"):
        flat["logit_bias"] = state.take("logit_bias")
    state.check_all_taken()
    as_tree = lambda entries: unflatten(
        {key: np.asarray(value, order="C") for key, value in entries.items()}
    )
    variables = {"params": as_tree(flat)}
    if stats:
        variables["batch_stats"] = as_tree(stats)
    return variables
