"""The grain pipeline for dense training and evaluation: a dense source in, per-process batches out.

Order, per-process shares, worker processes and checkpointing are the image-text pipeline's
(``pipeline.ordered_records`` then ``pipeline.example_batches``): training shuffles the whole
source each epoch and process ``p`` of ``P`` takes every ``P``-th element of the one global
stream; evaluation is one in-order pass in which process ``p`` takes its contiguous block.
``it = iter(ds)``; ``it.get_state()`` / ``it.set_state(state)`` restore the exact position.

Batch fields (``b = batch_size_per_process``; ``h, w`` the crop size in training, the eval size
in evaluation; only the requested targets):

===================  ===============  ====================================================
``image``            uint8 (b,h,w,3)  RGB, not normalised
``segmentation``     int32 (b,h,w)    class ids, ``ignore_label`` = unlabelled / padding
``depth``            float32 (b,h,w)  metres, 0 = invalid / padding
``normals``          float32          unit camera-frame vectors, zero = invalid / padding
                     (b,h,w,3)
``valid``            bool (b,)        False on padding rows (a padded last eval batch;
                                      their targets are zeros: mask them with ``valid``)
``index``            int64 (b,)       index of the record in the source; -1 on padding
``skipped``          Python int       records skipped since the previous batch (host only)
``skipped_reasons``  dict str -> int  the same records by reason (host only): e.g.
                                      ``missing_label``, ``corrupt_label``,
                                      ``label_size_mismatch``, ``corrupt_image``
===================  ===============  ====================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain

from pretrain.data import pipeline
from pretrain.data.dense.examples import DenseAugmentation, DenseExampleMaker
from pretrain.data.dense.targets import IGNORE_LABEL


def dense_dataset(
    source: Any,
    *,
    batch_size_per_process: int,
    seed: int,
    train: bool,
    targets: Sequence[str],
    augmentation: DenseAugmentation | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    workers: pipeline.Workers | None = None,
    ignore_label: int = IGNORE_LABEL,
    max_consecutive_skips: int = 10_000,
) -> grain.IterDataset:
    """The per-process dense batch stream; see the module docstring for order and fields.

    Args:
      source: random-access dense source (``len``, ``[i]``; records as
        :mod:`pretrain.data.dense.targets` reads them), e.g. from ``make_dense_source``.
      batch_size_per_process: rows per batch on this process (the global batch / process count).
      seed: non-negative run seed: fixes the shuffle (training) and every augmentation.
      train: shuffled, repeated, scaled / cropped / flipped (True) or one in-order pass resized
        to ``augmentation.eval_size`` (False).
      targets: which of ``segmentation``, ``depth``, ``normals`` to produce; a record lacking
        one is skipped (``missing_label``).
      augmentation: sizes, scales and flips (None: :class:`DenseAugmentation`'s defaults).
      process_index, process_count: this process's share of the data.
      num_epochs: training epochs (None: forever); ignored in evaluation (one pass).
      drop_remainder: drop (True) or pad (False, with ``valid``) the last partial batch.
      workers: grain worker processes and reader threads (None: threads of this process).
      ignore_label: the class id of unlabelled pixels, in the records and in crop padding.
      max_consecutive_skips: raise when this many records in a row are bad.
    """
    records = pipeline.ordered_records(
        source,
        seed=seed,
        train=train,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
    )
    make_example = DenseExampleMaker(
        train=train,
        targets=targets,
        seed=seed,
        augmentation=augmentation or DenseAugmentation(),
        ignore_label=ignore_label,
    )
    return pipeline.example_batches(
        records,
        make_example,
        batch_size_per_process=batch_size_per_process,
        drop_remainder=drop_remainder,
        max_consecutive_skips=max_consecutive_skips,
        workers=workers,
        count_skip_reasons=True,
    )
