"""Dense losses (losses/dense.py) against float64 NumPy references, with gradients checked by
central finite differences of those references.

Each loss runs on one device, under ``jax.shard_map`` on a mesh of 8 and a (4, 2) mesh (batch
split over both axes), and under ``jax.pmap``, with and without padding-image weights: the value
is the global mean over valid pixels whatever the split. Gradient conventions as in
test_bce_loss.py: through ``shard_map`` ``jax.grad`` is the global gradient; inside ``pmap`` a local
input's gradient is ``axis_size`` times its slice of the global one. The references solve the
SSI fit with ``numpy.linalg.lstsq``, not with the closed form under test.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from losses.dense import (
    angmf_normals_and_kappa,
    least_squares_scale_shift,
    masked_l1_loss,
    nll_angmf_loss,
    per_example_pixel_sums,
    pixel_cross_entropy,
    pixel_l1,
    pixel_nll,
    pooled_pixel_mean,
    ssi_depth_loss,
)

NUM_DEVICES = 8
GLOBAL_BATCH = 16
LOCAL_BATCH = GLOBAL_BATCH // NUM_DEVICES
HEIGHT, WIDTH = 3, 4
CLASSES = 5
IGNORE = 255
RTOL = 2e-5
GRAD_RTOL = 1e-4
PADDING_ROWS = (3, 13, 14, 15)


# --------------------------------------------------------------------------------------------------
# float64 NumPy references: a per-pixel loss and a mask, then the masked global mean
# --------------------------------------------------------------------------------------------------


def masked_mean(pixel_losses: np.ndarray, mask: np.ndarray, weights: np.ndarray | None) -> float:
    m = mask.astype(np.float64)
    if weights is not None:
        m = m * np.asarray(weights, np.float64)[:, None, None]
    if m.sum() == 0:
        return 0.0
    return float(np.sum(np.where(m > 0, pixel_losses, 0.0) * m) / m.sum())


def ce_reference(logits, labels, weights=None):
    x = np.asarray(logits, np.float64)
    valid = (labels != IGNORE) & (labels >= 0) & (labels < x.shape[-1])
    log_z = np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1)) + x.max(-1)
    picked = np.take_along_axis(x, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return masked_mean(log_z - picked, valid, weights)


def lstsq_scale_shift(p: np.ndarray, d: np.ndarray) -> tuple[float, float]:
    """One image's least-squares fit of ``s p + t`` to ``d`` (valid pixels only, flat)."""
    design = np.stack([p, np.ones_like(p)], axis=1)
    (s, t), *_ = np.linalg.lstsq(design, d, rcond=None)
    return s, t


def ssi_reference(prediction, target, valid, weights=None):
    p = np.asarray(prediction, np.float64)
    d = np.asarray(target, np.float64)
    residual = np.zeros_like(p)
    for b in range(p.shape[0]):
        s, t = lstsq_scale_shift(p[b][valid[b]], d[b][valid[b]])
        residual[b][valid[b]] = np.abs(s * p[b][valid[b]] + t - d[b][valid[b]])
    return masked_mean(residual, valid, weights)


def nll_angmf_reference(output, target, valid, weights=None):
    out = np.asarray(output, np.float64)
    n = out[..., :3] / np.linalg.norm(out[..., :3], axis=-1, keepdims=True)
    g = np.asarray(target, np.float64)
    g_norm = np.linalg.norm(g, axis=-1, keepdims=True)
    g = g / np.where(g_norm > 0, g_norm, 1.0)
    k = out[..., 3]
    kappa = np.where(k > 0, k, np.expm1(np.minimum(k, 0.0))) + 1.01
    cos = np.sum(n * g, axis=-1)
    usable = valid & (np.abs(cos) < 0.999)
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    pixel = -np.log(kappa**2 + 1) + kappa * theta + np.log1p(np.exp(-kappa * np.pi))
    return masked_mean(pixel, usable, weights)


def l1_reference(prediction, target, valid, weights=None):
    diff = np.abs(np.asarray(prediction, np.float64) - np.asarray(target, np.float64))
    if diff.ndim == 4:
        diff = diff.mean(-1)
    return masked_mean(np.where(valid, diff, 0.0), valid, weights)


def finite_difference_grad(f: Callable[[np.ndarray], float], x: np.ndarray, eps=1e-6):
    """Central differences of a float64 function, one coordinate at a time."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    flat_x, flat_grad = x.reshape(-1), grad.reshape(-1)
    for i in range(flat_x.size):
        saved = flat_x[i]
        flat_x[i] = saved + eps
        up = f(x)
        flat_x[i] = saved - eps
        down = f(x)
        flat_x[i] = saved
        flat_grad[i] = (up - down) / (2 * eps)
    return grad


# --------------------------------------------------------------------------------------------------
# Cases: global inputs (the first one is differentiated) and their reference
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossCase:
    name: str
    loss: Callable[..., jax.Array]
    reference: Callable[..., float]
    inputs: tuple[np.ndarray, ...]

    def expected(self, weights):
        return self.reference(*self.inputs, weights)

    def expected_grad(self, weights):
        rest = self.inputs[1:]
        return finite_difference_grad(lambda x: self.reference(x, *rest, weights), self.inputs[0])


def _random_unit(rng, shape):
    v = rng.normal(size=(*shape, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _make_cases() -> list[LossCase]:
    rng = np.random.default_rng(0)
    shape = (GLOBAL_BATCH, HEIGHT, WIDTH)
    valid = rng.uniform(size=shape) < 0.8

    logits = (2.0 * rng.normal(size=(*shape, CLASSES))).astype(np.float32)
    labels = rng.integers(0, CLASSES, shape).astype(np.int32)
    labels[rng.uniform(size=shape) < 0.2] = IGNORE
    labels[5] = IGNORE  # one image without any labelled pixel

    disparity = rng.uniform(0.1, 1.0, shape).astype(np.float32)
    target = (2.0 * disparity + 0.3 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    target[~valid] = np.inf  # never read: must not reach the value or the gradient

    output = rng.normal(size=(*shape, 4)).astype(np.float32)
    normals = _random_unit(rng, shape).astype(np.float32)
    normals[~valid] = 0.0
    # Two valid pixels with |cos| = 1, left out by the loss (and by the reference).
    valid_normals = valid.copy()
    valid_normals[0, 0, 0] = valid_normals[7, 1, 2] = True
    normals[[0, 7], [0, 1], [0, 2]] = _random_unit(rng, (2,))
    output[0, 0, 0, :3] = 2.0 * normals[0, 0, 0]
    output[7, 1, 2, :3] = -0.5 * normals[7, 1, 2]

    l1_prediction = rng.normal(size=(*shape, 3)).astype(np.float32)
    l1_target = rng.normal(size=(*shape, 3)).astype(np.float32)
    l1_target[~valid] = np.nan

    return [
        LossCase("pixel_ce", pixel_cross_entropy, ce_reference, (logits, labels)),
        LossCase("ssi", ssi_depth_loss, ssi_reference, (disparity, target, valid)),
        LossCase(
            "nll_angmf", nll_angmf_loss, nll_angmf_reference, (output, normals, valid_normals)
        ),
        LossCase("l1", masked_l1_loss, l1_reference, (l1_prediction, l1_target, valid)),
    ]


CASES = _make_cases()
case_param = pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])


def padding_weights(padded: bool) -> np.ndarray | None:
    if not padded:
        return None
    weights = np.ones(GLOBAL_BATCH, np.float32)
    weights[list(PADDING_ROWS)] = 0.0
    return weights


@functools.cache
def reference_value_and_grad(name: str, padded: bool) -> tuple[float, np.ndarray]:
    case = next(c for c in CASES if c.name == name)
    weights = padding_weights(padded)
    return case.expected(weights), case.expected_grad(weights)


def _bound(case: LossCase, axis_name, with_weights: bool):
    if with_weights:
        return lambda *args: case.loss(*args[:-1], axis_name=axis_name, weights=args[-1])
    return lambda *args: case.loss(*args, axis_name=axis_name)


def _inputs(case: LossCase, weights, dtype=jnp.float32) -> list[jax.Array]:
    first, *rest = case.inputs
    arrays = [jnp.asarray(first, dtype), *(jnp.asarray(x) for x in rest)]
    if weights is not None:
        arrays.append(jnp.asarray(weights))
    return arrays


def _assert_close(actual, expected, rtol=RTOL, name=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(np.max(np.abs(expected)), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


# --------------------------------------------------------------------------------------------------
# One device, shard_map, pmap
# --------------------------------------------------------------------------------------------------


@case_param
@pytest.mark.parametrize("padded", [False, True], ids=["all_rows", "padded"])
def test_single_device_matches_reference(case, padded):
    weights = padding_weights(padded)
    value, grad = jax.jit(jax.value_and_grad(_bound(case, None, padded)))(*_inputs(case, weights))
    expected_value, expected_grad = reference_value_and_grad(case.name, padded)
    assert value.dtype == jnp.float32 and value.shape == ()
    _assert_close(value, expected_value, name="loss")
    assert np.all(np.isfinite(np.asarray(grad)))
    _assert_close(grad, expected_grad, rtol=GRAD_RTOL, name="gradient")
    if padded:
        np.testing.assert_array_equal(np.asarray(grad)[list(PADDING_ROWS)], 0.0)


@case_param
@pytest.mark.parametrize(
    ("mesh_shape", "axis_name", "padded"),
    [
        ((NUM_DEVICES,), "data", False),
        ((NUM_DEVICES,), "data", True),
        ((4, 2), ("data", "fsdp"), True),
    ],
    ids=["mesh8", "mesh8_padded", "mesh4x2_padded"],
)
def test_shard_map_matches_unsplit(case, mesh_shape, axis_name, padded):
    weights = padding_weights(padded)
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    inputs = _inputs(case, weights)
    sharded = jax.shard_map(
        _bound(case, axis_name, padded),
        mesh=_mesh(mesh_shape, names),
        in_specs=tuple(P(axis_name) for _ in inputs),
        out_specs=P(),
    )
    value, grad = jax.value_and_grad(jax.jit(sharded))(*inputs)
    unsplit = jax.jit(_bound(case, None, padded))(*inputs)
    expected_value, expected_grad = reference_value_and_grad(case.name, padded)
    _assert_close(value, unsplit, name="sharded vs unsplit")
    _assert_close(value, expected_value, name="loss")
    assert np.all(np.isfinite(np.asarray(grad)))
    _assert_close(grad, expected_grad, rtol=GRAD_RTOL, name="gradient")


@case_param
def test_pmap_matches_reference(case):
    weights = padding_weights(True)
    local = [x.reshape(NUM_DEVICES, LOCAL_BATCH, *x.shape[1:]) for x in _inputs(case, weights)]
    values, grads = jax.pmap(jax.value_and_grad(_bound(case, "batch", True)), axis_name="batch")(
        *local
    )
    expected_value, expected_grad = reference_value_and_grad(case.name, True)
    _assert_close(values, np.full(NUM_DEVICES, expected_value), name="loss on every device")
    _assert_close(
        np.asarray(grads).reshape(expected_grad.shape),
        NUM_DEVICES * expected_grad,
        rtol=GRAD_RTOL,
        name="pmap gradient = axis_size x global",
    )


@case_param
def test_bfloat16_inputs_are_computed_in_float32(case):
    inputs = _inputs(case, None, dtype=jnp.bfloat16)
    value = jax.jit(_bound(case, None, False))(*inputs)
    rounded = np.asarray(inputs[0].astype(jnp.float32), np.float64)
    assert value.dtype == jnp.float32
    _assert_close(value, case.reference(rounded, *case.inputs[1:], None), name="bf16 loss")


# --------------------------------------------------------------------------------------------------
# The scale-and-shift fit and its degenerate images
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xp", [jnp, np], ids=["jax", "numpy"])
def test_least_squares_scale_shift_matches_lstsq(xp):
    rng = np.random.default_rng(3)
    prediction = rng.uniform(0.0, 2.0, (6, 5, 7))
    target = 1.7 * prediction - 0.4 + 0.2 * rng.normal(size=prediction.shape)
    valid = rng.uniform(size=prediction.shape) < 0.6
    target[~valid] = np.inf
    scale, shift = least_squares_scale_shift(prediction, target, valid, xp=xp)
    expected = np.array(
        [lstsq_scale_shift(p[v], d[v]) for p, d, v in zip(prediction, target, valid)]
    )
    rtol = 1e-5 if xp is jnp else 1e-12
    _assert_close(scale, expected[:, 0], rtol=rtol, name="scale")
    _assert_close(shift, expected[:, 1], rtol=rtol, name="shift")
    assert np.asarray(scale).dtype == (np.float32 if xp is jnp else np.float64)


def test_least_squares_scale_shift_degenerate_images():
    """Constant prediction: the shift-only fit; one valid pixel: exact; none: (1, 0)."""
    prediction = np.array([[[0.5, 0.5, 0.5, 0.5]], [[0.2, 0.9, 0.4, 0.1]], [[1.0, 2.0, 3.0, 4.0]]])
    target = np.array([[[1.0, 2.0, 4.0, 7.0]], [[3.0, 5.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]])
    valid = np.array([[[True] * 4], [[False, True, False, False]], [[False] * 4]])
    for xp in (np, jnp):
        scale, shift = least_squares_scale_shift(prediction, target, valid, xp=xp)
        _assert_close(scale, [1.0, 1.0, 1.0], rtol=1e-6, name=f"scale ({xp.__name__})")
        _assert_close(shift, [3.5 - 0.5, 5.0 - 0.9, 0.0], rtol=1e-6, name=f"shift ({xp.__name__})")


def test_ssi_loss_with_a_constant_prediction_image_is_finite():
    prediction = np.array([[[0.5, 0.5], [0.5, 0.5]], [[0.1, 0.2], [0.3, 0.4]]], np.float32)
    target = np.array([[[1.0, 2.0], [4.0, 7.0]], [[0.3, 0.5], [0.7, 0.9]]], np.float32)
    valid = np.ones(prediction.shape, bool)
    value, grad = jax.jit(jax.value_and_grad(ssi_depth_loss))(
        jnp.asarray(prediction), jnp.asarray(target), jnp.asarray(valid)
    )
    # Image 0 falls back to s = 1, t = mean(d) - 0.5: residuals |d - mean(d)|; image 1 is exact.
    expected = np.sum(np.abs(target[0] - target[0].mean())) / 8
    _assert_close(value, expected, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_ssi_loss_is_zero_for_an_affine_target():
    rng = np.random.default_rng(4)
    prediction = rng.uniform(0.1, 1.0, (2, 4, 4)).astype(np.float32)
    target = (3.0 * prediction + 0.25).astype(np.float32)
    value = ssi_depth_loss(jnp.asarray(prediction), jnp.asarray(target), jnp.ones((2, 4, 4), bool))
    assert float(value) < 1e-5


# --------------------------------------------------------------------------------------------------
# Hand-made values and edge cases
# --------------------------------------------------------------------------------------------------


def test_pixel_cross_entropy_hand_made():
    """Uniform logits over 4 classes: log 4 per labelled pixel; ignored / out-of-range: none."""
    logits = jnp.zeros((1, 2, 2, 4))
    labels = jnp.array([[[0, 3], [IGNORE, 7]]], jnp.int32)
    value, grad = jax.jit(jax.value_and_grad(pixel_cross_entropy))(logits, labels)
    _assert_close(value, math.log(4.0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[0, 1], 0.0)  # both pixels without a label
    # (softmax - one_hot) / 2 labelled pixels
    _assert_close(np.asarray(grad)[0, 0, 0], [-0.75 / 2, 0.25 / 2, 0.25 / 2, 0.25 / 2])


def test_everything_invalid_gives_zero_and_finite_gradients():
    logits = jnp.ones((2, 2, 2, 3))
    labels = jnp.full((2, 2, 2), IGNORE, jnp.int32)
    value, grad = jax.jit(jax.value_and_grad(pixel_cross_entropy))(logits, labels)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
    # NLL-AngMF where every prediction is (anti-)parallel to its ground truth: all left out.
    normals = jnp.array([[[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]]])
    output = jnp.concatenate(
        [jnp.array([[[[0.0, 0.0, 3.0], [-1.0, 0.0, 0.0]]]]), jnp.ones((1, 1, 2, 1))], -1
    )
    value, grad = jax.jit(jax.value_and_grad(nll_angmf_loss))(
        output, normals, jnp.ones((1, 1, 2), bool)
    )
    assert float(value) == 0.0 and np.all(np.isfinite(np.asarray(grad)))


def test_nll_angmf_hand_made_pixel():
    """A normal at 90 degrees with k = 0 (kappa = 1.01) and one at 30 degrees with k = 1."""
    output = jnp.array([[[[1.0, 0.0, 0.0, 0.0], [0.5, math.sqrt(3) / 2, 0.0, 1.0]]]])
    target = jnp.array([[[[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]]])
    value = nll_angmf_loss(output, target, jnp.ones((1, 1, 2), bool))

    def pixel(kappa, theta):
        return -math.log(kappa**2 + 1) + kappa * theta + math.log(1 + math.exp(-kappa * math.pi))

    expected = (pixel(1.01, math.pi / 2) + pixel(2.01, math.pi / 6)) / 2
    _assert_close(value, expected, rtol=1e-6)


def test_angmf_normals_and_kappa():
    output = np.random.default_rng(5).normal(size=(2, 3, 3, 4)).astype(np.float32)
    bf16 = jnp.asarray(output, jnp.bfloat16)
    normals, kappa = angmf_normals_and_kappa(bf16)
    x = np.asarray(bf16.astype(jnp.float32), np.float64)
    _assert_close(normals, x[..., :3] / np.linalg.norm(x[..., :3], axis=-1, keepdims=True))
    k = x[..., 3]
    _assert_close(kappa, np.where(k > 0, k, np.exp(np.minimum(k, 0)) - 1) + 1.01)
    assert normals.dtype == kappa.dtype == jnp.float32


def test_masked_l1_single_channel():
    rng = np.random.default_rng(6)
    prediction = rng.normal(size=(2, 3, 3)).astype(np.float32)
    target = rng.normal(size=(2, 3, 3)).astype(np.float32)
    valid = rng.uniform(size=(2, 3, 3)) < 0.7
    value = masked_l1_loss(jnp.asarray(prediction), jnp.asarray(target), jnp.asarray(valid))
    _assert_close(value, l1_reference(prediction, target, valid))


# --------------------------------------------------------------------------------------------------
# Per-example halves (the CLIP task's accumulated losses: CLIPTeX's pseudo-label terms)
# --------------------------------------------------------------------------------------------------


def _per_pixel(name: str, first: jax.Array, rest) -> tuple[jax.Array, jax.Array]:
    if name == "pixel_ce":
        return pixel_nll(first, jnp.asarray(rest[0]), ignore_label=IGNORE)
    target, valid = (jnp.asarray(x) for x in rest)
    return pixel_l1(first, target, valid), valid


@pytest.mark.parametrize("name", ["pixel_ce", "l1"])
def test_pooled_per_example_sums_match_reference_in_any_micro_batches(name):
    """Per-example sums made in micro-batches of 4, 5 and 7 rows and pooled once: the value and
    gradient of the whole batch's masked mean (the float64 references, padding rows weighted 0
    by giving them no valid pixel)."""
    case = next(c for c in CASES if c.name == name)
    first, *rest = case.inputs
    cuts = (0, 4, 9, GLOBAL_BATCH)

    def pooled(logits_or_prediction):
        sums, counts = [], []
        for start, stop in itertools.pairwise(cuts):
            part = [np.asarray(x)[start:stop] for x in rest]
            pixel, valid = _per_pixel(name, logits_or_prediction[start:stop], part)
            s, c = per_example_pixel_sums(pixel, valid)
            sums.append(s)
            counts.append(c)
        return pooled_pixel_mean(jnp.concatenate(sums), jnp.concatenate(counts))

    value, grad = jax.jit(jax.value_and_grad(pooled))(jnp.asarray(first, jnp.float32))
    expected_value, expected_grad = reference_value_and_grad(name, False)
    _assert_close(value, expected_value, name="pooled loss")
    _assert_close(grad, expected_grad, rtol=GRAD_RTOL, name="pooled gradient")
    # Under shard_map the pooled mean psums over the devices like global_pixel_mean.
    pixel, valid = _per_pixel(name, jnp.asarray(first), rest)
    sums, counts = per_example_pixel_sums(pixel, valid)
    sharded = jax.shard_map(
        functools.partial(pooled_pixel_mean, axis_name="data"),
        mesh=_mesh((NUM_DEVICES,), ("data",)),
        in_specs=(P("data"), P("data")),
        out_specs=P(),
    )
    _assert_close(jax.jit(sharded)(sums, counts), expected_value, name="sharded pooled loss")


def test_pooled_mean_without_valid_pixels_is_zero_with_finite_gradients():
    sums, counts = jnp.zeros(3), jnp.zeros(3)
    value, grad = jax.value_and_grad(lambda s: pooled_pixel_mean(s, counts))(sums)
    assert float(value) == 0.0 and np.all(np.isfinite(np.asarray(grad)))
