"""Tests of the procedural scenes: sampling, the exact renderer, captions and the TFDS builder.

The renderer is checked against independent formulas: a hand-worked sphere and cube in front of a
level camera, and, for every shape in sampled scenes, implicit-surface functions written here
(hit points lie on the surface, normals are their gradients, no ray passes through a solid before
the reported hit, background rays cross no solid at all).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from pretrain.data import scenes
from pretrain.data.scenes import geometry, render
from pretrain.data.scenes.geometry import Camera, Light, Scene, SceneObject

LEVEL_CAMERA = Camera(eye=(0.0, 1.0, 10.0), target=(0.0, 1.0, 0.0), fov_degrees=40.0)
LIGHT = Light(direction=(0.3, 0.8, 0.5), intensity=0.6, ambient=0.4)


def single_object_scene(obj: SceneObject, camera: Camera = LEVEL_CAMERA) -> Scene:
    return Scene(
        objects=(obj,),
        camera=camera,
        light=LIGHT,
        ground_rgb=(0.5, 0.5, 0.5),
        haze_rgb=(0.8, 0.8, 0.8),
    )


def camera_frame_rays(camera: Camera, size: int) -> np.ndarray:
    """(S, S, 3) unit directions through pixel centres, camera frame (x right, y up, -z ahead)."""
    half = math.tan(math.radians(camera.fov_degrees) / 2)
    centres = ((np.arange(size) + 0.5) / size * 2 - 1) * half
    x, y = np.meshgrid(centres, -centres)
    rays = np.stack([x, y, -np.ones_like(x)], axis=-1)
    return rays / np.linalg.norm(rays, axis=-1, keepdims=True)


def look_at(camera: Camera) -> np.ndarray:
    forward = np.subtract(camera.target, camera.eye)
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right = right / np.linalg.norm(right)
    return np.stack([right, np.cross(right, forward), -forward], axis=1)


def implicit(obj: SceneObject, q: np.ndarray) -> np.ndarray:
    """A function of local points (..., 3): < 0 inside, 0 on the surface, its gradient there the
    outward normal (a signed distance, or a max of signed distances to the faces)."""
    y, s, rho = q[..., 1], obj.size, np.hypot(q[..., 0], q[..., 2])
    if obj.shape == "sphere":
        return np.linalg.norm(q, axis=-1) - s
    if obj.shape == "cube":
        return np.max(np.abs(q), axis=-1) - geometry.CUBE_HALF_EDGE * s
    if obj.shape == "cylinder":
        radius, half = geometry.CYLINDER_RADIUS * s, geometry.CYLINDER_HALF_HEIGHT * s
        return np.maximum(rho - radius, np.abs(y) - half)
    if obj.shape == "cone":
        radius, half = geometry.CONE_RADIUS * s, geometry.CONE_HALF_HEIGHT * s
        slope = radius / (2 * half)
        side = (rho - slope * (half - y)) / math.sqrt(1 + slope**2)
        return np.maximum(side, -(y + half))
    if obj.shape == "pyramid":
        width, half = geometry.PYRAMID_HALF_WIDTH * s, geometry.PYRAMID_HALF_HEIGHT * s
        apex = np.array([0.0, half, 0.0])
        corners = [
            np.array([cx * width, -half, cz * width])
            for cx, cz in ((1, 1), (1, -1), (-1, -1), (-1, 1))
        ]
        values = [-(y + half)]
        for a, b in zip(corners, corners[1:] + corners[:1]):
            normal = np.cross(a - apex, b - apex)
            normal = normal / np.linalg.norm(normal)
            assert normal @ (apex - np.array([0.0, 0.0, 0.0])) > 0  # outward
            values.append(q @ normal - normal @ apex)
        return np.max(values, axis=0)
    if obj.shape == "torus":
        major, minor = geometry.TORUS_MAJOR * s, geometry.TORUS_MINOR * s
        return np.hypot(rho - major, y) - minor
    raise AssertionError(obj.shape)


def world_implicit(obj: SceneObject, points: np.ndarray) -> np.ndarray:
    rotation = geometry.object_rotation(obj)
    return implicit(obj, (points - geometry.object_centre(obj)) @ rotation)


def numeric_gradient(obj: SceneObject, points: np.ndarray, step: float = 1e-6) -> np.ndarray:
    columns = []
    for axis in range(3):
        offset = np.zeros(3)
        offset[axis] = step
        columns.append(world_implicit(obj, points + offset) - world_implicit(obj, points - offset))
    gradient = np.stack(columns, axis=-1)
    return gradient / np.linalg.norm(gradient, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Sampling


def test_sample_scene_is_deterministic_per_seed():
    first = scenes.sample_scene(np.random.default_rng(123))
    again = scenes.sample_scene(np.random.default_rng(123))
    other = scenes.sample_scene(np.random.default_rng(124))
    assert first == again
    assert first != other


def test_make_example_is_deterministic_per_seed():
    a, b = scenes.make_example(7, 32, dense=True), scenes.make_example(7, 32, dense=True)
    c = scenes.make_example(8, 32)
    for key in ("image", "segmentation", "depth", "normals"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["captions"] == b["captions"] and a["label"] == b["label"] and a["seed"] == 7
    assert not np.array_equal(a["image"], c["image"])


def test_class_names_cover_every_colour_and_shape():
    assert len(scenes.CLASS_NAMES) == len(scenes.COLOURS) * len(scenes.SHAPES) == 48
    assert len(set(scenes.CLASS_NAMES)) == 48
    for colour in scenes.COLOURS:
        for shape in scenes.SHAPES:
            assert scenes.CLASS_NAMES[scenes.class_index(colour, shape)] == f"{colour} {shape}"
    assert all(t.count("{}") == 1 for t in scenes.ZERO_SHOT_TEMPLATES)
    assert len(scenes.SHAPES) >= 6 and len(scenes.COLOURS) == 8


def test_objects_rest_on_the_ground():
    """The lowest point of every solid (found on a fine grid) is at y = 0."""
    rng = np.random.default_rng(0)
    for shape in scenes.SHAPES:
        obj = SceneObject(
            shape,
            "red",
            (1, 0, 0),
            size=1.1,
            position=(0.3, -0.2),
            yaw=float(rng.uniform(0, 6)),
            tilt=0.5 if shape == "torus" else 0.0,
        )
        grid = np.linspace(-2.5, 2.5, 81)
        points = np.stack(np.meshgrid(grid + 0.3, grid + 2.4, grid - 0.2), axis=-1)
        inside = world_implicit(obj, points.reshape(-1, 3)) < 0
        lowest = points.reshape(-1, 3)[inside, 1].min()
        assert 0.0 <= lowest < grid[1] - grid[0], (shape, lowest)


# --------------------------------------------------------------------------------------------
# Renderer: hand-worked cases


def test_sphere_depth_normals_and_mask_match_the_analytic_formula():
    size = 33  # odd: the centre pixel's ray is the optical axis
    sphere = SceneObject("sphere", "red", (0.9, 0.1, 0.1), size=1.0, position=(0.0, 0.0))
    out = scenes.render_scene(single_object_scene(sphere), size)

    # A level camera at (0, 1, 10) looking at -z: camera frame = world frame.
    rays = camera_frame_rays(LEVEL_CAMERA, size)
    origin = np.array([0.0, 1.0, 10.0]) - np.array([0.0, 1.0, 0.0])  # eye - sphere centre
    half_b = rays @ origin
    discriminant = half_b**2 - (origin @ origin - 1.0)
    hit = discriminant >= 0
    t = -half_b - np.sqrt(np.where(hit, discriminant, 0.0))
    normal = (origin + t[..., None] * rays) / 1.0

    assert out["depth"][16, 16] == pytest.approx(9.0, abs=1e-6)
    np.testing.assert_allclose(out["normals"][16, 16], [0.0, 0.0, 1.0], atol=1e-7)
    np.testing.assert_array_equal(out["segmentation"] == 1, hit)  # 1 + SHAPES.index("sphere")
    np.testing.assert_allclose(out["depth"][hit], t[hit], rtol=1e-6)
    np.testing.assert_allclose(out["normals"][hit], normal[hit], atol=1e-6)

    # Everything else: ground (y = 0, one unit below the eye) below the horizon, sky above.
    ground = ~hit & (rays[..., 1] < 0)
    sky = ~hit & ~ground
    np.testing.assert_allclose(out["depth"][ground], -1.0 / rays[ground][:, 1], rtol=1e-6)
    np.testing.assert_allclose(
        out["normals"][ground], np.broadcast_to([0, 1, 0], (ground.sum(), 3))
    )
    assert np.all(out["depth"][sky] == render.FAR_DEPTH)
    np.testing.assert_allclose(out["normals"][sky], np.broadcast_to([0, 0, 1], (sky.sum(), 3)))
    assert np.all(out["segmentation"][~hit] == render.BACKGROUND_CLASS)
    np.testing.assert_allclose(np.linalg.norm(out["normals"], axis=-1), 1.0, atol=1e-6)

    # The image: the sphere's pixels have its red hue, the rest is grey ground or haze.
    image = out["image"].astype(int)
    assert np.all(image[hit][:, 0] > image[hit][:, 1])
    assert np.all(np.ptp(image[~hit], axis=-1) <= 1)


def test_cube_front_face_matches_hand_computation():
    """A cube facing a level camera at its centre's height shows only its front face z = a."""
    size, half_edge = 41, geometry.CUBE_HALF_EDGE * 1.0
    camera = Camera(eye=(0.0, half_edge, 8.0), target=(0.0, half_edge, 0.0), fov_degrees=30.0)
    cube = SceneObject("cube", "blue", (0.1, 0.2, 0.9), size=1.0, position=(0.0, 0.0), yaw=0.0)
    out = scenes.render_scene(single_object_scene(cube, camera), size)

    rays = camera_frame_rays(camera, size)
    t = (8.0 - half_edge) / -rays[..., 2]  # to the plane z = a
    x, y = t * rays[..., 0], t * rays[..., 1]  # relative to the face's centre
    on_face = (np.abs(x) <= half_edge) & (np.abs(y) <= half_edge)
    cube_class = 1 + scenes.SHAPES.index("cube")
    np.testing.assert_array_equal(out["segmentation"] == cube_class, on_face)
    np.testing.assert_allclose(out["depth"][on_face], t[on_face], rtol=1e-6)
    np.testing.assert_allclose(
        out["normals"][on_face], np.broadcast_to([0, 0, 1], (on_face.sum(), 3))
    )


# --------------------------------------------------------------------------------------------
# Renderer: every shape against implicit surfaces


def scene_with_shapes(seed: int) -> Scene:
    """A sampled scene whose primary object is each shape in turn."""
    scene = scenes.sample_scene(np.random.default_rng(seed))
    shape = scenes.SHAPES[seed % len(scenes.SHAPES)]
    primary = scene.objects[0]
    tilt = 0.5 if shape == "torus" else 0.0
    return Scene(
        objects=(
            SceneObject(
                shape,
                primary.colour,
                primary.rgb,
                primary.size,
                primary.position,
                primary.yaw,
                tilt,
            ),
            *scene.objects[1:],
        ),
        camera=scene.camera,
        light=scene.light,
        ground_rgb=scene.ground_rgb,
        haze_rgb=scene.haze_rgb,
    )


@pytest.mark.parametrize("seed", range(12))
def test_render_matches_implicit_surfaces(seed):
    size = 40
    scene = scene_with_shapes(seed)
    out = scenes.render_scene(scene, size)
    rotation = look_at(scene.camera)
    np.testing.assert_allclose(scene.camera.camera_to_world(), rotation, atol=1e-12)
    rays_camera = camera_frame_rays(scene.camera, size)
    rays = rays_camera @ rotation.T
    eye = np.asarray(scene.camera.eye)
    depth = out["depth"].astype(np.float64)
    points = eye + depth[..., None] * rays
    normals_world = out["normals"].astype(np.float64) @ rotation.T
    np.testing.assert_allclose(np.linalg.norm(out["normals"], axis=-1), 1.0, atol=1e-6)
    # Every visible surface faces the camera.
    assert np.all(np.sum(out["normals"] * rays_camera, axis=-1) < 1e-6)

    for index, obj in enumerate(scene.objects):
        mask = out["instances"] == 1 + index
        assert np.all(out["segmentation"][mask] == 1 + scenes.SHAPES.index(obj.shape))
        if not mask.any():
            continue
        assert np.max(np.abs(world_implicit(obj, points[mask]))) < 2e-5, obj.shape
        agreement = np.sum(numeric_gradient(obj, points[mask]) * normals_world[mask], axis=-1)
        assert np.mean(agreement > 1 - 1e-6) > 0.99, obj.shape

    # Ground pixels: the plane y = 0 with its normal, both checked in the camera frame.
    ground = out["instances"] == 0
    np.testing.assert_allclose(points[ground][:, 1], 0.0, atol=2e-5)
    np.testing.assert_allclose(
        normals_world[ground], np.broadcast_to([0, 1, 0], (ground.sum(), 3)), atol=1e-6
    )
    assert np.all(out["segmentation"][ground] == 0)

    # No ray passes through any solid before its reported surface (z-buffer; misses).
    fractions = np.linspace(0.0, 1.0, 1500)[:, None]
    before = eye + (fractions * (depth.reshape(-1) - 1e-4))[..., None] * rays.reshape(1, -1, 3)
    for obj in scene.objects:
        assert not np.any(world_implicit(obj, before) < 0), obj.shape


def test_torus_hole_shows_the_ground():
    """Looking straight down the axis of a flat ring: the centre pixel sees the ground."""
    size = 31
    ring = SceneObject("torus", "green", (0.1, 0.8, 0.1), size=1.0, position=(0.0, 0.0))
    camera = Camera(eye=(0.0, 9.0, 1e-3), target=(0.0, 0.0, 0.0), fov_degrees=30.0)
    out = scenes.render_scene(single_object_scene(ring, camera), size)
    assert out["segmentation"][15, 15] == 0
    assert out["depth"][15, 15] == pytest.approx(9.0, rel=1e-6)
    # The ring's top is a circle of radius R at height 2r: pixels there see depth 9 - 2r.
    torus_class = 1 + scenes.SHAPES.index("torus")
    # Its image covers 4 pi R r / (2 * 8.4 * tan 15 deg)^2 = 14% of the frame.
    assert 0.12 < (out["segmentation"] == torus_class).mean() < 0.16
    top = geometry.TORUS_MAJOR
    column = 15 + round(top / ((9.0 - 2 * 0.3) * math.tan(math.radians(15))) * size / 2)
    assert out["segmentation"][15, column] == torus_class
    assert out["depth"][15, column] == pytest.approx(math.hypot(9.0 - 0.6, top), rel=2e-3)


def test_render_time_is_a_few_milliseconds():
    scene = scenes.sample_scene(np.random.default_rng(3))
    scenes.render_scene(scene, 64)
    import time

    start = time.perf_counter()
    for _ in range(10):
        scenes.render_scene(scene, 64)
    # Generous: loaded CI machines are slow; the renderer takes ~3 ms on a free core.
    assert (time.perf_counter() - start) / 10 < 0.1


# --------------------------------------------------------------------------------------------
# Examples and captions


EXAMPLES = [scenes.make_example(seed, 32, dense=True) for seed in range(200)]


def test_primary_object_is_the_largest_in_the_image():
    largest = 0
    for example in EXAMPLES:
        seg = example["segmentation"]
        assert example["primary"]["area"] > 0.02
        areas = np.bincount(
            scenes.render_scene(scenes.sample_scene(np.random.default_rng(example["seed"])), 32)[
                "instances"
            ].reshape(-1),
            minlength=4,
        )
        largest += int(np.argmax(areas[1:]) == 0)
        assert example["primary"]["area"] == pytest.approx(areas[1] / seg.size)
        assert seg.dtype == np.uint8 and example["depth"].dtype == np.float32
    assert largest / len(EXAMPLES) > 0.97


def test_labels_are_balanced_enough():
    counts = np.bincount([e["label"] for e in EXAMPLES], minlength=48)
    assert (counts > 0).sum() > 40  # 200 draws over 48 classes


def test_captions_name_the_primary_colour_and_shape():
    for example in EXAMPLES:
        colour = scenes.COLOURS[example["primary"]["colour"]]
        shape = scenes.SHAPES[example["primary"]["shape"]]
        assert scenes.CLASS_NAMES[example["label"]] == f"{colour} {shape}"
        captions = example["captions"]
        assert len(captions) == scenes.CAPTIONS_PER_IMAGE == len(set(captions))
        # Most captions say "<colour> <noun>" for the primary, as the class names do.
        nouns = "|".join(scenes.SHAPE_NOUNS[shape])
        adjacent = [re.search(rf"\b{colour} (?:{nouns})\b", c) is not None for c in captions]
        assert sum(adjacent) >= 3, captions
        nouns = "|".join(scenes.SHAPE_NOUNS[shape])
        for caption in captions:
            assert re.search(rf"\b{colour}\b", caption), caption
            assert re.search(rf"\b(?:{nouns})\b", caption), caption
            assert not re.search(r"\ba [aeiou]", caption), caption
            assert "{" not in caption and "  " not in caption


def test_captions_are_varied_and_use_the_canonical_noun_most():
    captions = [c for e in EXAMPLES for c in e["captions"]]
    assert len(set(captions)) > 0.9 * len(captions)
    words = [len(c.split()) for c in captions]
    assert min(words) <= 3 and max(words) >= 12
    for shape, nouns in scenes.SHAPE_NOUNS.items():
        mentions = [
            c
            for e in EXAMPLES
            if scenes.SHAPES[e["primary"]["shape"]] == shape
            for c in e["captions"]
        ]
        used = {
            noun: sum(re.search(rf"\b{noun}\b", c) is not None for c in mentions) for noun in nouns
        }
        assert used[nouns[0]] == max(used.values()), (shape, used)
        assert all(count > 0 for count in used.values()), (shape, used)


def test_caption_positions_agree_with_the_image():
    checked = 0
    for example in EXAMPLES:
        column = example["primary"]["centre"][1]
        for caption in example["captions"]:
            if re.search(r"\b(on the|at) left\b", caption):
                assert column < 0.5, (caption, column)
                checked += 1
            if re.search(r"\b(on the|at) right\b", caption):
                assert column > 0.5, (caption, column)
                checked += 1
    assert checked > 20


def test_shape_nouns_are_wordnet_nouns():
    wordnet = pytest.importorskip("nltk.corpus").wordnet
    try:
        wordnet.ensure_loaded()
    except LookupError:
        pytest.skip("WordNet data not installed")
    for nouns in scenes.SHAPE_NOUNS.values():
        for noun in nouns:
            assert wordnet.synsets(noun, pos="n"), noun


# --------------------------------------------------------------------------------------------
# TFDS builder


def test_parallel_generation_matches_sequential():
    from pretrain.data.scenes import builder

    seeds = builder.split_seeds("test", 12)
    sequential = list(builder.generate_examples(seeds, 16, True, num_workers=1))
    parallel = list(builder.generate_examples(seeds, 16, True, num_workers=2, chunk_size=4))
    assert [k for k, _ in sequential] == [k for k, _ in parallel] == list(seeds)
    for (_, a), (_, b) in zip(sequential, parallel):
        assert a["image"] == b["image"] and a["captions"] == b["captions"]
        np.testing.assert_array_equal(a["depth"], b["depth"])


def test_tiny_builder_reads_back_without_tensorflow(tmp_path):
    import sys

    from pretrain.data.scenes import builder

    prepared = builder.prepare("tiny", str(tmp_path))
    assert prepared.info.file_format.value == "array_record"
    assert builder.prepare("tiny", str(tmp_path)).data_path == prepared.data_path

    train = builder.data_source("train", "tiny", str(tmp_path))
    test = builder.data_source("test", "tiny", str(tmp_path))
    assert (len(train), len(test)) == (256, 64)
    train_seeds = {int(train[i]["seed"]) for i in range(len(train))}
    test_seeds = {int(test[i]["seed"]) for i in range(len(test))}
    assert train_seeds == set(range(256))
    assert test_seeds == set(range(builder.TEST_SEED_OFFSET, builder.TEST_SEED_OFFSET + 64))

    for source in (train, test):
        element = source[3]
        assert element["image"].shape == (32, 32, 3) and element["image"].dtype == np.uint8
        assert element["segmentation"].shape == (32, 32)
        assert element["segmentation"].dtype == np.uint8
        assert element["depth"].shape == (32, 32) and element["depth"].dtype == np.float32
        assert element["normals"].shape == (32, 32, 3)
        assert element["normals"].dtype == np.float32
        assert element["primary"]["centre"].dtype == np.float32
        assert all(isinstance(c, bytes) for c in element["captions"])

        expected = scenes.make_example(int(element["seed"]), 32, dense=True)
        np.testing.assert_array_equal(element["image"], expected["image"])
        np.testing.assert_array_equal(element["depth"], expected["depth"])
        np.testing.assert_array_equal(element["normals"], expected["normals"])
        np.testing.assert_array_equal(element["segmentation"], expected["segmentation"])
        assert [c.decode() for c in element["captions"]] == expected["captions"]
        assert int(element["label"]) == expected["label"]
        assert int(element["primary"]["shape"]) == expected["primary"]["shape"]
        assert int(element["num_objects"]) == expected["num_objects"]
    assert prepared.info.features["label"].names == scenes.CLASS_NAMES
    assert "tensorflow" not in sys.modules
