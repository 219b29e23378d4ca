"""CatLIP *Transfer Init*: a downstream classifier initialised from the pretrained one.

CatLIP (Mehta et al., 2024, Sections 3.1 and 4.2) pretrains an image tower with a linear classifier
over a vocabulary ``V`` of WordNet noun synsets; column ``v`` of its kernel (shape ``(W, V)``) and
entry ``v`` of its bias belong to vocabulary synset ``v``. For a downstream task with ``C`` classes,
each class gets its initial column from those of its own synset(s):

- ``exact``: the class's synset is in the vocabulary -> that column (and bias).
- ``similar``: it is not, but vocabulary synsets ``S`` with WordNet ``path_similarity(S, target)
  >= alpha`` exist (the paper's matching rule, Section 3.1) -> the mean of the *most similar* ones.
- ``composed``: a class name made of several nouns (Places365 ``restaurant_kitchen``; the embedded
  scene classes ``red sphere``) -> the mean of the parts' columns (the paper "linearly
  interpolates" them; with no stated weights the mean is the neutral choice). Each part may itself
  be an exact or a similar match; a part without any match makes the whole class ``random``.
- ``random``: nothing matches (the paper's footnote 1: ``archaeological_excavation`` is
  "initialized with random embeddings") -> a normal draw with the pretrained columns' std.

Why "most similar" and not a similarity-weighted mean of everything ``>= alpha``: Figure 2b of the
paper counts ImageNet-1k synsets per similarity threshold, i.e. it characterises each target by its
*best* similarity to the vocabulary (score 1.0 = exact match), and Section 4.2 extracts "the
embeddings associated with target labels", one per label. Only the best-scoring synsets are that
label's counterpart; averaging in every synset at the threshold would mix in e.g. the parent
together with all of the target's children. Ties at the best score (a synset with two hypernyms in
the vocabulary) are averaged with weights proportional to the (equal) similarity.
``similar="weighted"`` gives the alternative (all synsets ``>= alpha``, weights proportional to
similarity) for ablations.

Speed: path similarity is ``1 / (d + 1)`` with ``d`` the shortest hypernym path length between the
two synsets through a common ancestor (NLTK follows hypernyms and instance hypernyms; WordNet 3.0
nouns share the root ``entity.n.01``, so no root is simulated). Only synsets with
``d <= floor(1/alpha - 1)`` can reach ``alpha``; :func:`synsets_within` collects exactly those by a
bounded breadth-first search (up the hypernyms, then down the hyponyms from each ancestor), and
exact ``path_similarity`` is then computed only for the ones in the vocabulary. A 24k-synset
vocabulary is never scanned.

Synset ids: CoreNet writes ``"n" + offset`` without zero padding (``n2084071``), ImageNet wnids are
zero-padded (``n02084071``); both are compared as integer offsets. ImageNet-1k class wnids in label
order ship with TFDS (its ``imagenet2012`` label names *are* the wnids): :func:`imagenet2012_wnids`
reads them from the installed package without importing it; pass them as ``wnids=`` to
:func:`match_classes` together with :data:`pretrain.evaluate.imagenet_prompts.IMAGENET_CLASSNAMES`.

NumPy + NLTK (WordNet corpus) only; WordNet is imported lazily so importing this module is cheap.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import pathlib
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MATCH_KINDS: tuple[str, ...] = ("exact", "similar", "composed", "random")
SIMILAR_MODES: tuple[str, ...] = ("best", "weighted")

WordSynsetFn = Callable[[str], str | None]

# Slack for floor(1/alpha - 1): 1/alpha is inexact in floating point (for alpha = 1/3 it may give
# 1.9999999999999996); over-estimating the radius only adds candidates that the exact check drops.
_RADIUS_SLACK = 1e-9


@dataclass(frozen=True)
class ClassMatch:
    """How one target class is initialised.

    ``rows`` index the vocabulary (= classifier columns); ``weights`` (same length, summing to 1)
    mix them. ``random`` matches have empty ``rows``. ``detail`` says which synsets were used / why.
    """

    class_name: str
    kind: str
    rows: tuple[int, ...]
    weights: tuple[float, ...]
    detail: str

    def __post_init__(self) -> None:
        if self.kind not in MATCH_KINDS:
            raise ValueError(f"kind must be one of {MATCH_KINDS}, got {self.kind!r}")
        if len(self.rows) != len(self.weights):
            raise ValueError("rows and weights must have the same length")
        if (self.kind == "random") != (not self.rows):
            raise ValueError("exactly the random matches have no rows")


# ------------------------------------------------------------------------------------------------
# WordNet helpers


def _wordnet() -> Any:
    from nltk.corpus import wordnet

    return wordnet


def synset_offset(synset_id: str) -> int:
    """WordNet noun offset of ``synset_id``: ``"n02084071"``, ``"n2084071"`` or ``"dog.n.01"``."""
    text = synset_id.strip()
    if re.fullmatch(r"n\d+", text):
        return int(text[1:])
    if re.fullmatch(r"[^.\s]+\.n\.\d+", text):
        return _wordnet().synset(text).offset()
    raise ValueError(f"not a noun synset id: {synset_id!r} (expected 'n<offset>' or 'word.n.NN')")


def _synset_id(synset: Any) -> str:
    """CoreNet's id for a synset: ``"n" + offset``, unpadded."""
    return f"n{synset.offset()}"


def _noun_synset(offset: int) -> Any | None:
    """The WordNet noun synset at ``offset``, or ``None`` if WordNet has none there."""
    from nltk.corpus.reader.wordnet import WordNetError

    try:
        return _wordnet().synset_from_pos_and_offset("n", offset)
    except WordNetError:
        return None


def _synset_name(synset_id: str) -> str:
    synset = _noun_synset(synset_offset(synset_id))
    return synset.name() if synset is not None else synset_id


@functools.cache
def _synset_extractor() -> Any:
    # Imported on first use only: the caption-label module is optional for users of this one.
    from pretrain.data.synsets.labels import SynsetExtractor

    return SynsetExtractor()


def _default_word_synset(word: str) -> str | None:
    return _synset_extractor().word_synset(word)


# ------------------------------------------------------------------------------------------------
# Target synsets of a class


def _scene_head(class_name: str) -> str:
    """Drop Places365-style decorations: a leading ``/a/`` and a ``/qualifier`` (``bazaar/indoor``).

    The qualifier refines the scene (indoor/outdoor, hockey/rodeo arena) and is mostly not a noun;
    the scene noun carries the synset, so ``church/indoor`` and ``church/outdoor`` start from the
    same column.
    """
    name = re.sub(r"^/[a-z]/", "", class_name.strip())
    return name.split("/", 1)[0]


def target_synsets(
    class_name: str, wnid: str | None = None, word_synset: WordSynsetFn | None = None
) -> list[str]:
    """Synset ids (``"n" + offset``) a class stands for; several ids mean a composed class.

    - ``wnid`` given (ImageNet): that synset.
    - else the whole name as one WordNet noun lemma (spaces -> underscores: ``golden retriever``,
      ``fire truck``): its first noun sense.
    - else one synset per word via ``word_synset`` (CoreNet's caption rule, so that the parts are
      named like the vocabulary): ``red sphere`` -> [red, sphere].

    Returns ``[]`` when a word has no synset: a class with an unmatched word (``archaeological
    excavation``, ``archaeological`` being an adjective) is left to random init as in the paper,
    instead of being silently reduced to its remaining nouns.
    """
    if wnid is not None:
        return [f"n{synset_offset(wnid)}"]
    name = _scene_head(class_name)
    words = [w for w in re.split(r"[\s_]+", name.strip().lower()) if w]
    if not words:
        return []
    senses = _wordnet().synsets("_".join(words), pos="n")
    if senses:
        return [_synset_id(senses[0])]
    word_synset = word_synset or _default_word_synset
    parts = [word_synset(word) for word in words]
    if any(part is None for part in parts):
        return []
    return [f"n{synset_offset(part)}" for part in parts]


# ------------------------------------------------------------------------------------------------
# Bounded search for similar synsets


def max_path_distance(alpha: float) -> int:
    """Largest hypernym path length ``d`` with ``1 / (d + 1) >= alpha``."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return math.floor(1.0 / alpha - 1.0 + _RADIUS_SLACK)


def _hypernyms(synset: Any) -> list[Any]:
    return synset.hypernyms() + synset.instance_hypernyms()


def _hyponyms(synset: Any) -> list[Any]:
    return synset.hyponyms() + synset.instance_hyponyms()


def _ancestor_distances(synset: Any, max_distance: int) -> dict[Any, int]:
    """Shortest upward distance to every (instance) hypernym within ``max_distance``, self at 0."""
    distances = {synset: 0}
    queue = deque([synset])
    while queue:
        node = queue.popleft()
        if distances[node] == max_distance:
            continue
        for parent in _hypernyms(node):
            if parent not in distances:
                distances[parent] = distances[node] + 1
                queue.append(parent)
    return distances


def synsets_within(synset: Any, max_distance: int) -> set[Any]:
    """All noun synsets whose NLTK shortest path distance to ``synset`` is ``<= max_distance``.

    NLTK's distance goes up from one synset to a common ancestor and down to the other, so: for each
    ancestor ``a`` at upward distance ``k``, breadth-first down the (instance) hyponyms for at most
    ``max_distance - k`` levels. Includes ``synset`` itself.
    """
    found: set[Any] = set()
    for ancestor, up in _ancestor_distances(synset, max_distance).items():
        budget = max_distance - up
        depth = {ancestor: 0}
        queue = deque([ancestor])
        while queue:
            node = queue.popleft()
            found.add(node)
            if depth[node] == budget:
                continue
            for child in _hyponyms(node):
                if child not in depth:
                    depth[child] = depth[node] + 1
                    queue.append(child)
    return found


def _similar_rows(
    target: Any, vocab_rows: dict[int, int], alpha: float, similar: str
) -> tuple[tuple[int, ...], tuple[float, ...], str] | None:
    """Vocabulary rows similar to ``target`` (excluding itself), their weights and a description."""
    scored = []
    for candidate in synsets_within(target, max_path_distance(alpha)):
        row = vocab_rows.get(candidate.offset())
        if row is None or candidate == target:
            continue
        score = target.path_similarity(candidate)
        if score is not None and score >= alpha:
            scored.append((row, score, candidate))
    if not scored:
        return None
    if similar == "best":
        best = max(score for _, score, _ in scored)
        scored = [item for item in scored if item[1] == best]
    scored.sort(key=lambda item: item[0])
    total = sum(score for _, score, _ in scored)
    rows = tuple(row for row, _, _ in scored)
    weights = tuple(score / total for _, score, _ in scored)
    detail = ", ".join(f"{synset.name()} ({score:.3f})" for _, score, synset in scored)
    return rows, weights, f"{target.name()} ~ {detail}"


# ------------------------------------------------------------------------------------------------
# Matching


def _vocabulary_rows(vocabulary: Sequence[str]) -> dict[int, int]:
    """Offset -> first vocabulary row holding it (padded and unpadded ids collapse)."""
    rows: dict[int, int] = {}
    for row, synset_id in enumerate(vocabulary):
        rows.setdefault(synset_offset(synset_id), row)
    return rows


def _match_synset(
    synset_id: str, vocab_rows: dict[int, int], alpha: float, similar: str
) -> tuple[str, tuple[int, ...], tuple[float, ...], str] | None:
    """Exact, else similar match of one synset; ``None`` when neither exists."""
    offset = synset_offset(synset_id)
    synset = _noun_synset(offset)
    name = synset.name() if synset is not None else synset_id
    if offset in vocab_rows:
        return "exact", (vocab_rows[offset],), (1.0,), name
    if synset is None:
        return None
    found = _similar_rows(synset, vocab_rows, alpha, similar)
    if found is None:
        return None
    return "similar", *found


def _mix_parts(
    parts: Iterable[tuple[tuple[int, ...], tuple[float, ...]]], count: int
) -> dict[int, float]:
    """Equal-weight mean of the parts' row mixtures, duplicate rows merged."""
    mixed: dict[int, float] = {}
    for rows, weights in parts:
        for row, weight in zip(rows, weights):
            mixed[row] = mixed.get(row, 0.0) + weight / count
    return mixed


def _match_one(
    class_name: str,
    wnid: str | None,
    vocab_rows: dict[int, int],
    alpha: float,
    similar: str,
    word_synset: WordSynsetFn | None,
) -> ClassMatch:
    synsets = target_synsets(class_name, wnid, word_synset)
    if not synsets:
        return ClassMatch(class_name, "random", (), (), "no WordNet noun synset for every word")
    if len(synsets) == 1:
        found = _match_synset(synsets[0], vocab_rows, alpha, similar)
        if found is None:
            detail = f"nothing within path similarity {alpha} of {_synset_name(synsets[0])}"
            return ClassMatch(class_name, "random", (), (), detail)
        return ClassMatch(class_name, *found)
    parts = [_match_synset(synset_id, vocab_rows, alpha, similar) for synset_id in synsets]
    missing = [_synset_name(s) for s, part in zip(synsets, parts) if part is None]
    if missing:
        detail = f"parts without a match: {', '.join(missing)}"
        return ClassMatch(class_name, "random", (), (), detail)
    mixed = _mix_parts(((part[1], part[2]) for part in parts), len(parts))
    rows = tuple(sorted(mixed))
    detail = " + ".join(f"[{part[0]}: {part[3]}]" for part in parts)
    return ClassMatch(class_name, "composed", rows, tuple(mixed[r] for r in rows), detail)


def match_classes(
    class_names: Sequence[str],
    vocabulary: Sequence[str],
    *,
    wnids: Sequence[str | None] | None = None,
    alpha: float = 0.5,
    word_synset: WordSynsetFn | None = None,
    similar: str = "best",
) -> list[ClassMatch]:
    """Match each target class to vocabulary synsets: exact > similar > composed > random.

    Args:
      class_names: the ``C`` downstream class names, in label order.
      vocabulary: the pretraining vocabulary's synset ids, in classifier-column order.
      wnids: optional per-class synset ids (ImageNet wnids, e.g. from :func:`imagenet2012_wnids`);
        ``None`` entries fall back to the class name.
      alpha: path-similarity threshold of the paper (``sim >= alpha`` means similar).
      word_synset: word -> synset id for the parts of multi-word names; default: CoreNet's rule in
        :mod:`pretrain.data.synsets.labels`.
      similar: ``"best"`` (only the most similar vocabulary synsets; ties averaged) or
        ``"weighted"`` (every synset ``>= alpha``, weights proportional to similarity).
    """
    if similar not in SIMILAR_MODES:
        raise ValueError(f"similar must be one of {SIMILAR_MODES}, got {similar!r}")
    max_path_distance(alpha)  # validates alpha before any work
    if wnids is not None and len(wnids) != len(class_names):
        raise ValueError(f"{len(wnids)} wnids for {len(class_names)} classes")
    vocab_rows = _vocabulary_rows(vocabulary)
    per_class_wnids = wnids if wnids is not None else [None] * len(class_names)
    return [
        _match_one(name, wnid, vocab_rows, alpha, similar, word_synset)
        for name, wnid in zip(class_names, per_class_wnids)
    ]


# ------------------------------------------------------------------------------------------------
# Classifier


def transfer_classifier(
    kernel: np.ndarray,
    bias: np.ndarray,
    matches: Sequence[ClassMatch],
    *,
    rng: np.random.Generator,
    random_std: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The downstream ``(W, C)`` kernel and ``(C,)`` bias from the pretrained ``(W, V)`` / ``(V,)``.

    Matched classes get the weighted mean of their columns and biases; ``random`` ones a
    ``N(0, random_std)`` column (default: the std of all pretrained kernel entries, so that they sit
    on the same scale as the transferred ones) and the mean pretrained bias.
    """
    kernel = np.asarray(kernel)
    bias = np.asarray(bias)
    if kernel.ndim != 2 or bias.shape != (kernel.shape[1],):
        raise ValueError(f"need kernel (W, V) and bias (V,), got {kernel.shape} and {bias.shape}")
    std = float(np.std(kernel)) if random_std is None else float(random_std)
    width = kernel.shape[0]
    new_kernel = np.empty((width, len(matches)), dtype=kernel.dtype)
    new_bias = np.empty((len(matches),), dtype=bias.dtype)
    for column, match in enumerate(matches):
        if match.kind == "random":
            new_kernel[:, column] = rng.normal(0.0, std, size=width)
            new_bias[column] = bias.mean()
            continue
        rows = np.asarray(match.rows)
        weights = np.asarray(match.weights, dtype=np.float64)
        new_kernel[:, column] = kernel[:, rows].astype(np.float64) @ weights
        new_bias[column] = bias[rows].astype(np.float64) @ weights
    return new_kernel, new_bias


# ------------------------------------------------------------------------------------------------
# Reporting


def summarize_matches(matches: Sequence[ClassMatch]) -> dict[str, int]:
    """Number of classes per match kind (all kinds present, zero if unused)."""
    counts = dict.fromkeys(MATCH_KINDS, 0)
    for match in matches:
        counts[match.kind] += 1
    return counts


def format_matches(matches: Sequence[ClassMatch], vocabulary: Sequence[str]) -> str:
    """A per-class table: class, kind, the vocabulary synsets used (with weights) or the reason."""
    lines = []
    for match in matches:
        if match.rows:
            used = ", ".join(
                f"{_synset_name(vocabulary[row])}*{weight:.2f}"
                for row, weight in zip(match.rows, match.weights)
            )
        else:
            used = f"- ({match.detail})"
        lines.append((match.class_name, match.kind, used))
    name_width = max([len("class"), *(len(line[0]) for line in lines)])
    kind_width = max(len(kind) for kind in MATCH_KINDS)
    header = f"{'class':<{name_width}}  {'kind':<{kind_width}}  synsets"
    body = [f"{name:<{name_width}}  {kind:<{kind_width}}  {used}" for name, kind, used in lines]
    return "\n".join([header, *body])


# ------------------------------------------------------------------------------------------------
# ImageNet-1k wnids


def imagenet2012_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in label order, read from the installed ``tensorflow_datasets``.

    TFDS's ``imagenet2012`` label names are these wnids (``n01440764`` = tench = label 0), in the
    order of :data:`pretrain.evaluate.imagenet_prompts.IMAGENET_CLASSNAMES`. The file is read
    directly, so TensorFlow/TFDS are not imported. Raises ``FileNotFoundError`` without TFDS.
    """
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("tensorflow_datasets is not installed; pass wnids yourself")
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    # The label file moved between TFDS versions.
    for relative in (
        "datasets/imagenet2012/labels.txt",
        "image_classification/imagenet2012_labels.txt",
    ):
        path = root / relative
        if path.is_file():
            wnids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
            if len(wnids) != 1000:
                raise ValueError(f"{path} holds {len(wnids)} labels, expected 1000")
            return wnids
    raise FileNotFoundError(f"no imagenet2012 label file under {root}")
