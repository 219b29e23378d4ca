"""Exact NumPy ray caster for the synthetic-scenes data set (see :mod:`pretrain.data.scenes`).

Every pixel casts one ray through its centre from a pinhole camera and intersects it
analytically with each primitive: a quadratic for the sphere and the sides of the cylinder and
cone, plane slabs for the convex polyhedra (cube, pyramid) and a quartic for the torus (solved as
the eigenvalues of its companion matrix, then polished with Newton steps). The nearest hit over all
objects and the ground plane wins (a z-buffer over exact distances), and shading is Lambertian plus
ambient from the exact surface normal, with hard shadows from one more ray per pixel.

Conventions (what the dense outputs mean):

* world frame: right-handed, ``y`` up, the ground is the plane ``y = 0``; the camera looks at the
  scene from ``+z`` and above.
* camera frame (of ``normals``): OpenGL style, ``x`` right, ``y`` up, ``z`` towards the viewer
  (the camera looks along ``-z``), so every visible surface has a normal with ``z > 0``.
* ``depth``: Euclidean distance from the camera centre to the visible surface point along the
  pixel's ray (not the z coordinate), in scene units; rays that hit nothing get ``FAR_DEPTH``.
* ``segmentation``: semantic classes, ``0`` for the ground and anything else that is not an
  object, ``1 + PRIMITIVE_SHAPES.index(shape)`` for an object pixel.
* ``instances``: ``0`` background, ``1 + i`` for ``scene.objects[i]`` (``objects[0]`` is the
  primary object).

A 64x64 image takes a few milliseconds on one CPU core.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

PRIMITIVE_SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "pyramid", "torus")
BACKGROUND_CLASS = 0
FAR_DEPTH = 100.0
# Offset of shadow-ray origins along the normal: far above float64 round-off at scene scale,
# far below a pixel's footprint.
_SHADOW_EPSILON = 1e-4

# Proportions of each primitive relative to an object's ``size`` (its nominal radius), chosen so
# that the shapes have similar visual bulk and stay recognisable at 64x64 pixels.
CUBE_HALF_EDGE = 0.8
CYLINDER_RADIUS, CYLINDER_HALF_HEIGHT = 0.8, 0.85
CONE_RADIUS, CONE_HALF_HEIGHT = 1.05, 1.1
PYRAMID_HALF_WIDTH, PYRAMID_HALF_HEIGHT = 1.05, 0.95
TORUS_MAJOR, TORUS_MINOR = 0.78, 0.3


@dataclasses.dataclass(frozen=True)
class Camera:
    """Pinhole camera at ``eye`` looking at ``target`` with a square field of view."""

    eye: tuple[float, float, float]
    target: tuple[float, float, float]
    fov_degrees: float

    def camera_to_world(self) -> np.ndarray:
        """3x3 rotation whose columns are the camera's x (right), y (up), z (backward) axes."""
        return self._rotation

    @functools.cached_property
    def _rotation(self) -> np.ndarray:
        fx, fy, fz = _unit(np.subtract(self.target, self.eye, dtype=np.float64))
        right = _unit(np.array([-fz, 0.0, fx]))  # forward x (0, 1, 0)
        up = np.array(
            [
                right[1] * fz - right[2] * fy,
                right[2] * fx - right[0] * fz,
                right[0] * fy - right[1] * fx,
            ]
        )  # right x forward
        rotation = np.stack([right, up, -np.array([fx, fy, fz])], axis=1)
        rotation.flags.writeable = False
        return rotation

    @property
    def focal_scale(self) -> float:
        """tan(fov / 2): half the image plane's width at unit distance."""
        return math.tan(math.radians(self.fov_degrees) / 2)


@dataclasses.dataclass(frozen=True)
class Light:
    """A directional light; ``direction`` points from the surface towards the light."""

    direction: tuple[float, float, float]
    intensity: float
    ambient: float


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One primitive standing on the ground.

    ``size`` is the nominal radius in scene units; ``position`` the ``(x, z)`` of the point on the
    ground below its centre; ``yaw`` the rotation about the vertical axis; ``tilt`` the rotation
    about the object's own x axis (used for the torus, so its hole faces the camera). ``colour``
    names the colour for captions; ``rgb`` (in [0, 1]) is what the renderer paints.
    """

    shape: str
    colour: str
    rgb: tuple[float, float, float]
    size: float
    position: tuple[float, float]
    yaw: float = 0.0
    tilt: float = 0.0


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects (``objects[0]`` is the primary one), camera, light and background."""

    objects: tuple[SceneObject, ...]
    camera: Camera
    light: Light
    ground_rgb: tuple[float, float, float]
    haze_rgb: tuple[float, float, float]
    noise_std: float = 0.0
    noise_seed: int = 0
    ground_name: str = ""  # words for the ground's tint, for captions


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Object placement


def object_rotation(obj: SceneObject) -> np.ndarray:
    """Local-to-world rotation: yaw about the vertical axis after tilt about the local x axis."""
    cos_yaw, sin_yaw = math.cos(obj.yaw), math.sin(obj.yaw)
    cos_tilt, sin_tilt = math.cos(obj.tilt), math.sin(obj.tilt)
    yaw = np.array([[cos_yaw, 0.0, sin_yaw], [0.0, 1.0, 0.0], [-sin_yaw, 0.0, cos_yaw]])
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, cos_tilt, -sin_tilt], [0.0, sin_tilt, cos_tilt]])
    return yaw @ tilt


def centre_height(obj: SceneObject) -> float:
    """Height of the local origin above the ground, so that the object rests on the ground.

    Only the torus is tilted; a tilted ring's lowest point lies ``R sin(tilt) + r`` below its
    centre. The other shapes are symmetric about their centre's horizontal plane or start at it.
    """
    s = obj.size
    heights = {
        "sphere": s,
        "cube": CUBE_HALF_EDGE * s,
        "cylinder": CYLINDER_HALF_HEIGHT * s,
        "cone": CONE_HALF_HEIGHT * s,
        "pyramid": PYRAMID_HALF_HEIGHT * s,
        "torus": TORUS_MAJOR * s * abs(math.sin(obj.tilt)) + TORUS_MINOR * s,
    }
    return heights[obj.shape]


def object_centre(obj: SceneObject) -> np.ndarray:
    """World position of the object's local origin."""
    return np.array([obj.position[0], centre_height(obj), obj.position[1]])


def bounding_radius(obj: SceneObject) -> float:
    """Radius of a sphere around the local origin that contains the whole object."""
    s = obj.size
    radii = {
        "sphere": s,
        "cube": math.sqrt(3.0) * CUBE_HALF_EDGE * s,
        "cylinder": math.hypot(CYLINDER_RADIUS, CYLINDER_HALF_HEIGHT) * s,
        "cone": math.hypot(CONE_RADIUS, CONE_HALF_HEIGHT) * s,
        "pyramid": math.hypot(math.sqrt(2.0) * PYRAMID_HALF_WIDTH, PYRAMID_HALF_HEIGHT) * s,
        "torus": (TORUS_MAJOR + TORUS_MINOR) * s,
    }
    return radii[obj.shape]


def project_points(camera: Camera, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (..., 3) -> (image coordinates (..., 2) as (column, row) fractions in [0, 1]
    when inside the image, distance along the viewing axis (...))."""
    rotation = camera.camera_to_world()
    in_camera = (np.asarray(points, np.float64) - np.asarray(camera.eye)) @ rotation
    forward_distance = -in_camera[..., 2]
    scale = forward_distance * camera.focal_scale
    column = (in_camera[..., 0] / scale + 1.0) / 2.0
    row = (1.0 - in_camera[..., 1] / scale) / 2.0
    return np.stack([column, row], axis=-1), forward_distance


def projected_extent(camera: Camera, obj: SceneObject) -> tuple[np.ndarray, float]:
    """Image position (column, row fractions) of the object's centre and the approximate radius of
    its bounding sphere's image, as a fraction of the image width."""
    centre = object_centre(obj)
    position, forward_distance = project_points(camera, centre)
    radius = bounding_radius(obj) / (forward_distance * camera.focal_scale) / 2.0
    return position, float(radius)


# --------------------------------------------------------------------------------------------
# Ray-primitive intersections, in the object's local frame. Each returns (t, normal): the ray
# parameter of the nearest hit in front of the origin (inf for a miss) and the outward unit
# normal there. Ray directions are unit vectors, so t is a distance.


def _nearest_positive(candidates: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """The smallest valid t among several surfaces' candidates and the matching normals."""
    ts = np.stack([t for t, _ in candidates])
    normals = np.stack([n for _, n in candidates])
    best = np.argmin(ts, axis=0)
    rows = np.arange(ts.shape[1])
    return ts[best, rows], normals[best, rows]


def _quadratic_roots(a, half_b, c) -> tuple[np.ndarray, np.ndarray]:
    """Both roots of ``a t^2 + 2 half_b t + c = 0`` (nan where complex), cancellation-free."""
    discriminant = half_b * half_b - a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        root = np.sqrt(discriminant)
        q = -(half_b + np.copysign(root, half_b))
        return q / a, c / q


def sphere_interval(origin, direction, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit t of each ray through a sphere centred on the origin (nan for a miss)."""
    half_b = np.einsum("ij,ij->i", origin, direction)
    c = np.einsum("ij,ij->i", origin, origin) - radius * radius
    with np.errstate(invalid="ignore"):
        root = np.sqrt(half_b * half_b - c)
    return -half_b - root, -half_b + root


def intersect_sphere(origin, direction, radius: float):
    """Sphere of ``radius`` centred on the local origin."""
    half_b = np.einsum("ij,ij->i", origin, direction)
    c = np.einsum("ij,ij->i", origin, origin) - radius * radius
    discriminant = half_b * half_b - c
    with np.errstate(invalid="ignore"):
        t = -half_b - np.sqrt(discriminant)
    t = np.where((discriminant >= 0) & (t > 0), t, np.inf)
    normal = (origin + np.where(np.isfinite(t), t, 0.0)[:, None] * direction) / radius
    return t, normal


def intersect_convex_polytope(origin, direction, plane_normals, plane_offsets):
    """The solid ``{x : plane_normals @ x <= plane_offsets}`` (unit plane normals, outward).

    A ray enters every half-space it is not parallel to at ``t_k``; it is inside the solid
    between the last entry and the first exit, and the visible face is the last one entered.
    """
    along = direction @ plane_normals.T
    room = plane_offsets[None, :] - origin @ plane_normals.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t_planes = room / along
    t_enter_each = np.where(along < 0, t_planes, -np.inf)
    t_exit_each = np.where(along > 0, t_planes, np.inf)
    entry_face = np.argmax(t_enter_each, axis=1)
    t_enter = t_enter_each[np.arange(len(origin)), entry_face]
    t_exit = np.min(t_exit_each, axis=1)
    outside_parallel = np.any((along == 0) & (room < 0), axis=1)
    hit = (t_enter <= t_exit) & (t_enter > 0) & ~outside_parallel
    return np.where(hit, t_enter, np.inf), plane_normals[entry_face]


def cube_planes(half_edge: float) -> tuple[np.ndarray, np.ndarray]:
    normals = np.concatenate([np.eye(3), -np.eye(3)])
    return normals, np.full(6, half_edge)


def pyramid_planes(half_width: float, half_height: float) -> tuple[np.ndarray, np.ndarray]:
    """Square base at ``y = -half_height``, apex at ``(0, half_height, 0)``.

    The side facing +x holds the apex and the base edge ``x = half_width``; its normal is
    ``(2 half_height, half_width, 0)`` up to scale, offset ``half_width half_height`` likewise.
    """
    sides = []
    for axis_x, axis_z in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        sides.append((2 * half_height * axis_x, half_width, 2 * half_height * axis_z))
    sides = np.array(sides, np.float64)
    lengths = np.linalg.norm(sides, axis=1)
    normals = np.concatenate([sides / lengths[:, None], [[0.0, -1.0, 0.0]]])
    offsets = np.concatenate([half_width * half_height / lengths, [half_height]])
    return normals, offsets


def _disc_cap(origin, direction, height: float, radius: float, facing_up: bool):
    """The disc ``y = height, x^2 + z^2 <= radius^2``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (height - origin[:, 1]) / direction[:, 1]
    x = origin[:, 0] + t * direction[:, 0]
    z = origin[:, 2] + t * direction[:, 2]
    inside = (t > 0) & (x * x + z * z <= radius * radius)
    normal = np.zeros_like(origin)
    normal[:, 1] = 1.0 if facing_up else -1.0
    return np.where(inside, t, np.inf), normal


def intersect_cylinder(origin, direction, radius: float, half_height: float):
    """Closed cylinder about the y axis, ``|y| <= half_height``."""
    a = direction[:, 0] ** 2 + direction[:, 2] ** 2
    half_b = origin[:, 0] * direction[:, 0] + origin[:, 2] * direction[:, 2]
    c = origin[:, 0] ** 2 + origin[:, 2] ** 2 - radius * radius
    candidates = []
    for t in _quadratic_roots(a, half_b, c):
        y = origin[:, 1] + t * direction[:, 1]
        valid = np.isfinite(t) & (t > 0) & (np.abs(y) <= half_height)
        point = origin + np.where(valid, t, 0.0)[:, None] * direction
        normal = np.stack([point[:, 0], np.zeros_like(t), point[:, 2]], axis=1) / radius
        candidates.append((np.where(valid, t, np.inf), normal))
    candidates.append(_disc_cap(origin, direction, half_height, radius, facing_up=True))
    candidates.append(_disc_cap(origin, direction, -half_height, radius, facing_up=False))
    return _nearest_positive(candidates)


def intersect_cone(origin, direction, radius: float, half_height: float):
    """Solid cone about the y axis: base disc of ``radius`` at ``y = -half_height``, apex at
    ``y = +half_height``. Its side is ``x^2 + z^2 = k^2 (half_height - y)^2`` with
    ``k = radius / (2 half_height)``, restricted to the lower nappe."""
    k2 = (radius / (2.0 * half_height)) ** 2
    below_apex = half_height - origin[:, 1]
    a = direction[:, 0] ** 2 + direction[:, 2] ** 2 - k2 * direction[:, 1] ** 2
    half_b = origin[:, 0] * direction[:, 0] + origin[:, 2] * direction[:, 2]
    half_b = half_b + k2 * below_apex * direction[:, 1]
    c = origin[:, 0] ** 2 + origin[:, 2] ** 2 - k2 * below_apex**2
    candidates = []
    for t in _quadratic_roots(a, half_b, c):
        y = origin[:, 1] + t * direction[:, 1]
        valid = np.isfinite(t) & (t > 0) & (np.abs(y) <= half_height)
        point = origin + np.where(valid, t, 0.0)[:, None] * direction
        gradient = np.stack([point[:, 0], k2 * (half_height - point[:, 1]), point[:, 2]], axis=1)
        length = np.linalg.norm(gradient, axis=1, keepdims=True)
        # The apex (zero gradient) is a single point; any unit vector will do there.
        normal = np.where(length > 0, gradient / np.maximum(length, 1e-300), (0.0, 1.0, 0.0))
        candidates.append((np.where(valid, t, np.inf), normal))
    candidates.append(_disc_cap(origin, direction, -half_height, radius, facing_up=False))
    return _nearest_positive(candidates)


def _torus_quartic(origin, direction, major: float, minor: float) -> np.ndarray:
    """Coefficients (N, 5), highest power first, of the monic quartic in t whose roots are the
    ray's crossings of ``(|p|^2 + R^2 - r^2)^2 = 4 R^2 (x^2 + z^2)`` (|direction| = 1)."""
    along = np.einsum("ij,ij->i", origin, direction)
    g = np.einsum("ij,ij->i", origin, origin) + major**2 - minor**2
    planar_dd = direction[:, 0] ** 2 + direction[:, 2] ** 2
    planar_od = origin[:, 0] * direction[:, 0] + origin[:, 2] * direction[:, 2]
    planar_oo = origin[:, 0] ** 2 + origin[:, 2] ** 2
    four_r2 = 4.0 * major**2
    return np.stack(
        [
            np.ones_like(g),
            4.0 * along,
            4.0 * along**2 + 2.0 * g - four_r2 * planar_dd,
            4.0 * along * g - 2.0 * four_r2 * planar_od,
            g * g - four_r2 * planar_oo,
        ],
        axis=1,
    )


def _smallest_nonnegative_real_root(coefficients: np.ndarray) -> np.ndarray:
    """Smallest real root >= 0 of each monic quartic (inf if none), via companion matrices."""
    count = len(coefficients)
    companion = np.zeros((count, 4, 4))
    companion[:, 0, :] = -coefficients[:, 1:]
    companion[:, 1, 0] = companion[:, 2, 1] = companion[:, 3, 2] = 1.0
    roots = np.linalg.eigvals(companion)
    # Grazing rays give a double root whose eigenvalues split by ~sqrt(machine eps); accept
    # those as real (the ray touches the surface), reject clearly complex pairs.
    # The tolerance below 0 keeps a ray that grazes the bounding sphere where the torus touches it.
    is_real = np.abs(roots.imag) <= 1e-6
    real = np.where(is_real & (roots.real >= -1e-9), roots.real, np.inf)
    return np.min(real, axis=1)


def _polish_roots(coefficients: np.ndarray, t: np.ndarray, steps: int = 3) -> np.ndarray:
    """Newton steps on the quartic, to full precision; leaves a step out where p' is ~0."""
    derivative = coefficients[:, :4] * np.array([4.0, 3.0, 2.0, 1.0])
    for _ in range(steps):
        value = coefficients[:, 0]
        slope = derivative[:, 0]
        for power in range(1, 5):
            value = value * t + coefficients[:, power]
            if power < 4:
                slope = slope * t + derivative[:, power]
        step = np.where(np.abs(slope) > 1e-12, value / np.where(slope == 0, 1.0, slope), 0.0)
        t = t - np.clip(step, -1e-3, 1e-3)
    return t


def intersect_torus(origin, direction, major: float, minor: float):
    """Torus about the y axis, ring radius ``major``, tube radius ``minor``, centred at 0.

    The ray is first advanced to its bounding sphere so the quartic's coefficients are O(1)
    (well conditioned), then solved exactly.
    """
    t = np.full(len(origin), np.inf)
    normal = np.zeros_like(origin)
    entry, exit_ = sphere_interval(origin, direction, major + minor)
    candidates = np.flatnonzero(exit_ > 0)  # false for nan (a miss)
    if candidates.size == 0:
        return t, normal
    # Shadow rays start on a surface, possibly inside the bounding sphere.
    start = np.maximum(entry[candidates], 0.0)
    shifted = origin[candidates] + start[:, None] * direction[candidates]
    coefficients = _torus_quartic(shifted, direction[candidates], major, minor)
    s = _smallest_nonnegative_real_root(coefficients)
    s[np.isfinite(s)] = _polish_roots(coefficients[np.isfinite(s)], s[np.isfinite(s)])
    hit = np.isfinite(s) & (start + s > 0)
    rows = candidates[hit]
    t[rows] = start[hit] + s[hit]
    point = origin[rows] + t[rows, None] * direction[rows]
    planar = np.hypot(point[:, 0], point[:, 2])
    ring_point = np.stack(
        [major * point[:, 0] / planar, np.zeros_like(planar), major * point[:, 2] / planar], axis=1
    )
    normal[rows] = _unit(point - ring_point)
    return t, normal


def intersect_object(obj: SceneObject, origin: np.ndarray, direction: np.ndarray):
    """World-frame rays (N, 3) -> (t (N,), world unit normals (N, 3)) for one object."""
    rotation = object_rotation(obj)
    local_origin = (origin - object_centre(obj)) @ rotation
    local_direction = direction @ rotation
    s = obj.size
    if obj.shape == "sphere":
        t, normal = intersect_sphere(local_origin, local_direction, s)
    elif obj.shape == "cube":
        t, normal = intersect_convex_polytope(
            local_origin, local_direction, *cube_planes(CUBE_HALF_EDGE * s)
        )
    elif obj.shape == "cylinder":
        t, normal = intersect_cylinder(
            local_origin, local_direction, CYLINDER_RADIUS * s, CYLINDER_HALF_HEIGHT * s
        )
    elif obj.shape == "cone":
        t, normal = intersect_cone(
            local_origin, local_direction, CONE_RADIUS * s, CONE_HALF_HEIGHT * s
        )
    elif obj.shape == "pyramid":
        t, normal = intersect_convex_polytope(
            local_origin,
            local_direction,
            *pyramid_planes(PYRAMID_HALF_WIDTH * s, PYRAMID_HALF_HEIGHT * s),
        )
    elif obj.shape == "torus":
        t, normal = intersect_torus(local_origin, local_direction, TORUS_MAJOR * s, TORUS_MINOR * s)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {PRIMITIVE_SHAPES}")
    return t, normal @ rotation.T


def _intersect_object_culled(obj: SceneObject, origin, direction):
    """:func:`intersect_object` on only the rays that hit the object's bounding sphere."""
    t = np.full(len(origin), np.inf)
    normal = np.zeros_like(origin)
    _, exit_ = sphere_interval(origin - object_centre(obj), direction, bounding_radius(obj))
    rows = np.flatnonzero(exit_ > 0)
    if rows.size:
        t[rows], normal[rows] = intersect_object(obj, origin[rows], direction[rows])
    return t, normal


# --------------------------------------------------------------------------------------------
# Rendering


def camera_rays(camera: Camera, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit ray directions through the pixel centres, in camera and world frames, (H*W, 3)."""
    centres = (np.arange(image_size) + 0.5) / image_size * 2.0 - 1.0
    x = centres[None, :] * camera.focal_scale
    y = -centres[:, None] * camera.focal_scale
    x, y = np.broadcast_arrays(x, y)
    in_camera = _unit(np.stack([x, y, -np.ones_like(x)], axis=-1).reshape(-1, 3))
    return in_camera, in_camera @ camera.camera_to_world().T


def _first_hits(objects, origin, direction) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-buffer over the objects: (nearest t, index of the object hit or -1, world normal)."""
    nearest = np.full(len(origin), np.inf)
    which = np.full(len(origin), -1)
    normal = np.zeros_like(origin)
    for index, obj in enumerate(objects):
        t, n = _intersect_object_culled(obj, origin, direction)
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
        t, _ = _intersect_object_culled(obj, origins, np.ascontiguousarray(directions))
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

    light = _unit(np.asarray(scene.light.direction, np.float64))
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
    shape_ids = np.array([PRIMITIVE_SHAPES.index(obj.shape) for obj in scene.objects], np.int64)
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
