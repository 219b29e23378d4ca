"""The train state: what it holds, how it is initialised, and how it is laid out over the mesh.

A state is a dict: ``step``, ``params``, ``opt_state``, ``rng`` (raw key data), and when used
``ema_params``, ``model_state`` / ``ema_model_state`` (variables the forward pass updates, e.g.
BatchNorm statistics) and ``frozen`` (a task's frozen variables, e.g. a teacher).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from pretrain import sharding
from pretrain.task import Task

State = dict[str, Any]


def overlay(params: Any, pretrained: Any, path: str = "") -> Any:
    """``params`` with the subtrees given in ``pretrained`` replaced (shapes must agree)."""
    if not isinstance(pretrained, Mapping):
        if getattr(pretrained, "shape", None) != getattr(params, "shape", None):
            raise ValueError(
                f"pretrained {path or 'value'} has shape {getattr(pretrained, 'shape', None)}, "
                f"the model expects {getattr(params, 'shape', None)}"
            )
        return jnp.asarray(pretrained, params.dtype)
    if not isinstance(params, Mapping):
        raise ValueError(f"pretrained weights give a subtree at {path}, the model has an array")
    unknown = set(pretrained) - set(params)
    if unknown:
        raise ValueError(
            f"pretrained weights have {sorted(unknown)} under {path or '/'}: not in the model"
        )
    return {
        key: overlay(value, pretrained[key], f"{path}/{key}") if key in pretrained else value
        for key, value in params.items()
    }


def init_state(
    task: Task, tx: optax.GradientTransformation, seed: int, use_ema: bool
) -> Callable[..., State]:
    """A function building the initial train state (to be jitted with sharded outputs).

    Its optional arguments are the task's frozen variables and pretrained parameter subtrees
    (host arrays, passed as jit arguments so that they do not become compiled-in constants).
    """

    def build(frozen: Any = None, pretrained: Any = None) -> State:
        init_rng, train_rng = jax.random.split(jax.random.key(seed))
        params, model_state = task.init_variables(init_rng)
        if pretrained is not None:
            params = overlay(params, pretrained)
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            # Raw key data: checkpoints store plain uint32 arrays, not typed keys.
            "rng": jax.random.key_data(train_rng),
        }
        if use_ema:
            state["ema_params"] = params
        if model_state is not None:
            state["model_state"] = model_state
            if use_ema:
                state["ema_model_state"] = model_state
        if frozen is not None:
            state["frozen"] = frozen
        return state

    return build


def count_params(params: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def weights(state: State, use_ema: bool = False) -> tuple[Any, Any]:
    """``(params, model_state)`` of a state, the EMA ones with ``use_ema``; model_state may be
    None (a model without BatchNorm statistics)."""
    key = "ema_params" if use_ema else "params"
    if key not in state:
        raise ValueError(f"the checkpoint has no {key} (ema_decay was off)")
    return state[key], state.get("ema_model_state" if use_ema else "model_state")


def evaluate_weights(
    task: Task, state: State, step: int, use_ema: bool = False
) -> dict[str, float]:
    """The task's evaluation of a state's weights (the EMA ones with ``use_ema``)."""
    params, model_state = weights(state, use_ema)
    return task.evaluate(params, step, state.get("frozen"), model_state)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """How a task's train state is built and laid out over the mesh."""

    build: Callable[..., State]
    abstract: State
    shardings: State

    @classmethod
    def create(
        cls, config: ConfigDict, task: Task, tx: optax.GradientTransformation
    ) -> StateLayout:
        rules = tuple(
            tuple(rule)
            for rule in config.get("sharding_rules", sharding.TRANSFORMER_MODEL_PARALLEL_RULES)
        )
        build = init_state(task, tx, int(config.seed), bool(config.get("ema_decay")))
        abstract = jax.eval_shape(build, task.frozen_spec())
        return cls(build, abstract, sharding.tree_shardings(abstract, task.mesh, rules))

    @property
    def has_model_state(self) -> bool:
        return "model_state" in self.abstract

    def abstract_with_shardings(self) -> State:
        """What orbax restores into: shapes, dtypes and the target shardings."""
        return jax.tree.map(
            lambda shape, s: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=s),
            self.abstract,
            self.shardings,
        )

    def initialize(self, frozen: Any = None, pretrained: Any = None) -> State:
        """A fresh state, every array created directly in its shards."""
        return jax.jit(self.build, out_shardings=self.shardings)(frozen, pretrained)
