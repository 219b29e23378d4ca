"""The grain pipeline for image-text training and evaluation: a source in, per-process batches out.

``image_text_dataset(source, ...)`` turns any random-access source (``len``/``[i]``; records as
:mod:`pretrain.data.records` reads them) into an iterable of batches. Order of the records
(grain ``MapDataset`` steps, so a position is restored from a step count):

* training: the whole source is shuffled with the seed (a new permutation each epoch), repeated
  (forever unless ``num_epochs``), and process ``p`` of ``P`` takes every ``P``-th element of that
  one global stream: within an epoch the processes' examples are disjoint and cover the source,
  and the global stream does not depend on the number of processes;
* evaluation: no shuffle, one pass; process ``p`` takes the ``p``-th contiguous block
  ``[p*N//P, (p+1)*N//P)`` in order.

Each record becomes an example (:mod:`pretrain.data.examples`: crops, captions, skips, the
task's plug-ins); :mod:`pretrain.data.batching` batches the good ones and counts the skipped.
The two halves, :func:`ordered_records` and :func:`example_batches`, serve other example makers
too (the dense pipeline, :mod:`pretrain.data.dense`), with the same order and checkpointing.

Batch fields (``b = batch_size_per_process``, ``L`` = the tokenizer's context length):

==================  ===============  ======================================================
``image``           uint8 (b,H,W,3)  RGB, not normalised (see ``transforms.normalize``)
``text``            int32 (b, L)     tokens of the chosen caption
``valid``           bool (b,)        False on padding rows (only in a padded last batch)
``index``           int64 (b,)       index of the record in the source; -1 on padding
``skipped``         Python int       records skipped since the previous batch (host only:
                                     pop it before putting the batch on devices)
``label``           int32 (b,)       only if the source's records have a ``label``
(plug-in fields)    (b, ...)         what ``plugins`` add (e.g. ``synthetic_text``)
``all_text``        int32 (b, K, L)  evaluation with ``num_eval_captions=K > 0``: the
                                     first K captions' tokens, zero rows where missing
``all_text_valid``  bool (b, K)      which rows of ``all_text`` hold a caption
==================  ===============  ======================================================

Evaluation with ``drop_remainder=False``: reduce metrics over ``valid`` rows only; skipped records
after the last good example are reported in a final all-padding batch. With several processes the
number of batches can differ between processes (uneven blocks, skips).

Checkpointing: ``it = iter(ds)``; ``it.get_state()`` / ``it.set_state(state)`` restore the exact
position (also with worker processes), e.g. through orbax's ``grain.checkpoint.CheckpointSave``.
With ``Workers(count > 0)`` each worker batches its own slice of the process's stream (grain's
``mp_prefetch``), so the batches differ from ``count=0`` ones (deterministic for a fixed count),
and an evaluation pass ends with up to one padded batch per worker.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from pretrain.data.batching import SkipCountingBatchIterDataset
from pretrain.data.examples import Augmentation, ExampleMaker, Plugins, Tokenizer
from pretrain.data.variable_batches import ResolutionSchedule, VariableResolutionBatchIterDataset


@dataclasses.dataclass(frozen=True)
class Workers:
    """Where records are read and made into batches: ``count`` grain worker processes (0: reader
    threads of this process), ``buffer_size`` batches buffered per worker, and ``read_options``
    (each process's reader threads and buffer; grain's defaults if None)."""

    count: int = 0
    buffer_size: int = 2
    read_options: grain.ReadOptions | None = None

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"worker count must be >= 0, got {self.count}")


def _with_source_index(index: int, record: Any, *, num_records: int) -> tuple[int, Any]:
    # Past the first epoch grain addresses the source with epoch * num_records + index.
    return index % num_records, record


def _with_epoch(position: int, item: tuple[int, Any], *, records_per_epoch: int):
    return (position // records_per_epoch, *item)


def _with_epoch_zero(item: tuple[int, Any]) -> tuple[int, int, Any]:
    return (0, *item)


def shuffle_seed(seed: int) -> int:
    """The 32-bit seed of grain's shuffle, derived from the run's seed (a separate stream)."""
    return int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])


def _process_block(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
    """``[start, stop)`` of process ``process_index``'s contiguous evaluation block."""
    return (
        process_index * num_records // process_count,
        (process_index + 1) * num_records // process_count,
    )


def _ignore_termination_signal(worker_index: int, worker_count: int) -> None:
    """Workers outlive a SIGTERM sent to the whole process group (SLURM, Kubernetes), so that
    the main process can still read the batches it needs and save its preemption checkpoint;
    grain stops them when the iterator is closed."""
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside an absl app (tests, notebooks) they are
    # unparsed and reading them raises, so take the defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def ordered_records(
    source: Any,
    *,
    seed: int,
    train: bool,
    process_index: int,
    process_count: int,
    num_epochs: int | None,
) -> grain.MapDataset:
    """This process's ``(epoch, source index, record)`` items, in the order of the docstring.

    Raises ValueError for a negative seed, a process index outside ``[0, process_count)`` or an
    empty source.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if len(source) == 0:
        raise ValueError("The source is empty")
    num_records = len(source)
    records = grain.MapDataset.source(source).map_with_index(
        functools.partial(_with_source_index, num_records=num_records)
    )
    if not train:
        start, stop = _process_block(num_records, process_index, process_count)
        return records[start:stop].map(_with_epoch_zero)
    records = records.shuffle(seed=shuffle_seed(seed)).repeat(num_epochs)
    records = records.map_with_index(functools.partial(_with_epoch, records_per_epoch=num_records))
    return records[process_index::process_count]


def image_text_dataset(
    source: Any,
    *,
    batch_size_per_process: int,
    seed: int,
    train: bool,
    image_size: int,
    tokenizer: Tokenizer | None,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    augmentation: Augmentation | None = None,
    plugins: Plugins | None = None,
    num_eval_captions: int = 0,
    drop_remainder: bool = True,
    max_consecutive_skips: int = 10_000,
    workers: Workers | None = None,
    resolutions: ResolutionSchedule | None = None,
) -> grain.IterDataset:
    """The per-process image-text batch stream; see the module docstring for order and fields.

    Args:
      source: random-access source of raw or decoded records.
      batch_size_per_process: rows per batch on this process (the global batch / process count).
      seed: non-negative run seed: fixes the shuffle (training) and every augmentation.
      train: shuffled, repeated, augmented (True) or one in-order pass, centre crop (False).
      image_size: output height and width.
      tokenizer: picklable callable, list of str -> int array ``(n, context_length)``; None
        for image-only streams (no ``text``, captions not required).
      process_index, process_count: this process's share of the data (``jax.process_index()``...).
      num_epochs: training epochs (None: forever); ignored in evaluation (one pass).
      augmentation: training only: crops, flips and caption choice (None: the defaults).
      plugins: the fields a task adds to each example (None: none).
      num_eval_captions: evaluation only: keep the first K captions' tokens as ``all_text``.
      drop_remainder: drop (True) or pad (False, with ``valid``) the last partial batch.
      max_consecutive_skips: raise when this many records in a row are bad.
      workers: grain worker processes and reader threads (None: threads of this process).
      resolutions: training only: batches at several sizes and batch sizes
        (pretrain/data/variable_batches.py) instead of ``image_size`` and
        ``batch_size_per_process``.
    """
    records = ordered_records(
        source,
        seed=seed,
        train=train,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
    )
    make_example = ExampleMaker(
        train=train,
        image_size=image_size,
        tokenizer=tokenizer,
        seed=seed,
        augmentation=augmentation or Augmentation(),
        plugins=plugins or Plugins(),
        num_eval_captions=num_eval_captions,
    )
    return example_batches(
        records,
        make_example,
        batch_size_per_process=batch_size_per_process,
        drop_remainder=drop_remainder,
        max_consecutive_skips=max_consecutive_skips,
        workers=workers,
        resolutions=resolutions if train else None,
    )


def example_batches(
    records: grain.MapDataset,
    make_example: Callable[[Any], Any],
    *,
    batch_size_per_process: int,
    drop_remainder: bool = True,
    max_consecutive_skips: int = 10_000,
    workers: Workers | None = None,
    count_skip_reasons: bool = False,
    resolutions: ResolutionSchedule | None = None,
) -> grain.IterDataset:
    """Batches of ``make_example(item)`` over :func:`ordered_records`' items, made in reader
    threads or ``workers``; ``make_example`` (picklable) returns an example dict or a
    ``SkippedRecord``. ``count_skip_reasons``: batches also carry ``skipped_reasons``
    (:class:`~pretrain.data.batching.SkipCountingBatchIterDataset`). With ``resolutions`` the
    batches vary in size (:mod:`pretrain.data.variable_batches`; ``make_example.at_size``)."""
    workers = workers or Workers()
    read_options = workers.read_options or grain.ReadOptions()
    if resolutions is not None:
        batches = VariableResolutionBatchIterDataset(
            records.to_iter_dataset(read_options),
            make_example,
            resolutions,
            max_consecutive_skips=max_consecutive_skips,
        )
    else:
        batches = SkipCountingBatchIterDataset(
            records.map(make_example).to_iter_dataset(read_options),
            batch_size_per_process,
            drop_remainder=drop_remainder,
            max_consecutive_skips=max_consecutive_skips,
            count_reasons=count_skip_reasons,
        )
    if workers.count > 0:
        _ensure_absl_flags_parsed()
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers.count, per_worker_buffer_size=workers.buffer_size
            ),
            worker_init_fn=_ignore_termination_signal,
        )
    return batches
