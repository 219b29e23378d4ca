"""The loss and its gradients for one global batch, whole or accumulated over micro-batches."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pretrain import sharding
from pretrain.task import LossOutput, Task


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


def _loss_and_metrics(output: LossOutput) -> tuple[jax.Array, tuple[Any, Any]]:
    """A LossOutput as ``value_and_grad(has_aux=True)`` wants it: (loss, aux)."""
    return output.loss, (output.metrics, output.model_state)


def loss_and_gradients(
    task: Task,
    params: Any,
    batch: Any,
    rng: jax.Array,
    step: jax.Array,
    frozen: Any = None,
    model_state: Any = None,
) -> tuple[LossOutput, Any]:
    """``(LossOutput, grads)`` of the task's loss on the whole batch."""
    value_and_grad = jax.value_and_grad(
        lambda p: _loss_and_metrics(task.loss_fn(p, batch, rng, step, frozen, model_state)),
        has_aux=True,
    )
    (loss, (metrics, new_model_state)), grads = value_and_grad(params)
    return LossOutput(loss, metrics, new_model_state), grads


def accumulated_gradients(
    task: Task,
    params: Any,
    batch: Any,
    rng: jax.Array,
    step: jax.Array,
    steps: int,
    mesh: Mesh,
    frozen: Any = None,
) -> tuple[LossOutput, Any]:
    """``(LossOutput, grads)`` of the whole batch, computed ``steps`` micro-batches at a time.

    For tasks that split their loss into ``embed`` + ``loss_from_embeddings`` (contrastive losses,
    where every example is a negative for every other), the result is exactly the full-batch
    gradient: a first pass embeds all micro-batches without gradients; then each micro-batch is
    embedded again with gradients and the loss over all embeddings is differentiated through that
    micro-batch only. Summing gives dL/dparams by the chain rule. Parameters the loss uses
    directly (e.g. the temperature) get their direct gradient from one pass only.
    For other tasks the gradients of the micro-batch losses are averaged.
    Models that update state in their forward pass (BatchNorm) are refused at start-up
    (pretrain/run.py): their statistics would depend on the micro-batching.
    """
    micro = split_microbatches(batch, steps, mesh)
    indices = jnp.arange(steps)
    zeros = jax.tree.map(jnp.zeros_like, params)
    micro_rng = lambda index: jax.random.fold_in(rng, index)

    if not task.splits_loss:

        def plain_step(grads_sum: Any, inputs: tuple[Any, jax.Array]) -> tuple[Any, Any]:
            microbatch, index = inputs
            output, grads = loss_and_gradients(
                task, params, microbatch, micro_rng(index), step, frozen
            )
            return jax.tree.map(jnp.add, grads_sum, grads), (output.loss, output.metrics)

        grads, (losses, metrics) = jax.lax.scan(plain_step, zeros, (micro, indices))
        grads = jax.tree.map(lambda g: g / steps, grads)
        return LossOutput(losses.mean(), _tree_mean(metrics)), grads

    embeddings = jax.lax.map(
        lambda inputs: task.embed(params, inputs[0], micro_rng(inputs[1]), frozen),
        (micro, indices),
    )
    embeddings = jax.lax.stop_gradient(embeddings)
    merge = lambda tree: jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)

    def split_step(grads_sum: Any, inputs: tuple[Any, jax.Array]) -> tuple[Any, Any]:
        microbatch, index = inputs

        def loss_through_microbatch(p: Any) -> tuple[jax.Array, Any]:
            fresh = task.embed(p, microbatch, micro_rng(index), frozen)
            stacked = jax.tree.map(
                lambda old, new: jax.lax.dynamic_update_index_in_dim(old, new, index, 0),
                embeddings,
                fresh,
            )
            direct = jax.tree.map(lambda x: jnp.where(index == 0, x, jax.lax.stop_gradient(x)), p)
            output = task.loss_from_embeddings(direct, merge(stacked), rng, step, frozen)
            return output.loss, output.metrics

        (loss, metrics), grads = jax.value_and_grad(loss_through_microbatch, has_aux=True)(params)
        return jax.tree.map(jnp.add, grads_sum, grads), (loss, metrics)

    grads, (losses, metrics) = jax.lax.scan(split_step, zeros, (micro, indices))
    return LossOutput(losses.mean(), _tree_mean(metrics)), grads
