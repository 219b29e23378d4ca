"""Batches of good examples, with the records skipped on the way counted in each batch.

Every batch has the same shapes (so nothing recompiles under jit): the last batch of a pass is
padded with zero rows (``valid`` False, ``index`` -1), or dropped with its ``skipped`` count.
With ``count_reasons`` a batch also says why: ``skipped_reasons`` (reason -> count, host only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from pretrain.data.examples import SkippedRecord


def _padding_rows(template: Mapping[str, tuple[tuple[int, ...], np.dtype]], rows: int) -> dict:
    padding = {name: np.zeros((rows, *shape), dtype) for name, (shape, dtype) in template.items()}
    if "index" in padding:
        padding["index"][:] = -1
    return padding


def _stack(
    examples: Sequence[Mapping[str, np.ndarray]],
    template: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    batch_size: int,
    skipped: int,
) -> dict[str, Any]:
    rows = len(examples)
    if rows == batch_size:
        batch = {name: np.stack([example[name] for example in examples]) for name in template}
    else:  # the last batch of a pass: padding rows, then the examples written over the first ones
        batch = _padding_rows(template, batch_size)
        for row, example in enumerate(examples):
            for name in template:
                batch[name][row] = example[name]
    batch["valid"] = np.arange(batch_size) < rows
    batch["skipped"] = skipped
    return batch


class _SkipCountingBatchIterator(grain.DatasetIterator):
    """Fills each batch with good examples, counting the ``SkippedRecord`` s met on the way.

    Its state is its parent's: nothing is buffered between batches, so restoring the parent's
    position restores this iterator exactly.
    """

    def __init__(
        self,
        parent: grain.DatasetIterator,
        batch_size: int,
        drop_remainder: bool,
        max_consecutive_skips: int,
        count_reasons: bool = False,
    ):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._max_consecutive_skips = max_consecutive_skips
        self._count_reasons = count_reasons
        self._template: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None

    def __next__(self) -> dict[str, Any]:
        examples: list[Mapping[str, np.ndarray]] = []
        skipped = consecutive_skips = 0
        reasons: dict[str, int] = {}
        while len(examples) < self._batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                can_pad = examples or (skipped and self._template is not None)
                if self._drop_remainder or not can_pad:
                    raise
                break
            if isinstance(element, SkippedRecord):
                skipped += 1
                consecutive_skips += 1
                reasons[element.reason] = reasons.get(element.reason, 0) + 1
                if consecutive_skips > self._max_consecutive_skips:
                    raise RuntimeError(
                        f"{consecutive_skips} records in a row were skipped ({reasons}): "
                        "the data or the source's record format is wrong."
                    )
                continue
            consecutive_skips = 0
            if self._template is None:
                self._template = {
                    name: (np.shape(value), np.asarray(value).dtype)
                    for name, value in element.items()
                }
            examples.append(element)
        batch = _stack(examples, self._template, self._batch_size, skipped)
        if self._count_reasons:
            batch["skipped_reasons"] = reasons
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return f"SkipCountingBatchIterator(batch_size={self._batch_size})"


class SkipCountingBatchIterDataset(grain.IterDataset):
    """Batches dict examples, dropping ``SkippedRecord`` elements and counting them per batch.

    Each batch has ``batch_size`` rows, a bool ``valid`` (False on padding rows) and ``skipped``
    (int: records skipped since the previous batch). ``drop_remainder=False`` pads the last batch.
    ``max_consecutive_skips`` stops a run whose data is all bad instead of letting it spin.
    ``count_reasons``: each batch also has ``skipped_reasons``, a dict of ``SkippedRecord.reason``
    -> count over the same records as ``skipped`` (host only, like ``skipped``).
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        batch_size: int,
        *,
        drop_remainder: bool = True,
        max_consecutive_skips: int = 10_000,
        count_reasons: bool = False,
    ):
        super().__init__(parent)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._max_consecutive_skips = max_consecutive_skips
        self._count_reasons = count_reasons

    def __iter__(self) -> _SkipCountingBatchIterator:
        return _SkipCountingBatchIterator(
            self._parent.__iter__(),
            self._batch_size,
            self._drop_remainder,
            self._max_consecutive_skips,
            self._count_reasons,
        )

    def __str__(self) -> str:
        return f"SkipCountingBatchIterDataset(batch_size={self._batch_size})"
