"""The one train step: task loss -> gradients (optionally accumulated over micro-batches) ->
optax update -> the task's parameter projection -> EMA; BatchNorm statistics carried along."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from jax.sharding import Mesh

from pretrain.gradients import accumulated_gradients, loss_and_gradients
from pretrain.state import State
from pretrain.task import Task

Metrics = dict[str, jax.Array]


def make_train_step(
    task: Task,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    *,
    grad_accum_steps: int = 1,
    ema_decay: float | None = None,
) -> Callable[[State, dict[str, jax.Array]], tuple[State, Metrics]]:
    def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, Metrics]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params = state["params"]
        frozen = state.get("frozen")
        if grad_accum_steps > 1:
            output, grads = accumulated_gradients(
                task, params, batch, rng, state["step"], grad_accum_steps, mesh, frozen
            )
        else:
            output, grads = loss_and_gradients(
                task, params, batch, rng, state["step"], frozen, state.get("model_state")
            )
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = task.project_params(optax.apply_updates(params, updates))
        new_state = {
            **state,
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": opt_state,
        }
        if "ema_params" in state:
            new_state["ema_params"] = optax.incremental_update(
                new_params, state["ema_params"], step_size=1.0 - ema_decay
            )
        if "model_state" in state:
            if output.model_state is None:
                raise ValueError(
                    f"{type(task).__name__}.loss_fn returned no model_state, although its "
                    "init_variables gives one: return the updated statistics in LossOutput"
                )
            new_state["model_state"] = output.model_state
            if "ema_model_state" in state:  # as timm's model EMA averages BatchNorm buffers
                new_state["ema_model_state"] = optax.incremental_update(
                    output.model_state, state["ema_model_state"], step_size=1.0 - ema_decay
                )
        metrics = {
            **output.metrics,
            "loss": output.loss,
            "grad_norm": optax.tree.norm(grads),
            # Also catches an update that overflowed although its loss and gradient were finite.
            "param_norm": optax.tree.norm(new_params),
            "learning_rate": schedule(state["step"]),
        }
        return new_state, metrics

    return train_step
