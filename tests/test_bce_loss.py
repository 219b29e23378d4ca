"""CatLIP's multi-label BCE and the single-label (label-smoothed) softmax cross-entropy against
float64 NumPy references with analytic gradients.

Each loss runs on one device, under ``jax.shard_map`` on a 1-axis mesh of 8 and a (4, 2) mesh
(batch split over both axes), and under ``jax.pmap`` on 8 fake CPU devices, with and without
padding-row weights. Gradient conventions as in test_alignment_loss.py: through ``shard_map``
``jax.grad`` is the global gradient; inside ``pmap`` a local input's gradient is ``axis_size`` times
its slice of the global one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from losses.bce import multilabel_bce_loss
from losses.classification import softmax_cross_entropy_loss

NUM_DEVICES = 8
GLOBAL_BATCH = 16
LOCAL_BATCH = GLOBAL_BATCH // NUM_DEVICES
CLASSES = 10
LABEL_SMOOTHING = 0.1
RTOL = 1e-5
# Padding rows on several devices (rows 3, 13, 14, 15), as a last partial batch padded per device.
PADDING_ROWS = (3, 13, 14, 15)


# --------------------------------------------------------------------------------------------------
# float64 references: per-row losses and their gradients with respect to the logits
# --------------------------------------------------------------------------------------------------


def bce_rows(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum_c softplus(x) - y x per row, and d/dx = sigmoid(x) - y."""
    x = np.asarray(logits, np.float64)
    y = np.asarray(targets, np.float64)
    rows = np.sum(np.logaddexp(0.0, x) - y * x, axis=-1)
    return rows, 1.0 / (1.0 + np.exp(-x)) - y


def smoothed_ce_rows(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-sum_c q log softmax(x) per row with q = (1 - eps) onehot + eps / C; d/dx = softmax - q."""
    x = np.asarray(logits, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    q = np.full(x.shape, LABEL_SMOOTHING / x.shape[-1])
    q[np.arange(len(labels)), labels] += 1.0 - LABEL_SMOOTHING
    return -np.sum(q * log_probs, axis=-1), np.exp(log_probs) - q


def weighted_mean(rows_and_grads, weights: np.ndarray | None) -> tuple[float, np.ndarray]:
    """Global mean of the row losses (over the weight sum with weights) and d mean / d logits."""
    rows, d_rows = rows_and_grads
    w = np.ones(len(rows)) if weights is None else np.asarray(weights, np.float64)
    return float(np.sum(w * rows) / w.sum()), w[:, None] * d_rows / w.sum()


@dataclasses.dataclass(frozen=True)
class LossCase:
    name: str
    loss: Callable[..., jax.Array]
    reference_rows: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    targets: np.ndarray  # multi-hot (uint8) or labels (int32), global batch

    def reference(self, logits, weights=None):
        return weighted_mean(self.reference_rows(logits, self.targets), weights)


def _make_cases() -> list[LossCase]:
    rng = np.random.default_rng(0)
    multi_hot = (rng.uniform(size=(GLOBAL_BATCH, CLASSES)) < 0.3).astype(np.uint8)
    labels = rng.integers(0, CLASSES, GLOBAL_BATCH).astype(np.int32)
    return [
        LossCase("bce", multilabel_bce_loss, bce_rows, multi_hot),
        LossCase(
            "softmax_ce",
            functools.partial(softmax_cross_entropy_loss, label_smoothing=LABEL_SMOOTHING),
            smoothed_ce_rows,
            labels,
        ),
    ]


CASES = _make_cases()
case_param = pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
weights_param = pytest.mark.parametrize("padded", [False, True], ids=["all_rows", "padded"])


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    return 3.0 * np.random.default_rng(1).normal(size=(GLOBAL_BATCH, CLASSES))


def padding_weights(padded: bool) -> np.ndarray | None:
    if not padded:
        return None
    weights = np.ones(GLOBAL_BATCH, np.float32)
    weights[list(PADDING_ROWS)] = 0.0
    return weights


def _assert_close(actual, expected, rtol=RTOL, name=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(np.max(np.abs(expected)), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _bound(case: LossCase, axis_name, with_weights: bool):
    """loss(logits, targets[, weights]) with the axis name bound."""
    if with_weights:
        return lambda x, t, w: case.loss(x, t, axis_name=axis_name, weights=w)
    return lambda x, t: case.loss(x, t, axis_name=axis_name)


def _inputs(case: LossCase, logits, weights, dtype=jnp.float32):
    inputs = [jnp.asarray(logits, dtype), jnp.asarray(case.targets)]
    if weights is not None:
        inputs.append(jnp.asarray(weights))
    return inputs


# --------------------------------------------------------------------------------------------------
# One device, shard_map, pmap
# --------------------------------------------------------------------------------------------------


@case_param
@weights_param
def test_single_device_matches_reference(case, padded, logits):
    weights = padding_weights(padded)
    loss = jax.jit(_bound(case, None, weights is not None))
    value, d_logits = jax.value_and_grad(loss)(*_inputs(case, logits, weights))
    expected_value, expected_grad = case.reference(logits, weights)
    assert value.dtype == jnp.float32 and value.shape == ()
    _assert_close(value, expected_value, name="loss")
    _assert_close(d_logits, expected_grad, name="d loss / d logits")
    if padded:
        np.testing.assert_array_equal(np.asarray(d_logits)[list(PADDING_ROWS)], 0.0)


@case_param
@weights_param
@pytest.mark.parametrize(
    ("mesh_shape", "axis_name"),
    [((NUM_DEVICES,), "data"), ((4, 2), ("data", "fsdp"))],
    ids=["mesh8", "mesh4x2"],
)
def test_shard_map_matches_reference(case, padded, mesh_shape, axis_name, logits):
    weights = padding_weights(padded)
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    inputs = _inputs(case, logits, weights)
    sharded = jax.shard_map(
        _bound(case, axis_name, weights is not None),
        mesh=_mesh(mesh_shape, names),
        in_specs=tuple(P(axis_name) for _ in inputs),
        out_specs=P(),
    )
    value, d_logits = jax.value_and_grad(jax.jit(sharded))(*inputs)
    expected_value, expected_grad = case.reference(logits, weights)
    _assert_close(value, expected_value, name="loss")
    _assert_close(d_logits, expected_grad, name="d loss / d logits")


@case_param
def test_shard_map_on_make_mesh_default_axes(case, logits):
    """jax.make_mesh's default axis types (Explicit on newer JAX), inputs placed sharded."""
    axis_name = ("data", "fsdp")
    mesh = jax.make_mesh((4, 2), axis_name)
    weights = padding_weights(True)
    placed = NamedSharding(mesh, P(axis_name))
    inputs = [jax.device_put(x, placed) for x in _inputs(case, logits, weights)]
    sharded = jax.shard_map(
        _bound(case, axis_name, True),
        mesh=mesh,
        in_specs=(P(axis_name),) * 3,
        out_specs=P(),
    )
    with jax.set_mesh(mesh):
        value, d_logits = jax.value_and_grad(jax.jit(sharded))(*inputs)
    expected_value, expected_grad = case.reference(logits, weights)
    _assert_close(value, expected_value, name="loss")
    _assert_close(d_logits, expected_grad, name="d loss / d logits")


@case_param
def test_grad_inside_shard_map_is_global_gradient(case, logits):
    """As a trainer does it: the gradient taken inside shard_map on a (4, 2) mesh."""
    axis_name = ("data", "fsdp")
    weights = padding_weights(True)
    spec = P(axis_name)

    @jax.jit
    @functools.partial(
        jax.shard_map,
        mesh=_mesh((4, 2), axis_name),
        in_specs=(spec, spec, spec),
        out_specs=(P(), spec),
    )
    def step(x, targets, w):
        return jax.value_and_grad(_bound(case, axis_name, True))(x, targets, w)

    value, d_logits = step(*_inputs(case, logits, weights))
    expected_value, expected_grad = case.reference(logits, weights)
    _assert_close(value, expected_value, name="loss")
    _assert_close(d_logits, expected_grad, name="d loss / d logits")


@case_param
@weights_param
def test_pmap_matches_reference(case, padded, logits):
    weights = padding_weights(padded)
    loss = _bound(case, "batch", weights is not None)
    shards = lambda x: x.reshape(NUM_DEVICES, LOCAL_BATCH, *x.shape[1:])
    values, d_logits = jax.pmap(jax.value_and_grad(loss), axis_name="batch")(
        *map(shards, _inputs(case, logits, weights))
    )
    expected_value, expected_grad = case.reference(logits, weights)
    _assert_close(values, np.full(NUM_DEVICES, expected_value), name="loss on every device")
    # pmap differentiates the sum of the devices' identical outputs: axis_size x the slice.
    _assert_close(
        d_logits.reshape(expected_grad.shape),
        NUM_DEVICES * expected_grad,
        name="d loss / d logits (pmap)",
    )


# --------------------------------------------------------------------------------------------------
# Dtypes, extreme logits, hand-worked values
# --------------------------------------------------------------------------------------------------


@case_param
def test_bfloat16_logits_are_computed_in_float32(case, logits):
    x = jnp.asarray(logits, jnp.bfloat16)
    value, d_logits = jax.value_and_grad(case.loss)(x, jnp.asarray(case.targets))
    assert value.dtype == jnp.float32
    assert d_logits.dtype == jnp.bfloat16  # the cotangent of a bf16 input
    # The bf16 values are exact in float32, so the loss matches the float64 reference of the
    # rounded logits to float32 accuracy (a bf16 computation would be off by ~1e-2 relative).
    rounded = np.asarray(x.astype(jnp.float32), np.float64)
    expected_value, expected_grad = case.reference(rounded)
    _assert_close(value, expected_value, name="loss")
    _assert_close(d_logits, expected_grad, rtol=1e-2, name="d logits (rounded to bf16)")


@case_param
def test_large_logits_stay_finite(case):
    rng = np.random.default_rng(2)
    logits = 100.0 * np.sign(rng.normal(size=(GLOBAL_BATCH, CLASSES)))
    logits[0, :] = 100.0  # confident in every class, right and wrong
    logits[1, :] = -100.0
    value, d_logits = jax.value_and_grad(case.loss)(
        jnp.asarray(logits, jnp.float32), jnp.asarray(case.targets)
    )
    assert np.isfinite(value) and np.all(np.isfinite(d_logits))
    expected_value, expected_grad = case.reference(logits)
    _assert_close(value, expected_value, name="loss")
    _assert_close(d_logits, expected_grad, name="d loss / d logits")


def test_bce_hand_worked_values():
    # Zero logits: log 2 per class. Logit +-ln 3 (sigmoid 3/4 or 1/4): -log(3/4) when right,
    # -log(1/4) when wrong.
    zeros = jnp.zeros((2, 5))
    np.testing.assert_allclose(multilabel_bce_loss(zeros, jnp.ones((2, 5))), 5 * np.log(2), 1e-6)
    logits = jnp.log(3.0) * jnp.array([[1.0, -1.0, 1.0]])
    targets = jnp.array([[1, 0, 0]], jnp.uint8)
    expected = -2 * np.log(0.75) - np.log(0.25)
    np.testing.assert_allclose(multilabel_bce_loss(logits, targets), expected, rtol=1e-6)


def test_bce_target_dtypes_agree(logits):
    targets = CASES[0].targets
    x = jnp.asarray(logits, jnp.float32)
    values = [
        multilabel_bce_loss(x, jnp.asarray(targets, dtype))
        for dtype in (jnp.uint8, jnp.bool_, jnp.int32, jnp.float32, jnp.bfloat16)
    ]
    np.testing.assert_array_equal(values, values[0])


def test_softmax_ce_matches_optax(logits):
    labels = CASES[1].targets
    x = jnp.asarray(logits, jnp.float32)
    for smoothing in (0.0, LABEL_SMOOTHING, 0.5):
        targets = optax.smooth_labels(jax.nn.one_hot(labels, CLASSES), smoothing)
        expected = optax.softmax_cross_entropy(x, targets).mean()
        actual = softmax_cross_entropy_loss(x, jnp.asarray(labels), label_smoothing=smoothing)
        np.testing.assert_allclose(actual, expected, rtol=1e-6)
    # Uniform logits: log C whatever the smoothing.
    uniform = softmax_cross_entropy_loss(
        jnp.zeros((3, CLASSES)), jnp.array([0, 4, 9]), label_smoothing=0.3
    )
    np.testing.assert_allclose(uniform, np.log(CLASSES), rtol=1e-6)


@case_param
def test_all_padding_gives_zero_with_finite_gradient(case, logits):
    weights = jnp.zeros(GLOBAL_BATCH)
    value, d_logits = jax.value_and_grad(case.loss)(
        jnp.asarray(logits, jnp.float32), jnp.asarray(case.targets), weights=weights
    )
    assert value == 0.0
    np.testing.assert_array_equal(d_logits, 0.0)


def test_bad_shapes_and_labels_are_errors():
    with pytest.raises(ValueError, match="batch, classes"):
        multilabel_bce_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="local_batch"):
        multilabel_bce_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), weights=jnp.ones(3))
    with pytest.raises(ValueError, match="labels"):
        softmax_cross_entropy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        softmax_cross_entropy_loss(jnp.zeros((2, 3)), jnp.zeros(2))
    with pytest.raises(ValueError, match="label_smoothing"):
        softmax_cross_entropy_loss(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), label_smoothing=2)
