"""Benchmark: CatLIP label extraction (caption -> WordNet noun synsets), captions/s on one core.

    .venv/bin/python bench/label_extraction.py [--count 20000] [--seed 0]

Two caption sets: (a) the embedded scenes' captions (pretrain/data/scenes/; scenes are sampled,
not rendered) and (b) synthetic web-like captions: 10-20 words drawn Zipf-like from WordNet's
single-word lemmas and filler words, with plurals, capitals, punctuation and some HTML and
URL-encoding. Each set is timed twice with one fresh SynsetExtractor in this process: the first
pass starts from an empty word cache (cold), the second finds the words cached (warm). WordNet's
one-time load (per process: each data worker pays it once) is timed separately.

Other benchmarks import :func:`measure_captions_per_second`.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench import timing  # noqa: E402
from pretrain.data import scenes  # noqa: E402
from pretrain.data.synsets.labels import SynsetExtractor, _plain_words, clean_caption  # noqa: E402
from pretrain.data.synsets.wordnet import load_wordnet  # noqa: E402

FILLER_WORDS = (
    "a", "the", "of", "in", "on", "with", "and", "for", "at", "by", "to", "from", "is", "are",
    "this", "that", "my", "our", "your", "new", "best", "free", "stock", "photo", "image",
    "vector", "illustration", "hd", "4k", "2023", "2024", "royalty", "background", "design",
    "set", "isolated", "white", "close-up", "top", "view", "|", "-", "&", "cannot", "it's",
)  # fmt: skip


def scene_captions(count: int, seed: int = 0) -> list[str]:
    """``count`` captions of the embedded data set (its caption templates on sampled scenes)."""
    rng = np.random.default_rng(seed)
    captions: list[str] = []
    while len(captions) < count:
        captions.extend(scenes.captions_for(scenes.sample_scene(rng), rng))
    return captions[:count]


def _zipf_sampler(words: Sequence[str], rng: np.random.Generator):
    """Draws words with probability 1/rank over a seeded random ranking of ``words``."""
    ranked = [words[i] for i in rng.permutation(len(words))]
    cumulative = np.cumsum(1.0 / np.arange(1, len(words) + 1))
    cumulative /= cumulative[-1]

    def draw(size: int) -> list[str]:
        picks = np.searchsorted(cumulative, rng.random(size), side="right")
        return [ranked[min(i, len(ranked) - 1)] for i in picks]

    return draw


def _web_words(rng: np.random.Generator, samplers) -> list[str]:
    length = int(rng.integers(10, 21))
    kinds = rng.choice(["noun", "adjective", "filler"], size=length, p=[0.45, 0.2, 0.35])
    words = []
    for kind in kinds:
        word = samplers[kind](1)[0]
        if kind == "noun" and rng.random() < 0.25:
            word += "es" if word.endswith(("s", "x", "ch", "sh")) else "s"
        if rng.random() < 0.15:
            word = word.capitalize()
        if rng.random() < 0.08:
            word += ","
        words.append(word)
    return words


def web_like_captions(count: int, seed: int = 0) -> list[str]:
    """``count`` seeded web-alt-text-like captions from WordNet lemmas and filler words."""
    wordnet = load_wordnet()
    lemmas = {
        kind: sorted(
            {name for name in wordnet.all_lemma_names(pos) if name.isalpha() and name.islower()}
        )
        for kind, pos in (("noun", "n"), ("adjective", "a"))
    }
    rng = np.random.default_rng(seed)
    samplers = {kind: _zipf_sampler(words, rng) for kind, words in lemmas.items()}
    samplers["filler"] = _zipf_sampler(FILLER_WORDS, rng)
    captions = []
    for _ in range(count):
        text = " ".join(_web_words(rng, samplers))
        style = rng.random()
        if style < 0.05:
            text = f"<b>{text}</b>"
        elif style < 0.08:
            text = urllib.parse.quote_plus(text)
        elif style < 0.5:
            text += rng.choice([".", "!", " ...", ". Buy now."])
        captions.append(text)
    return captions


def measure_captions_per_second(captions: Sequence[str]) -> dict[str, float]:
    """Single-process label extraction speed: a fresh extractor's first (cold cache) and second
    (warm cache) pass over ``captions``, one timed pass each (a repeat would no longer be cold).
    WordNet is loaded beforehand, outside the timing."""
    load_wordnet().ensure_loaded()
    extractor = SynsetExtractor()

    def extract_all() -> int:
        return sum(len(extractor(caption)) for caption in captions)

    rates = {}
    for name in ("cold", "warm"):
        labels, seconds = timing.time_call(extract_all, wait=timing.no_wait)
        rates[f"{name}_captions_per_s"] = len(captions) / seconds
    return {
        **rates,
        "captions": float(len(captions)),
        "labels_per_caption": labels / max(len(captions), 1),
        "cached_words": float(len(extractor._cache)),
    }


def plain_text_share(captions: Sequence[str]) -> float:
    """Fraction of captions whose tokenisation takes the whitespace-split shortcut."""
    plain = sum(_plain_words(clean_caption(caption)) is not None for caption in captions)
    return plain / max(len(captions), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="captions per set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, seconds = timing.time_call(load_wordnet, wait=timing.no_wait)
    print(f"WordNet load (once per process): {seconds:.2f} s")
    sets = {
        "scenes": scene_captions(args.count, args.seed),
        "web-like": web_like_captions(args.count, args.seed),
    }
    print(f"{'set':<10} {'cold/s':>9} {'warm/s':>9} {'labels':>7} {'words':>7} {'plain':>6}")
    for name, captions in sets.items():
        result = measure_captions_per_second(captions)
        print(
            f"{name:<10} {result['cold_captions_per_s']:>9,.0f} "
            f"{result['warm_captions_per_s']:>9,.0f} {result['labels_per_caption']:>7.2f} "
            f"{result['cached_words']:>7,.0f} {plain_text_share(captions):>6.0%}"
        )
    print("(captions/s on one core; labels = synsets per caption; words = distinct words cached;")
    print(" plain = captions tokenised by the whitespace shortcut)")
    print("example web-like captions:")
    for caption in sets["web-like"][:3]:
        print("  ", caption)


if __name__ == "__main__":
    main()
