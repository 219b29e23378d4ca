"""Tests of caption -> WordNet noun synset labels (CoreNet's rule) and the WordNet set-up.

Expected synset ids were worked out by hand with nltk's WordNet 3.0 (lemma, first noun sense,
name check) and, where the synset is in ImageNet's WordNet hierarchy, agree with its zero-padded
wnid (dog n02084071, cat n02121620, car n02958343, bicycle n02834778, bird n01503061, goose
n01855672, mouse n02330245, tree n13104059, house n03544360, child n09917593, girl n10129825): an
independent record of the same WordNet offsets.

Without WordNet these tests skip; with ``REQUIRE_WORDNET=1`` (CI) they fail instead.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil

import numpy as np
import pytest
import wordnet_env

from pretrain.data import scenes
from pretrain.data.synsets import labels, wordnet
from pretrain.data.synsets.labels import (
    CaptionLabeler,
    SynsetExtractor,
    caption_words,
    clean_caption,
    normalize_synset_id,
    synset_from_id,
    synset_name,
)


@pytest.fixture(scope="module", autouse=True)
def require_wordnet():
    wordnet_env.require_wordnet()


DOG, CAT, CAR, BICYCLE = "n2084071", "n2121620", "n2958343", "n2834778"
RED, BLUE, BLACK, IMAGE = "n4962784", "n4968895", "n4960277", "n5928118"


def test_golden_case_from_the_paper():
    assert SynsetExtractor()("An image of black dog.") == [IMAGE, BLACK, DOG]


CASES = [
    # Plurals are lemmatised ("dogs" -> dog); the cardinal numbers are nouns in WordNet
    # (two.n.01 = 13743269, three.n.01 = 13744044), kept by the rule; "and" has no noun sense.
    ("two dogs and three cats", ["n13743269", DOG, "n13744044", CAT]),
    # HTML tags are removed before tokenising: "<b>Red</b>" is the word "red".
    ("<b>Red</b> car", [RED, CAR]),
    # URL-unquoted ("%20" -> " ") and "+" -> " "; "a" lemmatises to itself but a.n.01 is
    # angstrom.n.01, so the name check drops it.
    ("a+blue%20bicycle", [BLUE, BICYCLE]),
    # "photo" -> photograph.n.01 and "boy" -> male_child.n.01 fail the name check; "men" is
    # itself a noun lemma (shortest of its morphy lemmas, tied with "man" and listed first) whose
    # first sense is work_force.n.01, so it is dropped too; girl.n.01 = 10129825 stays.
    ("A photo of a boy, a girl and men!", ["n10129825"]),
    # "cannot" is split by the tokenizer into "can" + "not": can.n.01 (the container, 2946921);
    # "go" has a first noun sense go.n.01 (the board game, 15292069). Two sentences.
    ("I cannot go. The can is red", ["n2946921", "n15292069", RED]),
    # Upper case is folded; irregular plurals come from WordNet's exception lists:
    # children -> child (9917593), mice -> mouse (2330245), geese -> goose (1855672).
    ("CHILDREN & mice; geese?", ["n9917593", "n2330245", "n1855672"]),
    # Sentences are split at . ! ? + space, so "dog." is the word "dog" plus a period (without
    # the split the tokenizer would keep "dog." whole and find no synset).
    ("A dog. A cat! A bird? A tree", [DOG, CAT, "n1503061", "n13104059"]),
    # No noun senses at all ("running" lemmatises to itself: its first noun sense is run.n.05).
    ("running quickly and beautiful", []),
    # "t-shirt" -> jersey.n.03 and "3d" -> three-d.n.01 are dropped; print.n.01 = 6678302 stays.
    ("t-shirt with 3d print", ["n6678302"]),
    # Percent-encoded HTML: unquoting happens before the tag removal, so the tags go too;
    # "big" has no noun sense; house.n.01 = 3544360.
    ("%3Cb%3Ebig%3C%2Fb%3E+house", ["n3544360"]),
    # Each synset once, in order of first mention.
    ("dog dogs DOG", [DOG]),
    # Quotes and the possessive are split off; hello.n.01 = 6632511, owner.n.01 = 10388924.
    ('he said "hello" to the dogs\' owner', ["n6632511", DOG, "n10388924"]),
]


@pytest.mark.parametrize(("caption", "expected"), CASES)
def test_caption_synsets(caption, expected):
    assert SynsetExtractor()(caption) == expected


def test_names_of_expected_synsets():
    # The ids above name the synsets the comments say (the reverse direction of the rule).
    assert [synset_name(i) for i in ("n2946921", "n15292069", "n1855672", "n6678302")] == [
        "can.n.01",
        "go.n.01",
        "goose.n.01",
        "print.n.01",
    ]


def test_clean_caption():
    assert clean_caption("  A   <i>Big</i>\n\n  DOG\n") == "a big\n\n dog"
    assert clean_caption("a+blue%20bicycle%2C+too") == "a blue bicycle, too"
    # ftfy repairs mojibake and HTML entities.
    assert clean_caption("caf\u00c3\u00a9 &amp; bar") == "café & bar"
    assert caption_words("A cat.Dog") == ["a", "cat.dog"]  # no space after the period: one word


def _plain_text_samples(count: int) -> list[str]:
    """Random texts made of the pieces the tokenizer's rules react to (contractions, hyphens,
    periods, punctuation), joined by assorted whitespace or nothing."""
    pieces = ["can", "not", "cannot", "gon", "na", "gonna", "wan", "wanna", "wannabe", "gim",
              "me", "gimme", "lem", "lemme", "got", "ta", "gotta", "more", "d", "dog", "3d", "x-y",
              "-", "--", "a-", "canopy", "can-not", ".", ",", "a,b", "1,000", "x,1", ",,", ":",
              "a:b", "!", "?!", "wow!", "50%", "&", "a;b", "#1", "@x", "$5", "*", "',",
              "(a)", "a|b", "|", "x/y", "_can", "not_", "=", "~", "^"]  # fmt: skip
    rng = random.Random(0)
    texts = []
    for _ in range(count):
        words = rng.choices(pieces, k=rng.randint(1, 6))
        separators = rng.choices([" ", " ", "\t", "  ", "\n", ""], k=len(words))
        text = "".join(w + s for w, s in zip(words, separators)).strip()
        texts.append(text + rng.choice(["", ".", " ."]))
    return texts


def test_plain_text_shortcut_matches_nltk_tokenizer():
    scene_captions = (scenes.make_example(seed, 8)["captions"] for seed in range(40))
    texts = [clean_caption(caption) for captions in scene_captions for caption in captions]
    texts += _plain_text_samples(2000)
    texts += ["", ".", "i wanna", "wanna go", "x-cannot-y", "a--b", "box..", "red ball ."]
    shortcut_used = 0
    for text in texts:
        reference = labels.tokenize_with_nltk(text)
        assert labels.tokenize(text) == reference, text
        shortcut_used += labels._plain_words(text) is not None
    # Both branches are exercised: the shortcut and the fall-back to the full tokenizer.
    assert 300 < shortcut_used < len(texts) - 300


def test_cache_gives_the_uncached_result():
    captions = [c for example in range(30) for c in scenes.make_example(example, 8)["captions"]]
    captions += [caption for caption, _ in CASES]
    cached = SynsetExtractor()
    uncached = SynsetExtractor(cache_size=0)
    first = [cached(c) for c in captions]
    assert len(cached._cache) > 20 and not uncached._cache
    assert [cached(c) for c in captions] == first == [uncached(c) for c in captions]
    assert cached.word_synset("dogs") == DOG and cached.word_synset("photo") is None


def test_pickling_drops_the_cache_and_gives_the_same_labels():
    extractor = SynsetExtractor(cache_size=1000)
    before = [extractor(caption) for caption, _ in CASES]
    restored = pickle.loads(pickle.dumps(extractor))
    assert restored.cache_size == 1000 and not restored._cache
    assert [restored(caption) for caption, _ in CASES] == before
    assert len(pickle.dumps(extractor)) < 200  # no cache or WordNet reader inside


def test_caption_labeler():
    # Zero-padded ImageNet wnids are accepted and mean the same synsets.
    vocabulary = ["n02958343", CAT, "n02084071", "n13743269", BLUE]
    labeler = CaptionLabeler(vocabulary)
    indices = labeler.indices("Two dogs chase a cat; no car, but a dog.")
    # two -> row 3, dogs/dog -> row 2, cat -> row 1, car -> row 0 (sorted, unique).
    np.testing.assert_array_equal(indices, [0, 1, 2, 3])
    assert indices.dtype == np.int32
    hot = labeler.multi_hot("a blue bicycle next to a cat")  # bicycle is not in the vocabulary
    np.testing.assert_array_equal(hot, [0, 1, 0, 0, 1])
    assert hot.dtype == np.uint8 and hot.shape == (5,)
    assert labeler.indices("nothing here").shape == (0,)
    restored = pickle.loads(pickle.dumps(labeler))
    np.testing.assert_array_equal(restored.multi_hot("a blue bicycle next to a cat"), hot)
    with pytest.raises(ValueError, match="more than once"):
        CaptionLabeler([DOG, "n02084071"])


def test_synset_ids():
    assert normalize_synset_id("n02084071") == normalize_synset_id("n2084071") == DOG
    assert synset_name("n02084071") == "dog.n.01"
    assert synset_from_id(DOG).offset() == 2084071
    for bad in ("dog", "x123", "n", "n12a"):
        with pytest.raises(ValueError, match="not a synset id"):
            normalize_synset_id(bad)


def test_lexnames_match_the_installed_corpus():
    reader = wordnet.load_wordnet()
    with reader.open("lexnames") as installed:
        lines = [line.rstrip("\n") for line in installed.read().splitlines() if line.strip()]
    assert lines == wordnet.lexnames_lines()
    assert len(lines) == 45 and lines[5] == "05\tnoun.animal\t1" and lines[44] == "44\tadj.ppl\t3"


def test_install_from_a_wordnet_folder(tmp_path, monkeypatch):
    # A WordNet database folder without lexnames (like /usr/share/wordnet of the Debian package):
    # install_wordnet copies it, writes lexnames, and a second call finds it ready. nltk's search
    # path starts empty, as on a fresh machine (nltk's reader of a folder also looks for the
    # corpus named "wordnet" on that path: the install must not depend on finding one).
    installed = wordnet.load_wordnet().root
    if not os.path.isdir(installed.path):
        pytest.skip(f"WordNet is installed as {installed.path}, not as a folder to copy")
    source = tmp_path / "dict"
    shutil.copytree(installed.path, source, ignore=shutil.ignore_patterns("lexnames", "*.zip"))
    monkeypatch.setenv("WNSEARCHDIR", str(source))
    monkeypatch.setattr("nltk.data.path", [])
    target = tmp_path / "nltk_data"
    assert wordnet.install_wordnet(target) == target
    corpus = target / "corpora" / "wordnet"
    assert (corpus / "lexnames").read_text().splitlines() == wordnet.lexnames_lines()
    assert sorted(p.name for p in (target / "corpora").iterdir()) == ["wordnet"]  # no leftovers
    stamp = (corpus / "lexnames").stat().st_mtime_ns
    wordnet.install_wordnet(target)
    assert (corpus / "lexnames").stat().st_mtime_ns == stamp


RACE_SCRIPT = """
import sys, threading
from pretrain.data.synsets import labels
words = ["cone", "sphere", "cube", "red", "blue", "dog", "ground", "pyramid", "torus", "ring",
         "ball", "box", "block", "can", "drum", "cylinder", "scene", "picture", "light"] * 3
sys.setswitchinterval(1e-6)  # switch threads often, as a busy grain reader pool does
results = {}
def label(i):
    results[i] = [labels.SynsetExtractor().word_synset(w) for w in words]
threads = [threading.Thread(target=label, args=(i,)) for i in range(16)]
[t.start() for t in threads]
[t.join() for t in threads]
reference = [labels.SynsetExtractor().word_synset(w) for w in words]
print(sum(r != reference for r in results.values()))
"""


def test_threads_looking_up_words_at_once_get_the_sequential_answers():
    """grain maps examples in reader threads; nltk's WordNet reader (one shared file handle, a
    lazy loader) returned wrong or missing synsets when they looked words up at once, in a fresh
    process (measured without the lock: 2-12 of 16 threads disagreed)."""
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-c", RACE_SCRIPT],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == "0", result.stdout
