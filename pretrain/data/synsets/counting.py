"""How many records of a data source name each WordNet noun synset, counted in parallel.

A synset counts once per record (the union over the record's captions), so its count is the
number of records whose captions name it. Labels are extracted by
:class:`~pretrain.data.synsets.labels.SynsetExtractor`. Large sources are read in parallel over
index ranges by worker processes that each open the data source themselves (sources need not be
picklable).
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pretrain.data import records
from pretrain.data.synsets.labels import SynsetExtractor

# Index ranges handed to one worker at a time: enough chunks per worker to balance the load and
# show progress, few enough that merging the per-chunk counts stays cheap.
_CHUNKS_PER_PROCESS = 16
_CHUNK_SIZE_RANGE = (16, 20_000)


def record_synsets(captions: Sequence[str] | str, extractor: SynsetExtractor) -> set[str]:
    """Synset ids named by any of a record's captions (a single string is one caption)."""
    if isinstance(captions, str):
        captions = [captions]
    found: set[str] = set()
    for caption in captions:
        found.update(extractor(caption))
    return found


def count_synsets(
    captions_per_record: Iterable[Sequence[str]], extractor: SynsetExtractor | None = None
) -> collections.Counter:
    """Synset id -> number of records (caption lists) that mention it."""
    extractor = extractor if extractor is not None else SynsetExtractor()
    counts: collections.Counter = collections.Counter()
    for captions in captions_per_record:
        counts.update(record_synsets(captions, extractor))
    return counts


def _count_records(source: Any, indices: range, extractor: SynsetExtractor) -> collections.Counter:
    captions = (
        records.image_and_captions(source[index], require_captions=False)[1] for index in indices
    )
    return count_synsets(captions, extractor)


def _chunks(num_records: int, processes: int) -> list[range]:
    low, high = _CHUNK_SIZE_RANGE
    size = min(max(num_records // (processes * _CHUNKS_PER_PROCESS), low), high)
    return [range(start, min(start + size, num_records)) for start in range(0, num_records, size)]


class _Progress:
    """Records/s and ETA on stderr, at most every ``every_s`` seconds (0: only the summary)."""

    def __init__(self, total: int, every_s: float):
        self.total, self.every_s = total, every_s
        self.done = 0
        self.start = self.last = time.monotonic()

    def _line(self, now: float) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        percent = 100.0 * self.done / max(self.total, 1)
        return (
            f"vocabulary: {self.done:,}/{self.total:,} records ({percent:.1f}%), "
            f"{rate:,.0f} records/s, ETA {eta:,.0f} s"
        )

    def update(self, records: int) -> None:
        self.done += records
        now = time.monotonic()
        if self.every_s > 0 and now - self.last >= self.every_s:
            self.last = now
            print(self._line(now), file=sys.stderr, flush=True)

    def finish(self) -> None:
        elapsed = time.monotonic() - self.start
        print(
            f"vocabulary: read {self.done:,} records in {elapsed:,.1f} s "
            f"({self.done / max(elapsed, 1e-9):,.0f} records/s)",
            file=sys.stderr,
            flush=True,
        )


# Per worker process: its own source and extractor (with its own word cache).
_worker_state: dict[str, Any] = {}


def use_cpu_only() -> None:
    """Keep JAX (imported with grain; a source may ask it for the process count) off the
    accelerators: reading captions needs none, and a TPU opened here is locked for training."""
    import jax

    jax.config.update("jax_platforms", "cpu")


def _start_worker(make_source: Callable[[], Any]) -> None:
    use_cpu_only()
    _worker_state["source"] = make_source()
    _worker_state["extractor"] = SynsetExtractor()


def _count_chunk(indices: range) -> tuple[collections.Counter, int]:
    counts = _count_records(_worker_state["source"], indices, _worker_state["extractor"])
    return counts, len(indices)


def _default_processes() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def count_source(
    source: Any,
    make_source: Callable[[], Any],
    *,
    processes: int,
    progress_every: float,
) -> tuple[collections.Counter, int]:
    """``(synset id -> record count, records read)`` of ``source``; ``processes`` worker
    processes (0: one per CPU core) open their own copy with ``make_source``; a progress line on
    stderr every ``progress_every`` seconds (0: only the summary)."""
    num_records = len(source)
    processes = processes or _default_processes()
    chunks = _chunks(num_records, processes)
    progress = _Progress(num_records, progress_every)
    counts: collections.Counter = collections.Counter()
    if processes == 1 or len(chunks) <= 1:
        extractor = SynsetExtractor()
        for indices in chunks:
            counts.update(_count_records(source, indices, extractor))
            progress.update(len(indices))
    else:
        # Spawned, not forked: the parent may have started JAX's threads, which fork breaks.
        context = multiprocessing.get_context("spawn")
        with context.Pool(processes, initializer=_start_worker, initargs=(make_source,)) as pool:
            for chunk_counts, records in pool.imap_unordered(_count_chunk, chunks):
                counts.update(chunk_counts)
                progress.update(records)
    progress.finish()
    return counts, num_records
