"""A frozen CLIP model as a teacher: UTA's alignment targets and its zero-shot text tower.

Two sources (``config.teacher.source``):
  "workdir"    a CLIP run of this project: ``config`` names its recipe ("configs/clip_vitb16.py:
               runlocal"), ``workdir`` its directory, ``step`` "best" | "latest" | a number;
  "open_clip"  open_clip weights on local disk, in ``open_clip_dir``: the weights as open_clip and
               the Hugging Face Hub ship them (``open_clip_model.safetensors``,
               ``open_clip_pytorch_model.bin``, or the folder's only ``.safetensors`` / ``.bin`` /
               ``.pt`` file; ``.bin``/``.pt`` need torch, which the JAX environment lacks:
               safetensors work everywhere) and the architecture, either the folder's
               ``open_clip_config.json`` (``{"model_cfg": ...}`` or a bare model config) or
               ``open_clip_model``, an open_clip model name from
               pretrain/export/open_clip_configs.py ("EVA01-g-14", "EVA02-L-14",
               "ViT-L-14-quickgelu" for OpenAI's weights...), which takes precedence.
The teacher computes in ``dtype`` (bfloat16 on accelerators) and is stored in it, as frozen
variables of the student's train state.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from models.text import TextTransformer
from models.two_tower import TwoTowerModel
from models.vit import VisionTransformer
from pretrain.components.modules import build_module
from pretrain.components.runs import run_config, run_params
from pretrain.components.two_tower import build_two_tower
from pretrain.export import open_clip
from pretrain.export.open_clip_configs import open_clip_model_config_by_name

SOURCES = ("workdir", "open_clip")


def _cast(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), tree)


@dataclasses.dataclass
class Teacher:
    """A CLIP two-tower model and where its weights come from."""

    model: TwoTowerModel
    image_size: int
    context_length: int
    dtype: Any
    config: ConfigDict

    @property
    def embed_dim(self) -> int:
        return int(self.model.image_encoder.output_dim)

    @property
    def patch_size(self) -> int:
        return int(self.model.image_encoder.patch_size)

    def spec(self) -> Any:
        """ShapeDtypeStructs of the parameters (no weights read)."""
        images = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        tokens = jnp.zeros((1, self.context_length), jnp.int32)
        shapes = jax.eval_shape(self.model.init, jax.random.key(0), images, tokens)["params"]
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, self.dtype), shapes)

    def load(self) -> Any:
        """The weights as host arrays in the teacher's dtype."""
        if self.config.source == "workdir":
            params = _params_from_workdir(self.config)
        else:
            _, params = open_clip.load_open_clip(
                self.config.open_clip_dir, open_clip_teacher_config(self.config)
            )
        return _cast(params, self.dtype)


def _params_from_workdir(teacher_config: ConfigDict) -> Any:
    return run_params(
        teacher_config.config,
        teacher_config.workdir,
        str(teacher_config.step),
        teacher_config.get("use_ema"),
    )


def open_clip_teacher_config(teacher_config: ConfigDict) -> dict[str, Any]:
    """The open_clip model config of an "open_clip" teacher: ``open_clip_model`` by name, else the
    ``open_clip_config.json`` in ``open_clip_dir``."""
    directory = teacher_config.get("open_clip_dir") or ""
    # With a name, the model can be built (e.g. compiled) before its weights are on disk.
    stored = (
        open_clip.read_model_config(directory) if directory and Path(directory).is_dir() else None
    )
    name = teacher_config.get("open_clip_model") or ""
    if name:
        named = open_clip_model_config_by_name(name)
        if stored is not None and stored != named:
            logging.warning(
                "teacher.open_clip_model=%s overrides the different %s in %s",
                name,
                open_clip.CONFIG_FILE_NAME,
                directory,
            )
        return named
    if stored is None:
        raise FileNotFoundError(
            f"teacher.open_clip_dir={directory!r} has no {open_clip.CONFIG_FILE_NAME} (or is "
            "not a directory): name the model with teacher.open_clip_model (e.g. 'EVA01-g-14')"
        )
    return stored


def build_teacher(teacher_config: ConfigDict) -> Teacher:
    """The teacher described by ``config.teacher`` (see the module docstring)."""
    dtype = jnp.dtype(teacher_config.get("dtype", "bfloat16"))
    common = {"dtype": dtype, "param_dtype": dtype}
    source = teacher_config.source
    if source == "workdir":
        recipe = run_config(teacher_config.get("workdir", ""), teacher_config.config)
        recipe.model.update({"dtype": str(dtype.name), "param_dtype": str(dtype.name)})
        image_size = int(recipe.data.image_size)
        # Position embeddings stay those of training; other input sizes resize them.
        patch = build_module(recipe.model.image).patch_size
        recipe.model.image.pos_embed_grid = image_size // patch
        model = build_two_tower(recipe.model, recipe.loss.name)
        context_length = int(recipe.model.text.context_length)
    elif source == "open_clip":
        kwargs = open_clip.jax_model_kwargs(open_clip_teacher_config(teacher_config))
        patch = kwargs["image_encoder"]["patch_size"]
        grid = (kwargs["image_size"][0] // patch, kwargs["image_size"][1] // patch)
        model = TwoTowerModel(
            VisionTransformer(**kwargs["image_encoder"], pos_embed_grid=grid, **common),
            TextTransformer(**kwargs["text_encoder"], **common),
            logit_bias_init=kwargs["logit_bias_init"],
        )
        image_size = int(kwargs["image_size"][0])
        context_length = int(kwargs["text_encoder"]["context_length"])
    else:
        raise ValueError(f"teacher.source={source!r}; choose from {SOURCES}")
    return Teacher(model, image_size, context_length, dtype, teacher_config)
