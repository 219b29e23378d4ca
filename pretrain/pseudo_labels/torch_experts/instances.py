"""Instance masks -> one semantic class map (NumPy only: the torch-side Mask R-CNN expert and the
JAX-side tests both import this file by path).

Classes: Mask R-CNN trained on COCO predicts COCO's 91 category ids (0 = background, 1..90 with
ten ids unused: 12, 26, 29, 30, 45, 66, 68, 69, 71, 83). The class map numbers COCO's 80 "thing"
categories 1..80 in category-id order (``COCO_THING_NAMES[k - 1]`` is class ``k``: 1 person,
2 bicycle, ..., 80 toothbrush) and 0 = background (no kept instance covers the pixel).

The rule (:func:`semantic_from_instances`): an instance is kept when its score is at least
``score_threshold`` and its category is one of the 80; it covers the pixels where its mask
probability is at least ``mask_threshold``. Where kept instances overlap, ``overlap`` decides:
``"score"`` = the higher-scoring instance wins (Mask R-CNN's own confidence), ``"smaller"`` = the
instance with fewer covered pixels is drawn on top (the usual panoptic conversion, which keeps
small objects in front of the large ones they sit on). Ties keep the earlier instance.
"""

from __future__ import annotations

import numpy as np

# COCO's 80 thing categories: their ids among the 91 and their names, in id order.
COCO_THING_IDS: tuple[int, ...] = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)
COCO_THING_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
BACKGROUND = 0
NUM_CLASSES = 1 + len(COCO_THING_IDS)  # background + 80
OVERLAP_RULES = ("score", "smaller")

# COCO category id (0..90) -> contiguous class (1..80); 0 for background and the unused ids.
_CATEGORY_TO_CLASS = np.zeros(91, np.int32)
_CATEGORY_TO_CLASS[list(COCO_THING_IDS)] = np.arange(1, len(COCO_THING_IDS) + 1)


def coco_category_to_class(category_ids: np.ndarray) -> np.ndarray:
    """COCO category ids (0..90) -> classes 1..80, 0 where the id is no thing category (also out
    of range ids, which a checkpoint with another head could produce)."""
    ids = np.asarray(category_ids, np.int64)
    inside = (ids >= 0) & (ids < len(_CATEGORY_TO_CLASS))
    return np.where(inside, _CATEGORY_TO_CLASS[np.clip(ids, 0, 90)], 0).astype(np.int32)


def semantic_from_instances(
    masks: np.ndarray,
    category_ids: np.ndarray,
    scores: np.ndarray,
    *,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap: str = "score",
) -> np.ndarray:
    """The (H, W) int32 class map of instances ``masks`` (N, H, W) (probabilities in [0, 1]),
    with their COCO ``category_ids`` (N,) and ``scores`` (N,); N may be 0 (all background)."""
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"overlap must be one of {OVERLAP_RULES}, got {overlap!r}")
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    classes = coco_category_to_class(category_ids)
    scores = np.asarray(scores, np.float64)
    if not len(classes) == len(scores) == len(masks):
        raise ValueError(
            f"{len(masks)} masks, {len(classes)} category ids and {len(scores)} scores differ"
        )
    covered = masks >= mask_threshold
    kept = np.flatnonzero((scores >= score_threshold) & (classes > 0))
    # The drawing order: the instance that must win a pixel is drawn last. A stable sort on the
    # reversed key keeps ties in input order (the earlier instance drawn last wins).
    if overlap == "score":
        key = scores[kept]
    else:
        key = -covered[kept].sum(axis=(1, 2)).astype(np.float64)
    order = kept[::-1][np.argsort(key[::-1], kind="stable")]
    semantic = np.full(masks.shape[1:], BACKGROUND, np.int32)
    for index in order:
        semantic[covered[index]] = classes[index]
    return semantic
