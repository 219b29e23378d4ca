"""Dense metrics (pretrain/evaluate/dense_metrics.py) against independent float64 NumPy code.

The references here count per class with boolean masks (no confusion matrix), fit the MiDaS
alignment with ``numpy.linalg.lstsq`` on ``[pred, 1]`` and loop over images explicitly. Hand-made
cases pin the numbers: the two absent-class conventions on a 2x2 image, depth errors of a 2x2
image, 0 / 90 / 180-degree normals. Every accumulator must give the same result fed in several
batches as in one, ignore padding rows, and merge (and round-trip its statistics) exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pretrain.evaluate.dense_metrics import DepthMetrics, NormalMetrics, SegmentationMetrics

IGNORE = 255
NYU_CROP = (45, 471, 41, 601)


def _assert_results(actual: dict, expected: dict, rtol=1e-10, atol=1e-10):
    assert set(expected) <= set(actual), (sorted(actual), sorted(expected))
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=rtol, atol=atol, err_msg=key)


# --------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------


def segmentation_reference(predicted, labels, num_classes, absent, weights=None):
    """Per-class counts from boolean masks over the whole set; percent."""
    keep = labels != IGNORE
    if weights is not None:
        keep &= (np.asarray(weights) != 0)[:, None, None]
    iou, accuracy = [], []
    for c in range(num_classes):
        is_predicted, is_label = (predicted == c) & keep, (labels == c) & keep
        intersection = float(np.sum(is_predicted & is_label))
        union = float(np.sum(is_predicted | is_label))
        labelled = float(np.sum(is_label))
        if absent == "zero":
            iou.append(intersection / (union + 1e-10))
            accuracy.append(intersection / (labelled + 1e-10))
        else:
            iou.append(intersection / union if union else np.nan)
            accuracy.append(intersection / labelled if labelled else np.nan)
    correct = np.sum((predicted == labels) & keep)
    return {
        "miou": 100 * np.nanmean(iou),
        "pixel_accuracy": 100 * correct / np.sum(keep),
        "mean_class_accuracy": 100 * np.nanmean(accuracy),
    }, 100 * np.array(iou)


def _random_segmentation(seed=0, batch=6, num_classes=6):
    rng = np.random.default_rng(seed)
    shape = (batch, 7, 9)
    # The last class never occurs; class num_classes - 2 is only ever a label, never predicted.
    labels = rng.integers(0, num_classes - 1, shape)
    predicted = rng.integers(0, num_classes - 2, shape)
    predicted[labels == predicted] = labels[labels == predicted]  # some agreement
    match = rng.uniform(size=shape) < 0.4
    predicted[match] = np.minimum(labels[match], num_classes - 3)
    labels[rng.uniform(size=shape) < 0.2] = IGNORE
    labels[1] = IGNORE  # an image without a labelled pixel
    return predicted, labels


@pytest.mark.parametrize("absent", ["skip", "zero"])
def test_segmentation_random_matches_reference(absent):
    predicted, labels = _random_segmentation()
    metrics = SegmentationMetrics(6, absent=absent)
    metrics.update(predicted, labels)
    expected, expected_iou = segmentation_reference(predicted, labels, 6, absent)
    _assert_results(metrics.result(), expected)
    np.testing.assert_allclose(metrics.per_class_iou(), expected_iou, rtol=1e-12)
    assert metrics.confusion_matrix().sum() == np.sum(labels != IGNORE)


def test_segmentation_hand_made_absent_conventions():
    """2x2 image, 3 classes, class 2 nowhere, one ignored pixel.

    Labelled pixels: (label 0, pred 0), (label 0, pred 1), (label 1, pred 1).
    IoU_0 = 1/2, IoU_1 = 1/2, IoU_2 = 0/0; Acc_0 = 1/2, Acc_1 = 1, Acc_2 = 0/0.
    """
    labels = np.array([[[0, 0], [1, IGNORE]]])
    predicted = np.array([[[0, 1], [1, 0]]])
    skip = SegmentationMetrics(3, absent="skip")
    zero = SegmentationMetrics(3, absent="zero")
    for metrics in (skip, zero):
        metrics.update(predicted, labels)
    _assert_results(
        skip.result(), {"miou": 50.0, "pixel_accuracy": 200 / 3, "mean_class_accuracy": 75.0}
    )
    _assert_results(
        zero.result(),
        {"miou": 100 / 3, "pixel_accuracy": 200 / 3, "mean_class_accuracy": 50.0},
        rtol=1e-8,
    )
    assert np.isnan(skip.per_class_iou()[2]) and zero.per_class_iou()[2] == 0.0


def test_segmentation_class_only_in_labels_counts_zero_in_both():
    """Labels [0, 2, 2], predictions [0, 0, 0]: IoU_0 = 1/3, class 1 absent, IoU_2 = 0."""
    labels = np.array([[[0, 2, 2]]])
    predicted = np.zeros_like(labels)
    results = {}
    for absent in ("skip", "zero"):
        metrics = SegmentationMetrics(3, absent=absent)
        metrics.update(predicted, labels)
        results[absent] = metrics.result()["miou"]
    np.testing.assert_allclose(results["skip"], 100 / 6, rtol=1e-12)
    np.testing.assert_allclose(results["zero"], 100 / 9, rtol=1e-8)


def test_segmentation_all_ignored():
    labels = np.full((2, 3, 3), IGNORE)
    predicted = np.zeros((2, 3, 3), np.int64)
    skip, zero = SegmentationMetrics(4), SegmentationMetrics(4, absent="zero")
    for metrics in (skip, zero):
        metrics.update(predicted, labels)
    assert all(np.isnan(v) for v in skip.result().values())
    assert zero.result()["miou"] == 0.0 and np.isnan(zero.result()["pixel_accuracy"])


def test_segmentation_batches_padding_merge_and_statistics():
    predicted, labels = _random_segmentation(seed=1, batch=8)
    whole = SegmentationMetrics(6)
    whole.update(predicted, labels)

    batched = SegmentationMetrics(6)
    for start in range(0, 8, 3):
        batched.update(predicted[start : start + 3], labels[start : start + 3])
    np.testing.assert_array_equal(batched.confusion_matrix(), whole.confusion_matrix())

    # Padding rows hold garbage (out-of-range classes) and must neither count nor raise.
    padded_predicted = np.concatenate([predicted, np.full((2, 7, 9), 99)])
    padded_labels = np.concatenate([labels, np.full((2, 7, 9), 42)])
    weights = np.array([1] * 8 + [0, 0])
    padded = SegmentationMetrics(6)
    padded.update(padded_predicted, padded_labels, weights=weights)
    np.testing.assert_array_equal(padded.confusion_matrix(), whole.confusion_matrix())

    first, second = SegmentationMetrics(6), SegmentationMetrics(6)
    first.update(predicted[:5], labels[:5])
    second.update(predicted[5:], labels[5:])
    first.merge(second)
    np.testing.assert_array_equal(first.confusion_matrix(), whole.confusion_matrix())
    restored = SegmentationMetrics(6)
    restored.add_statistics(whole.statistics())
    _assert_results(restored.result(), whole.result(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="different settings"):
        first.merge(SegmentationMetrics(6, absent="zero"))


def test_segmentation_uint8_inputs_and_out_of_range():
    predicted, labels = _random_segmentation(seed=2)
    as_int, as_uint8 = SegmentationMetrics(6), SegmentationMetrics(6)
    as_int.update(predicted, labels)
    as_uint8.update(predicted.astype(np.uint8), labels.astype(np.uint8))
    np.testing.assert_array_equal(as_int.confusion_matrix(), as_uint8.confusion_matrix())
    with pytest.raises(ValueError, match="outside"):
        as_int.update(np.zeros((1, 1, 2), int), np.array([[[1, 6]]]))


# --------------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------------


def depth_reference(prediction, gt, alignment, min_depth=1e-3, max_depth=10.0, crop=None):
    """Per-image metrics averaged over images, and the number of images without valid pixels."""
    per_image, skipped = [], 0
    for pred, g in zip(np.asarray(prediction, np.float64), np.asarray(gt, np.float64)):
        valid = (g > min_depth) & (g < max_depth)
        if crop is not None:
            outside = np.ones_like(valid)
            outside[crop[0] : crop[1], crop[2] : crop[3]] = False
            valid[outside] = False
        if not valid.any():
            skipped += 1
            continue
        if alignment == "median":
            pred = pred * np.median(g[valid]) / np.median(pred[valid])
        elif alignment == "disparity_scale_shift":
            design = np.stack([pred[valid], np.ones(valid.sum())], axis=1)
            (s, t), *_ = np.linalg.lstsq(design, 1.0 / g[valid], rcond=None)
            pred = 1.0 / np.maximum(s * pred + t, 1.0 / max_depth)
        p = np.clip(pred, min_depth, max_depth)[valid]
        t = g[valid]
        ratio = np.maximum(p / t, t / p)
        per_image.append(
            [
                np.mean(np.abs(p - t) / t),
                np.sqrt(np.mean((p - t) ** 2)),
                np.mean(np.abs(np.log10(p) - np.log10(t))),
                np.mean(ratio < 1.25),
                np.mean(ratio < 1.25**2),
                np.mean(ratio < 1.25**3),
            ]
        )
    means = np.mean(per_image, axis=0)
    keys = ("abs_rel", "rmse", "log10", "delta1", "delta2", "delta3")
    result = dict(zip(keys, means))
    result.update(images=len(per_image), images_without_valid_pixels=skipped)
    return result


def _random_depth(alignment, seed=0, batch=4, shape=(12, 16)):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.5, 12.0, (batch, *shape))  # some beyond max_depth: invalid
    gt[rng.uniform(size=gt.shape) < 0.1] = 0.0  # missing depth
    gt[2] = 0.0  # an image without valid pixels
    noise = np.exp(0.2 * rng.normal(size=gt.shape))
    safe_gt = np.where(gt > 0, gt, 1.0)
    if alignment == "none":
        prediction = safe_gt * noise
        prediction[0, 0, :4] = [50.0, -1.0, 0.0, 1e-6]  # clipped to [min_depth, max_depth]
    elif alignment == "median":
        prediction = 0.3 * safe_gt * noise
    else:  # a disparity, affine in 1 / gt, with a few far-off values that hit the 1/max cap
        prediction = 2.0 / safe_gt * noise + 0.1
        prediction[0, 1, :3] = [-5.0, -1.0, 40.0]
    return prediction, gt


@pytest.mark.parametrize("alignment", ["none", "median", "disparity_scale_shift"])
@pytest.mark.parametrize("crop", [None, (2, 10, 3, 14)], ids=["whole", "crop"])
def test_depth_random_matches_reference(alignment, crop):
    prediction, gt = _random_depth(alignment)
    metrics = DepthMetrics(crop=crop, alignment=alignment)
    metrics.update(prediction, gt)
    expected = depth_reference(prediction, gt, alignment, crop=crop)
    assert expected["images"] == 3 and expected["images_without_valid_pixels"] == 1
    _assert_results(metrics.result(), expected, rtol=1e-9, atol=1e-12)


def test_depth_hand_made():
    """gt [[1, 2], [4, 0]], pred [[1, 1], [4, 20]]: the 0 pixel is invalid; ratios 1, 2, 1."""
    metrics = DepthMetrics()
    metrics.update(np.array([[[1.0, 1.0], [4.0, 20.0]]]), np.array([[[1.0, 2.0], [4.0, 0.0]]]))
    expected = {
        "abs_rel": 0.5 / 3,
        "rmse": math.sqrt(1 / 3),
        "log10": math.log10(2) / 3,
        "delta1": 2 / 3,
        "delta2": 2 / 3,  # 1.25^2 = 1.5625 < 2
        "delta3": 2 / 3,  # 1.25^3 = 1.953 < 2
        "images": 1,
        "images_without_valid_pixels": 0,
    }
    _assert_results(metrics.result(), expected, rtol=1e-12)


def test_depth_prediction_is_clipped():
    """pred 100 -> 10 against gt 5 (AbsRel 1), pred -3 -> 1e-3 against gt 2, NaN -> 1e-3."""
    metrics = DepthMetrics()
    metrics.update(np.array([[[100.0, -3.0, np.nan]]]), np.array([[[5.0, 2.0, 2.0]]]))
    expected_abs_rel = (1.0 + 2 * (2.0 - 1e-3) / 2.0) / 3
    _assert_results(metrics.result(), {"abs_rel": expected_abs_rel, "delta3": 0.0}, rtol=1e-12)


def test_depth_nyu_crop_ignores_the_border():
    rng = np.random.default_rng(5)
    gt = rng.uniform(1.0, 9.0, (1, 480, 640))
    prediction = 3.0 * gt
    top, bottom, left, right = NYU_CROP
    prediction[:, top:bottom, left:right] = gt[:, top:bottom, left:right]
    cropped, whole = DepthMetrics(crop=NYU_CROP), DepthMetrics()
    cropped.update(prediction, gt)
    whole.update(prediction, gt)
    assert cropped.result()["abs_rel"] == 0.0 and cropped.result()["delta1"] == 1.0
    assert whole.result()["abs_rel"] > 0.1
    with pytest.raises(ValueError, match="does not fit"):
        DepthMetrics(crop=(0, 500, 0, 640)).update(prediction, gt)


def test_depth_alignments_recover_exact_predictions():
    gt = np.random.default_rng(6).uniform(0.5, 9.0, (2, 6, 6))
    median = DepthMetrics(alignment="median")
    median.update(3.0 * gt, gt)
    disparity = DepthMetrics(alignment="disparity_scale_shift")
    disparity.update((1.0 / gt - 0.05) / 2.0, gt)  # s = 2, t = 0.05 recovers 1 / gt
    for metrics in (median, disparity):
        result = metrics.result()
        assert result["abs_rel"] < 1e-12 and result["delta1"] == 1.0


def test_depth_median_alignment_with_a_non_positive_median_leaves_the_prediction():
    gt = np.array([[[2.0, 4.0, 6.0]]])
    prediction = np.array([[[-1.0, 0.0, 3.0]]])  # median 0: no scale; clipped to [1e-3, 10]
    aligned, plain = DepthMetrics(alignment="median"), DepthMetrics()
    aligned.update(prediction, gt)
    plain.update(prediction, gt)
    _assert_results(aligned.result(), plain.result(), rtol=0, atol=0)


def test_depth_batches_padding_merge_and_statistics():
    prediction, gt = _random_depth("disparity_scale_shift", seed=7, batch=6)
    settings = {"alignment": "disparity_scale_shift", "crop": (1, 11, 0, 16)}
    whole = DepthMetrics(**settings)
    whole.update(prediction, gt)
    batched = DepthMetrics(**settings)
    for start in range(0, 6, 4):
        batched.update(prediction[start : start + 4], gt[start : start + 4])
    _assert_results(batched.result(), whole.result(), rtol=1e-13)

    # Padding rows: garbage that would otherwise count (a valid image, an image without pixels).
    padded = DepthMetrics(**settings)
    garbage_gt = np.stack([np.full((12, 16), 5.0), np.zeros((12, 16))])
    padded.update(
        np.concatenate([prediction, np.ones((2, 12, 16))]),
        np.concatenate([gt, garbage_gt]),
        weights=np.array([True] * 6 + [False, False]),
    )
    _assert_results(padded.result(), whole.result(), rtol=0, atol=0)

    first, second = DepthMetrics(**settings), DepthMetrics(**settings)
    first.update(prediction[:2], gt[:2])
    second.update(prediction[2:], gt[2:])
    first.merge(second)
    _assert_results(first.result(), whole.result(), rtol=1e-13)
    restored = DepthMetrics(**settings)
    restored.add_statistics(whole.statistics())
    _assert_results(restored.result(), whole.result(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="different settings"):
        first.merge(DepthMetrics())


# --------------------------------------------------------------------------------------------------
# Normals
# --------------------------------------------------------------------------------------------------


def normal_reference(prediction, gt, weights=None):
    """Pooled angular errors in degrees over pixels with a non-zero ground truth."""
    p = np.asarray(prediction, np.float64).reshape(-1, 3)
    g = np.asarray(gt, np.float64).reshape(-1, 3)
    valid = np.any(g != 0, axis=1)
    if weights is not None:
        valid &= np.repeat(np.asarray(weights) != 0, len(p) // len(weights))
    p, g = p[valid], g[valid]
    cos = np.einsum("nd,nd->n", p, g) / (np.linalg.norm(p, axis=1) * np.linalg.norm(g, axis=1))
    errors = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    return {
        "mean_angle": errors.mean(),
        "median_angle": np.median(errors),
        "rmse_angle": np.sqrt(np.mean(errors**2)),
        "within_11.25": 100 * np.mean(errors < 11.25),
        "within_22.5": 100 * np.mean(errors < 22.5),
        "within_30": 100 * np.mean(errors < 30),
    }


def _random_normals(seed=0, batch=4, shape=(5, 6)):
    rng = np.random.default_rng(seed)
    gt = rng.normal(size=(batch, *shape, 3))
    gt /= np.linalg.norm(gt, axis=-1, keepdims=True)
    prediction = 3.0 * (gt + 0.5 * rng.normal(size=gt.shape))  # not unit: normalised inside
    gt[rng.uniform(size=gt.shape[:-1]) < 0.2] = 0.0  # no ground truth
    return prediction, gt


# The median is over float32 errors: equal to the float64 one to float32 rounding (~1e-5 deg).
_MEDIAN_ATOL = 1e-4


def _assert_normals(actual, expected):
    median = {"median_angle": expected["median_angle"]}
    rest = {k: v for k, v in expected.items() if k != "median_angle"}
    _assert_results(actual, rest, rtol=1e-12)
    _assert_results(actual, median, rtol=0, atol=_MEDIAN_ATOL)


def test_normals_hand_made():
    """0 degrees (a scaled copy), 90 degrees, 180 degrees, and a pixel without ground truth."""
    prediction = np.array([[[[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [1.0, 1.0, 1.0]]]])
    gt = np.array([[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]])
    metrics = NormalMetrics()
    metrics.update(prediction, gt)
    expected = {
        "mean_angle": 90.0,
        "median_angle": 90.0,
        "rmse_angle": math.sqrt((90.0**2 + 180.0**2) / 3),
        "within_11.25": 100 / 3,
        "within_22.5": 100 / 3,
        "within_30": 100 / 3,
    }
    _assert_results(metrics.result(), expected, rtol=1e-12)
    two = NormalMetrics()
    two.update(prediction[:, :, :2], gt[:, :, :2])  # 0 and 90 degrees: the median averages them
    _assert_results(two.result(), {"mean_angle": 45.0, "median_angle": 45.0}, rtol=1e-12)


def test_normals_random_matches_reference():
    prediction, gt = _random_normals()
    metrics = NormalMetrics()
    metrics.update(prediction, gt)
    _assert_normals(metrics.result(), normal_reference(prediction, gt))


def test_normals_batches_padding_merge_and_statistics():
    prediction, gt = _random_normals(seed=1, batch=7)
    whole = NormalMetrics()
    whole.update(prediction, gt)
    expected = normal_reference(prediction, gt)
    batched = NormalMetrics()
    for start in range(0, 7, 2):
        batched.update(prediction[start : start + 2], gt[start : start + 2])
    _assert_normals(batched.result(), expected)
    assert batched.result()["median_angle"] == whole.result()["median_angle"]

    padded = NormalMetrics()
    garbage = np.ones((2, 5, 6, 3))
    padded.update(
        np.concatenate([prediction, -garbage]),
        np.concatenate([gt, garbage]),
        weights=np.array([1] * 7 + [0, 0]),
    )
    _assert_results(padded.result(), whole.result(), rtol=0, atol=0)

    first, second = NormalMetrics(), NormalMetrics()
    first.update(prediction[:3], gt[:3])
    second.update(prediction[3:], gt[3:])
    first.merge(second)
    _assert_results(first.result(), whole.result(), rtol=1e-13)
    restored = NormalMetrics()
    restored.add_statistics(whole.statistics())
    _assert_results(restored.result(), whole.result(), rtol=0, atol=0)


def test_normals_without_valid_pixels_is_nan():
    metrics = NormalMetrics()
    metrics.update(np.ones((1, 2, 2, 3)), np.zeros((1, 2, 2, 3)))
    assert all(np.isnan(v) for v in metrics.result().values())
