"""CLIP and SigLIP losses against a float64 NumPy reference with analytic gradients.

Every loss runs on one device (axis_name=None), under ``jax.shard_map`` on a 1-axis and a 2-axis
mesh (batch split over both axes), and under ``jax.pmap``; values and gradients must match the
reference on the global batch. Gradient conventions checked here:

* ``jax.grad`` of a function wrapping ``shard_map``, or taken inside ``shard_map`` with check_vma
  on, is the gradient of the global loss.
* Inside ``jax.pmap`` it is ``axis_size`` times that: pmap differentiates the sum of its devices'
  (identical) outputs, since ``psum`` transposes to ``psum``. A local embedding's gradient is
  ``axis_size`` x its slice of the global gradient; a replicated scalar's per-device gradients
  ``pmean`` to the global gradient (the usual pmap idiom for parameters).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from losses.contrastive import clip_loss
from losses.sigmoid import sigmoid_loss, sigmoid_loss_ring

GLOBAL_BATCH = 32
DIM = 8
SCALE = 6.7
BIAS = -2.3
NUM_DEVICES = 8
LOCAL_BATCH = GLOBAL_BATCH // NUM_DEVICES
RTOL = 1e-5


# ---------------------------------------------------------------- NumPy reference (float64) ----


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(_log_sigmoid(z))


def _chain_rule(d_logits, images, texts, similarities, scale):
    """From dL/dlogits (logits = scale * images @ texts.T + bias) to the inputs' gradients."""
    return {
        "images": scale * d_logits @ texts,
        "texts": scale * d_logits.T @ images,
        "scale": np.sum(d_logits * similarities),
        "bias": np.sum(d_logits),
    }


def clip_reference(images, texts, scale, bias):
    """CLIP loss and analytic gradients; the loss has no bias, so its gradient is 0."""
    batch = images.shape[0]
    similarities = images @ texts.T
    logits = scale * similarities
    probs_rows = _softmax(logits, axis=1)  # image -> text
    probs_columns = _softmax(logits, axis=0)  # text -> image
    loss = -(np.log(np.diag(probs_rows)).sum() + np.log(np.diag(probs_columns)).sum()) / (2 * batch)
    eye = np.eye(batch)
    d_logits = ((probs_rows - eye) + (probs_columns - eye)) / (2 * batch)
    grads = _chain_rule(d_logits, images, texts, similarities, scale)
    grads["bias"] = 0.0
    return loss, grads


def sigmoid_reference(images, texts, scale, bias):
    """SigLIP loss and analytic gradients."""
    batch = images.shape[0]
    labels = 2 * np.eye(batch) - 1
    similarities = images @ texts.T
    logits = scale * similarities + bias
    loss = -_log_sigmoid(labels * logits).sum() / batch
    d_logits = -labels * _sigmoid(-labels * logits) / batch
    return loss, _chain_rule(d_logits, images, texts, similarities, scale)


# ------------------------------------------------------------------------------ set-up ----

# Uniform signature (images, texts, scale, bias, axis_name) for every loss; CLIP ignores the bias.
LOSSES = {
    "clip": (
        lambda i, t, s, b, axis_name: clip_loss(i, t, s, axis_name=axis_name),
        clip_reference,
    ),
    "sigmoid": (
        lambda i, t, s, b, axis_name: sigmoid_loss(i, t, s, b, axis_name=axis_name),
        sigmoid_reference,
    ),
    "sigmoid_ring": (
        lambda i, t, s, b, axis_name: sigmoid_loss_ring(i, t, s, b, axis_name=axis_name),
        sigmoid_reference,
    ),
}
ARGS = ("images", "texts", "scale", "bias")


@pytest.fixture(scope="module")
def embeddings():
    rng = np.random.default_rng(0)
    images = _normalise(rng.normal(size=(GLOBAL_BATCH, DIM)))
    # Texts correlated with their images so that the positives matter.
    texts = _normalise(images + 0.7 * rng.normal(size=(GLOBAL_BATCH, DIM)))
    return images, texts


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _as_jax(images, texts, dtype=jnp.float32):
    return (
        jnp.asarray(images, dtype),
        jnp.asarray(texts, dtype),
        jnp.float32(SCALE),
        jnp.float32(BIAS),
    )


def _assert_close(actual, expected, rtol=RTOL, name=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    # Gradients have entries near zero: tolerance relative to the array's largest entry.
    atol = rtol * max(np.max(np.abs(expected)), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


def _assert_matches(value, grads, expected_value, expected_grads, rtol=RTOL):
    _assert_close(value, expected_value, rtol, "loss")
    for name, grad in zip(ARGS, grads):
        _assert_close(grad, expected_grads[name], rtol, f"d loss / d {name}")


def _value_and_grads_single_device(loss_fn, args):
    fn = jax.jit(lambda *a: loss_fn(*a, axis_name=None))
    return jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(*args)


def _value_and_grads_shard_map(loss_fn, args, mesh, axis_name):
    """Gradient of a jitted function wrapping shard_map (batch split over `axis_name`)."""
    batch_spec = P(axis_name)
    sharded = jax.shard_map(
        functools.partial(loss_fn, axis_name=axis_name),
        mesh=mesh,
        in_specs=(batch_spec, batch_spec, P(), P()),
        out_specs=P(),
    )
    return jax.value_and_grad(jax.jit(sharded), argnums=(0, 1, 2, 3))(*args)


def _value_and_grads_inside_pmap(loss_fn, args, axis_name="batch"):
    """Per-device value and gradients, taken inside pmap (scale and bias broadcast)."""
    images, texts, scale, bias = args

    def per_device(i, t, s, b):
        return jax.value_and_grad(
            functools.partial(loss_fn, axis_name=axis_name), argnums=(0, 1, 2, 3)
        )(i, t, s, b)

    mapped = jax.pmap(per_device, axis_name=axis_name, in_axes=(0, 0, None, None))
    shards = lambda x: x.reshape(NUM_DEVICES, LOCAL_BATCH, *x.shape[1:])
    return mapped(shards(images), shards(texts), scale, bias)


# ------------------------------------------------------------------------------- tests ----


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_single_device_matches_reference(loss_name, embeddings):
    loss_fn, reference = LOSSES[loss_name]
    value, grads = _value_and_grads_single_device(loss_fn, _as_jax(*embeddings))
    assert value.dtype == jnp.float32
    _assert_matches(value, grads, *reference(*embeddings, SCALE, BIAS))


@pytest.mark.parametrize(
    ("mesh_shape", "axis_name"),
    [((NUM_DEVICES,), "data"), ((4, 2), ("data", "fsdp"))],
    ids=["mesh8", "mesh4x2"],
)
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_shard_map_matches_reference(loss_name, mesh_shape, axis_name, embeddings):
    loss_fn, reference = LOSSES[loss_name]
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    value, grads = _value_and_grads_shard_map(
        loss_fn, _as_jax(*embeddings), _mesh(mesh_shape, names), axis_name
    )
    _assert_matches(value, grads, *reference(*embeddings, SCALE, BIAS))


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_shard_map_on_make_mesh_default_axes(loss_name, embeddings):
    """jax.make_mesh's default (Explicit) axis types, inputs placed with their shardings."""
    loss_fn, reference = LOSSES[loss_name]
    axis_name = ("data", "fsdp")
    mesh = jax.make_mesh((4, 2), axis_name)
    args = [
        jax.device_put(x, NamedSharding(mesh, P(axis_name) if x.ndim else P()))
        for x in _as_jax(*embeddings)
    ]
    with jax.set_mesh(mesh):
        value, grads = _value_and_grads_shard_map(loss_fn, args, mesh, axis_name)
    _assert_matches(value, grads, *reference(*embeddings, SCALE, BIAS))


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_grad_inside_shard_map_is_global_gradient(loss_name, embeddings):
    """As a trainer does it: grad inside shard_map; replicated scalars get the full gradient."""
    loss_fn, reference = LOSSES[loss_name]
    axis_name = ("data", "fsdp")
    mesh = _mesh((4, 2), axis_name)
    batch_spec = P(axis_name)

    @jax.jit
    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(batch_spec, batch_spec, P(), P()),
        out_specs=(P(), (batch_spec, batch_spec, P(), P())),
    )
    def step(i, t, s, b):
        return jax.value_and_grad(
            functools.partial(loss_fn, axis_name=axis_name), argnums=(0, 1, 2, 3)
        )(i, t, s, b)

    value, grads = step(*_as_jax(*embeddings))
    _assert_matches(value, grads, *reference(*embeddings, SCALE, BIAS))


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_pmap_matches_reference(loss_name, embeddings):
    loss_fn, reference = LOSSES[loss_name]
    values, (d_images, d_texts, d_scale, d_bias) = _value_and_grads_inside_pmap(
        loss_fn, _as_jax(*embeddings)
    )
    expected_value, expected = reference(*embeddings, SCALE, BIAS)
    _assert_close(values, np.full(NUM_DEVICES, expected_value), name="loss on every device")
    # Local embeddings: axis_size x their slice of the global gradient.
    _assert_close(d_images.reshape(GLOBAL_BATCH, DIM), NUM_DEVICES * expected["images"])
    _assert_close(d_texts.reshape(GLOBAL_BATCH, DIM), NUM_DEVICES * expected["texts"])
    # Replicated scalars: each device holds its own term (x axis_size); the mean is the gradient.
    _assert_close(np.mean(d_scale), expected["scale"], name="pmean d scale")
    _assert_close(np.mean(d_bias), expected["bias"], name="pmean d bias")


@pytest.mark.parametrize("setup", ["mesh4x2", "pmap"])
def test_ring_equals_all_gather(setup, embeddings):
    args = _as_jax(*embeddings)
    gather_fn, _ = LOSSES["sigmoid"]
    ring_fn, _ = LOSSES["sigmoid_ring"]
    if setup == "pmap":
        run = lambda fn: _value_and_grads_inside_pmap(fn, args)
    else:
        mesh = _mesh((4, 2), ("data", "fsdp"))
        run = lambda fn: _value_and_grads_shard_map(fn, args, mesh, ("data", "fsdp"))
    gather_value, gather_grads = run(gather_fn)
    ring_value, ring_grads = run(ring_fn)
    _assert_close(ring_value, gather_value, name="loss")
    for name, ring_grad, gather_grad in zip(ARGS, ring_grads, gather_grads):
        _assert_close(ring_grad, gather_grad, name=f"d loss / d {name}")


@pytest.mark.parametrize("num_devices", [1, 2, 3])
def test_ring_short_rings(num_devices, embeddings):
    """Rings of 1 and 2 devices skip the scan entirely; 3 runs it once."""
    images, texts = (x[: 4 * num_devices] for x in embeddings)
    mesh = _mesh((num_devices,), ("data",))
    value, grads = _value_and_grads_shard_map(
        LOSSES["sigmoid_ring"][0], _as_jax(images, texts), mesh, "data"
    )
    _assert_matches(value, grads, *sigmoid_reference(images, texts, SCALE, BIAS))


def _sub_jaxprs(equation):
    for param in equation.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):  # a (Closed)Jaxpr; jax.core.Jaxpr is no public API
                yield inner


def _equations(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs included."""
    for equation in jaxpr.eqns:
        yield equation
        for inner in _sub_jaxprs(equation):
            yield from _equations(inner)


def _array_shapes(jaxpr) -> set[tuple[int, ...]]:
    """Every intermediate array shape in a jaxpr, nested ones (scan, checkpoint...) included."""
    shapes = set()
    for equation in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in equation.outvars if hasattr(v.aval, "shape"))
        for inner in _sub_jaxprs(equation):
            shapes |= _array_shapes(inner)
    return shapes


def _per_device_shapes(jaxpr) -> set[tuple[int, ...]]:
    """Shapes inside shard_map bodies only: outside them, arrays are global (device-sharded)."""
    shapes = set()
    for equation in jaxpr.eqns:
        for inner in _sub_jaxprs(equation):
            is_body = equation.primitive.name == "shard_map"
            shapes |= _array_shapes(inner) if is_body else _per_device_shapes(inner)
    return shapes


@pytest.mark.parametrize(
    ("loss_name", "expect_local_by_global"), [("sigmoid", True), ("sigmoid_ring", False)]
)
def test_ring_never_materialises_local_by_global_logits(
    loss_name, expect_local_by_global, embeddings
):
    """Forward and backward: the ring's per-device arrays stay (local x local) blocks."""
    loss_fn = LOSSES[loss_name][0]
    mesh = _mesh((NUM_DEVICES,), ("data",))
    sharded = jax.shard_map(
        functools.partial(loss_fn, axis_name="data"),
        mesh=mesh,
        in_specs=(P("data"), P("data"), P(), P()),
        out_specs=P(),
    )
    jaxpr = jax.make_jaxpr(jax.grad(sharded, argnums=(0, 1, 2, 3)))(*_as_jax(*embeddings))
    shapes = _per_device_shapes(jaxpr.jaxpr)
    local_by_global = {(LOCAL_BATCH, GLOBAL_BATCH), (GLOBAL_BATCH, LOCAL_BATCH)}
    assert bool(shapes & local_by_global) == expect_local_by_global
    if not expect_local_by_global:
        assert (LOCAL_BATCH, LOCAL_BATCH) in shapes


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_bfloat16_inputs_are_computed_in_float32(loss_name, embeddings):
    loss_fn, reference = LOSSES[loss_name]
    args = _as_jax(*embeddings, dtype=jnp.bfloat16)
    mesh = _mesh((4, 2), ("data", "fsdp"))
    value, grads = _value_and_grads_shard_map(loss_fn, args, mesh, ("data", "fsdp"))
    assert value.dtype == jnp.float32
    # XLA on CPU upcasts bfloat16 matmuls anyway, so the numbers alone cannot show that the loss
    # casts first (a TPU would not upcast): check that every matmul, forward and backward, reads
    # and writes float32.
    wrapped = lambda *a: _value_and_grads_shard_map(loss_fn, a, mesh, ("data", "fsdp"))
    equations = _equations(jax.make_jaxpr(wrapped)(*args).jaxpr)
    matmuls = [eq for eq in equations if eq.primitive.name == "dot_general"]
    assert matmuls
    for eq in matmuls:
        assert {v.aval.dtype for v in (*eq.invars, *eq.outvars)} == {jnp.dtype(jnp.float32)}
    assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
    # The reference on the bf16-rounded inputs: float32 arithmetic keeps ~1e-5 on the loss and
    # on the float32 scalar gradients (bfloat16 arithmetic would be off by ~1e-2).
    rounded = [np.asarray(x, np.float64) for x in args[:2]]
    expected_value, expected = reference(*rounded, SCALE, BIAS)
    _assert_close(value, expected_value, name="loss")
    _assert_close(grads[2], expected["scale"], name="d scale")
    _assert_close(grads[3], expected["bias"], name="d bias")
    # Embedding gradients come back in bfloat16: equal up to their own rounding.
    _assert_close(grads[0], expected["images"], rtol=1e-2, name="d images")
    _assert_close(grads[1], expected["texts"], rtol=1e-2, name="d texts")
    # And the loss stays within bf16 input rounding of the full-precision reference.
    _assert_close(value, reference(*embeddings, SCALE, BIAS)[0], rtol=2e-2, name="loss vs f64")
