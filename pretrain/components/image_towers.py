"""An image tower to probe, fine-tune or analyse, from wherever its weights are.

Dense probes, dense fine-tuning and the attention-distance command all start from "an image
tower with its weights", whatever trained it. ``config.tower`` (see :func:`tower_source_config`)
says where it comes from (``source``):

  "workdir"    a run of this project (any task whose ``image_tower_entry`` names a tower: CLIP,
               CatLIP, UTA...): ``workdir``, ``config`` (the recipe, used when the run has no
               ``config.json``), ``step`` ("best" | "latest" | a number), ``use_ema`` (None: the
               EMA when the run kept one). BatchNorm statistics (ResNet, MCi) come along.
  "recipe"     a randomly initialised tower of the recipe ``config`` (e.g.
               "configs/clip_vitb16.py:runlocal"), from ``seed``: the baseline that shows a probe
               measures the representation and not the head.
  "open_clip"  open_clip weights on local disk: ``open_clip_dir`` (its ``open_clip_config.json``)
               or the model name ``open_clip_model`` (pretrain/export/open_clip_configs.py).
  "timm"       a timm model directory (``config.json`` + ``model.safetensors``, as this project
               exports them and the Hub ships them): ``timm_dir``; vision_transformer, eva and
               fastvit (MCi) architectures.

The tower is built without its projection (``output_dim=None``): dense heads read its spatial
features, not its embedding. A ModifiedResNet keeps its source's embedding width, because its
attention pool's output projection is shaped by it (unused by dense heads, loaded all the same).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict, config_dict

from models.mobileclip import MobileClipImageTower
from models.resnet import ModifiedResNet
from models.vit import VisionTransformer
from pretrain.components.modules import build_module
from pretrain.components.pretrained_tower import (
    image_tower_params,
    image_tower_spec,
    matching_subtree,
)
from pretrain.components.runs import load_recipe, restore_run_variables, run_config
from pretrain.components.two_tower import BATCH_STATS
from pretrain.export import open_clip, timm_eva, timm_eva_args, timm_fastvit
from pretrain.export.open_clip.families import family_of_vision_cfg
from pretrain.export.open_clip_configs import open_clip_model_config_by_name
from pretrain.export.timm_hub import read_timm_config

SOURCES = ("workdir", "recipe", "open_clip", "timm")
# The JAX module of each open_clip tower family (pretrain/export/open_clip/families.py).
_FAMILY_MODULES = {
    "vit": VisionTransformer,
    "eva_trunk": VisionTransformer,
    "resnet": ModifiedResNet,
    "mobileclip": MobileClipImageTower,
}


def tower_source_config(**overrides: Any) -> ConfigDict:
    """``config.tower`` with every field of every source (unused ones stay at their defaults)."""
    config = ConfigDict(
        {
            "source": "workdir",
            "config": "",
            "workdir": "",
            "step": "best",
            "use_ema": config_dict.placeholder(bool),  # None: the EMA when the run kept one
            "seed": 0,
            "open_clip_dir": "",
            "open_clip_model": "",
            "timm_dir": "",
        }
    )
    config.update(overrides)
    return config


@dataclasses.dataclass(frozen=True)
class ImageTower:
    """A Flax image tower (no projection), the resolution it was trained at, and its source."""

    module: Any
    image_size: int
    source: ConfigDict
    has_batch_stats: bool

    def init_variables(self, rng: jax.Array, image_size: int | None = None) -> dict[str, Any]:
        """Freshly initialised variables (``params`` and, with BatchNorm, ``batch_stats``)."""
        size = int(image_size or self.image_size)
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        return dict(self.module.init(rng, images))

    def variables_spec(self, image_size: int | None = None) -> dict[str, Any]:
        """ShapeDtypeStructs of the variables (nothing is read or computed)."""
        return jax.eval_shape(lambda: self.init_variables(jax.random.key(0), image_size))

    def load_variables(self) -> dict[str, Any]:
        """The tower's variables as host NumPy arrays, shaped as :meth:`variables_spec`'s."""
        template = self.variables_spec()
        loaded = _LOADERS[self.source.source](self)
        return {name: matching_subtree(loaded[name], template[name]) for name in template}


def build_image_tower(
    source: ConfigDict, *, dtype: Any = "float32", param_dtype: Any = "float32"
) -> ImageTower:
    """The tower ``source`` describes (see the module docstring); no weights are read yet."""
    kind = source.get("source", "")
    if kind not in _BUILDERS:
        raise ValueError(f"tower.source={kind!r}; choose from {SOURCES}")
    module, image_size = _BUILDERS[kind](source, jnp.dtype(dtype), jnp.dtype(param_dtype))
    module = _with_stored_grid(module, int(image_size))
    has_batch_stats = isinstance(module, ModifiedResNet | MobileClipImageTower)
    return ImageTower(module, int(image_size), source, has_batch_stats)


def _with_stored_grid(module: Any, image_size: int) -> Any:
    """The tower with its position embeddings kept at the grid it was trained on, so that dense
    tasks can feed it other image sizes (they are resized, bicubic)."""
    if isinstance(module, VisionTransformer) and module.pos_embed_grid is None:
        return module.clone(pos_embed_grid=image_size // module.patch_size)
    if isinstance(module, ModifiedResNet) and module.pos_embed_grid is None:
        return module.clone(pos_embed_grid=image_size // 32)  # its attention pool's grid
    return module


# -- building the module ----------------------------------------------------------------------


def _recipe_of(source: ConfigDict) -> ConfigDict:
    if source.source == "recipe":
        if not source.get("config"):
            raise ValueError(
                "tower.source='recipe' needs tower.config, e.g. 'configs/clip_vitb16.py'"
            )
        return load_recipe(source.config)
    if not source.get("workdir"):
        raise ValueError("tower.source='workdir' needs tower.workdir (a run of this project)")
    return run_config(source.workdir, source.get("config", ""))


def _output_dim(module_path: str, embed_dim: Any) -> int | None:
    """None (no projection), except for a ResNet: see the module docstring."""
    return int(embed_dim) if module_path.endswith("ModifiedResNet") and embed_dim else None


def _module_from_recipe(source: ConfigDict, dtype: Any, param_dtype: Any) -> tuple[Any, int]:
    recipe = _recipe_of(source)
    spec = image_tower_spec(recipe)
    module = build_module(
        spec,
        output_dim=_output_dim(spec.module, recipe.model.get("embed_dim")),
        dtype=dtype,
        param_dtype=param_dtype,
        remat_policy=recipe.model.get("remat_policy", "none"),
    )
    return module, int(recipe.data.image_size)


def _open_clip_model_config(source: ConfigDict) -> dict[str, Any]:
    if source.get("open_clip_model"):
        return open_clip_model_config_by_name(source.open_clip_model)
    stored = open_clip.read_model_config(source.open_clip_dir) if source.open_clip_dir else None
    if stored is None:
        raise FileNotFoundError(
            f"tower.open_clip_dir={source.get('open_clip_dir')!r} has no "
            f"{open_clip.CONFIG_FILE_NAME}: name the model with tower.open_clip_model"
        )
    return stored


def _module_from_open_clip(source: ConfigDict, dtype: Any, param_dtype: Any) -> tuple[Any, int]:
    model_config = _open_clip_model_config(source)
    kwargs = open_clip.jax_model_kwargs(model_config)
    family = family_of_vision_cfg(model_config["vision_cfg"])
    module_class = _FAMILY_MODULES[family.name]
    fields = dict(kwargs["image_encoder"])
    fields["output_dim"] = _output_dim(module_class.__name__, fields.get("output_dim"))
    module = module_class(**fields, dtype=dtype, param_dtype=param_dtype)
    return module, int(kwargs["image_size"][0])


def _timm_architecture(source: ConfigDict) -> tuple[str, dict[str, Any]]:
    if not source.get("timm_dir"):
        raise ValueError("tower.source='timm' needs tower.timm_dir (config.json + safetensors)")
    config = read_timm_config(source.timm_dir)
    return config["architecture"], config


def _timm_image_size(config: dict[str, Any]) -> int:
    """The resolution a timm directory was trained at (its pretrained_cfg's input size)."""
    return int(config.get("pretrained_cfg", {}).get("input_size", [3, 224, 224])[-1])


def _module_from_timm(source: ConfigDict, dtype: Any, param_dtype: Any) -> tuple[Any, int]:
    architecture, config = _timm_architecture(source)
    model_args = config.get("model_args", {})
    if architecture.startswith("fastvit"):
        module = timm_fastvit.tower_from_timm_args(model_args, dtype=dtype, param_dtype=param_dtype)
        return module.clone(output_dim=None), _timm_image_size(config)
    if not architecture.startswith("eva"):
        # timm's vision_transformer layout is read for a ViT already known (load_timm_vit).
        raise ValueError(
            f"timm architecture {architecture!r}: tower.source='timm' reads eva* and fastvit* "
            "directories; take a CLIP ViT through source='open_clip' or 'workdir'"
        )
    kwargs = timm_eva_args.vit_kwargs_from_timm(model_args)
    kwargs = {k: v for k, v in kwargs.items() if k != "image_size"}
    kwargs.update(output_dim=None, dtype=dtype, param_dtype=param_dtype)
    module = VisionTransformer(**kwargs)
    return module, _timm_image_size(config)


_BUILDERS = {
    "workdir": _module_from_recipe,
    "recipe": _module_from_recipe,
    "open_clip": _module_from_open_clip,
    "timm": _module_from_timm,
}


# -- reading the weights ----------------------------------------------------------------------


def _variables_from_workdir(tower: ImageTower) -> dict[str, Any]:
    source = tower.source
    task, params, model_state = restore_run_variables(
        source.get("config", ""), source.workdir, str(source.step), source.get("use_ema")
    )
    variables = {"params": image_tower_params(task.config, params)}
    if model_state is not None:
        variables[BATCH_STATS] = image_tower_params(task.config, model_state)
    return variables


def _variables_from_recipe(tower: ImageTower) -> dict[str, Any]:
    # Jitted: an eager initialisation of a deep tower takes many times longer on a CPU.
    variables = jax.jit(tower.init_variables)(jax.random.key(int(tower.source.get("seed", 0))))
    return jax.tree.map(np.asarray, variables)


def _variables_from_open_clip(tower: ImageTower) -> dict[str, Any]:
    source = tower.source
    _, variables = open_clip.load_open_clip_variables(
        source.open_clip_dir, _open_clip_model_config(source)
    )
    return {name: tree["image_encoder"] for name, tree in variables.items()}


def _variables_from_timm(tower: ImageTower) -> dict[str, Any]:
    architecture, _ = _timm_architecture(tower.source)
    if architecture.startswith("fastvit"):
        variables, _ = timm_fastvit.load_timm_fastvit(tower.source.timm_dir, tower.module)
        return dict(variables)
    _, params = timm_eva.load_timm(tower.source.timm_dir)
    return {"params": params}


_LOADERS = {
    "workdir": _variables_from_workdir,
    "recipe": _variables_from_recipe,
    "open_clip": _variables_from_open_clip,
    "timm": _variables_from_timm,
}
