"""What a scene is, and where its objects stand: camera, light, primitives on a ground plane.

World frame: right-handed, ``y`` up, the ground is the plane ``y = 0``; the camera looks at the
scene from ``+z`` and above.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "pyramid", "torus")


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
        fx, fy, fz = unit(np.subtract(self.target, self.eye, dtype=np.float64))
        right = unit(np.array([-fz, 0.0, fx]))  # forward x (0, 1, 0)
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


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


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
