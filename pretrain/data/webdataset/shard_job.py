"""Jobs that write a data set as tar shards one at a time: resumable, split over processes, and
kept apart from other jobs' shards (the reinforcement and pseudo-label tools).

A job reads records ``0 .. N-1`` of a source and writes shard ``k`` from records
``[k * per_shard, (k + 1) * per_shard)``. Each shard is written under a temporary name and
renamed into place, with a ``<shard>.counts.json`` beside it (what was written and skipped); a
shard with both files is done and is not written again, so an interrupted job resumes where it
stopped. With ``P`` processes, process ``p`` writes the shards ``k`` with ``k % P == p``. A job
description (``job_file``) kept beside the shards makes a different job refuse the folder:
mixing two jobs' shards would silently pair records with labels they were not made from.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pretrain.data.webdataset.writer import write_shards

_logger = logging.getLogger(__name__)

# Counts of one shard: {"written": int, "skipped": {reason: int}} (tools may add their own).
ShardCounts = dict[str, Any]


def check_same_job(output: Path, job_file: str, description: Mapping[str, Any]) -> None:
    """Keep ``description`` in ``output / job_file``, or check that the one there is the same."""
    path = output / job_file
    description = json.loads(json.dumps(description, default=str))
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier != description:
            changed = sorted(
                k for k in set(earlier) | set(description) if earlier.get(k) != description.get(k)
            )
            raise ValueError(
                f"{output} holds shards of another job (it differs in {changed}): choose another "
                f"output folder or remove it"
            )
    else:
        path.write_text(json.dumps(description, indent=1))


def write_shard(samples: Sequence[Mapping[str, Any]], path: Path) -> None:
    """One whole shard at ``path``, renamed into place when complete (possibly empty)."""
    partial = path.with_name(f"{path.name}.part")
    if samples:
        write_shards(samples, f"{partial}.%d", len(samples))
        os.replace(f"{partial}.0", path)
    else:
        with tarfile.open(partial, "w"):
            pass
        os.replace(partial, path)


def add_counts(total: ShardCounts, counts: Mapping[str, Any]) -> None:
    """Adds one shard's counts into ``total`` (numbers summed, dicts of numbers merged)."""
    for key, value in counts.items():
        if isinstance(value, Mapping):
            merged = total.setdefault(key, {})
            for name, count in value.items():
                merged[name] = merged.get(name, 0) + count
        else:
            total[key] = total.get(key, 0) + value


def run_shard_job(
    output: Path,
    *,
    num_records: int,
    per_shard: int,
    shard_pattern: str,
    make_shard: Callable[[Path, range], ShardCounts],
    process_index: int = 0,
    process_count: int = 1,
    what: str = "shard",
) -> ShardCounts:
    """Writes this process's shards with ``make_shard(path, records)`` (skipping finished ones),
    logging progress and an ETA; returns the counts summed over its shards."""
    if per_shard <= 0:
        raise ValueError(f"samples per shard must be positive, got {per_shard}")
    num_shards = -(-num_records // per_shard)
    mine = range(process_index, num_shards, process_count)
    totals: ShardCounts = {"written": 0, "skipped": {}}
    started, made = time.time(), 0
    for done, shard in enumerate(mine, start=1):
        path = output / (shard_pattern % shard)
        counts_path = output / f"{path.name}.counts.json"
        if path.exists() and counts_path.exists():  # done by an earlier (interrupted) job
            counts = json.loads(counts_path.read_text())
        else:
            records = range(shard * per_shard, min((shard + 1) * per_shard, num_records))
            counts = make_shard(path, records)
            counts_path.write_text(json.dumps(counts))
            made += 1
        add_counts(totals, counts)
        elapsed = time.time() - started
        # The ETA from the shards made by this run (resumed ones cost nothing).
        remaining = len(mine) - done
        eta = elapsed / made * remaining if made else 0.0
        _logger.info(
            "%s %d/%d (%d samples so far, %d skipped) %.0f s, ETA %.0f s",
            what,
            done,
            len(mine),
            totals["written"],
            sum(totals["skipped"].values()),
            elapsed,
            eta,
        )
    totals["num_shards"] = num_shards
    return totals
