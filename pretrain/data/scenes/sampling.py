"""Draws a scene from a random generator: camera, light, ground, a primary object, distractors.

Each image shows one large *primary* object (a sphere, cube, cylinder, cone, pyramid or torus in
one of eight colours) standing on a tinted ground plane, with up to two small distractor objects.
The image's class is ``"<colour> <shape>"`` of the primary object: 8 x 6 = 48 classes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pretrain.data.scenes.geometry import (
    SHAPES,
    Camera,
    Light,
    Scene,
    SceneObject,
    bounding_radius,
    projected_extent,
)

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


# Low-saturation grounds (named, for captions) keep the objects' colours the most salient thing.
_GROUNDS: dict[str, tuple[float, float, float]] = {
    "grey": (0.52, 0.52, 0.53),
    "light grey": (0.72, 0.72, 0.72),
    "dark grey": (0.30, 0.30, 0.32),
    "beige": (0.72, 0.66, 0.54),
    "white": (0.86, 0.86, 0.84),
    "brown": (0.45, 0.36, 0.28),
}
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


def pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


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
            colour = pick(rng, [c for c in COLOURS if c != primary.colour])
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
