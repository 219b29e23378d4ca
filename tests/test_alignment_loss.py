"""UTA token alignment loss against a float64 NumPy reference with an analytic gradient.

Runs on one device, under ``jax.shard_map`` on a 1-axis and a (4, 2) mesh (batch split over both
axes) and under ``jax.pmap`` on 8 fake CPU devices. Gradient conventions as in test_losses.py:
through ``shard_map`` ``jax.grad`` is the global gradient; inside ``pmap`` a local input's gradient
is ``axis_size`` times its slice of the global one. The teacher never receives a gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from losses.alignment import token_alignment_loss

NUM_DEVICES = 8
GLOBAL_BATCH = 16
LOCAL_BATCH = GLOBAL_BATCH // NUM_DEVICES
TOKENS = 5
DIM = 8
RTOL = 1e-5


def reference(student: np.ndarray, teacher: np.ndarray) -> tuple[float, np.ndarray]:
    """mean(-cos) over all tokens and its gradient with respect to the student, in float64.

    d cos(s, t) / d s = t / (|s| |t|) - cos(s, t) * s / |s|^2.
    """
    student = np.asarray(student, np.float64)
    teacher = np.asarray(teacher, np.float64)
    s_norm = np.linalg.norm(student, axis=-1, keepdims=True)
    t_norm = np.linalg.norm(teacher, axis=-1, keepdims=True)
    cos = np.sum(student * teacher, axis=-1, keepdims=True) / (s_norm * t_norm)
    count = cos.size
    d_cos = teacher / (s_norm * t_norm) - cos * student / s_norm**2
    return float(-cos.sum() / count), -d_cos / count


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(GLOBAL_BATCH, TOKENS, DIM))
    # Teacher correlated with the student (cosines spread over (-1, 1)), varied norms.
    norms = rng.uniform(0.5, 3.0, (GLOBAL_BATCH, 1, 1))
    teacher = (student + rng.normal(size=student.shape)) * norms
    return student, teacher


def _assert_close(actual, expected, rtol=RTOL, name=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(np.max(np.abs(expected)), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _as_jax(student, teacher, dtype=jnp.float32):
    return jnp.asarray(student, dtype), jnp.asarray(teacher, dtype)


def test_single_device_matches_reference(tokens):
    loss = jax.jit(lambda s, t: token_alignment_loss(s, t, axis_name=None))
    value, (d_student, d_teacher) = jax.value_and_grad(loss, argnums=(0, 1))(*_as_jax(*tokens))
    expected_value, expected_grad = reference(*tokens)
    assert value.dtype == jnp.float32 and value.shape == ()
    _assert_close(value, expected_value, name="loss")
    _assert_close(d_student, expected_grad, name="d loss / d student")
    np.testing.assert_array_equal(d_teacher, 0.0)


@pytest.mark.parametrize(
    ("mesh_shape", "axis_name"),
    [((NUM_DEVICES,), "data"), ((4, 2), ("data", "fsdp"))],
    ids=["mesh8", "mesh4x2"],
)
def test_shard_map_matches_reference(tokens, mesh_shape, axis_name):
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    batch_spec = P(axis_name)
    sharded = jax.shard_map(
        functools.partial(token_alignment_loss, axis_name=axis_name),
        mesh=_mesh(mesh_shape, names),
        in_specs=(batch_spec, batch_spec),
        out_specs=P(),
    )
    value, (d_student, d_teacher) = jax.value_and_grad(jax.jit(sharded), argnums=(0, 1))(
        *_as_jax(*tokens)
    )
    expected_value, expected_grad = reference(*tokens)
    _assert_close(value, expected_value, name="loss")
    _assert_close(d_student, expected_grad, name="d loss / d student")
    np.testing.assert_array_equal(d_teacher, 0.0)


def test_shard_map_on_make_mesh_default_axes(tokens):
    """jax.make_mesh's default axis types (Explicit on newer JAX), inputs placed sharded."""
    axis_name = ("data", "fsdp")
    mesh = jax.make_mesh((4, 2), axis_name)
    batch_spec = P(axis_name)
    placed = NamedSharding(mesh, batch_spec)
    student, teacher = [jax.device_put(x, placed) for x in _as_jax(*tokens)]
    sharded = jax.shard_map(
        functools.partial(token_alignment_loss, axis_name=axis_name),
        mesh=mesh,
        in_specs=(batch_spec, batch_spec),
        out_specs=P(),
    )
    with jax.set_mesh(mesh):
        value, d_student = jax.value_and_grad(jax.jit(sharded))(student, teacher)
    expected_value, expected_grad = reference(*tokens)
    _assert_close(value, expected_value, name="loss")
    _assert_close(d_student, expected_grad, name="d loss / d student")


def test_grad_inside_shard_map_is_global_gradient(tokens):
    """As a trainer does it: the gradient taken inside shard_map on a (4, 2) mesh."""
    axis_name = ("data", "fsdp")
    batch_spec = P(axis_name)

    @jax.jit
    @functools.partial(
        jax.shard_map,
        mesh=_mesh((4, 2), axis_name),
        in_specs=(batch_spec, batch_spec),
        out_specs=(P(), (batch_spec, batch_spec)),
    )
    def step(student, teacher):
        loss = functools.partial(token_alignment_loss, axis_name=axis_name)
        return jax.value_and_grad(loss, argnums=(0, 1))(student, teacher)

    value, (d_student, d_teacher) = step(*_as_jax(*tokens))
    expected_value, expected_grad = reference(*tokens)
    _assert_close(value, expected_value, name="loss")
    _assert_close(d_student, expected_grad, name="d loss / d student")
    np.testing.assert_array_equal(d_teacher, 0.0)


def test_pmap_matches_reference(tokens):
    def per_device(student, teacher):
        loss = functools.partial(token_alignment_loss, axis_name="batch")
        return jax.value_and_grad(loss, argnums=(0, 1))(student, teacher)

    shards = lambda x: x.reshape(NUM_DEVICES, LOCAL_BATCH, *x.shape[1:])
    student, teacher = _as_jax(*tokens)
    values, (d_student, d_teacher) = jax.pmap(per_device, axis_name="batch")(
        shards(student), shards(teacher)
    )
    expected_value, expected_grad = reference(*tokens)
    _assert_close(values, np.full(NUM_DEVICES, expected_value), name="loss on every device")
    # pmap differentiates the sum of the devices' identical outputs: axis_size x the slice.
    _assert_close(
        d_student.reshape(expected_grad.shape),
        NUM_DEVICES * expected_grad,
        name="d loss / d student (pmap)",
    )
    np.testing.assert_array_equal(d_teacher, 0.0)


def test_bfloat16_inputs_are_computed_in_float32(tokens):
    student, teacher = _as_jax(*tokens, dtype=jnp.bfloat16)
    value, d_student = jax.value_and_grad(token_alignment_loss)(student, teacher)
    assert value.dtype == jnp.float32
    assert d_student.dtype == jnp.bfloat16  # the cotangent of a bf16 input
    # The bf16 values are exact in float32, so the loss matches the float64 reference of the
    # rounded inputs to float32 accuracy (a bf16 computation would be off by ~1e-3).
    rounded = [np.asarray(x.astype(jnp.float32), np.float64) for x in (student, teacher)]
    expected_value, expected_grad = reference(*rounded)
    _assert_close(value, expected_value, name="loss")
    _assert_close(d_student, expected_grad, rtol=1e-2, name="d student (rounded to bf16)")


def test_identical_and_opposite_tokens():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4)), jnp.float32)
    np.testing.assert_allclose(token_alignment_loss(x, 2.5 * x), -1.0, rtol=1e-6)
    np.testing.assert_allclose(token_alignment_loss(x, -x), 1.0, rtol=1e-6)


def test_zero_tokens_have_finite_gradient():
    student = jnp.zeros((1, 2, 4)).at[0, 1, 0].set(1.0)
    teacher = jnp.ones((1, 2, 4))
    value, d_student = jax.value_and_grad(token_alignment_loss)(student, teacher)
    assert np.isfinite(value) and np.all(np.isfinite(d_student))
    np.testing.assert_allclose(value, -0.5 * 0.5, rtol=1e-6)  # cos 0 and cos 0.5 (x 1/2)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="batch, tokens, dim"):
        token_alignment_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4, 4)))
