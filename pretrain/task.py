"""What the trainer needs from a method (one file in pretrain/tasks/ each): the Task contract.

A task owns its model, its loss, its data fields and its evaluators; the trainer owns the loop,
sharding, optimizer, EMA, checkpoints and logging. The trainer never imports a task by name: the
config's ``task`` field is a module path whose ``Task`` class is built with ``(config, mesh)``.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from pretrain import sharding
from pretrain.data import image_text

Params = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
# An evaluator maps whatever the task gives it (parameters, frozen variables...) to named scalars.
Evaluator = Callable[..., dict[str, float]]


class LossOutput(NamedTuple):
    """What a task's loss returns for one (micro-)batch.

    ``model_state``: the non-trained variables the forward pass updated (BatchNorm's running
    statistics), for tasks whose ``init_variables`` returns some; None otherwise.
    """

    loss: jax.Array
    metrics: Metrics
    model_state: Any = None


class Task(abc.ABC):
    """Base class of the per-method task files in pretrain/tasks/."""

    # The batch fields the loss reads; only these are sent to the devices.
    batch_fields: tuple[str, ...] = ()
    # Config fields (regular expressions over dotted paths, e.g. r"vocab\.path$") that shape this
    # task's saved state beyond those every run has (pretrain/saved_config.py): a checkpoint is
    # resumed, evaluated or exported only with the same values.
    state_fields: tuple[str, ...] = ()
    # True for losses that couple the examples of a batch (contrastive losses) and so are written
    # as ``loss_from_embeddings(embed(...))``: gradient accumulation then gives exactly the
    # large-batch gradient (pretrain/gradients.py). Otherwise micro-batch gradients are averaged.
    splits_loss: bool = False
    # Where a run of this task keeps its image tower, for runs that start from it (probes,
    # fine-tuning): its entry under ``config.model`` (None: no image tower to take) and its
    # parameters' subtree ("" = the whole parameter tree).
    image_tower_entry: str | None = None
    image_tower_params_key: str = ""

    def __init__(self, config: ConfigDict, mesh: Mesh):
        self.config = config
        self.mesh = mesh
        self._evaluator: Evaluator | None = None
        # Where the task may write files beside its metrics (e.g. evaluation figures): the run's
        # workdir, set by the trainer and by --mode=evaluate; None: write nothing.
        self.output_dir: str | None = None

    # -- model and loss ---------------------------------------------------------------------------

    @abc.abstractmethod
    def init_variables(self, rng: jax.Array) -> tuple[Params, Any]:
        """``(params, model_state)``, called inside jit with sharded outputs (no host work).

        ``model_state`` holds the variables the forward pass updates (BatchNorm's running
        statistics), None for models without any. The trainer keeps it in the train state
        (checkpointed, EMA'd with the parameters) and passes it back to ``loss_fn``,
        ``evaluate`` and ``export``.
        """

    @abc.abstractmethod
    def loss_fn(
        self,
        params: Params,
        batch: Batch,
        rng: jax.Array,
        step: jax.Array,
        frozen: Any = None,
        model_state: Any = None,
    ) -> LossOutput:
        """Global-batch loss and scalar metrics for one (micro-)batch of global arrays.

        ``step`` is the number of optimizer steps taken before this one (for schedules inside
        the loss, e.g. an annealed augmentation target); ``frozen`` holds the task's frozen
        variables (see ``frozen_spec``).
        """

    def embed(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any = None) -> Any:
        """Per-example embeddings of a batch (tasks with ``splits_loss``)."""
        raise NotImplementedError(f"{type(self).__name__} does not split its loss")

    def loss_from_embeddings(
        self, params: Params, embeddings: Any, rng: jax.Array, step: jax.Array, frozen: Any = None
    ) -> LossOutput:
        """The loss over all embeddings of the global batch (tasks with ``splits_loss``)."""
        raise NotImplementedError(f"{type(self).__name__} does not split its loss")

    def project_params(self, params: Params) -> Params:
        """Applied after each optimizer update (e.g. clamping a learned temperature)."""
        return params

    # -- frozen and pretrained variables ----------------------------------------------------------
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
        """Parameter subtrees (host arrays, same paths and shapes as ``init_variables``' params)
        that replace the fresh initialisation when training starts afresh; None: from scratch."""
        return None

    # -- data -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of the ``batch_fields`` of a global batch (compiling without data)."""

    def train_data_options(self) -> dict[str, Any]:
        """Keyword arguments of ``image_text.train_dataset`` beyond the common ones: the task's
        plug-ins (``example_extras``, ``caption_fields``...), ``context_length`` for text."""
        return {}

    def train_dataset(self, *, batch_size: int, process_index: int, process_count: int) -> Any:
        """A checkpointable grain IterDataset of this process's host batches (NumPy dicts).

        A batch may carry ``skipped`` (records dropped as corrupt since the previous batch); the
        trainer counts it. Only the ``batch_fields`` go to the devices.
        """
        return image_text.train_dataset(
            self.config.data,
            batch_size=batch_size,
            seed=int(self.config.seed),
            process_index=process_index,
            process_count=process_count,
            batch_multiple=sharding.local_batch_multiple(
                self.mesh, int(self.config.get("grad_accum_steps", 1))
            ),
            **self.train_data_options(),
        )

    # -- evaluation and export --------------------------------------------------------------------

    def make_evaluator(self) -> Evaluator | None:
        """The task's evaluator (it loads and checks its data sets); None: nothing to evaluate."""
        return None

    @property
    def evaluator(self) -> Evaluator | None:
        """Built once, on first use (evaluation data is loaded only by runs that evaluate)."""
        if self._evaluator is None:
            self._evaluator = self.make_evaluator()
        return self._evaluator

    def prepare_evaluation(self) -> None:
        """Load and check the evaluation data before training starts, so that a wrong setting
        fails at start-up rather than at the first evaluation, hours later."""
        _ = self.evaluator  # building it is the check

    def evaluate(
        self, params: Params, step: int, frozen: Any = None, model_state: Any = None
    ) -> dict[str, float]:
        """Run the task's evaluators; every process calls it (the encoders are collective)."""
        del params, step, frozen, model_state
        return {}

    def export(self, params: Params, directory: str, model_state: Any = None) -> str:
        """Write ``params`` (host NumPy) in the PyTorch format of this method; returns the path."""
        raise NotImplementedError(f"{type(self).__module__} has no PyTorch export")


def task_class(config: ConfigDict) -> type[Task]:
    """The ``Task`` class of the module named by ``config.task``."""
    try:
        module = importlib.import_module(config.task)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"config.task={config.task!r} is not an importable module: {error}"
        ) from error
    cls = getattr(module, "Task", None)
    if cls is None or not issubclass(cls, Task):
        raise ValueError(f"module {config.task!r} has no Task class deriving pretrain.task.Task")
    return cls


def build_task(config: ConfigDict, mesh: Mesh) -> Task:
    """Import the module named by ``config.task`` and build its ``Task``."""
    return task_class(config)(config, mesh)
