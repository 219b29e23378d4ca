"""Host-side accumulators for dense-prediction metrics: segmentation, depth, surface normals.

The evaluator gathers the device outputs to the host and feeds them batch by batch as NumPy
arrays; everything is accumulated in float64 (int64 for counts). Each accumulator has
``update(...)`` and ``result() -> dict[str, float]``. ``weights`` (B,) mark padding rows: a row
whose weight is 0 (False) is ignored entirely, any other value counts it as a real image.

Merging across processes: the sufficient statistics are the merge mechanism.
``statistics() -> dict[str, np.ndarray]`` returns them; ``add_statistics(stats)`` adds another
accumulator's (or a cross-process total's) into this one; ``merge(other)`` is
``add_statistics(other.statistics())`` after checking that both have the same settings. Every
entry is SUMMED over processes, except ``NormalMetrics``' ``"errors"`` (the per-pixel errors,
which are CONCATENATED so that the median stays exact). Gather them with a path that keeps
int64 / float64 (JAX's ``process_allgather`` with x64 disabled would cast them to 32 bits).

Segmentation (:class:`SegmentationMetrics`, as mmsegmentation's ``IoUMetric``): pixels labelled
``ignore_label`` are dropped; a (C, C) confusion matrix ``M[label, predicted]`` is summed over the
WHOLE data set (never averaged per batch or image); per class ``c``

    I_c = M[c, c],   U_c = sum_j M[c, j] + sum_i M[i, c] - M[c, c],   L_c = sum_j M[c, j]
    IoU_c = I_c / U_c,   Acc_c = I_c / L_c

and ``pixel_accuracy = sum_c I_c / sum_c L_c`` (correct / labelled pixels). Classes with a zero
denominator (``U_c = 0``: in neither the predictions nor the labels; ``L_c = 0`` for the accuracy)
are counted by the ``absent`` convention:

- ``absent="skip"`` (mmsegmentation, the default): their IoU_c (Acc_c) is NaN and the means
  ``miou`` (``mean_class_accuracy``) are over the other classes only;
- ``absent="zero"`` (CoreNet): ``IoU_c = I_c / (U_c + 1e-10)`` (``Acc_c = I_c / (L_c + 1e-10)``),
  so an absent class counts as 0 and the means are over all C classes.

A class present in the labels but never predicted has IoU 0 under both. Results are in percent
(as both codebases report them); with no labelled pixel at all ``pixel_accuracy`` is NaN, and so
is ``miou`` under ``"skip"`` (no class to average).

Depth (:class:`DepthMetrics`, as mmsegmentation's ``DepthMetric`` / ZoeDepth): per image, valid
pixels are ``min_depth < gt < max_depth`` inside the optional evaluation crop ``(top, bottom,
left, right)`` (rows ``top:bottom``, columns ``left:right`` in the label's pixel coordinates;
NYUv2's is ``(45, 471, 41, 601)`` on 480 x 640). The prediction is first aligned
(``alignment``):

- ``"none"``: metric depth, as is;
- ``"median"``: ``pred * median(gt) / median(pred)`` over the valid pixels;
- ``"disparity_scale_shift"`` (MiDaS's protocol): the prediction is a DISPARITY; the least-squares
  ``s, t`` of ``s * pred + t ~ 1 / gt`` over the valid pixels (losses/dense.py's closed form, in
  float64), the aligned disparity clamped below at ``1 / max_depth``, and ``depth = 1 / it``;

then NaNs become ``min_depth`` and the depth is clipped to ``[min_depth, max_depth]`` (ZoeDepth's
post-processing; +-inf go to the bounds). The alignment statistics skip pixels where the
prediction is not finite (a median with a NaN in it would be NaN). With ``p`` the clipped
prediction and ``g`` the ground truth over the image's ``n`` valid pixels:

    abs_rel = mean |p - g| / g          rmse = sqrt(mean (p - g)^2)
    log10 = mean |log10 p - log10 g|    delta_k = mean [max(g / p, p / g) < 1.25^k],  k = 1, 2, 3

and each result is the MEAN OVER IMAGES of these per-image values (deltas as fractions in [0, 1]).
An image without a valid pixel is skipped: it enters no mean and is counted in
``images_without_valid_pixels``; ``images`` counts the evaluated ones (the metrics are NaN when
it is 0). A median alignment with ``median(pred) <= 0`` leaves the prediction unscaled.

Normals (:class:`NormalMetrics`): valid pixels have a ground-truth normal that is not the zero
vector (a NaN one is invalid too). Both vectors are normalised (a zero prediction counts as 90
degrees from anything); ``e = degrees(acos(clip(cos, -1, 1)))`` per pixel, POOLED over every valid
pixel of the set (not per image): ``mean_angle``, ``median_angle``, ``rmse_angle = sqrt(mean
e^2)`` in degrees, and ``within_11.25`` / ``within_22.5`` / ``within_30``, the percentage of pixels
with ``e`` below the threshold. The mean, RMSE and shares come from float64 sums; the median is
the EXACT median of all the set's pixel errors, kept as float32: 4 bytes per valid pixel (NYUv2's
654 test images at 480 x 640: about 0.8 GB), and ``result()`` needs as much again while it sorts
a concatenated copy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from losses.dense import least_squares_scale_shift

__all__ = [
    "ABSENT_CONVENTIONS",
    "DEPTH_ALIGNMENTS",
    "NORMAL_THRESHOLDS",
    "DepthMetrics",
    "NormalMetrics",
    "SegmentationMetrics",
    "align_depth",
    "angular_errors_degrees",
    "depth_image_metrics",
    "valid_depth_mask",
]

ABSENT_CONVENTIONS = ("skip", "zero")
DEPTH_ALIGNMENTS = ("none", "median", "disparity_scale_shift")
DEPTH_KEYS = ("abs_rel", "rmse", "log10", "delta1", "delta2", "delta3")
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)
# CoreNet's guard against 0 / 0 in the "zero" convention.
_CORENET_EPS = 1e-10


def _real_rows(weights: np.ndarray | None, batch: int) -> np.ndarray:
    """(B,) bool: the rows that are real images (weight != 0)."""
    if weights is None:
        return np.ones(batch, bool)
    weights = np.asarray(weights)
    if weights.shape != (batch,):
        raise ValueError(f"weights must be (batch,) = ({batch},), got shape {weights.shape}")
    return weights != 0


def _check_statistics(stats: Mapping[str, np.ndarray], expected: Mapping[str, tuple]) -> None:
    for key, shape in expected.items():
        if key not in stats:
            raise ValueError(f"statistics lack {key!r}; expected keys {sorted(expected)}")
        if shape is not None and np.shape(stats[key]) != shape:
            raise ValueError(f"statistics[{key!r}] must be {shape}, got {np.shape(stats[key])}")


# --------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------


def _ratio_with_absent(numerator: np.ndarray, denominator: np.ndarray, absent: str) -> np.ndarray:
    """Per-class ratio; a zero denominator gives NaN ("skip") or CoreNet's 0 ("zero")."""
    numerator = numerator.astype(np.float64)
    denominator = denominator.astype(np.float64)
    if absent == "zero":
        return numerator / (denominator + _CORENET_EPS)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, np.nan)


def _mean_over_classes(values: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN (without a warning) when there are none."""
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")


class SegmentationMetrics:
    """mIoU, pixel accuracy and mean class accuracy from a data-set-wide confusion matrix."""

    def __init__(self, num_classes: int, ignore_label: int = 255, absent: str = "skip"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if absent not in ABSENT_CONVENTIONS:
            raise ValueError(f"absent={absent!r}; use one of {ABSENT_CONVENTIONS}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.absent = absent
        self._confusion = np.zeros((num_classes, num_classes), np.int64)

    def update(
        self,
        predicted_classes: np.ndarray,
        labels: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> None:
        """Add a batch: ``predicted_classes`` and ``labels`` (B, H, W) ints; ``weights`` (B,)."""
        predicted = np.asarray(predicted_classes)
        labels = np.asarray(labels)
        if predicted.shape != labels.shape or labels.ndim != 3:
            raise ValueError(
                "predicted_classes and labels must both be (B, H, W), got "
                f"{predicted.shape} and {labels.shape}"
            )
        for name, array in (("predicted_classes", predicted), ("labels", labels)):
            if not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
        keep = (labels != self.ignore_label) & _real_rows(weights, labels.shape[0])[:, None, None]
        # int64 before multiplying: uint8 labels times num_classes would wrap around.
        kept_labels = labels[keep].astype(np.int64)
        kept_predicted = predicted[keep].astype(np.int64)
        for name, values in (("labels", kept_labels), ("predicted_classes", kept_predicted)):
            if values.size and (values.min() < 0 or values.max() >= self.num_classes):
                raise ValueError(
                    f"{name} outside [0, {self.num_classes}) (other than ignore_label "
                    f"{self.ignore_label}): {values.min()}..{values.max()}"
                )
        flat = kept_labels * self.num_classes + kept_predicted
        counts = np.bincount(flat, minlength=self.num_classes**2)
        self._confusion += counts.reshape(self.num_classes, self.num_classes)

    def confusion_matrix(self) -> np.ndarray:
        """(C, C) int64 copy, rows = labels, columns = predictions."""
        return self._confusion.copy()

    def per_class_iou(self) -> np.ndarray:
        """(C,) float64 IoU per class in percent; absent classes NaN ("skip") or 0 ("zero")."""
        intersection = np.diag(self._confusion)
        union = self._confusion.sum(axis=0) + self._confusion.sum(axis=1) - intersection
        return 100.0 * _ratio_with_absent(intersection, union, self.absent)

    def per_class_accuracy(self) -> np.ndarray:
        """(C,) float64 share of each class's labelled pixels predicted right, in percent."""
        intersection = np.diag(self._confusion)
        return 100.0 * _ratio_with_absent(intersection, self._confusion.sum(axis=1), self.absent)

    def result(self) -> dict[str, float]:
        """``miou``, ``pixel_accuracy``, ``mean_class_accuracy`` in percent."""
        labelled = self._confusion.sum()
        correct = np.trace(self._confusion)
        return {
            "miou": _mean_over_classes(self.per_class_iou()),
            "pixel_accuracy": 100.0 * correct / labelled if labelled else float("nan"),
            "mean_class_accuracy": _mean_over_classes(self.per_class_accuracy()),
        }

    def statistics(self) -> dict[str, np.ndarray]:
        """``{"confusion": (C, C) int64}``, to be summed over processes."""
        return {"confusion": self._confusion.copy()}

    def add_statistics(self, stats: Mapping[str, np.ndarray]) -> None:
        _check_statistics(stats, {"confusion": self._confusion.shape})
        self._confusion += np.asarray(stats["confusion"], np.int64)

    def merge(self, other: SegmentationMetrics) -> None:
        """Add ``other``'s counts into this accumulator (same classes, ignore label, convention)."""
        settings = ("num_classes", "ignore_label", "absent")
        if any(getattr(self, name) != getattr(other, name) for name in settings):
            raise ValueError("cannot merge SegmentationMetrics with different settings")
        self.add_statistics(other.statistics())


# --------------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------------


def valid_depth_mask(
    gt_depth: np.ndarray,
    min_depth: float,
    max_depth: float,
    crop: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """(..., H, W) bool: ``min_depth < gt < max_depth``, inside the crop (top, bottom, left, right)
    when one is given."""
    gt_depth = np.asarray(gt_depth)
    with np.errstate(invalid="ignore"):  # NaN ground truth is simply invalid
        valid = (gt_depth > min_depth) & (gt_depth < max_depth)
    if crop is None:
        return valid
    top, bottom, left, right = crop
    height, width = gt_depth.shape[-2:]
    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
        raise ValueError(f"crop {crop} does not fit a {height} x {width} image")
    inside = np.zeros((height, width), bool)
    inside[top:bottom, left:right] = True
    return valid & inside


def align_depth(
    prediction: np.ndarray,
    gt_depth: np.ndarray,
    valid: np.ndarray,
    alignment: str,
    min_depth: float,
    max_depth: float,
) -> np.ndarray:
    """One image's (H, W) prediction aligned (see the module docstring) and clipped, float64."""
    prediction = np.asarray(prediction, np.float64)
    gt_depth = np.asarray(gt_depth, np.float64)
    fit = valid & np.isfinite(prediction)
    if alignment == "median":
        predicted_median = np.median(prediction[fit]) if fit.any() else 0.0
        if predicted_median > 0:
            prediction = prediction * (np.median(gt_depth[fit]) / predicted_median)
    elif alignment == "disparity_scale_shift":
        target = np.divide(1.0, gt_depth, out=np.zeros_like(gt_depth), where=fit)
        scale, shift = least_squares_scale_shift(prediction[None], target[None], fit[None], xp=np)
        with np.errstate(invalid="ignore"):  # a non-finite prediction stays NaN, handled below
            disparity = np.maximum(scale[0] * prediction + shift[0], 1.0 / max_depth)
        prediction = 1.0 / disparity
    elif alignment != "none":
        raise ValueError(f"alignment={alignment!r}; use one of {DEPTH_ALIGNMENTS}")
    prediction = np.where(np.isnan(prediction), min_depth, prediction)
    return np.clip(prediction, min_depth, max_depth)


def depth_image_metrics(prediction: np.ndarray, gt_depth: np.ndarray) -> np.ndarray:
    """(6,) float64 ``abs_rel, rmse, log10, delta1, delta2, delta3`` over the given pixels.

    Both arrays hold only the valid pixels (any shape); the prediction is already positive.
    """
    p = np.asarray(prediction, np.float64)
    g = np.asarray(gt_depth, np.float64)
    ratio = np.maximum(g / p, p / g)
    return np.array(
        [
            np.mean(np.abs(p - g) / g),
            np.sqrt(np.mean((p - g) ** 2)),
            np.mean(np.abs(np.log10(p) - np.log10(g))),
            *(np.mean(ratio < 1.25**k) for k in (1, 2, 3)),
        ]
    )


class DepthMetrics:
    """AbsRel, RMSE, log10 and delta_k per image over its valid pixels, averaged over images."""

    def __init__(
        self,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        crop: tuple[int, int, int, int] | None = None,
        alignment: str = "none",
    ):
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        if alignment not in DEPTH_ALIGNMENTS:
            raise ValueError(f"alignment={alignment!r}; use one of {DEPTH_ALIGNMENTS}")
        if crop is not None and len(crop) != 4:
            raise ValueError(f"crop must be (top, bottom, left, right), got {crop}")
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)
        self.crop = None if crop is None else tuple(int(c) for c in crop)
        self.alignment = alignment
        self._sums = np.zeros(len(DEPTH_KEYS), np.float64)
        self._images = np.zeros((), np.int64)
        self._images_without_valid_pixels = np.zeros((), np.int64)

    def update(
        self,
        prediction: np.ndarray,
        gt_depth: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> None:
        """Add a batch: ``prediction`` and ``gt_depth`` (B, H, W) at the label's resolution."""
        prediction = np.asarray(prediction)
        gt_depth = np.asarray(gt_depth)
        if prediction.shape != gt_depth.shape or gt_depth.ndim != 3:
            raise ValueError(
                "prediction and gt_depth must both be (B, H, W), got "
                f"{prediction.shape} and {gt_depth.shape}"
            )
        valid = valid_depth_mask(gt_depth, self.min_depth, self.max_depth, self.crop)
        for b in np.flatnonzero(_real_rows(weights, gt_depth.shape[0])):
            if not valid[b].any():
                self._images_without_valid_pixels += 1
                continue
            aligned = align_depth(
                prediction[b], gt_depth[b], valid[b], self.alignment, self.min_depth, self.max_depth
            )
            self._sums += depth_image_metrics(aligned[valid[b]], gt_depth[b][valid[b]])
            self._images += 1

    def result(self) -> dict[str, float]:
        """The six means over images, plus ``images`` and ``images_without_valid_pixels``."""
        images = int(self._images)
        means = self._sums / images if images else np.full(len(DEPTH_KEYS), np.nan)
        return {
            **{key: float(value) for key, value in zip(DEPTH_KEYS, means)},
            "images": float(images),
            "images_without_valid_pixels": float(self._images_without_valid_pixels),
        }

    def statistics(self) -> dict[str, np.ndarray]:
        """Per-image metric sums and the two image counts, to be summed over processes."""
        return {
            "sums": self._sums.copy(),
            "images": self._images.copy(),
            "images_without_valid_pixels": self._images_without_valid_pixels.copy(),
        }

    def add_statistics(self, stats: Mapping[str, np.ndarray]) -> None:
        _check_statistics(
            stats, {"sums": self._sums.shape, "images": (), "images_without_valid_pixels": ()}
        )
        self._sums += np.asarray(stats["sums"], np.float64)
        self._images += np.int64(stats["images"])
        self._images_without_valid_pixels += np.int64(stats["images_without_valid_pixels"])

    def merge(self, other: DepthMetrics) -> None:
        """Add ``other``'s images into this accumulator (same depth range, crop, alignment)."""
        settings = ("min_depth", "max_depth", "crop", "alignment")
        if any(getattr(self, name) != getattr(other, name) for name in settings):
            raise ValueError("cannot merge DepthMetrics with different settings")
        self.add_statistics(other.statistics())


# --------------------------------------------------------------------------------------------------
# Surface normals
# --------------------------------------------------------------------------------------------------


def angular_errors_degrees(prediction: np.ndarray, gt_normals: np.ndarray) -> np.ndarray:
    """Angles in degrees between (N, 3) vectors, float64; the ground truth must be non-zero."""
    prediction = np.asarray(prediction, np.float64)
    gt_normals = np.asarray(gt_normals, np.float64)
    prediction_norm = np.linalg.norm(prediction, axis=-1)
    # A zero prediction stays the zero vector: cos 0, so 90 degrees from any ground truth.
    prediction = prediction / np.where(prediction_norm > 0, prediction_norm, 1.0)[:, None]
    gt_normals = gt_normals / np.linalg.norm(gt_normals, axis=-1, keepdims=True)
    cos = np.clip(np.sum(prediction * gt_normals, axis=-1), -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def _exact_median(values: np.ndarray) -> float:
    """The median of a float32 array (mean of the two middle values), partitioned in place."""
    n = values.size
    lower, upper = (n - 1) // 2, n // 2
    values.partition((lower, upper))
    return (float(values[lower]) + float(values[upper])) / 2.0


class NormalMetrics:
    """Angular errors of surface normals pooled over every valid pixel of the set."""

    # sums: valid pixels, sum e, sum e^2, and the pixel counts below each threshold.
    _SUMS = 3 + len(NORMAL_THRESHOLDS)

    def __init__(self):
        self._sums = np.zeros(self._SUMS, np.float64)
        self._errors: list[np.ndarray] = []

    def update(
        self,
        prediction: np.ndarray,
        gt_normals: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> None:
        """Add a batch: ``prediction`` and ``gt_normals`` (B, H, W, 3)."""
        prediction = np.asarray(prediction)
        gt_normals = np.asarray(gt_normals)
        if (
            prediction.shape != gt_normals.shape
            or gt_normals.ndim != 4
            or gt_normals.shape[-1] != 3
        ):
            raise ValueError(
                "prediction and gt_normals must both be (B, H, W, 3), got "
                f"{prediction.shape} and {gt_normals.shape}"
            )
        with np.errstate(invalid="ignore"):  # a NaN ground truth is simply invalid
            valid = np.linalg.norm(np.asarray(gt_normals, np.float64), axis=-1) > 0
        valid &= _real_rows(weights, gt_normals.shape[0])[:, None, None]
        errors = angular_errors_degrees(prediction[valid], gt_normals[valid])
        self._sums += np.array(
            [
                errors.size,
                errors.sum(),
                np.sum(errors**2),
                *(np.sum(errors < threshold) for threshold in NORMAL_THRESHOLDS),
            ],
            np.float64,
        )
        self._errors.append(errors.astype(np.float32))

    def result(self) -> dict[str, float]:
        """``mean_angle``, ``median_angle``, ``rmse_angle`` (degrees), ``within_*`` (percent)."""
        count = self._sums[0]
        if count == 0:
            keys = ["mean_angle", "median_angle", "rmse_angle"]
            keys += [f"within_{t:g}" for t in NORMAL_THRESHOLDS]
            return dict.fromkeys(keys, float("nan"))
        result = {
            "mean_angle": float(self._sums[1] / count),
            "median_angle": _exact_median(np.concatenate(self._errors)),
            "rmse_angle": float(np.sqrt(self._sums[2] / count)),
        }
        for threshold, within in zip(NORMAL_THRESHOLDS, self._sums[3:]):
            result[f"within_{threshold:g}"] = float(100.0 * within / count)
        return result

    def statistics(self) -> dict[str, np.ndarray]:
        """``"sums"`` (6,) float64, SUMMED over processes; ``"errors"`` (pixels,) float32, the
        per-pixel errors, CONCATENATED over processes."""
        errors = np.concatenate(self._errors) if self._errors else np.zeros(0, np.float32)
        return {"sums": self._sums.copy(), "errors": errors}

    def add_statistics(self, stats: Mapping[str, np.ndarray]) -> None:
        _check_statistics(stats, {"sums": self._sums.shape, "errors": None})
        errors = np.asarray(stats["errors"], np.float32).reshape(-1)
        if errors.size != stats["sums"][0]:
            raise ValueError(
                f"{errors.size} errors for {stats['sums'][0]:g} pixels in the statistics"
            )
        self._sums += np.asarray(stats["sums"], np.float64)
        self._errors.append(errors)

    def merge(self, other: NormalMetrics) -> None:
        """Add ``other``'s pixels into this accumulator."""
        self.add_statistics(other.statistics())
