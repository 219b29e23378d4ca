"""open_clip's text tower (``CLIPTextCfg``, the ``TextTransformer`` under the CLIP model's top
level, or under ``text.`` for ``CustomTextCLIP``) <-> models/text.py's ``TextTransformer``: its
config both ways, its parameters both ways and its state-dict shapes (keys without ``text.``).

====================================  =============================================================
JAX (``text_encoder/...``)             open_clip ``state_dict``
====================================  =============================================================
``token_embedding/embedding``         ``token_embedding.weight``
``positional_embedding``              ``positional_embedding``
``transformer/...``                   ``transformer....`` (transformer.py)
``ln_final``                          ``ln_final``
``text_projection`` (W, E)            ``text_projection``: the same matrix (absent: proj_type none)
====================================  =============================================================

open_clip takes the text heads directly (``heads``); ``causal=False`` is ``no_causal_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pretrain.export.open_clip import defaults
from pretrain.export.open_clip.transformer import (
    SUPPORTED_BLOCK_VALUES,
    transformer_from_torch,
    transformer_shapes,
    transformer_to_torch,
)
from pretrain.export.state_dict_shapes import Shapes, norm_shapes
from pretrain.export.tree_io import (
    Entries,
    StateDict,
    layer_norm_from_torch,
    layer_norm_to_torch,
    module_field,
)

# open_clip text_cfg fields whose other values change the network in ways this project's text
# tower cannot express, each with the values it supports.
_SUPPORTED_TEXT_VALUES: dict[str, tuple[Any, ...]] = {
    **SUPPORTED_BLOCK_VALUES,
    "embed_cls": (False,),
    "pool_type": ("argmax",),
    "proj_bias": (False,),
    "hf_model_name": (None,),
}
_JAX = "text_encoder/"


def text_cfg(text_encoder: Any, embed_dim: int) -> dict[str, Any]:
    """open_clip's ``text_cfg`` for a ``TextTransformer`` (module or mapping of fields) whose
    output is the joint embedding of width ``embed_dim``."""
    field = lambda name, default=None: module_field(text_encoder, name, default)
    width = int(field("width"))
    output_dim = field("output_dim")
    if output_dim is not None and output_dim != embed_dim:
        raise ValueError(
            f"text_encoder.output_dim {output_dim} != image_encoder.output_dim {embed_dim}: "
            "open_clip has one embed_dim for both towers"
        )
    if output_dim is None and width != embed_dim:
        raise ValueError(
            f"the text tower has no projection, so its width {width} must equal embed_dim "
            f"{embed_dim}"
        )
    return {
        "context_length": int(field("context_length")),
        "vocab_size": int(field("vocab_size")),
        "width": width,
        "heads": int(field("num_heads")),
        "layers": int(field("depth")),
        "mlp_ratio": defaults.mlp_ratio(width, int(field("mlp_dim") or 4 * width)),
        "no_causal_mask": not field("causal", True),
        **({} if output_dim is not None else {"proj_type": "none"}),
        **defaults.norm_kwargs(float(field("layer_norm_eps", defaults.LAYER_NORM_EPS))),
    }


def text_cfg_problems(text_cfg: Mapping[str, Any]) -> list[str]:
    """The text_cfg fields with values this project's text tower lacks."""
    problems = defaults.unsupported_values(text_cfg, _SUPPORTED_TEXT_VALUES)
    return problems + defaults.norm_kwargs_problems(text_cfg, "text_cfg")


def text_kwargs(text_cfg: Mapping[str, Any], embed_dim: int, activation: str) -> dict[str, Any]:
    """``TextTransformer`` kwargs for an open_clip ``text_cfg``."""
    width = int(text_cfg.get("width", 512))
    no_projection = text_cfg.get("proj_type", "linear") == "none"
    kwargs = {
        "width": width,
        "depth": int(text_cfg.get("layers", 12)),
        "num_heads": int(text_cfg.get("heads", defaults.TEXT_HEADS)),
        "mlp_dim": int(width * text_cfg.get("mlp_ratio", defaults.MLP_RATIO)),
        "vocab_size": int(text_cfg.get("vocab_size", 49408)),
        "context_length": int(text_cfg.get("context_length", 77)),
        "output_dim": None if no_projection else embed_dim,
        "causal": not text_cfg.get("no_causal_mask", False),
        "layer_norm_eps": defaults.eps_of(text_cfg),
    }
    if activation != "gelu":
        kwargs["activation"] = activation
    return kwargs


def text_shapes(text: Mapping[str, Any]) -> Shapes:
    """Keys and shapes of the text tower for its :func:`text_kwargs`."""
    width = text["width"]
    shapes: Shapes = {
        "positional_embedding": (text["context_length"], width),
        "token_embedding.weight": (text["vocab_size"], width),
        **norm_shapes("ln_final", width),
    }
    if text["output_dim"] is not None:
        shapes["text_projection"] = (width, text["output_dim"])
    shapes.update(transformer_shapes("transformer.", text["depth"], width, text["mlp_dim"]))
    return shapes


def text_to_torch(params: Entries) -> StateDict:
    """Take the text tower's entries (``text_encoder/...``), return open_clip's keys."""
    take = params.take
    state = {
        "token_embedding.weight": take(f"{_JAX}token_embedding/embedding"),
        "positional_embedding": take(f"{_JAX}positional_embedding"),
        **transformer_to_torch(params, f"{_JAX}transformer/", "transformer."),
        **layer_norm_to_torch(params, f"{_JAX}ln_final", "ln_final"),
    }
    if params.has(f"{_JAX}text_projection"):
        state["text_projection"] = take(f"{_JAX}text_projection")
    return state


def text_from_torch(state: Entries, num_heads: int) -> StateDict:
    """The inverse of :func:`text_to_torch` (keys without ``text.``); ``num_heads`` is not in the
    weights."""
    take = state.take
    flat = {
        f"{_JAX}token_embedding/embedding": take("token_embedding.weight"),
        f"{_JAX}positional_embedding": take("positional_embedding"),
        **transformer_from_torch(state, "transformer.", f"{_JAX}transformer/", num_heads),
        **layer_norm_from_torch(state, "ln_final", f"{_JAX}ln_final"),
    }
    if state.has("text_projection"):
        flat[f"{_JAX}text_projection"] = take("text_projection")
    return flat
