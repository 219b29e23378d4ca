"""The one train loop of the project: every method runs through ``train_and_evaluate``.

Around the jitted step (pretrain/train_step.py): checkpoints (resume, keep-N, best, SIGTERM
save), evaluation on a schedule, progress on the terminal and metrics for TensorBoard/CSV.
A non-finite loss or gradient stops the run before anything after it is saved, so the last
checkpoint on disk is always a good one.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from pretrain import sharding
from pretrain.checkpoint import Checkpointer
from pretrain.distributed import sum_over_processes
from pretrain.metrics import MetricWriter
from pretrain.preemption import PreemptionWatcher
from pretrain.progress import ProgressMeter, log_progress
from pretrain.run import Run
from pretrain.saved_config import check_matches_training_config, save_training_config
from pretrain.state import evaluate_weights

StepMetrics = list[tuple[int, dict[str, float]]]


class NonFiniteLossError(RuntimeError):
    """Raised when the loss or gradient norm becomes NaN/inf."""


def device_fields(batch: dict[str, np.ndarray], fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The fields of a host batch that the task's loss reads (an absent one is a clear error)."""
    missing = [name for name in fields if name not in batch]
    if missing:
        raise KeyError(f"the data has no {missing} for the task; it has {sorted(batch)}")
    return {name: batch[name] for name in fields}


def check_finite(step_metrics: StepMetrics, last_saved: int | None) -> None:
    for step, metrics in step_metrics:
        for name in ("loss", "grad_norm", "param_norm"):
            value = metrics.get(name)
            if value is not None and not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{name} is {value} at step {step}. Training stopped; the last checkpoint "
                    f"(step {last_saved}) was written before this step and is intact. Lower the "
                    "learning rate or check the data, then restart to resume from it."
                )


def summarize(step_metrics: StepMetrics) -> dict[str, float]:
    """Mean of each metric over the steps since the last log line."""
    names = step_metrics[-1][1].keys()
    return {name: float(np.mean([m[name] for _, m in step_metrics])) for name in names}


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming from its last checkpoint); return final metrics."""
    run = Run.build(config)
    task, layout = run.task, run.layout
    task.output_dir = workdir
    run.log_summary()
    total_steps = int(config.total_steps)
    eval_every = int(config.eval.every_steps) if config.get("eval") else 0
    if eval_every:
        task.prepare_evaluation()
    data_iterator = iter(
        task.train_dataset(
            batch_size=run.local_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    )
    checkpointer = Checkpointer.for_workdir(config, workdir)
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        check_matches_training_config(config, workdir)
    save_training_config(config, workdir)
    if resume_step is not None:
        state = checkpointer.restore(resume_step, layout.abstract_with_shardings(), data_iterator)
        logging.info("resumed from checkpoint at step %d", resume_step)
    else:
        state = layout.initialize(task.load_frozen(), task.load_pretrained())
    writer = MetricWriter(workdir, resume_step=resume_step)

    start_step = int(jax.device_get(state["step"]))
    log_every = int(config.log_every_steps)
    ckpt_every = int(config.checkpoint.every_steps)
    include_ema = run.uses_ema and config.eval.get("include_ema", True)
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

    def drain() -> StepMetrics:
        """Fetch the metrics of the steps run since the last call; stop on a non-finite one."""
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending.clear()
        check_finite(fetched, last_saved)
        return fetched

    def evaluate(step: int) -> dict[str, float]:
        results = evaluate_weights(task, state, step)
        if include_ema:
            ema_results = evaluate_weights(task, state, step, use_ema=True)
            results.update({f"ema/{k}": v for k, v in ema_results.items()})
        if results:
            listing = "  ".join(f"{k} {v:.4f}" for k, v in sorted(results.items()))
            logging.info("eval step %d: %s", step, listing)
            writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
        final_metrics.update({f"eval/{k}": v for k, v in results.items()})
        return results

    try:
        if eval_every and config.eval.get("at_start") and resume_step is None:
            evaluate(0)  # before any update (e.g. a pretrained head as initialised)
        for step in range(start_step + 1, total_steps + 1):
            host_batch = next(data_iterator)
            skipped_total += int(host_batch.get("skipped", 0))
            global_batch = sharding.global_batch_from_local(
                device_fields(host_batch, task.batch_fields), run.mesh
            )
            state, metrics = run.train_step(state, global_batch)
            pending.append((step, metrics))
            meter.step()

            is_last = step == total_steps
            preempted = watcher.requested or checkpointer.reached_preemption(step)
            if step % log_every == 0 or is_last or preempted:
                summary = summarize(drain())
                rates = meter.end_interval(step)
                summary["steps_per_second"] = rates["steps_per_second"]
                summary["examples_per_second"] = rates["steps_per_second"] * config.batch_size
                summary["data/skipped_total"] = sum_over_processes(skipped_total)
                log_progress(step, total_steps, summary, rates["eta_seconds"])
                writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
                final_metrics.update({f"train/{k}": v for k, v in summary.items()})

            paused_at = time.perf_counter()
            eval_results = None
            if eval_every and (step % eval_every == 0 or is_last):
                eval_results = evaluate(step)
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
                    counters={"skipped": int(sum_over_processes(skipped_total))},
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
