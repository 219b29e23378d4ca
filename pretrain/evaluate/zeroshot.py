"""Zero-shot classification for two-tower (image, text) models, in NumPy on the host.

The evaluator never imports a model or the trainer: a task hands it two callables,

- ``encode_text(tokens)``: int32 tokens ``(n, context_length)`` -> float embeddings ``(n, d)``;
- ``encode_image(images)``: images ``(n, H, W, 3)`` (uint8 as the data side delivers them) ->
  float embeddings ``(n, d)``;

and the callable owns jit, sharding and preprocessing. The evaluator only promises to call each one
with a constant leading size (``batch_size``) so that a jitted encoder compiles once: short batches
are padded by repeating their last row, and the padding rows' embeddings are dropped.

Semantics follow open_clip (``build_zero_shot_classifier`` / ``zero_shot_eval``):

- class embedding = L2-normalise( mean over templates of L2-normalise(encode_text(template(c))) );
- logits = 100 * L2-normalise(image embedding) @ classifier.T.

Ranks are deterministic under ties: classes are ordered by decreasing score, equal scores by
increasing class id (a stable sort). The true class therefore ranks
``#{c: s_c > s_y} + #{c < y: s_c == s_y}``, and a sample counts as top-k correct when that rank is
below k. This is the pessimistic choice for the true class whenever a lower-id class ties with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

EncodeText = Callable[[np.ndarray], np.ndarray]
EncodeImage = Callable[[np.ndarray], np.ndarray]
Encode = Callable[[np.ndarray], np.ndarray]
# list of n strings -> int32 array (n, context_length), e.g. pretrain.data.tokenizer.ClipTokenizer.
Tokenizer = Callable[[list[str]], np.ndarray]
# A template is a str.format string with one "{}" slot, or a callable classname -> prompt.
Template = str | Callable[[str], str]

ZERO_SHOT_LOGIT_SCALE = 100.0
# open_clip's F.normalize clamps the norm from below at 1e-12: a zero vector stays zero, no NaN.
_NORM_EPS = 1e-12
# Rows of a similarity matrix scored at once: bounds host memory to ~64 MiB of float32 per chunk.
_SIMILARITY_CHUNK_ELEMENTS = 1 << 24


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x / max(||x||, 1e-12)`` along ``axis`` (open_clip's ``F.normalize``)."""
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, _NORM_EPS)


def _pad_to_batch(inputs: np.ndarray, batch_size: int) -> np.ndarray:
    # Repeating a real row (rather than zeros) keeps the padding a valid input for any encoder.
    missing = batch_size - inputs.shape[0]
    if missing == 0:
        return inputs
    return np.concatenate([inputs, np.repeat(inputs[-1:], missing, axis=0)], axis=0)


def encode_padded(encode: Encode, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Encode ``1 <= n <= batch_size`` rows in one call of leading size ``batch_size``.

    Returns the ``n`` real rows' embeddings as float32 (padding rows dropped).
    """
    num_real = inputs.shape[0]
    if not 0 < num_real <= batch_size:
        raise ValueError(f"need 1..{batch_size} rows, got {num_real}")
    embeddings = np.asarray(encode(_pad_to_batch(inputs, batch_size)))
    if embeddings.ndim != 2 or embeddings.shape[0] != batch_size:
        raise ValueError(
            f"encoder must map a batch of {batch_size} inputs to ({batch_size}, d) embeddings, "
            f"got shape {embeddings.shape}"
        )
    return embeddings[:num_real].astype(np.float32)


def embed_in_batches(encode: Encode, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Embed ``inputs`` ``(n, ...)`` with calls of constant leading size ``batch_size``.

    The last batch is padded by repeating its last row; padding rows are dropped, so the result is
    ``(n, d)`` float32 in input order. A sharded encoder needs ``batch_size`` divisible by its
    number of data shards; that is the caller's choice of ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    inputs = np.asarray(inputs)
    if inputs.shape[0] == 0:
        raise ValueError("embed_in_batches got no inputs: the embedding width is unknown")
    chunks = [
        encode_padded(encode, inputs[start : start + batch_size], batch_size)
        for start in range(0, inputs.shape[0], batch_size)
    ]
    return np.concatenate(chunks, axis=0)


def format_prompt(template: Template, classname: str) -> str:
    """The prompt of ``classname`` under ``template`` (a ``"{}"`` format string or a callable)."""
    return template.format(classname) if isinstance(template, str) else template(classname)


def zero_shot_classifier(
    encode_text: EncodeText,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template],
    batch_size: int = 256,
) -> np.ndarray:
    """Zero-shot classifier weights ``(num_classes, d)`` float32, rows L2-normalised.

    Row ``c`` = normalise(mean over templates t of normalise(encode_text(tokenizer(t(c))))). The
    ``num_classes * num_templates`` prompts are tokenised and encoded ``batch_size`` at a time and
    summed per class on the fly, so memory stays ``O(batch_size + num_classes)`` rows even for
    ImageNet's 80,000 prompts.
    """
    if not classnames or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    num_templates = len(templates)
    num_prompts = len(classnames) * num_templates
    class_sums: np.ndarray | None = None
    for start in range(0, num_prompts, batch_size):
        prompt_ids = np.arange(start, min(start + batch_size, num_prompts))
        # Prompt p is template p % T applied to class p // T: class-major, as open_clip orders them.
        class_ids = prompt_ids // num_templates
        prompts = [
            format_prompt(templates[p % num_templates], classnames[p // num_templates])
            for p in prompt_ids
        ]
        tokens = np.asarray(tokenizer(prompts))
        embeddings = l2_normalize(encode_padded(encode_text, tokens, batch_size).astype(np.float64))
        if class_sums is None:
            class_sums = np.zeros((len(classnames), embeddings.shape[1]), np.float64)
        np.add.at(class_sums, class_ids, embeddings)
    # The mean's 1/T factor cancels in the normalisation; kept so the code reads like the formula.
    return l2_normalize(class_sums / num_templates).astype(np.float32)


def zero_shot_logits(
    image_embeds: np.ndarray, classifier: np.ndarray, logit_scale: float = ZERO_SHOT_LOGIT_SCALE
) -> np.ndarray:
    """``logit_scale * normalise(image_embeds) @ classifier.T``: ``(n, num_classes)`` float32."""
    cosines = l2_normalize(np.asarray(image_embeds, np.float32)) @ classifier.T
    return (logit_scale * cosines).astype(np.float32)


def true_class_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of ``targets[i]`` in row ``scores[i]`` under the stable descending order.

    ``rank = #{j: s_j > s_t} + #{j < t: s_j == s_t}``: ties go to the lower column index, which is
    where a stable descending sort would put it. Shapes: ``scores (n, m)``, ``targets (n,)`` ints.
    """
    rows = np.arange(scores.shape[0])
    target_scores = scores[rows, targets][:, None]
    lower_index = np.arange(scores.shape[1])[None, :] < targets[:, None]
    beaten_by = (scores > target_scores) | ((scores == target_scores) & lower_index)
    return beaten_by.sum(axis=1)


def rows_per_chunk(num_columns: int) -> int:
    """Rows of a ``(rows, num_columns)`` score matrix to compute at once (~64 MiB of float32)."""
    return max(1, _SIMILARITY_CHUNK_ELEMENTS // max(num_columns, 1))


def zero_shot_accuracy(
    image_embeds: np.ndarray,
    labels: np.ndarray,
    classifier: np.ndarray,
    topk: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracies ``{'top1': ..., 'top5': ...}`` as fractions in [0, 1].

    ``image_embeds (n, d)`` need not be normalised; ``classifier (num_classes, d)`` is used as given
    (from :func:`zero_shot_classifier`). Classes are ranked by the zero-shot logits; ties are ranked
    as the module docstring says.
    """
    image_embeds = np.asarray(image_embeds, np.float32)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    classifier = np.asarray(classifier, np.float32)
    if image_embeds.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_embeds.shape[0]} image embeddings but {labels.shape[0]} labels")
    if labels.size == 0:
        raise ValueError("zero_shot_accuracy got no images")
    if labels.min() < 0 or labels.max() >= classifier.shape[0]:
        raise ValueError(
            f"labels must lie in [0, {classifier.shape[0]}), got {labels.min()}..{labels.max()}"
        )
    chunk = rows_per_chunk(classifier.shape[0])
    ranks = np.concatenate(
        [
            # Ranked on cosines: the positive logit scale changes no order, and multiplying by 100
            # in float32 could round two neighbouring scores into a tie.
            true_class_ranks(
                zero_shot_logits(image_embeds[s : s + chunk], classifier, logit_scale=1.0),
                labels[s : s + chunk],
            )
            for s in range(0, labels.shape[0], chunk)
        ]
    )
    return {f"top{k}": float(np.mean(ranks < k)) for k in topk}
