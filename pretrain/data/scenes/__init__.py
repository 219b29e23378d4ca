"""The embedded data set: procedural 3-D scenes with captions, made from seeds on the fly.

Each image shows a large primary object of one of 6 shapes in one of 8 colours (its class,
"<colour> <shape>", 48 classes) on a tinted ground, with up to two small distractors, and comes
with varied captions and captioner-style synthetic ones. The renderer is an exact analytic ray
caster, so the scenes also give dense ground truth (segmentation, depth, surface normals).
Everything is a pure function of a seed: ``make_example(seed)`` always gives the same example.

Modules: ``geometry`` (what a scene is), ``primitives`` (ray intersections), ``render``,
``sampling`` (drawing a scene, the classes), ``captions``, ``example`` (one example) and
``builder`` (the TFDS data set ``synthetic_scenes`` on disk; imports TFDS, so not imported here).
"""

from pretrain.data.scenes.captions import (
    CAPTIONS_PER_IMAGE,
    SHAPE_NOUNS,
    SYNTHETIC_CAPTIONS_PER_IMAGE,
    ZERO_SHOT_TEMPLATES,
    captions_for,
    synthetic_captions_for,
)
from pretrain.data.scenes.example import make_example
from pretrain.data.scenes.geometry import SHAPES
from pretrain.data.scenes.render import render_scene
from pretrain.data.scenes.sampling import CLASS_NAMES, COLOURS, class_index, sample_scene

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "CLASS_NAMES",
    "COLOURS",
    "SHAPES",
    "SHAPE_NOUNS",
    "SYNTHETIC_CAPTIONS_PER_IMAGE",
    "ZERO_SHOT_TEMPLATES",
    "captions_for",
    "class_index",
    "make_example",
    "render_scene",
    "sample_scene",
    "synthetic_captions_for",
]
