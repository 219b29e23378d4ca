"""Caption labels: the WordNet noun synsets a caption names, by CoreNet's rule.

For each caption (CoreNet's ``caption_preprocessing`` then its ``convert_caption_to_labels``):

1. clean: URL-unquote, ``+`` -> space, remove HTML tags ``<...>``, strip newlines at the ends,
   collapse runs of spaces, ``ftfy.fix_text``, strip, lower-case (:func:`clean_caption`);
2. tokenise into words with ``nltk.word_tokenize`` (:func:`caption_words`). Its sentence splitter
   needs nltk's punkt data, which cannot be downloaded offline; without it sentences are split at
   ``.``/``!``/``?`` followed by whitespace and each is tokenised by the same ``NLTKWordTokenizer``
   that ``word_tokenize`` uses. CoreNet also POS-tags the words but filters on nothing but the
   rule below, so no tagger (another download) is needed;
3. for each word: ``lemma = WordNetLemmatizer().lemmatize(word)`` (as a noun), take the synset
   ``wn.synset(f"{lemma}.n.01")`` (no synset, or any error: no label) and keep it only if its name
   is ``f"{lemma}.n.01"`` itself, i.e. the lemma's first noun sense is a synset headed by that
   lemma ("photo" -> photograph.n.01 is dropped, "dogs" -> dog.n.01 is kept);
4. the label is ``"n" + str(offset)``: CoreNet's id, not zero-padded ("n2084071" for dog.n.01,
   whereas ImageNet writes "n02084071"; :func:`normalize_synset_id` maps both to the former).

Example: "An image of black dog." -> image n5928118, black n4960277, dog n2084071.

Speed: a word's label depends on the word only, so :class:`SynsetExtractor` caches word -> label
(web captions repeat a small vocabulary of words), and captions made only of lower-case ASCII
letters, digits, spaces, hyphens and some punctuation (optionally ending in a period), where the
tokenizer's rules reduce to a few local ones and a whitespace split, skip the full regex
tokenizer. The extractor pickles without its cache and WordNet reader, so it can be sent to grain
worker processes.
"""

from __future__ import annotations

import functools
import re
import threading
import urllib.parse
import warnings
from collections.abc import Sequence
from typing import Any

import ftfy
import numpy as np

from pretrain.data.synsets.wordnet import load_wordnet

# Bounded so that a web-scale stream of rare tokens (typos, numbers, URLs) cannot grow a worker's
# memory without limit; frequent words are met early and stay cached.
DEFAULT_CACHE_SIZE = 1 << 19

_HTML_TAG = re.compile(r"<.*?>")
_SPACE_RUNS = re.compile(" +")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
# Text on which every rule of nltk's word tokenizer is a no-op except its final whitespace split
# (its rules act on quotes, brackets, most punctuation, double dashes and a few contractions;
# none touches these symbols).
_PLAIN_TEXT = re.compile(r"[a-z0-9 \t\n|/=~^_-]*")
# The tokenizer's rules for these characters split them off by local context alone, so on plain
# text with these characters added, those rules (nltk's own compiled ones, in its order) and a
# whitespace split give its output. Other characters (quotes, brackets, periods...) take the
# full tokenizer.
_LOCAL_RULES = {
    r"([:,])([^\d])": ":,",
    r"([:,])$": ":,",
    r"[;@#$%&]": ";@#$%&",
    r"[?!]": "?!",
    r"[*]": "*",
}
_SYNSET_ID = re.compile(r"([nvasr])0*(\d+)")
_UNSEEN = object()


# ----------------------------------------------------------------------------- text


def clean_caption(text: str) -> str:
    """CoreNet's caption clean-up: unquote, drop HTML tags, fix text, squeeze spaces, lower-case."""
    text = urllib.parse.unquote(str(text)).replace("+", " ")
    text = _HTML_TAG.sub("", text)
    # Only the ends, as CoreNet does: inner newlines separate words for the tokenizer anyway.
    text = text.strip("\n")
    text = _SPACE_RUNS.sub(" ", text)
    return ftfy.fix_text(text).strip().lower()


@functools.cache
def _word_tokenizer() -> Any:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


@functools.cache
def _contraction_pattern() -> re.Pattern:
    """One regex for the tokenizer's contraction rules ("cannot" -> "can not", "gonna"...)."""
    tokenizer = _word_tokenizer()
    patterns = [
        regex.pattern.removeprefix("(?i)")
        for regex in (*tokenizer.CONTRACTIONS2, *tokenizer.CONTRACTIONS3)
    ]
    return re.compile("|".join(f"(?:{pattern})" for pattern in patterns), re.IGNORECASE)


@functools.cache
def punkt_available() -> bool:
    """Whether nltk's punkt sentence-splitter data is installed (``word_tokenize`` needs it)."""
    import nltk

    try:
        nltk.word_tokenize("A probe. Another probe.")
    except LookupError:
        return False
    return True


@functools.cache
def _local_punctuation() -> tuple[re.Pattern, list[tuple[re.Pattern, str]]]:
    """(text the shortcut handles, the tokenizer's rules to apply to it). A rule missing from
    the installed nltk (another version) leaves its characters to the full tokenizer."""
    rules = [
        (regex, substitution)
        for regex, substitution in _word_tokenizer().PUNCTUATION
        if regex.pattern in _LOCAL_RULES
    ]
    found = {regex.pattern for regex, _ in rules}
    unhandled = "".join(chars for pattern, chars in _LOCAL_RULES.items() if pattern not in found)
    characters = set("".join(_LOCAL_RULES.values())) - set(unhandled)
    extra = re.escape("".join(sorted(characters)))
    return re.compile(rf"[a-z0-9 \t\n|/=~^_{extra}-]*"), rules


def _plain_words(text: str) -> list[str] | None:
    """The tokenizer's output computed with a few local rules and a whitespace split, or None
    when that could differ."""
    body = text[:-1] if text.endswith(".") else text
    if _PLAIN_TEXT.fullmatch(body) is None:
        allowed, rules = _local_punctuation()
        if allowed.fullmatch(body) is None:
            return None
        for regex, substitution in rules:
            body = regex.sub(substitution, body)
    if "--" in body:
        return None
    # Padded as the tokenizer pads: its "wanna" rule needs whitespace after the word.
    if _contraction_pattern().search(f" {body} "):
        return None
    words = body.split()
    if text.endswith("."):  # a final period is split off as its own token
        words.append(".")
    return words


def tokenize_with_nltk(cleaned: str) -> list[str]:
    """``nltk.word_tokenize`` of a cleaned caption (its data-free equivalent without punkt)."""
    if punkt_available():
        import nltk

        return nltk.word_tokenize(cleaned)
    tokenizer = _word_tokenizer()
    return [
        word for sentence in _SENTENCE_BREAK.split(cleaned) for word in tokenizer.tokenize(sentence)
    ]


def tokenize(cleaned: str) -> list[str]:
    """Words of an already cleaned caption, as :func:`tokenize_with_nltk` gives them, faster
    for plain text."""
    words = _plain_words(cleaned)
    return words if words is not None else tokenize_with_nltk(cleaned)


def caption_words(text: str) -> list[str]:
    """The caption's words: :func:`clean_caption`, then :func:`tokenize`."""
    return tokenize(clean_caption(text))


# ----------------------------------------------------------------------------- synset ids


def normalize_synset_id(synset_id: str) -> str:
    """CoreNet's form of a synset id: ``"n02084071"`` (ImageNet wnid) -> ``"n2084071"``."""
    match = _SYNSET_ID.fullmatch(synset_id.strip())
    if match is None:
        raise ValueError(f"not a synset id (a part-of-speech letter and an offset): {synset_id!r}")
    return f"{match[1]}{int(match[2])}"


def synset_from_id(synset_id: str) -> Any:
    """The nltk ``Synset`` of an id such as ``"n2084071"`` or ``"n02084071"``."""
    normalized = normalize_synset_id(synset_id)
    return load_wordnet().synset_from_pos_and_offset(normalized[0], int(normalized[1:]))


def synset_name(synset_id: str) -> str:
    """The synset's name: ``"n2084071"`` -> ``"dog.n.01"``."""
    return synset_from_id(synset_id).name()


# ----------------------------------------------------------------------------- extraction


_WORDNET_LOCK = threading.Lock()


class SynsetExtractor:
    """Caption -> its noun synset ids in order of first mention, by CoreNet's rule.

    Picklable: the word cache and the WordNet reader are rebuilt lazily after unpickling.
    """

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE):
        self.cache_size = int(cache_size)
        self._cache: dict[str, str | None] = {}
        self._lemmatizer: Any = None
        self._wordnet: Any = None

    def _lookup(self, word: str) -> str | None:
        if self._wordnet is None:
            from nltk.stem import WordNetLemmatizer

            with _WORDNET_LOCK:  # nltk's lazy corpus loader is not thread-safe either
                self._wordnet = load_wordnet()
            self._lemmatizer = WordNetLemmatizer()
        try:
            # nltk's WordNet reader seeks and reads one shared file handle: lookups from grain's
            # reader threads at once read each other's lines (wrong or missing synsets), so they
            # take turns. Only cache misses come here.
            with _WORDNET_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                lemma = self._lemmatizer.lemmatize(word)
                name = f"{lemma}.n.01"
                synset = self._wordnet.synset(name)
        except Exception:  # no such lemma or sense, or a token nltk cannot parse as a name
            return None
        return f"n{synset.offset()}" if synset.name() == name else None

    def word_synset(self, word: str) -> str | None:
        """The synset id of one (cleaned, lower-case) word, or None."""
        synset_id = self._cache.get(word, _UNSEEN)
        if synset_id is _UNSEEN:
            synset_id = self._lookup(word)
            if len(self._cache) < self.cache_size:
                self._cache[word] = synset_id
        return synset_id

    def __call__(self, caption: str) -> list[str]:
        found: dict[str, None] = {}
        cache = self._cache
        for word in caption_words(caption):
            synset_id = cache.get(word, _UNSEEN)
            if synset_id is _UNSEEN:
                synset_id = self.word_synset(word)
            if synset_id is not None:
                found[synset_id] = None
        return list(found)

    def __getstate__(self) -> dict[str, Any]:
        return {"cache_size": self.cache_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


class CaptionLabeler:
    """Caption -> rows of a synset vocabulary (multi-hot classification targets).

    ``vocabulary``: synset ids, one per class row (zero-padded ImageNet wnids are accepted).
    Synsets of the caption outside the vocabulary are ignored. Picklable.
    """

    def __init__(self, vocabulary: Sequence[str], extractor: SynsetExtractor | None = None):
        ids = [normalize_synset_id(synset_id) for synset_id in vocabulary]
        self.row_of = {synset_id: row for row, synset_id in enumerate(ids)}
        if len(self.row_of) != len(ids):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"vocabulary lists synsets more than once: {duplicates[:10]}")
        self.num_classes = len(ids)
        self.extractor = extractor if extractor is not None else SynsetExtractor()

    def indices(self, caption: str) -> np.ndarray:
        """Sorted unique vocabulary rows of the caption's synsets, int32."""
        rows = {self.row_of[s] for s in self.extractor(caption) if s in self.row_of}
        return np.array(sorted(rows), dtype=np.int32)

    def multi_hot(self, caption: str) -> np.ndarray:
        """(num_classes,) uint8: 1 on the rows of the caption's synsets."""
        target = np.zeros(self.num_classes, np.uint8)
        target[self.indices(caption)] = 1
        return target
