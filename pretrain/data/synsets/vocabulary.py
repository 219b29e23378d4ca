"""A synset vocabulary: the WordNet noun synsets that enough records of a data set name.

The classes of a multi-label image classifier over synsets. The vocabulary keeps the synsets
named by at least ``min_count`` records (see :mod:`~pretrain.data.synsets.counting`; e.g. 500 on
DataComp-1.3B gives 24,320 classes), sorted by count (descending, ties by id), optionally
truncated to ``max_size``. It is a TSV file, one class per row in class order, under a header::

    synset_id<TAB>name<TAB>count
    n2084071<TAB>dog.n.01<TAB>123456

Command line (reads ``config.data.train``; ``--min_count`` / ``--max_size`` default to
``config.vocab``'s)::

    python -m pretrain.data.synsets.vocabulary --config=configs/catlip_vitb16.py:runlocal \\
        --output=vocab.tsv [--min_count=N] [--max_size=N] [--processes=N]
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from etils import epath

from pretrain.data.synsets.counting import count_source, use_cpu_only
from pretrain.data.synsets.labels import normalize_synset_id, synset_name

HEADER = ("synset_id", "name", "count")


@dataclasses.dataclass(frozen=True)
class VocabEntry:
    """One class: its synset id (CoreNet form, e.g. "n2084071"), name and record count."""

    synset_id: str
    name: str
    count: int


def _id_order(synset_id: str) -> tuple[str, int]:
    normalized = normalize_synset_id(synset_id)
    return normalized[0], int(normalized[1:])


def build_vocabulary(
    counts: Mapping[str, int], min_count: int, max_size: int = 0
) -> list[VocabEntry]:
    """Synsets with ``count >= min_count``, by count descending then id; at most ``max_size``
    (0: no limit)."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    if max_size < 0:
        raise ValueError(f"max_size must be >= 0 (0: no limit), got {max_size}")
    kept = [(synset_id, int(count)) for synset_id, count in counts.items() if count >= min_count]
    kept.sort(key=lambda item: (-item[1], _id_order(item[0])))
    if max_size:
        kept = kept[:max_size]
    return [
        VocabEntry(normalize_synset_id(synset_id), synset_name(synset_id), count)
        for synset_id, count in kept
    ]


# ----------------------------------------------------------------------------- the TSV file


def write_vocabulary(path: str | os.PathLike, entries: Sequence[VocabEntry]) -> None:
    """Write the vocabulary TSV (local path or URL such as gs://), replacing any old file whole."""
    lines = ["\t".join(HEADER)]
    lines += [f"{entry.synset_id}\t{entry.name}\t{entry.count}" for entry in entries]
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(path)


def _parse_row(fields: list[str], where: str) -> VocabEntry:
    if len(fields) != len(HEADER):
        raise ValueError(f"{where}: expected {len(HEADER)} tab-separated fields, got {fields}")
    synset_id, name, count = fields
    try:
        synset_id = normalize_synset_id(synset_id)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    try:
        count = int(count)
    except ValueError:
        raise ValueError(f"{where}: count {count!r} is not an integer") from None
    return VocabEntry(synset_id, name, count)


def read_vocabulary(path: str | os.PathLike) -> list[VocabEntry]:
    """The entries of a vocabulary TSV, in class order; ValueError naming the bad line."""
    lines = epath.Path(path).read_text().splitlines()
    if not lines or tuple(lines[0].split("\t")) != HEADER:
        found = lines[0] if lines else "an empty file"
        raise ValueError(f"{path}:1: expected the header {chr(9).join(HEADER)!r}, got {found!r}")
    entries, line_of = [], {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        entry = _parse_row(line.split("\t"), f"{path}:{number}")
        if entry.synset_id in line_of:
            raise ValueError(
                f"{path}:{number}: {entry.synset_id} already listed on line "
                f"{line_of[entry.synset_id]}"
            )
        line_of[entry.synset_id] = number
        entries.append(entry)
    return entries


class _Given:
    """A picklable factory that returns a given (picklable) source."""

    def __init__(self, source: Any):
        self.source = source

    def __call__(self) -> Any:
        return self.source


def vocabulary_from_source(
    source: Any,
    *,
    min_count: int,
    max_size: int = 0,
    processes: int = 1,
    progress_every: float = 30.0,
    make_source: Callable[[], Any] | None = None,
) -> tuple[list[VocabEntry], int]:
    """``(vocabulary, number of records read)`` of a random-access source (``len`` / ``[i]``).

    Records are read as the training pipeline reads them; a record without captions counts as a
    record with no synsets. ``processes``: 0 = one per CPU core, 1 = in this process; worker
    processes open the source with ``make_source`` (picklable; default: they receive ``source``
    itself, which must then be picklable). ``progress_every``: seconds between progress lines on
    stderr (0: only the final summary).
    """
    counts, num_records = count_source(
        source,
        make_source or _Given(source),
        processes=processes,
        progress_every=progress_every,
    )
    return build_vocabulary(counts, min_count, max_size), num_records


def _plain_config(source_config: Mapping[str, Any]) -> dict[str, Any]:
    to_dict = getattr(source_config, "to_dict", None)
    return to_dict() if callable(to_dict) else dict(source_config)


def _make_source(source_config: dict[str, Any]) -> Any:
    from pretrain.data import image_text  # imports JAX: only where a source is opened

    return image_text.make_source(source_config)


def vocabulary_from_config(
    source_config: Mapping[str, Any],
    *,
    min_count: int,
    max_size: int = 0,
    processes: int = 0,
    progress_every: float = 30.0,
) -> tuple[list[VocabEntry], int]:
    """:func:`vocabulary_from_source` of the source a config describes (``config.data.train``:
    see ``pretrain.data.image_text.make_source``); each worker process opens it itself.

    ``processes``: 0 = one per CPU core, 1 = in this process.
    """
    config = _plain_config(source_config)
    # Opened here first: a source built on first use (the embedded scenes) is built once, before
    # the workers open it, and its length is needed to split the work.
    return vocabulary_from_source(
        _make_source(config),
        min_count=min_count,
        max_size=max_size,
        processes=processes,
        progress_every=progress_every,
        make_source=functools.partial(_make_source, config),
    )


# ----------------------------------------------------------------------------- command line


def _define_flags() -> dict[str, Any]:
    from absl import flags
    from ml_collections import config_flags

    return {
        "config": config_flags.DEFINE_config_file(
            "config", None, "Recipe whose data.train is read, e.g. configs/catlip_vitb16.py."
        ),
        "output": flags.DEFINE_string("output", None, "Vocabulary TSV to write (path or gs://)."),
        "min_count": flags.DEFINE_integer(
            "min_count", None, "Keep synsets named in >= this many records (default: vocab's)."
        ),
        "max_size": flags.DEFINE_integer(
            "max_size", None, "At most this many classes, 0 = no limit (default vocab.max_size)."
        ),
        "processes": flags.DEFINE_integer(
            "processes", 0, "Worker processes (0: one per CPU core, 1: no workers)."
        ),
        "progress_every": flags.DEFINE_float(
            "progress_every", 30.0, "Seconds between progress lines."
        ),
    }


def _setting(flag_value: int | None, vocab_config: Any, name: str, default: int | None) -> int:
    if flag_value is not None:
        return flag_value
    if vocab_config is not None and vocab_config.get(name) is not None:
        return int(vocab_config.get(name))
    if default is None:
        raise ValueError(f"set --{name} or config.vocab.{name}")
    return default


def _main(flag_holders: dict[str, Any]) -> None:
    use_cpu_only()
    config = flag_holders["config"].value
    if config is None or flag_holders["output"].value is None:
        raise SystemExit("--config and --output are required")
    vocab_config = config.get("vocab")
    min_count = _setting(flag_holders["min_count"].value, vocab_config, "min_count", None)
    max_size = _setting(flag_holders["max_size"].value, vocab_config, "max_size", 0)
    entries, num_records = vocabulary_from_config(
        config.data.train,
        min_count=min_count,
        max_size=max_size,
        processes=flag_holders["processes"].value,
        progress_every=flag_holders["progress_every"].value,
    )
    output = flag_holders["output"].value
    write_vocabulary(output, entries)
    print(
        f"{len(entries):,} classes (synsets in >= {min_count:,} of {num_records:,} records"
        + (f", at most {max_size:,}" if max_size else "")
        + f") written to {output}"
    )
    for entry in entries[:10]:
        print(f"  {entry.synset_id}\t{entry.name}\t{entry.count:,}")


if __name__ == "__main__":
    from absl import app

    # Defined only when run as a program: spawned workers re-import this file as __mp_main__.
    holders = _define_flags()
    app.run(lambda argv: _main(holders) if len(argv) == 1 else sys.exit(f"unexpected {argv[1:]}"))
