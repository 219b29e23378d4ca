"""Procedural image-caption scenes: the project's built-in data set, made on the fly.

Each image shows one large *primary* object (a sphere, cube, cylinder, cone, pyramid or torus in
one of eight colours) standing on a tinted ground plane, with up to two small distractor objects.
The image's class is ``"<colour> <shape>"`` of the primary object: 8 x 6 = 48 classes, so zero-shot
chance is about 2%. Colour and shape stay visible at 64x64 pixels, so a small ViT trained for a few
minutes on two CPU cores learns them far above chance.

Every image comes with :data:`CAPTIONS_PER_IMAGE` captions of varied wording (synonyms such as
ball/sphere, box/block/cube, ring/doughnut/torus; optional sizes, positions, distractors, ground,
lighting; short and long sentence shapes). Shape nouns are ordinary English nouns found in
WordNet, so CatLIP can map caption nouns to synsets.

The renderer (:mod:`pretrain.data.scene_render`) is an exact analytic ray caster, so the same
scenes also give ground truth for dense tasks: semantic segmentation, depth and surface normals.

Everything is a pure function of a seed: ``make_example(seed)`` always gives the same example.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from pretrain.data.scene_render import (
    BACKGROUND_CLASS,
    FAR_DEPTH,
    PRIMITIVE_SHAPES,
    Camera,
    Light,
    Scene,
    SceneObject,
    bounding_radius,
    projected_extent,
    render_scene,
)

__all__ = [
    "BACKGROUND_CLASS",
    "CAPTIONS_PER_IMAGE",
    "CLASS_NAMES",
    "COLOURS",
    "COLOUR_RGB",
    "FAR_DEPTH",
    "SEGMENTATION_CLASS_NAMES",
    "SHAPES",
    "SHAPE_NOUNS",
    "SYNTHETIC_CAPTIONS_PER_IMAGE",
    "ZERO_SHOT_TEMPLATES",
    "Scene",
    "SceneObject",
    "captions_for",
    "class_index",
    "make_example",
    "render_scene",
    "sample_scene",
    "synthetic_captions_for",
]

SHAPES: tuple[str, ...] = PRIMITIVE_SHAPES

# Hues spread around the colour wheel (and pink lighter than red), so that colours stay
# distinguishable under shading, shadows and noise.
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.09),
    "orange": (0.98, 0.50, 0.04),
    "yellow": (0.96, 0.86, 0.10),
    "green": (0.14, 0.68, 0.18),
    "cyan": (0.08, 0.80, 0.86),
    "blue": (0.10, 0.22, 0.92),
    "purple": (0.52, 0.16, 0.78),
    "pink": (0.99, 0.50, 0.76),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)

CLASS_NAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]

# Segmentation class i (see scene_render): 0 is the background, 1 + k is SHAPES[k].
SEGMENTATION_CLASS_NAMES: tuple[str, ...] = ("background", *SHAPES)

# Nouns a caption may use for each shape; the first is the class name's noun and is used most
# often, so that zero-shot prompts built from CLASS_NAMES use the captions' commonest word.
# All are WordNet nouns (donut is a WordNet lemma of doughnut).
SHAPE_NOUNS: dict[str, tuple[str, ...]] = {
    "sphere": ("sphere", "ball"),
    "cube": ("cube", "box", "block"),
    "cylinder": ("cylinder", "drum", "can"),
    "cone": ("cone",),
    "pyramid": ("pyramid",),
    "torus": ("torus", "ring", "doughnut", "donut"),
}
_CANONICAL_NOUN_PROBABILITY = 0.6

# Short prompts for zero-shot classification. They use "the" rather than "a" before the class name,
# so "orange ..." never gets a wrong article; the captions use the same words (photo, rendering,
# picture, render, scene) so the text tower has seen them.
ZERO_SHOT_TEMPLATES: list[str] = [
    "a photo of the {}.",
    "a rendering of the {}.",
    "the {} in a scene.",
    "a 3d render of the {}.",
    "a picture of the {}.",
    "the {}.",
]

CAPTIONS_PER_IMAGE = 5

# Low-saturation grounds (named, for captions) keep the objects' colours the most salient thing.
_GROUNDS: dict[str, tuple[float, float, float]] = {
    "grey": (0.52, 0.52, 0.53),
    "light grey": (0.72, 0.72, 0.72),
    "dark grey": (0.30, 0.30, 0.32),
    "beige": (0.72, 0.66, 0.54),
    "white": (0.86, 0.86, 0.84),
    "brown": (0.45, 0.36, 0.28),
}
_GROUND_NOUNS = ("floor", "ground", "surface", "table", "plane")
_HAZES = ((0.82, 0.86, 0.92), (0.88, 0.88, 0.88), (0.92, 0.88, 0.80), (0.70, 0.76, 0.84))

# Sampling ranges (scene units: the primary object is about 2 units across, the camera 9 away).
_PRIMARY_SIZE = (1.0, 1.3)
_DISTRACTOR_SIZE = (0.32, 0.52)
_PRIMARY_AREA = ((-1.3, 1.3), (-1.4, 1.4))  # (x range, z range) of the primary's footprint
_DISTRACTOR_AREA = ((-3.2, 3.2), (-3.5, 2.5))
_MAX_DISTRACTORS = 2
# Pixel noise on a quarter of the images: some robustness, while clean renders keep the PNGs
# small (noise makes them four times larger).
_NOISE_PROBABILITY = 0.25
_PLACEMENT_TRIES = 30


def class_index(colour: str, shape: str) -> int:
    """Label of a ``colour`` ``shape`` primary object: its index in :data:`CLASS_NAMES`."""
    return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


# --------------------------------------------------------------------------------------------
# Scene sampling


def _sample_camera(rng: np.random.Generator) -> Camera:
    """A camera above and in front of the scene, looking down steeply enough (pitch > fov/2)
    that the ground fills the whole frame: no horizon, every pixel has a finite depth."""
    eye = (
        float(rng.uniform(-0.4, 0.4)),
        float(rng.uniform(4.3, 5.0)),
        float(rng.uniform(7.6, 8.4)),
    )
    target = (float(rng.uniform(-0.2, 0.2)), 0.5, float(rng.uniform(-0.2, 0.2)))
    return Camera(eye=eye, target=target, fov_degrees=float(rng.uniform(38.0, 42.0)))


def _sample_light(rng: np.random.Generator) -> Light:
    """Sun from the camera's side of the scene (so the visible faces are mostly lit)."""
    azimuth = float(rng.uniform(-0.45, 0.45)) * math.pi  # 0: from behind the camera
    elevation = float(rng.uniform(math.radians(35), math.radians(70)))
    direction = (
        math.cos(elevation) * math.sin(azimuth),
        math.sin(elevation),
        math.cos(elevation) * math.cos(azimuth),
    )
    return Light(
        direction=direction,
        intensity=float(rng.uniform(0.55, 0.75)),
        ambient=float(rng.uniform(0.35, 0.5)),
    )


def _jitter_rgb(rng: np.random.Generator, rgb, amount: float) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.clip(np.asarray(rgb) + rng.uniform(-amount, amount, 3), 0, 1))


def _sample_object(rng: np.random.Generator, size_range, area, shape=None, colour=None):
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or COLOURS[rng.integers(len(COLOURS))]
    if shape == "torus":
        # Tilt the ring's axis towards the camera (at +z), so its hole stays open in the image.
        tilt, yaw = float(rng.uniform(0.2, 0.7)), float(rng.uniform(-0.3, 0.3))
    else:
        tilt, yaw = 0.0, float(rng.uniform(0, 2 * math.pi))
    return SceneObject(
        shape=shape,
        colour=colour,
        rgb=_jitter_rgb(rng, COLOUR_RGB[colour], 0.04),
        size=float(rng.uniform(*size_range)),
        position=(float(rng.uniform(*area[0])), float(rng.uniform(*area[1]))),
        yaw=yaw,
        tilt=tilt,
    )


def _fits_in_frame(camera: Camera, obj: SceneObject, margin: float) -> bool:
    centre, radius = projected_extent(camera, obj)
    low, high = margin + radius, 1.0 - margin - radius
    return bool(np.all(centre >= low) and np.all(centre <= high))


def _footprints_apart(a: SceneObject, b: SceneObject) -> bool:
    gap = math.dist(a.position, b.position)
    return gap > bounding_radius(a) + bounding_radius(b) + 0.1


def _overlaps_primary(camera: Camera, primary: SceneObject, other: SceneObject) -> bool:
    """Whether the images of the two objects may overlap (in front of it or behind it).

    Bounding spheres overstate a shape's silhouette, so their image discs are shrunk a little.
    """
    (p_centre, p_radius), (o_centre, o_radius) = (
        projected_extent(camera, primary),
        projected_extent(camera, other),
    )
    return bool(np.linalg.norm(p_centre - o_centre) < 0.9 * (p_radius + o_radius))


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: camera, light, ground, one primary object and 0-2 distractors.

    The primary object is large and fully inside the frame; a distractor is small, has another
    colour, does not touch another object, and its image does not overlap the primary's (so a
    caption that mentions it is true, and the primary is seen whole).
    """
    camera = _sample_camera(rng)
    light = _sample_light(rng)
    ground_name = list(_GROUNDS)[rng.integers(len(_GROUNDS))]
    ground_rgb = _jitter_rgb(rng, _GROUNDS[ground_name], 0.03)
    haze_rgb = _jitter_rgb(rng, _HAZES[rng.integers(len(_HAZES))], 0.03)

    primary = _sample_object(rng, _PRIMARY_SIZE, _PRIMARY_AREA)
    for _ in range(_PLACEMENT_TRIES):
        if _fits_in_frame(camera, primary, margin=0.0):
            break
        primary = _sample_object(rng, _PRIMARY_SIZE, _PRIMARY_AREA, primary.shape, primary.colour)
    else:  # the bounding sphere is conservative: at the centre the object itself always fits
        primary = dataclasses.replace(primary, position=(0.0, 0.0))

    objects = [primary]
    for _ in range(rng.integers(_MAX_DISTRACTORS + 1)):
        for _ in range(_PLACEMENT_TRIES):
            colour = _pick(rng, [c for c in COLOURS if c != primary.colour])
            candidate = _sample_object(rng, _DISTRACTOR_SIZE, _DISTRACTOR_AREA, colour=colour)
            if (
                all(_footprints_apart(candidate, other) for other in objects)
                and _fits_in_frame(camera, candidate, margin=0.0)
                and not _overlaps_primary(camera, primary, candidate)
            ):
                objects.append(candidate)
                break

    return Scene(
        objects=tuple(objects),
        camera=camera,
        light=light,
        ground_rgb=ground_rgb,
        haze_rgb=haze_rgb,
        noise_std=float(rng.uniform(0.005, 0.02)) if rng.random() < _NOISE_PROBABILITY else 0.0,
        noise_seed=int(rng.integers(2**31)),
        ground_name=ground_name,
    )


# --------------------------------------------------------------------------------------------
# Captions


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(rng: np.random.Generator, shape: str) -> str:
    nouns = SHAPE_NOUNS[shape]
    if len(nouns) == 1 or rng.random() < _CANONICAL_NOUN_PROBABILITY:
        return nouns[0]
    return nouns[1 + rng.integers(len(nouns) - 1)]


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _where(column: float, row: float, rng: np.random.Generator) -> str:
    """A phrase for an image position given as (column, row) fractions."""
    horizontal = "left" if column < 0.42 else "right" if column > 0.58 else ""
    vertical = "top" if row < 0.4 else "bottom" if row > 0.62 else ""
    if horizontal and vertical:
        return f"{_pick(rng, ('at the', 'in the', 'near the'))} {vertical} {horizontal}"
    if horizontal:
        return _pick(rng, (f"on the {horizontal}", f"on the {horizontal} side", f"at {horizontal}"))
    if vertical:
        return _pick(rng, (f"near the {vertical}", f"at the {vertical}"))
    return _pick(rng, ("in the center", "in the middle", "at the center"))


def _relation(camera: Camera, primary: SceneObject, other: SceneObject) -> str:
    """Where ``other`` is relative to the primary, as a phrase ending in a reference to it."""
    (p_centre, _), (o_centre, _) = (
        projected_extent(camera, primary),
        projected_extent(camera, other),
    )
    offset = o_centre[0] - p_centre[0]
    if offset < -0.12:
        return "to its left"
    if offset > 0.12:
        return "to its right"
    return "behind it" if o_centre[1] < p_centre[1] else "in front of it"


def _caption_context(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    primary, distractors = scene.objects[0], scene.objects[1:]
    noun = _noun(rng, primary.shape)
    thing = f"{primary.colour} {noun}"
    size_word = _pick(rng, ("", "", "large ", "big "))
    centre, _ = projected_extent(scene.camera, primary)
    others = [
        _with_article(
            f"{_pick(rng, ('small', 'small', 'little', 'tiny'))} {o.colour} {_noun(rng, o.shape)}"
        )
        for o in distractors
    ]
    light_x = scene.light.direction[0]
    return {
        "thing": thing,
        "a_thing": _with_article(size_word + thing),
        "colour": primary.colour,
        "noun": noun,
        "a_noun": _with_article(noun),
        "a_colour": _with_article(primary.colour),
        "where": _where(float(centre[0]), float(centre[1]), rng),
        "ground": f"{scene.ground_name} {_pick(rng, _GROUND_NOUNS)}",
        "light_side": "left" if light_x < -0.3 else "right" if light_x > 0.3 else "front",
        "others": " and ".join(others),
        "other_rel": (
            f"{others[0]} {_relation(scene.camera, primary, distractors[0])}" if others else ""
        ),
        "count": ("one", "two", "three")[len(scene.objects) - 1],
        "n_smaller": ("no", "one smaller object", "two smaller objects")[len(distractors)],
    }


# Templates that need only the primary object; the second list mentions distractors.
_SOLO_TEMPLATES = (
    "{a_thing}.",
    "{thing}",
    "{a_thing} {where}.",
    "a photo of {a_thing}.",
    "a rendering of {a_thing} on a {ground}.",
    "a 3d render of {a_thing}.",
    "a picture of {a_thing} {where}.",
    "there is {a_thing} {where}.",
    "the {thing} sits {where}.",
    "{a_thing} resting on a {ground}.",
    "{a_thing} standing on a {ground}, lit from the {light_side}.",
    "the {noun} in this scene is {colour}.",
    "a simple scene with {a_thing}.",
    "a computer generated image of {a_thing} casting a shadow.",
    "{a_thing} seen from above.",
    "the main object is {a_thing}.",
    "{a_colour} object shaped like {a_noun}.",
    "a close-up of the {thing}.",
    "{colour} {noun} on a {ground}",
    "this picture shows {a_thing} {where}.",
)
_CROWD_TEMPLATES = (
    "{a_thing} next to {others}.",
    "{a_thing} beside {others} on a {ground}.",
    "{a_thing} {where}, with {other_rel}.",
    "a scene with {count} objects: {a_thing}, {others}.",
    "a large {thing} with {n_smaller} nearby.",
    "{others} near {a_thing}.",
    "{a_thing}, accompanied by {others}.",
    "the biggest object is {a_thing}; there is also {others}.",
)


def captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """:data:`CAPTIONS_PER_IMAGE` captions of the scene, from different templates.

    Every caption names the primary object's colour and a noun for its shape; wording, nouns,
    sizes and extras are drawn afresh for each caption.
    """
    templates = list(_SOLO_TEMPLATES)
    if len(scene.objects) > 1:
        templates += _CROWD_TEMPLATES
    chosen = rng.choice(len(templates), size=CAPTIONS_PER_IMAGE, replace=False)
    return [templates[i].format(**_caption_context(scene, rng)) for i in chosen]


# --------------------------------------------------------------------------------------------
# Synthetic captions (what an image captioner such as CoCa would write, as in DataCompDR)

SYNTHETIC_CAPTIONS_PER_IMAGE = 5  # DataCompDR stores five per image
# Drawn from their own random stream, so adding them changed no image or real caption.
_SYNTHETIC_STREAM = 17

# Captioner style: lower case, no final full stop, "a ... of ..." phrasing, descriptive words
# (material, lighting, viewpoint) that the real captions rarely use.
_SYNTHETIC_SOLO = (
    "{an_thing} sitting on top of a {ground}",
    "a close up of {an_thing} on a {ground}",
    "a 3d image of {an_thing} {where}",
    "an image of {an_thing} with a shadow on the {ground_noun}",
    "a shiny {thing} in a room",
    "{a_colour} colored {noun} on a {ground_colour} background",
    "a computer rendering of {an_thing}",
    "{an_thing} is shown {where} of the picture",
    "there is {an_thing} that is on the {ground_noun}",
    "{an_thing} that is lit from the {light_side}",
)
_SYNTHETIC_CROWD = (
    "{an_thing} and {others} on a {ground}",
    "a group of objects with {an_thing} in the middle",
    "{an_thing} next to {others}",
    "{count} objects on a {ground_noun}, the largest is {an_thing}",
)


def synthetic_captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """:data:`SYNTHETIC_CAPTIONS_PER_IMAGE` captioner-style captions of the scene.

    Like the real captions they are true of the scene (colour and a noun for the primary
    object's shape), but worded as an image captioner words them; DataCompDR pairs each web
    image with such captions (paper 000: "quality captions").
    """
    templates = list(_SYNTHETIC_SOLO)
    if len(scene.objects) > 1:
        templates += _SYNTHETIC_CROWD
    chosen = rng.choice(len(templates), size=SYNTHETIC_CAPTIONS_PER_IMAGE, replace=False)
    captions = []
    for i in chosen:
        context = _caption_context(scene, rng)
        ground_colour, _, ground_noun = context["ground"].rpartition(" ")
        context.update(
            an_thing=_with_article(context["thing"]),
            ground_noun=ground_noun,
            ground_colour=ground_colour,
            where=context["where"].replace("at the ", "in the ").replace("near the ", "in the "),
        )
        captions.append(templates[i].format(**context))
    return captions


# --------------------------------------------------------------------------------------------
# Examples


def make_example(
    seed_or_rng: int | np.random.Generator, image_size: int = 64, dense: bool = False
) -> dict[str, Any]:
    """One example: a scene from the seed, its rendering, captions and labels.

    Returns ``image`` (S, S, 3) uint8, ``captions`` (list of str), ``synthetic_captions``
    (list of str, captioner-style), ``label`` (int, index into
    :data:`CLASS_NAMES`), ``primary`` (dict: ``shape`` and ``colour`` indices, ``area`` — the
    fraction of pixels it covers — and ``centre`` — its (row, column) in [0, 1]), ``num_objects``
    and ``seed`` (-1 when a generator was given). With ``dense`` also ``segmentation``,
    ``depth`` and ``normals`` as documented in :mod:`pretrain.data.scene_render`.
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
