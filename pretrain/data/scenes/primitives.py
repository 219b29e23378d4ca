"""Exact ray-primitive intersections, in each object's local frame, and per object in the world.

A quadratic for the sphere and the sides of the cylinder and cone, plane slabs for the convex
polyhedra (cube, pyramid) and a quartic for the torus (solved as the eigenvalues of its companion
matrix, then polished with Newton steps). Each returns ``(t, normal)``: the ray parameter of the
nearest hit in front of the origin (inf for a miss) and the outward unit normal there. Ray
directions are unit vectors, so ``t`` is a distance.
"""

from __future__ import annotations

import numpy as np

from pretrain.data.scenes.geometry import (
    CONE_HALF_HEIGHT,
    CONE_RADIUS,
    CUBE_HALF_EDGE,
    CYLINDER_HALF_HEIGHT,
    CYLINDER_RADIUS,
    PYRAMID_HALF_HEIGHT,
    PYRAMID_HALF_WIDTH,
    SHAPES,
    TORUS_MAJOR,
    TORUS_MINOR,
    SceneObject,
    bounding_radius,
    object_centre,
    object_rotation,
    unit,
)


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
    normal[rows] = unit(point - ring_point)
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
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    return t, normal @ rotation.T


def intersect_object_culled(obj: SceneObject, origin, direction):
    """:func:`intersect_object` on only the rays that hit the object's bounding sphere."""
    t = np.full(len(origin), np.inf)
    normal = np.zeros_like(origin)
    _, exit_ = sphere_interval(origin - object_centre(obj), direction, bounding_radius(obj))
    rows = np.flatnonzero(exit_ > 0)
    if rows.size:
        t[rows], normal[rows] = intersect_object(obj, origin[rows], direction[rows])
    return t, normal
