"""Renders a scene exactly: image, semantic segmentation, instances, depth and normals.

Every pixel casts one ray through its centre from a pinhole camera; the nearest hit over all
objects and the ground plane wins (a z-buffer over exact distances), and shading is Lambertian
plus ambient from the exact surface normal, with hard shadows from one more ray per pixel.

What the dense outputs mean:

* camera frame (of ``normals``): OpenGL style, ``x`` right, ``y`` up, ``z`` towards the viewer
  (the camera looks along ``-z``), so every visible surface has a normal with ``z > 0``.
* ``depth``: Euclidean distance from the camera centre to the visible surface point along the
  pixel's ray (not the z coordinate), in scene units; rays that hit nothing get ``FAR_DEPTH``.
* ``segmentation``: semantic classes, ``0`` for the ground and anything else that is not an
  object, ``1 + SHAPES.index(shape)`` for an object pixel.
* ``instances``: ``0`` background, ``1 + i`` for ``scene.objects[i]`` (``objects[0]`` is the
  primary object).
"""

from __future__ import annotations

import numpy as np

from pretrain.data.scenes.geometry import SHAPES, Camera, Scene, unit
from pretrain.data.scenes.primitives import intersect_object_culled

BACKGROUND_CLASS = 0
FAR_DEPTH = 100.0
# Offset of shadow-ray origins along the normal: far above float64 round-off at scene scale,
# far below a pixel's footprint.
_SHADOW_EPSILON = 1e-4


def camera_rays(camera: Camera, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions through the pixel centres, in camera and world frames, (H*W, 3)."""
    centres = (np.arange(image_size) + 0.5) / image_size * 2.0 - 1.0
    x = centres[None, :] * camera.focal_scale
    y = -centres[:, None] * camera.focal_scale
    x, y = np.broadcast_arrays(x, y)
    in_camera = unit(np.stack([x, y, -np.ones_like(x)], axis=-1).reshape(-1, 3))
    return in_camera, in_camera @ camera.camera_to_world().T


def _first_hits(objects, origin, direction) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-buffer over the objects: (nearest t, index of the object hit or -1, world normal)."""
    nearest = np.full(len(origin), np.inf)
    which = np.full(len(origin), -1)
    normal = np.zeros_like(origin)
    for index, obj in enumerate(objects):
        t, n = intersect_object_culled(obj, origin, direction)
        closer = t < nearest
        nearest = np.where(closer, t, nearest)
        which = np.where(closer, index, which)
        normal[closer] = n[closer]
    return nearest, which, normal


def _in_shadow(objects, points, normals, light_direction) -> np.ndarray:
    """Whether a ray from each point towards the light hits any object."""
    origins = points + _SHADOW_EPSILON * normals
    directions = np.broadcast_to(light_direction, points.shape)
    blocked = np.zeros(len(points), bool)
    for obj in objects:
        t, _ = intersect_object_culled(obj, origins, np.ascontiguousarray(directions))
        blocked |= np.isfinite(t)
    return blocked


def render_scene(scene: Scene, image_size: int) -> dict[str, np.ndarray]:
    """Render ``scene`` at ``image_size`` x ``image_size`` pixels.

    Returns ``image`` (H, W, 3) uint8, ``segmentation`` (H, W) uint8 semantic classes, ``instances``
    (H, W) uint8 object ids, ``depth`` (H, W) float32 ray distances and ``normals`` (H, W, 3)
    float32 unit camera-frame normals; see the module docstring for the conventions.
    """
    camera = scene.camera
    _, rays_world = camera_rays(camera, image_size)
    count = len(rays_world)
    eye = np.broadcast_to(np.asarray(camera.eye, np.float64), (count, 3))

    t_object, which, normal_world = _first_hits(scene.objects, eye, rays_world)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(rays_world[:, 1] < 0, -eye[:, 1] / rays_world[:, 1], np.inf)
    on_object = t_object < t_ground
    on_ground = ~on_object & np.isfinite(t_ground)
    depth = np.where(on_object, t_object, np.where(on_ground, t_ground, FAR_DEPTH))
    normal_world[on_ground] = (0.0, 1.0, 0.0)
    hit_anything = on_object | on_ground

    albedo = np.empty((count, 3))
    palette = np.array([obj.rgb for obj in scene.objects], np.float64).reshape(-1, 3)
    albedo[on_object] = palette[which[on_object]]
    albedo[~on_object] = scene.ground_rgb

    light = unit(np.asarray(scene.light.direction, np.float64))
    lambert = np.clip(normal_world @ light, 0.0, None)
    points = eye + np.where(hit_anything, depth, 0.0)[:, None] * rays_world
    lit = hit_anything & (lambert > 0)
    shadowed = np.zeros(count, bool)
    shadowed[lit] = _in_shadow(scene.objects, points[lit], normal_world[lit], light)
    direct = np.where(shadowed, 0.0, lambert)
    colour = albedo * (scene.light.ambient + scene.light.intensity * direct)[:, None]

    # Distance haze on the ground only: a soft gradient towards the horizon, objects untouched.
    haze = np.clip((depth - 8.0) / 30.0, 0.0, 0.85) * (~on_object)
    colour = colour * (1.0 - haze[:, None]) + haze[:, None] * np.asarray(scene.haze_rgb)
    colour[~hit_anything] = scene.haze_rgb

    if scene.noise_std > 0:
        noise_rng = np.random.default_rng(scene.noise_seed)
        colour = colour + noise_rng.normal(0.0, scene.noise_std, colour.shape)
    image = np.round(np.clip(colour, 0.0, 1.0) * 255.0).astype(np.uint8)

    normals_camera = normal_world @ camera.camera_to_world()
    # Nothing was hit: the normal faces the camera, so that every normal is a unit vector.
    normals_camera[~hit_anything] = (0.0, 0.0, 1.0)
    shape_ids = np.array([SHAPES.index(obj.shape) for obj in scene.objects], np.int64)
    segmentation = np.where(on_object, 1 + shape_ids[np.maximum(which, 0)], BACKGROUND_CLASS)
    instances = np.where(on_object, 1 + which, 0)

    shape2d = (image_size, image_size)
    return {
        "image": image.reshape(*shape2d, 3),
        "segmentation": segmentation.reshape(shape2d).astype(np.uint8),
        "instances": instances.reshape(shape2d).astype(np.uint8),
        "depth": depth.reshape(shape2d).astype(np.float32),
        "normals": normals_camera.reshape(*shape2d, 3).astype(np.float32),
    }
