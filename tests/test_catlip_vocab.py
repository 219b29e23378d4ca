"""Tests of the synset vocabulary builder: per-record counting, threshold and order, the TSV file,
and the command line (worker processes) on the tiny embedded scenes against a one-process count.

Without WordNet the tests that need it skip; with ``REQUIRE_WORDNET=1`` (CI) they fail instead.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest
import wordnet_env

from pretrain.data import scenes
from pretrain.data.records import image_and_captions
from pretrain.data.scenes import builder
from pretrain.data.synsets import counting, vocabulary
from pretrain.data.synsets.vocabulary import VocabEntry

REPO_ROOT = Path(__file__).resolve().parent.parent
DOG, CAT, CAR, BICYCLE, RED, TWO = (
    "n2084071",
    "n2121620",
    "n2958343",
    "n2834778",
    "n4962784",
    "n13743269",
)


@pytest.fixture(scope="module")
def require_wordnet():
    wordnet_env.require_wordnet()


def test_a_synset_counts_once_per_record(require_wordnet):
    records = [
        ["a dog", "two dogs"],  # dog twice in one record: counted once; two
        ["a cat and a dog"],  # cat, dog
        ["   "],  # blank: no synsets
        ["the photo"],  # photo -> photograph.n.01 fails the name check
        ["cat", "CAT!"],  # cat once
        [],
    ]
    counts = counting.count_synsets(records)
    assert counts == collections.Counter({DOG: 2, CAT: 2, TWO: 1})


def test_threshold_and_order(require_wordnet):
    counts = {DOG: 5, CAT: 5, "n02958343": 7, BICYCLE: 2, RED: 3}
    # Count descending; the tie between dog (2084071) and cat (2121620) broken by offset.
    assert vocabulary.build_vocabulary(counts, min_count=3) == [
        VocabEntry(CAR, "car.n.01", 7),
        VocabEntry(DOG, "dog.n.01", 5),
        VocabEntry(CAT, "cat.n.01", 5),
        VocabEntry(RED, "red.n.01", 3),
    ]
    truncated = vocabulary.build_vocabulary(counts, min_count=1, max_size=2)
    assert [entry.synset_id for entry in truncated] == [CAR, DOG]
    assert vocabulary.build_vocabulary(counts, min_count=8) == []
    with pytest.raises(ValueError, match="min_count"):
        vocabulary.build_vocabulary(counts, min_count=0)


def test_tsv_round_trip(tmp_path):
    entries = [VocabEntry(CAR, "car.n.01", 7), VocabEntry(DOG, "dog.n.01", 5)]
    path = tmp_path / "sub" / "vocab.tsv"
    vocabulary.write_vocabulary(path, entries)
    expected = "synset_id\tname\tcount\nn2958343\tcar.n.01\t7\nn2084071\tdog.n.01\t5\n"
    assert path.read_text() == expected
    assert vocabulary.read_vocabulary(path) == entries
    assert sorted(p.name for p in path.parent.iterdir()) == ["vocab.tsv"]  # no temporary left


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r":1: expected the header"),
        ("id\tname\tcount\n", r":1: expected the header"),
        ("synset_id\tname\tcount\nn2084071\tdog.n.01\t5\nn2121620\tcat.n.01\n", r":3: expected 3"),
        ("synset_id\tname\tcount\nn2084071\tdog.n.01\tmany\n", r":2: count 'many'"),
        ("synset_id\tname\tcount\ndog\tdog.n.01\t5\n", r":2: not a synset id"),
        (
            "synset_id\tname\tcount\nn2084071\tdog.n.01\t5\n\nn02084071\tdog.n.01\t4\n",
            r":4: n2084071 already listed on line 2",
        ),
    ],
)
def test_malformed_tsv_names_the_line(tmp_path, text, message):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        vocabulary.read_vocabulary(path)


def test_vocabulary_from_a_source_counts_all_records(require_wordnet):
    source = [
        {"image": b"x", "captions": ["a dog on a car"]},
        {"image": b"x", "captions": ["", "  "]},  # all blank: a record with no synsets
        {"image_bytes": None, "caption": "a red car"},
        {"image": b"x"},  # no caption field at all
    ]
    entries, records = vocabulary.vocabulary_from_source(
        source, min_count=1, processes=1, progress_every=0
    )
    assert records == 4
    assert entries == [
        VocabEntry(CAR, "car.n.01", 2),
        VocabEntry(DOG, "dog.n.01", 1),
        VocabEntry(RED, "red.n.01", 1),
    ]


def _passes_rule(noun: str) -> str | None:
    """The synset id of ``noun`` by the rule, computed with nltk directly (no project code)."""
    from nltk.corpus import wordnet as wn
    from nltk.stem import WordNetLemmatizer

    lemma = WordNetLemmatizer().lemmatize(noun)
    try:
        synset = wn.synset(f"{lemma}.n.01")
    except Exception:
        return None
    return f"n{synset.offset()}" if synset.name() == f"{lemma}.n.01" else None


def test_command_line_with_workers_matches_one_process(require_wordnet, tmp_path):
    source = builder.data_source("train", "tiny")  # built here once, reused below
    reference = counting.count_synsets(
        image_and_captions(source[i], require_captions=False)[1] for i in range(len(source))
    )
    output = tmp_path / "vocab.tsv"
    command = [
        sys.executable,
        "-m",
        "pretrain.data.synsets.vocabulary",
        "--config=tests/tiny_catlip_vocab_config.py",
        f"--output={output}",
        "--processes=2",
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    entries = vocabulary.read_vocabulary(output)
    # min_count comes from the config's vocab.min_count (5); counts equal the one-process count.
    assert entries == vocabulary.build_vocabulary(reference, min_count=5)
    assert len(entries) > 20
    counts = {entry.synset_id: entry.count for entry in entries}
    nouns = [noun for shape_nouns in scenes.SHAPE_NOUNS.values() for noun in shape_nouns]
    shape_ids = {noun: _passes_rule(noun) for noun in nouns}
    for shape in scenes.SHAPES:  # every shape's canonical noun passes and is frequent
        assert shape_ids[shape] in counts, shape
    for noun, synset_id in shape_ids.items():
        if synset_id is None:  # e.g. doughnut: first noun sense ring.n.02
            continue
        assert (synset_id in counts) == (reference[synset_id] >= 5), noun
    assert shape_ids["doughnut"] is None and shape_ids["donut"] is None
