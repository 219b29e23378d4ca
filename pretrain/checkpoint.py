"""Checkpoints with orbax: train state (params, optimizer, EMA, step, RNG) + data-iterator position.

- Saves are asynchronous: the train loop continues while the arrays are written.
- Orbax writes each step into a temporary directory and renames it when complete, so a crash or
  SIGKILL in the middle of a save leaves the previous checkpoint intact.
- Kept: the latest ``keep`` checkpoints plus the best one by ``best_metric`` (when configured).
- The data iterator's state (grain) is saved with the arrays, so a resumed run sees exactly the
  examples an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from ml_collections import ConfigDict
from orbax.checkpoint import checkpoint_managers


def _score(best_metric: str, best_mode: str) -> Any:
    """Higher is better; a checkpoint whose metrics lack the metric ranks last."""
    sign = 1.0 if best_mode == "max" else -1.0
    return lambda metrics: sign * float(metrics.get(best_metric, -sign * math.inf))


def _preservation_policy(keep: int, best_metric: str | None, best_mode: str) -> Any:
    policies = [checkpoint_managers.LatestN(n=keep)]
    if best_metric:
        policies.append(
            checkpoint_managers.BestN(
                get_metric_fn=_score(best_metric, best_mode),
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    return checkpoint_managers.AnyPreservationPolicy(policies)


class Checkpointer:
    """Saves and restores ``{'state': pytree of jax.Arrays, 'data': grain iterator}``."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
        self.best_metric = best_metric
        self.best_mode = best_mode
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=_preservation_policy(keep, best_metric, best_mode),
            # Orbax stores the metrics with a checkpoint only when it tracks a best one.
            best_fn=_score(best_metric, "max") if best_metric else None,
            best_mode=best_mode,
            create=True,
        )
        directory = str(directory)
        self._manager = ocp.CheckpointManager(
            directory if "://" in directory else os.path.abspath(directory),
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    @classmethod
    def for_workdir(cls, config: ConfigDict, workdir: str) -> Checkpointer:
        """The checkpoints of a run: ``WORKDIR/checkpoints`` with ``config.checkpoint``'s policy."""
        settings = config.checkpoint
        return cls(
            os.path.join(workdir, "checkpoints"),
            keep=int(settings.get("keep", 3)),
            best_metric=settings.get("best_metric") or None,
            best_mode=settings.get("best_mode", "max"),
            async_save=bool(settings.get("async_save", True)),
        )

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The step whose saved metrics are best (None when no checkpoint has the metric)."""
        if not self.best_metric:
            return None
        scored = []
        for step in self._manager.all_steps():
            metrics = self._manager.metrics(step)
            if metrics and self.best_metric in metrics:
                scored.append((float(metrics[self.best_metric]), step))
        if not scored:
            return None
        pick = max if self.best_mode == "max" else min
        return pick(scored)[1]

    def resolve_step(self, step: str) -> int:
        """The saved step a user names: "latest", "best" or a number."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step == "latest":
            return max(steps)
        if step == "best":
            best = self.best_step()
            if best is None:
                raise ValueError(
                    "no checkpoint has the best-metric value (set checkpoint.best_metric)"
                )
            return best
        if not step.isdigit() or int(step) not in steps:
            raise ValueError(f"checkpoint step {step!r} not found; available: {sorted(steps)}")
        return int(step)

    def reached_preemption(self, step: int) -> bool:
        """Multi-host preemption notice from the JAX coordination service (single-process runs
        watch SIGTERM themselves: pretrain/preemption.py)."""
        if jax.process_count() == 1:
            return False
        return bool(self._manager.reached_preemption(step))

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any | None = None,
        metrics: Mapping[str, float] | None = None,
        counters: Mapping[str, int] | None = None,
    ) -> None:
        """Save asynchronously; ``counters`` are host-side totals (JSON) restored with the state."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
        self._manager.save(
            step,
            args=ocp.args.Composite(**items),
            metrics=metrics,
            force=True,
            custom_metadata={"counters": dict(counters or {})},
        )
        logging.info("checkpoint: saving step %d (async) to %s", step, self.directory)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """Restore into the shardings of ``abstract_state`` (and the data iterator in place)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = "data" in self._item_names(step)
        if data_iterator is not None and has_data:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None and not has_data:
            logging.warning("checkpoint %d has no data-iterator state; data restarts", step)
        return restored["state"]

    def counters(self, step: int) -> dict[str, int]:
        """The host-side counters saved with ``step`` (empty for older checkpoints)."""
        custom = self._manager.metadata(step).custom_metadata or {}
        return {name: int(value) for name, value in custom.get("counters", {}).items()}

    def _item_names(self, step: int) -> set[str]:
        step_dir = epath.Path(self.directory) / str(step)
        return {path.name for path in step_dir.iterdir()} if step_dir.is_dir() else set()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
