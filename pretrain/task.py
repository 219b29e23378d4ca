"""What the trainer needs from a method (CLIP, CatLIP, CLIPTeX, UTA): the Task interface.

A task owns its model, its loss and its evaluators; the trainer owns the loop, sharding,
optimizer, EMA, checkpoints and logging. The trainer never imports a task by name: the config's
``task`` field is a module path whose ``Task`` class is built with ``(config, mesh)``.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh
from ml_collections import ConfigDict

Params = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class Task(abc.ABC):
    """Base class of the per-method task files in pretrain/tasks/."""

    # The batch fields the loss reads; only these are sent to the devices.
    batch_fields: tuple[str, ...] = ()

    def __init__(self, config: ConfigDict, mesh: Mesh):
        self.config = config
        self.mesh = mesh

    @abc.abstractmethod
    def init_params(self, rng: jax.Array) -> Params:
        """Model parameters (called inside jit with sharded outputs: no host work here)."""

    def init_variables(self, rng: jax.Array) -> tuple[Params, Any]:
        """``(params, model_state)``: a model whose forward pass updates variables (BatchNorm's
        running statistics) returns them as ``model_state`` (else None). Such a task's
        ``loss_fn``, ``evaluate`` and ``export`` then take a ``model_state=`` keyword, and
        ``loss_fn`` returns the updated state in its metrics under ``"model_state"``; the
        trainer keeps it in the train state (checkpointed, EMA'd with the parameters)."""
        return self.init_params(rng), None

    @abc.abstractmethod
    def loss_fn(
        self, params: Params, batch: Batch, rng: jax.Array, step: jax.Array, frozen: Any = None
    ) -> tuple[jax.Array, Metrics]:
        """Global-batch loss and scalar metrics for one (micro-)batch of global arrays.

        ``step`` is the number of optimizer steps taken before this one (for schedules inside
        the loss, e.g. an annealed augmentation target); ``frozen`` holds the task's frozen
        variables (see ``frozen_spec``).
        """

    # Frozen variables (e.g. a teacher model) are read by the loss but never trained. They live
    # in the train state (sharded like parameters, saved in checkpoints, so a resumed run does
    # not need their source again), outside the optimizer and the EMA.
    def frozen_spec(self) -> Any:
        """Shapes and dtypes (ShapeDtypeStructs) of the frozen variables; cheap, no loading."""
        return None

    def load_frozen(self) -> Any:
        """The frozen variables' values (host arrays), read once when training starts afresh."""
        return None

    def load_pretrained(self) -> Any:
        """Parameter subtrees (host arrays, same paths and shapes as ``init_params``) that replace
        the fresh initialisation when training starts afresh; None to train from scratch."""
        return None

    @abc.abstractmethod
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of the ``batch_fields`` of a global batch (compiling without data)."""

    @abc.abstractmethod
    def train_dataset(self, *, batch_size: int, process_index: int, process_count: int) -> Any:
        """A checkpointable grain IterDataset of this process's host batches (NumPy dicts).

        A batch may carry ``skipped`` (records dropped as corrupt since the previous batch); the
        trainer counts it. Only the ``batch_fields`` go to the devices.
        """

    def prepare_evaluation(self) -> None:  # noqa: B027 - optional hook; tasks without evaluators
        """Load and check the evaluation data before training starts, so that a wrong setting
        fails at start-up rather than at the first evaluation, hours later."""

    def evaluate(self, params: Params, step: int, frozen: Any = None) -> dict[str, float]:
        """Run the task's evaluators; every process calls it (the encoders are collective)."""
        del params, step, frozen
        return {}

    def export(self, params: Params, directory: str) -> str:
        """Write ``params`` (host NumPy) in the PyTorch format of this method; returns the path."""
        raise NotImplementedError(f"{type(self).__module__} has no PyTorch export")

    def project_params(self, params: Params) -> Params:
        """Applied after each optimizer update (e.g. clamping CLIP's temperature)."""
        return params

    # Tasks whose loss couples the examples of a batch (contrastive losses) can split the loss
    # into a per-example embedding and a loss over all embeddings. Gradient accumulation then
    # gives exactly the large-batch gradient (see trainer.accumulated_gradients).
    def embed(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any = None) -> Any:
        raise NotImplementedError

    def loss_from_embeddings(
        self,
        params: Params,
        embeddings: Any,
        rng: jax.Array,
        step: jax.Array,
        frozen: Any = None,
    ) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError

    @property
    def splits_loss(self) -> bool:
        cls = type(self)
        return (
            cls.embed is not Task.embed
            and cls.loss_from_embeddings is not Task.loss_from_embeddings
        )


def build_task(config: ConfigDict, mesh: Mesh) -> Task:
    """Import the module named by ``config.task`` and build its ``Task``."""
    try:
        module = importlib.import_module(config.task)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"config.task={config.task!r} is not an importable module: {error}"
        ) from error
    task_cls = getattr(module, "Task", None)
    if task_cls is None or not issubclass(task_cls, Task):
        raise ValueError(f"module {config.task!r} has no Task class deriving pretrain.task.Task")
    return task_cls(config, mesh)
