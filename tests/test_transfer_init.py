"""Tests of CatLIP Transfer Init (pretrain/components/transfer_init.py) against hand-worked
WordNet cases and a brute-force path-similarity scan."""

import os
import random

import numpy as np
import pytest


def _load_wordnet():
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except (ImportError, LookupError) as error:
        if os.environ.get("REQUIRE_WORDNET") == "1":
            raise
        pytest.skip(f"WordNet not installed: {error}", allow_module_level=True)


wn = _load_wordnet()

from pretrain.components import transfer_init as ti  # noqa: E402


def _fallback_word_synset(word: str) -> str | None:
    """CoreNet's caption rule (lemmatize, keep ``lemma.n.01`` only if it is named so)."""
    from nltk.corpus.reader.wordnet import WordNetError
    from nltk.stem import WordNetLemmatizer

    lemma = WordNetLemmatizer().lemmatize(word.lower())
    try:
        synset = wn.synset(f"{lemma}.n.01")
    except WordNetError:
        return None
    return f"n{synset.offset()}" if synset.name() == f"{lemma}.n.01" else None


try:
    from pretrain.data.synsets.labels import SynsetExtractor

    word_synset = SynsetExtractor().word_synset
except ImportError:
    word_synset = _fallback_word_synset


def sid(name: str) -> str:
    """CoreNet-style (unpadded) id of a synset name."""
    return f"n{wn.synset(name).offset()}"


def random_classifier(width: int, vocab_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(width, vocab_size)).astype(np.float32), rng.normal(
        size=vocab_size
    ).astype(np.float32)


def test_max_path_distance():
    assert ti.max_path_distance(1.0) == 0
    assert ti.max_path_distance(0.5) == 1
    assert ti.max_path_distance(1 / 3) == 2
    assert ti.max_path_distance(0.25) == 3
    assert ti.max_path_distance(0.3) == 2  # 1/(2+1) = 0.333 >= 0.3 > 1/(3+1)
    with pytest.raises(ValueError):
        ti.max_path_distance(0.0)


def test_synset_offset_padding():
    assert ti.synset_offset("n02084071") == ti.synset_offset("n2084071") == 2084071
    assert ti.synset_offset("dog.n.01") == 2084071


def test_target_synsets():
    assert ti.target_synsets("golden retriever") == [sid("golden_retriever.n.01")]
    assert ti.target_synsets("fire truck") == [sid("fire_engine.n.01")]
    assert ti.target_synsets("anything", wnid="n01440764") == ["n1440764"]
    assert ti.target_synsets("red sphere", word_synset=word_synset) == [
        sid("red.n.01"),
        sid("sphere.n.01"),
    ]
    assert ti.target_synsets("restaurant_kitchen", word_synset=word_synset) == [
        sid("restaurant.n.01"),
        sid("kitchen.n.01"),
    ]
    assert ti.target_synsets("/c/church/outdoor", word_synset=word_synset) == [sid("church.n.01")]
    # "archaeological" is no noun: no target, random init (the paper's footnote 1).
    assert ti.target_synsets("archaeological_excavation", word_synset=word_synset) == []


def test_exact_match_picks_the_right_column():
    vocabulary = [sid("cat.n.01"), sid("dog.n.01"), sid("car.n.01")]
    matches = ti.match_classes(["car", "dog"], vocabulary, word_synset=word_synset)
    assert [(m.kind, m.rows, m.weights) for m in matches] == [
        ("exact", (2,), (1.0,)),
        ("exact", (1,), (1.0,)),
    ]
    kernel, bias = random_classifier(8, 3)
    new_kernel, new_bias = ti.transfer_classifier(
        kernel, bias, matches, rng=np.random.default_rng(0)
    )
    np.testing.assert_array_equal(new_kernel, kernel[:, [2, 1]])
    np.testing.assert_array_equal(new_bias, bias[[2, 1]])


def test_zero_padded_wnid_matches_unpadded_vocabulary():
    vocabulary = ["n1440764", "n2084071"]  # CoreNet ids: tench, dog
    matches = ti.match_classes(["tench", "dog"], vocabulary, wnids=["n02084071", "n01440764"])
    assert [(m.kind, m.rows) for m in matches] == [("exact", (1,)), ("exact", (0,))]
    # And the other way round: a padded vocabulary, unpadded wnids.
    matches = ti.match_classes(["dog"], ["n01440764", "n02084071"], wnids=["n2084071"])
    assert (matches[0].kind, matches[0].rows) == ("exact", (1,))


def test_similar_single_best_match():
    # poodle.n.01 --hypernym--> dog.n.01: path length 1, path_similarity = 1 / (1 + 1) = 0.5.
    # canine.n.02 is dog's hypernym: length 2, similarity 1/3 < 0.5.
    assert wn.synset("poodle.n.01").path_similarity(wn.synset("dog.n.01")) == 0.5
    vocabulary = [sid("cat.n.01"), sid("canine.n.02"), sid("car.n.01"), sid("dog.n.01")]
    (match,) = ti.match_classes(["poodle"], vocabulary, alpha=0.5)
    assert (match.kind, match.rows, match.weights) == ("similar", (3,), (1.0,))
    # Lower threshold: canine also qualifies, but the best (dog, 0.5) still wins alone ...
    (match,) = ti.match_classes(["poodle"], vocabulary, alpha=0.3)
    assert (match.kind, match.rows) == ("similar", (3,))
    # ... unless all synsets >= alpha are mixed, weights proportional to 1/2 and 1/3: 0.6 / 0.4.
    (match,) = ti.match_classes(["poodle"], vocabulary, alpha=0.3, similar="weighted")
    assert match.rows == (1, 3)
    np.testing.assert_allclose(match.weights, (0.4, 0.6))
    # Without dog, canine (1/3) is below alpha = 0.5: random.
    (match,) = ti.match_classes(["poodle"], vocabulary[:3], alpha=0.5)
    assert match.kind == "random"


def test_similar_ties_are_averaged():
    # puppy.n.01 has two hypernyms, pup.n.01 and dog.n.01: both at similarity 0.5.
    assert {h.name() for h in wn.synset("puppy.n.01").hypernyms()} == {"pup.n.01", "dog.n.01"}
    vocabulary = [sid("dog.n.01"), sid("cat.n.01"), sid("pup.n.01")]
    (match,) = ti.match_classes(["puppy"], vocabulary)
    assert (match.kind, match.rows, match.weights) == ("similar", (0, 2), (0.5, 0.5))
    kernel, bias = random_classifier(6, 3)
    new_kernel, new_bias = ti.transfer_classifier(
        kernel, bias, [match], rng=np.random.default_rng()
    )
    np.testing.assert_allclose(new_kernel[:, 0], (kernel[:, 0] + kernel[:, 2]) / 2, rtol=1e-6)
    np.testing.assert_allclose(new_bias[0], (bias[0] + bias[2]) / 2, rtol=1e-6)


def test_composed_is_mean_of_parts():
    names = ["red.n.01", "cube.n.01", "blue.n.01", "sphere.n.01", "dog.n.01"]
    vocabulary = [sid(name) for name in names]
    classes = ["red sphere", "blue cube", "red poodle"]
    matches = ti.match_classes(classes, vocabulary, word_synset=word_synset)
    assert [m.kind for m in matches] == ["composed"] * 3
    assert (matches[0].rows, matches[0].weights) == ((0, 3), (0.5, 0.5))
    assert (matches[1].rows, matches[1].weights) == ((1, 2), (0.5, 0.5))
    # poodle is not in the vocabulary: replaced by its similar match, dog.
    assert (matches[2].rows, matches[2].weights) == ((0, 4), (0.5, 0.5))
    kernel, bias = random_classifier(16, len(vocabulary), seed=3)
    new_kernel, new_bias = ti.transfer_classifier(
        kernel, bias, matches, rng=np.random.default_rng()
    )
    np.testing.assert_allclose(new_kernel[:, 0], (kernel[:, 0] + kernel[:, 3]) / 2, rtol=1e-6)
    np.testing.assert_allclose(new_kernel[:, 1], (kernel[:, 1] + kernel[:, 2]) / 2, rtol=1e-6)
    np.testing.assert_allclose(new_kernel[:, 2], (kernel[:, 0] + kernel[:, 4]) / 2, rtol=1e-6)
    np.testing.assert_allclose(new_bias[:2], [(bias[0] + bias[3]) / 2, (bias[1] + bias[2]) / 2])
    # A part without any match makes the class random.
    (match,) = ti.match_classes(["green sphere"], vocabulary, word_synset=word_synset)
    assert match.kind == "random" and "green" in match.detail


def test_random_when_nothing_matches():
    vocabulary = [sid("excavation.n.01"), sid("car.n.01")]
    classes = ["archaeological_excavation", "dog", "poodle"]
    matches = ti.match_classes(classes, vocabulary, word_synset=word_synset)
    assert [m.kind for m in matches] == ["random"] * 3
    kernel, bias = random_classifier(20_000, 2, seed=1)
    new_kernel, new_bias = ti.transfer_classifier(
        kernel, bias, matches, rng=np.random.default_rng(7), random_std=0.05
    )
    assert new_kernel.shape == (20_000, 3) and new_kernel.dtype == kernel.dtype
    np.testing.assert_allclose(new_kernel.std(axis=0), 0.05, rtol=0.03)
    assert abs(new_kernel.mean()) < 3 * 0.05 / np.sqrt(new_kernel.size)
    np.testing.assert_allclose(new_bias, bias.mean(), rtol=1e-6)
    # Default std: that of the pretrained kernel (here ~1).
    new_kernel, _ = ti.transfer_classifier(kernel, bias, matches, rng=np.random.default_rng(7))
    np.testing.assert_allclose(new_kernel.std(), kernel.std(), rtol=0.03)


def test_transfer_classifier_mixed_kinds_and_validation():
    kernel, bias = random_classifier(5, 4, seed=2)
    matches = [
        ti.ClassMatch("a", "exact", (3,), (1.0,), ""),
        ti.ClassMatch("b", "similar", (0, 2), (0.25, 0.75), ""),
        ti.ClassMatch("c", "random", (), (), ""),
    ]
    new_kernel, new_bias = ti.transfer_classifier(
        kernel, bias, matches, rng=np.random.default_rng(0)
    )
    assert new_kernel.shape == (5, 3) and new_bias.shape == (3,)
    np.testing.assert_array_equal(new_kernel[:, 0], kernel[:, 3])
    np.testing.assert_allclose(
        new_kernel[:, 1], 0.25 * kernel[:, 0] + 0.75 * kernel[:, 2], rtol=1e-6
    )
    np.testing.assert_allclose(new_bias, [bias[3], 0.25 * bias[0] + 0.75 * bias[2], bias.mean()])
    with pytest.raises(ValueError):
        ti.transfer_classifier(kernel, bias[:3], matches, rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        ti.ClassMatch("d", "random", (1,), (1.0,), "")


def test_summarize_and_format():
    vocabulary = [sid("dog.n.01"), sid("red.n.01"), sid("sphere.n.01")]
    classes = ["dog", "poodle", "red sphere", "car", "puppy"]
    matches = ti.match_classes(classes, vocabulary, word_synset=word_synset)
    assert ti.summarize_matches(matches) == {"exact": 1, "similar": 2, "composed": 1, "random": 1}
    table = ti.format_matches(matches, vocabulary).splitlines()
    assert len(table) == 1 + len(classes)
    assert "poodle" in table[2] and "similar" in table[2] and "dog.n.01" in table[2]
    assert "red.n.01" in table[3] and "sphere.n.01" in table[3]
    assert "random" in table[4]


def _neighbourhood(synset):
    """Parents, grandparents, siblings and children of ``synset``: seeds of the vocabulary."""
    near = set(synset.hyponyms() + synset.instance_hyponyms())
    for parent in synset.hypernyms() + synset.instance_hypernyms():
        near.add(parent)
        near.update(parent.hypernyms())
        near.update(parent.hyponyms()[:5])
    near.discard(synset)
    return near


def test_bounded_search_equals_brute_force():
    nouns = list(wn.all_synsets("n"))
    rand = random.Random(0)
    targets = rand.sample(nouns, 20)
    pool = set(rand.sample(nouns, 1800))
    for target in targets:
        pool.update(_neighbourhood(target))
    pool.difference_update(targets)  # no exact matches: exercise "similar"
    vocab_synsets = sorted(pool, key=lambda s: s.offset())[:2000]
    vocabulary = [f"n{s.offset()}" for s in vocab_synsets]
    row_of = {s: row for row, s in enumerate(vocab_synsets)}
    vocab_set = set(vocab_synsets)

    brute = {t: {v: t.path_similarity(v) for v in vocab_synsets} for t in targets}
    similar_counts = {}
    for alpha in (0.5, 1 / 3, 0.25):
        radius = ti.max_path_distance(alpha)
        matches = ti.match_classes(
            [t.name() for t in targets],
            vocabulary,
            wnids=[f"n{t.offset():08d}" for t in targets],
            alpha=alpha,
        )
        for target, match in zip(targets, matches):
            expected = {v for v, score in brute[target].items() if score >= alpha}
            candidates = ti.synsets_within(target, radius) & vocab_set
            assert candidates >= expected, target  # the required superset property
            assert candidates == expected, target  # and the search is exact
            if not expected:
                assert match.kind == "random"
                continue
            best = max(brute[target][v] for v in expected)
            best_rows = tuple(sorted(row_of[v] for v in expected if brute[target][v] == best))
            assert (match.kind, match.rows) == ("similar", best_rows), target
            np.testing.assert_allclose(match.weights, 1 / len(best_rows))
        similar_counts[alpha] = ti.summarize_matches(matches)["similar"]
    # The sample must exercise the similar path, more so at lower thresholds.
    assert 0 < similar_counts[0.5] <= similar_counts[1 / 3] <= similar_counts[0.25]


def test_imagenet2012_wnids():
    from pretrain.evaluate.imagenet_prompts import IMAGENET_CLASSNAMES

    try:
        wnids = ti.imagenet2012_wnids()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    assert len(wnids) == len(IMAGENET_CLASSNAMES) == 1000
    assert wnids[0] == "n01440764" and wnids == tuple(sorted(wnids))
    synsets = [wn.synset_from_pos_and_offset("n", ti.synset_offset(w)) for w in wnids]
    assert synsets[0].name() == "tench.n.01" and synsets[1].name() == "goldfish.n.01"
    # With a vocabulary holding every ImageNet synset, all 1000 classes match exactly.
    vocabulary = [f"n{s.offset()}" for s in reversed(synsets)]
    matches = ti.match_classes(IMAGENET_CLASSNAMES, vocabulary, wnids=wnids)
    assert ti.summarize_matches(matches)["exact"] == 1000
    assert [m.rows[0] for m in matches] == list(range(999, -1, -1))
