"""Image <-> text retrieval recall (R@1/5/10) and a one-pass image-text evaluator.

Retrieval scores are cosine similarities of L2-normalised embeddings. An image may have several
captions: ``text_to_image[j]`` is the index of the image that caption ``j`` describes.

- text -> image: caption ``j`` is a hit at k when its image ranks among the first k images.
- image -> text: image ``i`` is a hit at k when ANY of its captions ranks among the first k texts,
  i.e. its best-ranked caption has rank < k (the usual COCO / Flickr30k protocol, as in open_clip).

Ties are ranked deterministically, as a stable sort by decreasing similarity would: among equal
similarities the lower index (image index or caption index) comes first. So a correct item tied
with a lower-index wrong item loses the tie; recall under ties is the pessimistic one for items
with higher indices. All recalls are fractions in [0, 1].

:func:`evaluate_image_text` consumes an evaluation set once, embeds every image once, and reports
zero-shot accuracy and retrieval recall from the same image embeddings. Its input contract:

``examples`` is an iterable of batches; a batch is a mapping with

- ``'image'``: array ``(n, H, W, 3)``, passed as is to ``encode_image`` (uint8 from the data side);
- ``'label'``: ints ``(n,)``, the class ids; required when ``classnames`` is given (zero-shot);
- ``'captions'``: optional, a sequence of ``n`` entries, entry ``i`` holding image ``i``'s
  captions as either a sequence of ``str``/``bytes`` (tokenised here with ``tokenizer``), a single
  ``str``/``bytes``, or an integer token array ``(c_i, context_length)`` (already tokenised). An
  int array ``(n, c, context_length)`` also qualifies. Every image needs at least one caption.
  Either every batch has captions (retrieval is evaluated) or none has (retrieval is skipped).

Batch sizes may vary; images and caption tokens are re-batched into encoder calls of exactly
``batch_size`` rows (the final call padded), so jitted encoders compile once per tower. This is a
single-process evaluator: on several hosts, the caller's encode functions and data must present the
whole evaluation set to it (or the caller gathers embeddings and uses the lower-level functions).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pretrain.evaluate.imagenet_prompts import OPENAI_IMAGENET_TEMPLATES
from pretrain.evaluate.zeroshot import (
    Encode,
    EncodeImage,
    EncodeText,
    Template,
    Tokenizer,
    encode_padded,
    l2_normalize,
    rows_per_chunk,
    true_class_ranks,
    zero_shot_accuracy,
    zero_shot_classifier,
)


def _text_to_image_ranks(
    image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray
) -> np.ndarray:
    chunk = rows_per_chunk(image_embeds.shape[0])
    ranks = []
    for start in range(0, text_embeds.shape[0], chunk):
        scores = text_embeds[start : start + chunk] @ image_embeds.T
        ranks.append(true_class_ranks(scores, text_to_image[start : start + chunk]))
    return np.concatenate(ranks)


def _image_to_text_ranks(
    image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray
) -> np.ndarray:
    # An image's rank is that of its best caption: the first of its captions in the stable
    # descending order, i.e. highest similarity, and among equals the lowest caption index.
    chunk = rows_per_chunk(text_embeds.shape[0])
    ranks = []
    for start in range(0, image_embeds.shape[0], chunk):
        scores = image_embeds[start : start + chunk] @ text_embeds.T
        image_ids = np.arange(start, start + scores.shape[0])
        own = text_to_image[None, :] == image_ids[:, None]
        best_score = np.where(own, scores, -np.inf).max(axis=1, keepdims=True)
        # argmax of a boolean row is its first True: the lowest-index caption with the best score.
        best_caption = np.argmax(own & (scores == best_score), axis=1)
        ranks.append(true_class_ranks(scores, best_caption))
    return np.concatenate(ranks)


def retrieval_metrics(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways: keys ``'image_to_text_R@{k}'`` and ``'text_to_image_R@{k}'``.

    ``image_embeds (n_images, d)`` and ``text_embeds (n_texts, d)`` need not be normalised;
    ``text_to_image (n_texts,)`` maps each caption to its image, and every image must have at
    least one caption. Ties are ranked as the module docstring says.
    """
    image_embeds = l2_normalize(np.asarray(image_embeds, np.float32))
    text_embeds = l2_normalize(np.asarray(text_embeds, np.float32))
    text_to_image = np.asarray(text_to_image).astype(np.int64).reshape(-1)
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    if text_to_image.shape[0] != num_texts:
        raise ValueError(
            f"{num_texts} text embeddings but {text_to_image.shape[0]} text_to_image entries"
        )
    if num_images == 0 or num_texts == 0:
        raise ValueError("retrieval_metrics needs at least one image and one text")
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image must lie in [0, {num_images})")
    captions_per_image = np.bincount(text_to_image, minlength=num_images)
    if (captions_per_image == 0).any():
        missing = np.flatnonzero(captions_per_image == 0)
        raise ValueError(f"{missing.size} images have no caption (first: {missing[:5].tolist()})")

    image_ranks = _image_to_text_ranks(image_embeds, text_embeds, text_to_image)
    text_ranks = _text_to_image_ranks(image_embeds, text_embeds, text_to_image)
    metrics = {f"image_to_text_R@{k}": float(np.mean(image_ranks < k)) for k in ks}
    metrics.update({f"text_to_image_R@{k}": float(np.mean(text_ranks < k)) for k in ks})
    return metrics


class StreamingEmbedder:
    """Collects rows from batches of any size and encodes them in calls of exactly ``batch_size``.

    ``add`` encodes every complete batch at once and keeps fewer than ``batch_size`` rows pending;
    ``finish`` encodes the rest in one padded call and returns all embeddings ``(n, d)`` in order.
    """

    def __init__(self, encode: Encode, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._encode = encode
        self._batch_size = batch_size
        self._pending: list[np.ndarray] = []
        self._num_pending = 0
        self._embeddings: list[np.ndarray] = []

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.shape[0] == 0:
            return
        self._pending.append(rows)
        self._num_pending += rows.shape[0]
        if self._num_pending < self._batch_size:
            return
        pending = np.concatenate(self._pending, axis=0)
        num_full = (pending.shape[0] // self._batch_size) * self._batch_size
        for start in range(0, num_full, self._batch_size):
            batch = pending[start : start + self._batch_size]
            self._embeddings.append(encode_padded(self._encode, batch, self._batch_size))
        self._pending = [pending[num_full:]] if num_full < pending.shape[0] else []
        self._num_pending = pending.shape[0] - num_full

    def finish(self) -> np.ndarray:
        if self._pending:
            pending = np.concatenate(self._pending, axis=0)
            self._embeddings.append(encode_padded(self._encode, pending, self._batch_size))
            self._pending, self._num_pending = [], 0
        if not self._embeddings:
            raise ValueError("nothing was added to embed")
        return np.concatenate(self._embeddings, axis=0)


def _is_token_array(entry: Any) -> bool:
    return isinstance(entry, np.ndarray) and entry.dtype.kind in "iu"


def caption_tokens(
    captions: Sequence[Any], tokenizer: Tokenizer | None
) -> tuple[np.ndarray | None, np.ndarray]:
    """Tokens of a batch's captions, image after image, and the number of captions of each image.

    Entries follow the module docstring's ``'captions'`` contract. All string captions of the batch
    are tokenised in one ``tokenizer`` call. Returns ``(tokens, counts)``: tokens ``(m, L)`` int32
    (``None`` when the batch has no caption at all) and counts ``(n,)``.
    """
    blocks: list[np.ndarray | list[str | bytes]] = []
    for entry in captions:
        if _is_token_array(entry):
            blocks.append(entry.reshape(-1, entry.shape[-1]))
        elif isinstance(entry, str | bytes):
            blocks.append([entry])
        else:
            blocks.append(list(entry))
    strings = [text for block in blocks if isinstance(block, list) for text in block]
    if strings and tokenizer is None:
        raise ValueError("captions are strings but no tokenizer was given")
    string_tokens = np.asarray(tokenizer(strings)) if strings else None
    token_blocks, counts, next_string = [], [], 0
    for block in blocks:
        if isinstance(block, list):
            block = string_tokens[next_string : next_string + len(block)]
            next_string += block.shape[0]
        token_blocks.append(block)
        counts.append(block.shape[0])
    non_empty = [block for block in token_blocks if block.shape[0]]
    tokens = np.concatenate(non_empty, axis=0).astype(np.int32) if non_empty else None
    return tokens, np.asarray(counts, np.int64)


def evaluate_image_text(
    encode_image: EncodeImage,
    encode_text: EncodeText,
    tokenizer: Tokenizer | None,
    examples: Iterable[Mapping[str, Any]],
    classnames: Sequence[str] | None = None,
    templates: Sequence[Template] = OPENAI_IMAGENET_TEMPLATES,
    batch_size: int = 256,
    topk: Sequence[int] = (1, 5),
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Zero-shot accuracy and image<->text retrieval recall in one pass over ``examples``.

    Zero-shot runs when ``classnames`` is given (keys ``'zeroshot_top1'``, ``'zeroshot_top5'``);
    retrieval runs when the batches carry ``'captions'`` (keys ``'image_to_text_R@k'``,
    ``'text_to_image_R@k'``, and ``'num_texts'``). ``'num_images'`` is always reported. The input
    contract is the module docstring's. ``tokenizer`` may be ``None`` only when no string needs
    tokenising (no ``classnames``, captions given as tokens).
    """
    images = StreamingEmbedder(encode_image, batch_size)
    texts = StreamingEmbedder(encode_text, batch_size)
    labels: list[np.ndarray] = []
    text_to_image: list[np.ndarray] = []
    num_images = 0
    has_captions: bool | None = None
    for batch in examples:
        batch_images = np.asarray(batch["image"])
        n = batch_images.shape[0]
        images.add(batch_images)
        if classnames is not None:
            if "label" not in batch:
                raise ValueError("zero-shot evaluation (classnames given) needs 'label' in batches")
            batch_labels = np.asarray(batch["label"]).reshape(-1)
            if batch_labels.shape[0] != n:
                raise ValueError(f"batch has {n} images but {batch_labels.shape[0]} labels")
            labels.append(batch_labels)
        if has_captions is None:
            has_captions = "captions" in batch
        elif has_captions != ("captions" in batch):
            raise ValueError("either every batch has 'captions' or none has")
        if has_captions:
            tokens, counts = caption_tokens(batch["captions"], tokenizer)
            if counts.shape[0] != n:
                raise ValueError(f"batch has {n} images but {counts.shape[0]} caption lists")
            if tokens is not None:
                texts.add(tokens)
            text_to_image.append(np.repeat(np.arange(num_images, num_images + n), counts))
        num_images += n
    if num_images == 0:
        raise ValueError("evaluate_image_text got no images")
    image_embeds = images.finish()

    results: dict[str, float] = {"num_images": float(num_images)}
    if classnames is not None:
        if tokenizer is None:
            raise ValueError("zero-shot evaluation needs a tokenizer for the class prompts")
        classifier = zero_shot_classifier(encode_text, tokenizer, classnames, templates, batch_size)
        accuracy = zero_shot_accuracy(image_embeds, np.concatenate(labels), classifier, topk)
        results.update({f"zeroshot_{name}": value for name, value in accuracy.items()})
    if has_captions:
        all_text_to_image = np.concatenate(text_to_image)
        if all_text_to_image.size == 0:
            raise ValueError("batches carry 'captions' but every caption list is empty")
        results.update(retrieval_metrics(image_embeds, texts.finish(), all_text_to_image, ks))
        results["num_texts"] = float(all_text_to_image.size)
    return results
