"""Variable-resolution batches, as CoreNet's variable batch sampler makes them (CLIPTeX and CLIP-FT
fine-tune with it, paper 003 Section 4.2): each batch at one of several resolutions around a base
one, its size scaled so that every batch holds about the same number of pixels.

Sizes: ``num_sizes`` values from ``base_size * min_scale`` to ``base_size * max_scale``, evenly
spaced and rounded to a multiple of ``multiple`` pixels (the patch size of a ViT: 16, or the
stride of a convolutional tower: 32). The batch size at size ``s`` is
``floor(base_batch * (base_size / s)^2 / q) * q``, at least ``q`` (``q`` = ``batch_multiple``:
the rows each process must give for the batch to split over its devices and accumulation steps).

Batch ``n`` of an iterator (its own count, restored with its position) takes its size from a
stream seeded by ``[seed, RESOLUTION_STREAM, n]`` alone, so every process (and every grain worker
slot) picks the same size for the same step: the processes' rows form one global batch of one
shape. Its examples are made at that size from the next records, in a thread pool; a record that
cannot become an example is skipped and counted, and the next record takes its place, so every
batch has exactly its size and the stream of records is the fixed-size pipeline's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grain
import numpy as np

from pretrain.data.examples import SkippedRecord

# The random stream of the batch sizes (the examples' streams are pretrain.data.examples').
RESOLUTION_STREAM = 7


@dataclasses.dataclass(frozen=True)
class ResolutionSchedule:
    """The sizes a batch can have, the rows of each, and the seed of the choice."""

    sizes: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    seed: int

    def pick(self, batch_number: int) -> tuple[int, int]:
        """``(image size, rows)`` of batch ``batch_number``."""
        rng = np.random.default_rng([self.seed, RESOLUTION_STREAM, batch_number])
        choice = int(rng.integers(len(self.sizes)))
        return self.sizes[choice], self.batch_sizes[choice]


def resolution_schedule(
    base_size: int,
    base_batch: int,
    *,
    min_scale: float,
    max_scale: float,
    num_sizes: int,
    multiple: int,
    batch_multiple: int,
    seed: int,
) -> ResolutionSchedule:
    """The schedule of the module docstring."""
    if not 0 < min_scale <= max_scale or num_sizes < 1 or multiple < 1 or batch_multiple < 1:
        raise ValueError(
            f"variable resolution needs 0 < min_scale <= max_scale, num_sizes >= 1 and positive "
            f"multiples; got {min_scale}, {max_scale}, {num_sizes}, {multiple}, {batch_multiple}"
        )
    scales = np.linspace(min_scale, max_scale, num_sizes).tolist()
    sizes = sorted({max(multiple, round(base_size * s / multiple) * multiple) for s in scales})
    batch_sizes = []
    for size in sizes:
        scaled = int(base_batch * (base_size / size) ** 2)
        batch_sizes.append(max(batch_multiple, scaled // batch_multiple * batch_multiple))
    return ResolutionSchedule(tuple(sizes), tuple(batch_sizes), int(seed))


def _stack(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {name: np.stack([example[name] for example in examples]) for name in examples[0]}


class _VariableBatchIterator(grain.DatasetIterator):
    """Batches of examples made at each batch's size (see the module docstring)."""

    def __init__(
        self,
        parent: grain.DatasetIterator,
        make_example: Any,
        schedule: ResolutionSchedule,
        max_consecutive_skips: int,
        threads: int,
    ):
        super().__init__(parent)
        self._make_example = make_example
        self._schedule = schedule
        self._max_consecutive_skips = max_consecutive_skips
        self._batches = 0
        self._pool = futures.ThreadPoolExecutor(threads) if threads > 1 else None
        self._makers: dict[int, Callable[[Any], Any]] = {}

    def _maker_at(self, size: int) -> Callable[[Any], Any]:
        if size not in self._makers:
            self._makers[size] = self._make_example.at_size(size)
        return self._makers[size]

    def _make(self, maker: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        if self._pool is None or len(items) == 1:
            return [maker(item) for item in items]
        return list(self._pool.map(maker, items))

    def __next__(self) -> dict[str, Any]:
        size, rows = self._schedule.pick(self._batches)
        maker = self._maker_at(size)
        examples: list[dict[str, Any]] = []
        skipped, consecutive_skips = 0, 0
        reasons: dict[str, int] = {}
        while len(examples) < rows:
            items = [next(self._parent) for _ in range(rows - len(examples))]
            for made in self._make(maker, items):
                if isinstance(made, SkippedRecord):
                    skipped += 1
                    consecutive_skips += 1
                    reasons[made.reason] = reasons.get(made.reason, 0) + 1
                    if consecutive_skips > self._max_consecutive_skips:
                        raise RuntimeError(
                            f"{consecutive_skips} records in a row were skipped ({reasons}): "
                            "the data or the source's record format is wrong."
                        )
                else:
                    consecutive_skips = 0
                    examples.append(made)
        self._batches += 1
        batch = _stack(examples)
        batch["valid"] = np.ones(rows, bool)
        batch["skipped"] = skipped
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "batches": self._batches}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._batches = int(state["batches"])

    def __str__(self) -> str:
        return f"VariableBatchIterator(sizes={self._schedule.sizes})"


class VariableResolutionBatchIterDataset(grain.IterDataset):
    """Training batches at the schedule's sizes from an iterable of ``(epoch, index, record)``
    items; ``make_example`` is an example maker with ``at_size(size)`` (pretrain.data.examples).
    Batches carry ``valid`` (all True) and ``skipped`` as the fixed-size pipeline's do."""

    def __init__(
        self,
        parent: grain.IterDataset,
        make_example: Any,
        schedule: ResolutionSchedule,
        *,
        max_consecutive_skips: int = 10_000,
        threads: int = 8,
    ):
        super().__init__(parent)
        self._make_example = make_example
        self._schedule = schedule
        self._max_consecutive_skips = max_consecutive_skips
        self._threads = threads

    def __iter__(self) -> _VariableBatchIterator:
        return _VariableBatchIterator(
            self._parent.__iter__(),
            self._make_example,
            self._schedule,
            self._max_consecutive_skips,
            self._threads,
        )

    def __str__(self) -> str:
        return f"VariableResolutionBatchIterDataset(sizes={self._schedule.sizes})"
