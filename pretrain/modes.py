"""The modes besides training (``--mode=compile|evaluate|export``) and restoring a trained
workdir's state, which evaluation, export and other runs (teachers, probes) start from."""

from __future__ import annotations

import jax
from absl import logging
from ml_collections import ConfigDict

from pretrain import sharding
from pretrain.checkpoint import Checkpointer
from pretrain.run import Run
from pretrain.saved_config import check_matches_training_config
from pretrain.state import State, count_params, evaluate_weights, weights
from pretrain.task import Task


def compile_train_step(config: ConfigDict) -> dict[str, float]:
    """Build, shard and compile one train step of ``config`` without data or weights.

    Checks that a recipe fits its mesh before a long job starts: returns XLA's FLOP count of the
    step and the per-device memory of its arguments, outputs and temporaries (when the backend
    reports them).
    """
    run = Run.build(config)
    batch = {
        name: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=sharding.batch_sharding(run.mesh, s.ndim)
        )
        for name, s in run.task.batch_spec(int(config.batch_size)).items()
    }
    compiled = run.train_step.lower(run.layout.abstract_with_shardings(), batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    report = {
        "parameters": float(count_params(run.layout.abstract["params"])),
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


def restore_trained(config: ConfigDict, workdir: str, step: str = "latest") -> tuple[Task, State]:
    """The task and the train state of checkpoint ``step`` ("latest", "best" or a number)."""
    check_matches_training_config(config, workdir)
    run = Run.build(config)
    checkpointer = Checkpointer.for_workdir(config, workdir)
    try:
        chosen = checkpointer.resolve_step(step)
        logging.info("restoring checkpoint %d from %s", chosen, checkpointer.directory)
        return run.task, checkpointer.restore(chosen, run.layout.abstract_with_shardings())
    finally:
        checkpointer.close()


def evaluate_checkpoint(
    config: ConfigDict, workdir: str, step: str = "latest", use_ema: bool = False
) -> dict[str, float]:
    """Run the task's evaluators on a saved checkpoint (standalone evaluation)."""
    task, state = restore_trained(config, workdir, step)
    task.output_dir = workdir
    results = evaluate_weights(task, state, int(jax.device_get(state["step"])), use_ema)
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
    params, model_state = sharding.gather_to_host(weights(state, use_ema), task.mesh)
    if jax.process_index() != 0:
        return None
    path = task.export(params, directory, model_state)
    logging.info(
        "exported %s of step %d to %s",
        "ema_params" if use_ema else "params",
        int(jax.device_get(state["step"])),
        path,
    )
    return path
