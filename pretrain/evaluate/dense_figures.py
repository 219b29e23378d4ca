"""A figure of dense predictions where people look rather than read: one row per image, the
image beside its predicted and true map (segmentation in a fixed class palette, depth in a
colour map over the true map's valid range, normals as (n + 1) / 2 RGB; invalid label pixels
black)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# Distinct colours for the first classes (the embedded scenes' 7), then a fixed random palette.
_FIRST_COLOURS = np.array(
    [
        [90, 90, 90],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
    ],
    np.uint8,
)


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, the same for every figure."""
    extra = np.random.default_rng(0).integers(0, 256, (max(num_classes, 0), 3), dtype=np.uint8)
    palette = np.concatenate([_FIRST_COLOURS, extra])
    return palette[:num_classes]


def _segmentation_rgb(classes: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
    palette = class_palette(num_classes)
    rgb = palette[np.clip(classes, 0, num_classes - 1)]
    rgb[(classes == ignore_label) | (classes < 0) | (classes >= num_classes)] = 0
    return rgb


def _value_range(values: np.ndarray) -> tuple[float, float]:
    return (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)


def _depth_rgb(depth: np.ndarray, valid: np.ndarray, low: float, high: float) -> np.ndarray:
    from matplotlib import colormaps

    scaled = np.clip((depth - low) / max(high - low, 1e-6), 0.0, 1.0)
    rgb = (colormaps["magma_r"](scaled)[..., :3] * 255).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


def _normals_rgb(normals: np.ndarray) -> np.ndarray:
    rgb = np.round((np.clip(normals, -1, 1) + 1.0) * 127.5).astype(np.uint8)
    rgb[np.sum(np.square(normals), axis=-1) < 0.25] = 0
    return rgb


def dense_maps_rgb(target: Any, predicted: np.ndarray, labels: np.ndarray) -> tuple[Any, Any]:
    """``(predicted RGB, true RGB)`` (n, H, W, 3) uint8 for ``target`` (a DenseTarget)."""
    if target.name == "segmentation":
        return tuple(
            _segmentation_rgb(np.asarray(m), target.num_classes, target.ignore_label)
            for m in (predicted, labels)
        )
    if target.name == "depth":
        valid = (labels > target.min_depth) & (labels < target.max_depth)
        true_range = _value_range(labels[valid])
        if target.loss == "ssi":  # disparity up to scale and shift: larger is nearer
            shown, shown_range = -predicted, _value_range(-predicted)
        else:
            shown, shown_range = predicted, true_range
        return (
            _depth_rgb(shown, np.ones_like(valid), *shown_range),
            _depth_rgb(labels, valid, *true_range),
        )
    return _normals_rgb(predicted), _normals_rgb(labels)


def save_dense_figure(
    path: str | Path, target: Any, images: np.ndarray, predicted: np.ndarray, labels: np.ndarray
) -> Path:
    """Write a PNG of ``images`` (n, H, W, 3) uint8 with their predicted and true maps."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    from matplotlib import pyplot as plt

    predicted_rgb, true_rgb = dense_maps_rgb(target, predicted, labels)
    rows = len(images)
    figure, axes = plt.subplots(rows, 3, figsize=(6.6, 2.2 * rows), squeeze=False)
    for row in range(rows):
        for column, (picture, title) in enumerate(
            ((images[row], "image"), (predicted_rgb[row], "predicted"), (true_rgb[row], "true"))
        ):
            axis = axes[row, column]
            axis.imshow(picture, interpolation="nearest")
            axis.set_axis_off()
            if row == 0:
                axis.set_title(f"{title} {target.name}" if column else title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
