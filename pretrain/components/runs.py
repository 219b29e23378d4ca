"""Trained runs of this project as sources of weights: a run's config and its parameters (and
BatchNorm statistics) from a checkpoint, for teachers, transfer learning and initialisation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from etils import epath
from ml_collections import ConfigDict

from pretrain import sharding
from pretrain.modes import restore_trained
from pretrain.saved_config import CONFIG_FILE
from pretrain.state import weights
from pretrain.task import Task


def load_recipe(spec: str) -> ConfigDict:
    """``"configs/clip_vitb16.py:runlocal"`` -> that file's ``get_config("runlocal")``."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"teacher_recipe_{Path(path).stem}", path)
    if module_spec is None or not Path(path).is_file():
        raise FileNotFoundError(f"teacher recipe {path!r} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def run_config(workdir: str, recipe_spec: str = "") -> ConfigDict:
    """The config a run of this project was trained with: its saved ``config.json`` (with the
    run's command-line overrides), else the recipe ``recipe_spec`` names."""
    saved = epath.Path(workdir) / CONFIG_FILE if workdir else None
    if saved is not None and saved.exists():
        return ConfigDict(json.loads(saved.read_text()))
    if not recipe_spec:
        raise FileNotFoundError(f"no config.json in {workdir!r} and no recipe given")
    return load_recipe(recipe_spec)


def restore_run_variables(
    recipe_spec: str, workdir: str, step: str = "best", use_ema: bool | None = None
) -> tuple[Task, Any, Any]:
    """``(task, params, model_state)`` (host arrays) of a run of this project; ``model_state``
    holds BatchNorm statistics (ResNet, MCi towers), else None. ``step`` is "best" | "latest" |
    a number; ``use_ema`` picks the EMA weights (None: the EMA when the run kept one)."""
    if not workdir:
        raise ValueError(f"no workdir given for the run of {recipe_spec!r} to load weights from")
    recipe = run_config(workdir, recipe_spec)
    task, state = restore_trained(recipe, workdir, str(step))
    if use_ema is None:
        use_ema = "ema_params" in state
    if use_ema and "ema_params" not in state:
        raise ValueError(f"the run in {workdir} kept no EMA parameters (ema_decay was off)")
    params, model_state = sharding.gather_to_host(weights(state, use_ema), task.mesh)
    # Training-only parameters (RangeAugment's ranges) are not part of the model.
    return task, {k: v for k, v in params.items() if k != "range_augment"}, model_state


def restore_run(
    recipe_spec: str, workdir: str, step: str = "best", use_ema: bool | None = None
) -> tuple[Task, Any]:
    """The task and parameters (host arrays) of a run of this project (see
    :func:`restore_run_variables`)."""
    task, params, _ = restore_run_variables(recipe_spec, workdir, step, use_ema)
    return task, params


def run_params(
    recipe_spec: str, workdir: str, step: str = "best", use_ema: bool | None = None
) -> Any:
    """The parameters of a run of this project (see :func:`restore_run`)."""
    return restore_run(recipe_spec, workdir, step, use_ema)[1]
