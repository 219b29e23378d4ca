"""A run set up from its config, once, for every mode (train, compile, evaluate, export): the
mesh, the task, the optimizer, the state's layout and the jitted train step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from absl import logging
from jax.sharding import Mesh
from ml_collections import ConfigDict

from pretrain import sharding
from pretrain.optim import make_optimizer
from pretrain.state import StateLayout, count_params
from pretrain.task import Task, build_task
from pretrain.train_step import make_train_step


@dataclasses.dataclass(frozen=True)
class Run:
    config: ConfigDict
    mesh: Mesh
    task: Task
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    layout: StateLayout
    grad_accum_steps: int
    local_batch_size: int
    # (state, global batch) -> (state, metrics), jitted with the state donated and laid out.
    train_step: Callable

    @classmethod
    def build(cls, config: ConfigDict, devices: Sequence[Any] | None = None) -> Run:
        """Everything but data and weights; fails here, at start-up, on what cannot run.
        ``devices``: the mesh's devices (default all), e.g. a TPU topology's to compile for."""
        mesh = sharding.make_mesh(config.mesh, devices)
        sharding.check_processes_own_distinct_rows(mesh)
        task = build_task(config, mesh)
        tx, schedule = make_optimizer(config)
        grad_accum_steps = int(config.get("grad_accum_steps", 1))
        local_batch_size = sharding.check_batch_size(config.batch_size, mesh, grad_accum_steps)
        layout = StateLayout.create(config, task, tx)
        if layout.has_model_state and grad_accum_steps > 1:
            raise ValueError(
                "grad_accum_steps > 1 with a model that updates state in its forward pass "
                "(BatchNorm statistics) is not supported: use grad_accum_steps=1"
            )
        ema_decay = config.get("ema_decay")
        step = make_train_step(
            task,
            tx,
            schedule,
            mesh,
            grad_accum_steps=grad_accum_steps,
            ema_decay=float(ema_decay) if ema_decay else None,
        )
        train_step = jax.jit(step, out_shardings=(layout.shardings, None), donate_argnums=0)
        return cls(
            config,
            mesh,
            task,
            tx,
            schedule,
            layout,
            grad_accum_steps,
            local_batch_size,
            train_step,
        )

    @property
    def uses_ema(self) -> bool:
        return "ema_params" in self.layout.abstract

    def log_summary(self) -> None:
        logging.info(
            "mesh %s over %d devices (%d processes); %s parameters; global batch %d (%d per "
            "process)",
            dict(self.mesh.shape),
            self.mesh.size,
            jax.process_count(),
            f"{count_params(self.layout.abstract['params']):,}",
            self.config.batch_size,
            self.local_batch_size,
        )
