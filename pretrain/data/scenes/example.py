"""One example of the embedded data set: a pure function of a seed."""

from __future__ import annotations

from typing import Any

import numpy as np

from pretrain.data.scenes.captions import captions_for, synthetic_captions_for
from pretrain.data.scenes.geometry import SHAPES
from pretrain.data.scenes.render import render_scene
from pretrain.data.scenes.sampling import COLOURS, class_index, sample_scene

# Synthetic captions are drawn from their own random stream, so adding them changed no image or
# real caption.
_SYNTHETIC_STREAM = 17


def make_example(
    seed_or_rng: int | np.random.Generator, image_size: int = 64, dense: bool = False
) -> dict[str, Any]:
    """One example: a scene from the seed, its rendering, captions and labels.

    Returns ``image`` (S, S, 3) uint8, ``captions`` (list of str), ``synthetic_captions``
    (list of str, captioner-style), ``label`` (int, index into ``CLASS_NAMES``), ``primary``
    (dict: ``shape`` and ``colour`` indices, ``area`` — the fraction of pixels it covers — and
    ``centre`` — its (row, column) in [0, 1]), ``num_objects`` and ``seed`` (-1 when a generator
    was given). With ``dense`` also ``segmentation``, ``depth`` and ``normals`` as documented in
    :mod:`pretrain.data.scenes.render`.
    """
    if isinstance(seed_or_rng, np.random.Generator):
        rng, seed = seed_or_rng, -1
    else:
        seed = int(seed_or_rng)
        rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    rendered = render_scene(scene, image_size)
    primary = scene.objects[0]
    primary_mask = rendered["instances"] == 1
    rows, columns = np.nonzero(primary_mask)
    centre = (
        np.array([rows.mean() + 0.5, columns.mean() + 0.5]) / image_size
        if rows.size
        else np.full(2, np.nan)
    )
    example = {
        "seed": seed,
        "image": rendered["image"],
        "captions": captions_for(scene, rng),
        # Their own stream (a seed's), so that adding them changed no real caption.
        "synthetic_captions": synthetic_captions_for(
            scene, np.random.default_rng([seed, _SYNTHETIC_STREAM]) if seed >= 0 else rng
        ),
        "label": class_index(primary.colour, primary.shape),
        "primary": {
            "shape": SHAPES.index(primary.shape),
            "colour": COLOURS.index(primary.colour),
            "area": np.float32(primary_mask.mean()),
            "centre": centre.astype(np.float32),
        },
        "num_objects": len(scene.objects),
    }
    if dense:
        for key in ("segmentation", "depth", "normals"):
            example[key] = rendered[key]
    return example
