"""The modes besides training (``--mode=compile|evaluate|export``) and restoring a trained
workdir's state, which evaluation, export and other runs (teachers, probes) start from."""

from __future__ import annotations

from typing import Any

import jax
from absl import logging
from ml_collections import ConfigDict

from pretrain import compile_fit, sharding
from pretrain.checkpoint import Checkpointer
from pretrain.run import Run
from pretrain.saved_config import check_matches_training_config
from pretrain.state import State, evaluate_weights, weights
from pretrain.task import Task


def compile_train_step(config: ConfigDict) -> dict[str, Any]:
    """Build, shard and compile one train step of ``config`` without data or weights, for the
    local devices or ``config.compile.topology`` (a TPU slice, compiled from any machine).

    Checks that a recipe fits before a long job starts: returns XLA's FLOP count of the step,
    the per-device memory of its arguments, outputs and temporaries against the device's memory,
    whether it fits and (``config.compile.batch_search``) the largest per-device batch that does.
    """
    report = compile_fit.fit_report(config)
    cost = report["cost"]
    logging.info("compile: parameters = %.4g", report["parameters"])
    logging.info("compile: gflop_per_step = %.4g", report["gflop_per_step"])
    for name in ("argument", "output", "temp"):
        value = getattr(cost, f"{name}_bytes") / compile_fit.GIB
        report[f"{name}_gib_per_device"] = value
        logging.info("compile: %s_gib_per_device = %.4g", name, value)
    print(compile_fit.format_report(report), flush=True)
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
