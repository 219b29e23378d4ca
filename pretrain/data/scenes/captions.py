"""Captions of a scene: varied real captions, captioner-style synthetic ones, zero-shot prompts.

Every caption names the primary object's colour and a noun for its shape (synonyms such as
ball/sphere, box/block/cube, ring/doughnut/torus); the nouns are ordinary English nouns found in
WordNet, so caption nouns map to synsets.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pretrain.data.scenes.geometry import Camera, Scene, SceneObject, projected_extent
from pretrain.data.scenes.sampling import pick

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

_GROUND_NOUNS = ("floor", "ground", "surface", "table", "plane")


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(rng: np.random.Generator, shape: str) -> str:
    nouns = SHAPE_NOUNS[shape]
    if len(nouns) == 1 or rng.random() < _CANONICAL_NOUN_PROBABILITY:
        return nouns[0]
    return nouns[1 + rng.integers(len(nouns) - 1)]


def _where(column: float, row: float, rng: np.random.Generator) -> str:
    """A phrase for an image position given as (column, row) fractions."""
    horizontal = "left" if column < 0.42 else "right" if column > 0.58 else ""
    vertical = "top" if row < 0.4 else "bottom" if row > 0.62 else ""
    if horizontal and vertical:
        return f"{pick(rng, ('at the', 'in the', 'near the'))} {vertical} {horizontal}"
    if horizontal:
        return pick(rng, (f"on the {horizontal}", f"on the {horizontal} side", f"at {horizontal}"))
    if vertical:
        return pick(rng, (f"near the {vertical}", f"at the {vertical}"))
    return pick(rng, ("in the center", "in the middle", "at the center"))


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
    size_word = pick(rng, ("", "", "large ", "big "))
    centre, _ = projected_extent(scene.camera, primary)
    others = [
        _with_article(
            f"{pick(rng, ('small', 'small', 'little', 'tiny'))} {o.colour} {_noun(rng, o.shape)}"
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
        "ground": f"{scene.ground_name} {pick(rng, _GROUND_NOUNS)}",
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
