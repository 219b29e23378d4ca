"""The one train loop of the project: every method runs through ``train_and_evaluate``.

One jitted, sharded step: task loss -> gradients (optionally accumulated over micro-batches) ->
optax update -> task's parameter projection -> EMA. Around it: checkpoints (resume, keep-N, best,
SIGTERM save), evaluation on a schedule, progress on the terminal and metrics for TensorBoard/CSV.
A non-finite loss or gradient stops the run before anything after it is saved, so the last
checkpoint on disk is always a good one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from pretrain import sharding
from pretrain.checkpoint import Checkpointer
from pretrain.metrics import MetricWriter, format_duration
from pretrain.optim import make_optimizer
from pretrain.task import Task, build_task

State = dict[str, Any]


class NonFiniteLossError(RuntimeError):
    """Raised when the loss or gradient norm becomes NaN/inf."""


# --------------------------------------------------------------------------------------------
# State


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
            # Non-trained variables the forward pass updates (BatchNorm's running statistics).
            state["model_state"] = model_state
            if use_ema:
                state["ema_model_state"] = model_state
        if frozen is not None:
            state["frozen"] = frozen
        return state

    return build


def count_params(params: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


# A task whose forward pass updates variables (BatchNorm statistics) receives them as
# ``loss_fn(..., model_state=...)`` and returns the updated ones in its metrics under this key.
MODEL_STATE_KEY = "model_state"


def model_state_kwargs(state: State, use_ema: bool = False) -> dict[str, Any]:
    """``{"model_state": ...}`` for the task's loss, evaluation and export, when it has one."""
    key = "ema_model_state" if use_ema else "model_state"
    return {"model_state": state[key]} if key in state else {}


# --------------------------------------------------------------------------------------------
# Gradients


def split_microbatches(batch: Any, steps: int, mesh: Mesh) -> Any:
    """(B, ...) -> (steps, B/steps, ...), each micro-batch spread over all data-parallel devices.

    Rows are taken with stride ``steps`` so that micro-batch i holds rows i, i+steps, ...: every
    device contributes to every micro-batch, and no data moves between devices.
    """

    def split(x: jax.Array) -> jax.Array:
        rows = x.shape[0] // steps
        x = x.reshape(rows, steps, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


def _tree_mean(trees: Any) -> Any:
    return jax.tree.map(lambda x: x.mean(axis=0), trees)


def accumulated_gradients(
    task: Task,
    params: Any,
    batch: Any,
    rng: jax.Array,
    step: jax.Array,
    steps: int,
    mesh: Mesh,
    frozen: Any = None,
) -> tuple[tuple[jax.Array, dict], Any]:
    """((loss, metrics), grads) of the whole batch, computed ``steps`` micro-batches at a time.

    For tasks that split their loss into ``embed`` + ``loss_from_embeddings`` (contrastive losses,
    where every example is a negative for every other), the result is exactly the full-batch
    gradient: a first pass embeds all micro-batches without gradients; then each micro-batch is
    embedded again with gradients and the loss over all embeddings is differentiated through that
    micro-batch only. Summing gives dL/dparams by the chain rule. Parameters the loss uses
    directly (e.g. the temperature) get their direct gradient from one pass only.
    For other tasks the gradients of the micro-batch losses are averaged.
    """
    micro = split_microbatches(batch, steps, mesh)
    indices = jnp.arange(steps)
    zeros = jax.tree.map(jnp.zeros_like, params)

    if not task.splits_loss:

        def plain_step(grads_sum: Any, inputs: tuple[Any, jax.Array]) -> tuple[Any, Any]:
            microbatch, index = inputs
            value_and_grad = jax.value_and_grad(task.loss_fn, has_aux=True)
            (loss, metrics), grads = value_and_grad(
                params, microbatch, jax.random.fold_in(rng, index), step, frozen
            )
            return jax.tree.map(jnp.add, grads_sum, grads), (loss, metrics)

        grads, (losses, metrics) = jax.lax.scan(plain_step, zeros, (micro, indices))
        grads = jax.tree.map(lambda g: g / steps, grads)
        return (losses.mean(), _tree_mean(metrics)), grads

    micro_rng = lambda index: jax.random.fold_in(rng, index)
    embeddings = jax.lax.map(
        lambda inputs: task.embed(params, inputs[0], micro_rng(inputs[1]), frozen),
        (micro, indices),
    )
    embeddings = jax.lax.stop_gradient(embeddings)
    merge = lambda tree: jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)

    def split_step(grads_sum: Any, inputs: tuple[Any, jax.Array]) -> tuple[Any, Any]:
        microbatch, index = inputs

        def loss_through_microbatch(p: Any) -> tuple[jax.Array, dict]:
            fresh = task.embed(p, microbatch, micro_rng(index), frozen)
            stacked = jax.tree.map(
                lambda old, new: jax.lax.dynamic_update_index_in_dim(old, new, index, 0),
                embeddings,
                fresh,
            )
            direct = jax.tree.map(lambda x: jnp.where(index == 0, x, jax.lax.stop_gradient(x)), p)
            return task.loss_from_embeddings(direct, merge(stacked), rng, step, frozen)

        (loss, metrics), grads = jax.value_and_grad(loss_through_microbatch, has_aux=True)(params)
        return jax.tree.map(jnp.add, grads_sum, grads), (loss, metrics)

    grads, (losses, metrics) = jax.lax.scan(split_step, zeros, (micro, indices))
    return (losses.mean(), _tree_mean(metrics)), grads


def make_train_step(
    task: Task,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    *,
    grad_accum_steps: int = 1,
    ema_decay: float | None = None,
) -> Callable[[State, dict[str, jax.Array]], tuple[State, dict[str, jax.Array]]]:
    def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params = state["params"]
        frozen = state.get("frozen")
        model_state = model_state_kwargs(state)
        if model_state and grad_accum_steps > 1:
            raise ValueError(
                "grad_accum_steps > 1 with a model that updates state in its forward pass "
                "(BatchNorm statistics) is not supported: use grad_accum_steps=1"
            )
        if grad_accum_steps > 1:
            (loss, metrics), grads = accumulated_gradients(
                task, params, batch, rng, state["step"], grad_accum_steps, mesh, frozen
            )
        else:
            (loss, metrics), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(
                params, batch, rng, state["step"], frozen, **model_state
            )
        new_model_state = metrics.pop(MODEL_STATE_KEY, None) if model_state else None
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
        if new_model_state is not None:
            new_state["model_state"] = new_model_state
            if "ema_model_state" in state:  # as timm's model EMA averages BatchNorm buffers
                new_state["ema_model_state"] = optax.incremental_update(
                    new_model_state, state["ema_model_state"], step_size=1.0 - ema_decay
                )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            # Also catches an update that overflowed although its loss and gradient were finite.
            "param_norm": optax.global_norm(new_params),
            "learning_rate": schedule(state["step"]),
        }
        return new_state, metrics

    return train_step


# --------------------------------------------------------------------------------------------
# Loop helpers


class PreemptionWatcher:
    """Turns SIGTERM into a flag the loop checks once per step (then it saves and exits).

    Single-process runs only: with several processes each would see the signal at a different
    step, and the collective save needs one agreed step. There JAX's preemption service (started
    by ``jax.distributed.initialize``, with its own SIGTERM handler) agrees on the step, read
    through ``Checkpointer.reached_preemption``.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        single_process = jax.process_count() == 1
        if single_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint before exiting")
        self.requested = True

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def device_fields(batch: dict[str, np.ndarray], fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The fields of a host batch that the task's loss reads (an absent one is a clear error)."""
    missing = [name for name in fields if name not in batch]
    if missing:
        raise KeyError(f"the data has no {missing} for the task; it has {sorted(batch)}")
    return {name: batch[name] for name in fields}


def check_finite(step_metrics: list[tuple[int, dict[str, float]]], last_saved: int | None) -> None:
    for step, metrics in step_metrics:
        for name in ("loss", "grad_norm", "param_norm"):
            value = metrics.get(name)
            if value is not None and not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{name} is {value} at step {step}. Training stopped; the last checkpoint "
                    f"(step {last_saved}) was written before this step and is intact. Lower the "
                    "learning rate or check the data, then restart to resume from it."
                )


def summarize(step_metrics: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Mean of each metric over the steps since the last log line."""
    names = step_metrics[-1][1].keys()
    return {name: float(np.mean([m[name] for _, m in step_metrics])) for name in names}


def maybe_initialize_distributed(config: ConfigDict) -> None:
    """Start jax.distributed when launched on several hosts (before any other JAX call).

    ``config.distributed`` = "auto" detects the usual launchers (SLURM with several tasks, a
    coordinator address in the environment, multi-host TPU); "on" always, "off" never.
    """
    mode = config.get("distributed", "auto")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"config.distributed={mode!r}; use 'auto', 'on' or 'off'")
    if mode == "off":
        return
    launched_multi = (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "JAX_COORDINATOR_ADDRESS" in os.environ
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    )
    if mode == "on" or launched_multi:
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


# --------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """How a task's train state is built and laid out over the mesh."""

    build: Callable[[], State]
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


class ProgressMeter:
    """Steps per second and ETA from train-step time only (compilation, evaluation and
    checkpoint saves are excluded)."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._interval_start = time.perf_counter()
        self._interval_steps = 0
        self._excluded = 0.0
        self._timed_steps = 0
        self._timed_seconds = 0.0
        self._first_interval = True

    def step(self) -> None:
        self._interval_steps += 1

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def end_interval(self, step: int) -> dict[str, float]:
        """Close the interval since the last call: its rate, and the ETA of the whole run."""
        seconds = max(time.perf_counter() - self._interval_start - self._excluded, 1e-9)
        steps = max(self._interval_steps, 1)
        if not self._first_interval:  # the first interval includes compilation
            self._timed_steps += steps
            self._timed_seconds += seconds
        self._first_interval = False
        mean = self._timed_seconds / self._timed_steps if self._timed_steps else seconds / steps
        self._interval_start, self._interval_steps, self._excluded = time.perf_counter(), 0, 0.0
        return {
            "steps_per_second": steps / seconds,
            "eta_seconds": (self.total_steps - step) * mean,
        }


def log_progress(step: int, total_steps: int, summary: dict[str, float], eta: float) -> None:
    logging.info(
        "step %d/%d | loss %.4f | %.1f examples/s | %.2f steps/s | ETA %s",
        step,
        total_steps,
        summary["loss"],
        summary["examples_per_second"],
        summary["steps_per_second"],
        format_duration(eta),
    )


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming from its last checkpoint); return final metrics."""
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_processes_own_distinct_rows(mesh)
    task = build_task(config, mesh)
    tx, schedule = make_optimizer(config)
    grad_accum_steps = int(config.get("grad_accum_steps", 1))
    local_batch_size = sharding.check_batch_size(config.batch_size, mesh, grad_accum_steps)
    total_steps = int(config.total_steps)
    use_ema = bool(config.get("ema_decay"))
    layout = StateLayout.create(config, task, tx)
    logging.info(
        "mesh %s over %d devices (%d processes); %s parameters; global batch %d (%d per process)",
        dict(mesh.shape),
        mesh.size,
        jax.process_count(),
        f"{count_params(layout.abstract['params']):,}",
        config.batch_size,
        local_batch_size,
    )

    if config.get("eval") and int(config.eval.every_steps):
        task.prepare_evaluation()
    data_iterator = iter(
        task.train_dataset(
            batch_size=local_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    )
    checkpointer = make_checkpointer(config, workdir)
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        check_matches_training_config(config, workdir)
    if jax.process_index() == 0:
        (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
    if resume_step is not None:
        state = checkpointer.restore(resume_step, layout.abstract_with_shardings(), data_iterator)
        logging.info("resumed from checkpoint at step %d", resume_step)
    else:
        state = layout.initialize(task.load_frozen(), task.load_pretrained())
    writer = MetricWriter(workdir, resume_step=resume_step)

    train_step = make_train_step(
        task,
        tx,
        schedule,
        mesh,
        grad_accum_steps=grad_accum_steps,
        ema_decay=float(config.ema_decay) if use_ema else None,
    )
    jitted_step = jax.jit(train_step, out_shardings=(layout.shardings, None), donate_argnums=0)

    start_step = int(jax.device_get(state["step"]))
    log_every = int(config.log_every_steps)
    eval_every = int(config.eval.every_steps) if config.get("eval") else 0
    ckpt_every = int(config.checkpoint.every_steps)
    last_saved = resume_step
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    # Records skipped as bad over the whole run: a checkpoint keeps the sum over processes,
    # which process 0 carries on after a restart (the logged value is the sum again).
    skipped_total = 0
    if resume_step is not None and jax.process_index() == 0:
        skipped_total = checkpointer.counters(resume_step).get("skipped", 0)
    final_metrics: dict[str, float] = {}
    watcher = PreemptionWatcher()
    meter = ProgressMeter(total_steps)

    def drain() -> list[tuple[int, dict[str, float]]]:
        """Fetch the metrics of the steps run since the last call; stop on a non-finite one."""
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending.clear()
        check_finite(fetched, last_saved)
        return fetched

    def evaluate(step: int) -> dict[str, float]:
        frozen = state.get("frozen")
        results = task.evaluate(state["params"], step, frozen, **model_state_kwargs(state))
        if use_ema and config.eval.get("include_ema", True):
            ema_results = task.evaluate(
                state["ema_params"], step, frozen, **model_state_kwargs(state, use_ema=True)
            )
            results.update({f"ema/{k}": v for k, v in ema_results.items()})
        if results:
            listing = "  ".join(f"{k} {v:.4f}" for k, v in sorted(results.items()))
            logging.info("eval step %d: %s", step, listing)
            writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
        return results

    try:
        if eval_every and config.eval.get("at_start") and resume_step is None:
            # Before any update (e.g. a transferred classifier as initialised).
            final_metrics.update({f"eval/{k}": v for k, v in evaluate(0).items()})
        for step in range(start_step + 1, total_steps + 1):
            host_batch = next(data_iterator)
            skipped_total += int(host_batch.get("skipped", 0))
            global_batch = sharding.global_batch_from_local(
                device_fields(host_batch, task.batch_fields), mesh
            )
            state, metrics = jitted_step(state, global_batch)
            pending.append((step, metrics))
            meter.step()

            is_last = step == total_steps
            preempted = watcher.requested or checkpointer_reached_preemption(checkpointer, step)
            if step % log_every == 0 or is_last or preempted:
                summary = summarize(drain())
                rates = meter.end_interval(step)
                summary["steps_per_second"] = rates["steps_per_second"]
                summary["examples_per_second"] = rates["steps_per_second"] * config.batch_size
                summary["data/skipped_total"] = global_skipped(skipped_total)
                log_progress(step, total_steps, summary, rates["eta_seconds"])
                writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
                final_metrics.update({f"train/{k}": v for k, v in summary.items()})

            paused_at = time.perf_counter()
            eval_results = None
            if eval_every and (step % eval_every == 0 or is_last):
                eval_results = evaluate(step)
                final_metrics.update({f"eval/{k}": v for k, v in eval_results.items()})
            # An evaluated step is saved too when a best checkpoint is tracked, so that the best
            # evaluated parameters exist on disk.
            tracks_best = bool(eval_results) and checkpointer.best_metric is not None
            if step % ckpt_every == 0 or is_last or preempted or tracks_best:
                drain()
                checkpointer.save(
                    step,
                    state,
                    data_iterator,
                    metrics=eval_results,
                    counters={"skipped": int(global_skipped(skipped_total))},
                )
                last_saved = step
            meter.exclude(time.perf_counter() - paused_at)

            if preempted:
                logging.warning("preempted: checkpoint at step %d written; exiting", step)
                break
    finally:
        watcher.close()
        checkpointer.close()
        writer.close()
    logging.info(
        "training finished at step %d; checkpoints in %s",
        int(jax.device_get(state["step"])),
        checkpointer.directory,
    )
    return final_metrics


def compile_train_step(config: ConfigDict) -> dict[str, float]:
    """Build, shard and compile one train step of ``config`` without data or weights.

    Checks that a recipe fits its mesh before a long job starts: returns XLA's FLOP count of the
    step and the per-device memory of its arguments, outputs and temporaries (when the backend
    reports them).
    """
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_processes_own_distinct_rows(mesh)
    task = build_task(config, mesh)
    tx, schedule = make_optimizer(config)
    grad_accum_steps = int(config.get("grad_accum_steps", 1))
    sharding.check_batch_size(config.batch_size, mesh, grad_accum_steps)
    layout = StateLayout.create(config, task, tx)
    batch = {
        name: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.batch_sharding(mesh, s.ndim))
        for name, s in task.batch_spec(int(config.batch_size)).items()
    }
    step = make_train_step(
        task,
        tx,
        schedule,
        mesh,
        grad_accum_steps=grad_accum_steps,
        ema_decay=float(config.ema_decay) if config.get("ema_decay") else None,
    )
    compiled = (
        jax.jit(step, out_shardings=(layout.shardings, None), donate_argnums=0)
        .lower(layout.abstract_with_shardings(), batch)
        .compile()
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    report = {
        "parameters": float(count_params(layout.abstract["params"])),
        "gflop_per_step": float(cost.get("flops", float("nan"))) / 1e9,
    }
    memory = compiled.memory_analysis()
    if memory is not None:
        for name in ("argument", "output", "temp", "generated_code"):
            value = getattr(memory, f"{name}_size_in_bytes", None)
            if value is not None:
                report[f"{name}_gib_per_device"] = value / 2**30
    for name, value in report.items():
        logging.info("compile: %s = %.4g", name, value)
    return report


def make_checkpointer(config: ConfigDict, workdir: str) -> Checkpointer:
    ckpt = config.checkpoint
    return Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=int(ckpt.get("keep", 3)),
        best_metric=ckpt.get("best_metric") or None,
        best_mode=ckpt.get("best_mode", "max"),
        async_save=bool(ckpt.get("async_save", True)),
    )


def checkpointer_reached_preemption(checkpointer: Checkpointer, step: int) -> bool:
    """Multi-host preemption notice from the JAX coordination service (False when single-host)."""
    if jax.process_count() == 1:
        return False
    return checkpointer.reached_preemption(step)


def global_skipped(local_count: int) -> float:
    """Sum of the skipped-record counters of all processes."""
    if jax.process_count() == 1:
        return float(local_count)
    from jax.experimental import multihost_utils

    return float(np.sum(multihost_utils.process_allgather(np.asarray(local_count))))


# --------------------------------------------------------------------------------------------
# Using a trained workdir: evaluation and export


# Config fields that decide the structure and shapes of the saved state (learning rates or
# schedules may change between runs; these may not).
STATE_DEFINING_FIELDS = (
    r"task$",
    r"model\.",
    r"loss\.",
    r"range_augment\.(enabled|operations)$",
    r"optimizer\.(name|layer_decay|text_layer_decay)$",
    r"teacher\.(source|open_clip_model|config|dtype)$",  # frozen teachers' shapes
    r"vocab\.(path|min_count|max_size)$",  # CatLIP's classifier size
    r"transfer\.(mode|pretrained\.(config|workdir))$",  # what is trained, what is frozen
)


def _flatten_json(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten_json(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """State-defining fields whose values differ; a field only one config has is not compared
    (configs gain fields over time), except whether EMA is on."""
    was, now = _flatten_json(saved), _flatten_json(current)
    differences = [
        f"  {field}: trained {was[field]!r}, now {now[field]!r}"
        for field in sorted(set(was) & set(now))
        if any(re.match(pattern, field) for pattern in STATE_DEFINING_FIELDS)
        and was[field] != now[field]
    ]
    if bool(saved.get("ema_decay")) != bool(current.get("ema_decay")):
        differences.append(
            f"  ema_decay: trained {saved.get('ema_decay')!r}, now {current.get('ema_decay')!r}"
        )
    return differences


def check_matches_training_config(config: ConfigDict, workdir: str) -> None:
    """Fail with the differing fields when the model described now is not the one trained."""
    saved_path = epath.Path(workdir) / "config.json"
    if not saved_path.exists():
        return
    differences = config_differences(
        json.loads(saved_path.read_text()), json.loads(config.to_json_best_effort())
    )
    if differences:
        raise ValueError(
            f"the config differs from the one {saved_path} was trained with:\n"
            + "\n".join(differences)
            + "\nPass the same config arguments and overrides as for training."
        )


def restore_trained(config: ConfigDict, workdir: str, step: str = "latest") -> tuple[Task, State]:
    """The task and the train state of checkpoint ``step`` ("latest", "best" or a number)."""
    check_matches_training_config(config, workdir)
    task = build_task(config, sharding.make_mesh(config.mesh))
    tx, _ = make_optimizer(config)
    layout = StateLayout.create(config, task, tx)
    checkpointer = make_checkpointer(config, workdir)
    try:
        chosen = resolve_step(checkpointer, step)
        logging.info("restoring checkpoint %d from %s", chosen, checkpointer.directory)
        return task, checkpointer.restore(chosen, layout.abstract_with_shardings())
    finally:
        checkpointer.close()


def resolve_step(checkpointer: Checkpointer, step: str) -> int:
    steps = checkpointer.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
    if step == "latest":
        return max(steps)
    if step == "best":
        best = checkpointer.best_step()
        if best is None:
            raise ValueError("no checkpoint has the best-metric value (set checkpoint.best_metric)")
        return best
    if not step.isdigit() or int(step) not in steps:
        raise ValueError(f"checkpoint step {step!r} not found; available: {sorted(steps)}")
    return int(step)


def evaluate_checkpoint(
    config: ConfigDict, workdir: str, step: str = "latest", use_ema: bool = False
) -> dict[str, float]:
    """Run the task's evaluators on a saved checkpoint (standalone evaluation)."""
    task, state = restore_trained(config, workdir, step)
    key = "ema_params" if use_ema else "params"
    if key not in state:
        raise ValueError(f"the checkpoint has no {key} (ema_decay was off)")
    results = task.evaluate(
        state[key],
        int(jax.device_get(state["step"])),
        state.get("frozen"),
        **model_state_kwargs(state, use_ema),
    )
    for name, value in sorted(results.items()):
        logging.info("%s: %.4f", name, value)
    return results


def export_checkpoint(
    config: ConfigDict,
    workdir: str,
    directory: str,
    step: str = "latest",
    use_ema: bool = False,
) -> str | None:
    """Write a checkpoint's parameters in the task's PyTorch format (process 0 writes)."""
    task, state = restore_trained(config, workdir, step)
    key = "ema_params" if use_ema else "params"
    if key not in state:
        raise ValueError(f"the checkpoint has no {key} (ema_decay was off)")
    # Gather shards from every device (and host) into full arrays before leaving JAX.
    replicated = sharding.replicated(task.mesh)
    gather = lambda tree: jax.device_get(jax.jit(lambda p: p, out_shardings=replicated)(tree))
    params = gather(state[key])
    model_state = {k: gather(v) for k, v in model_state_kwargs(state, use_ema).items()}
    if jax.process_index() != 0:
        return None
    path = task.export(params, directory, **model_state)
    logging.info("exported %s of step %d to %s", key, int(jax.device_get(state["step"])), path)
    return path
