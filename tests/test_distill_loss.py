"""MobileCLIP distillation and reinforced losses against a float64 NumPy reference.

The reference computes the loss on the global batch and its analytic gradient (checked itself
against central finite differences). The JAX losses run on one device, under ``jax.shard_map`` on
a 1-axis and a (4, 2) mesh (batch split over both axes) and under ``jax.pmap`` on 8 fake CPU
devices. Gradient conventions as in test_losses.py: through ``shard_map`` ``jax.grad`` is the
global gradient; inside ``pmap`` a local input's gradient is ``axis_size`` times its slice of the
global one and a replicated scalar's per-device gradients average to the global one. The teachers
(embeddings and scale) never receive a gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from losses.distill import (
    MOBILECLIP_B_WEIGHTS,
    MOBILECLIP_TEACHER_SCALE,
    QUALITY_CAPTIONS_WEIGHTS,
    ImageTextEmbeddings,
    ReinforcedLossWeights,
    reinforced_clip_loss,
    similarity_distillation_loss,
)

NUM_DEVICES = 8
GLOBAL_BATCH = 16
LOCAL_BATCH = GLOBAL_BATCH // NUM_DEVICES
DIM = 8
TEACHER_DIM = 6
NUM_TEACHERS = 2
SCALE = 6.7
TEACHER_SCALE = 9.0
TEACHER_SCALES = (9.0, 5.5)
RTOL = 1e-5
# Distinct weights, so that a term under the wrong weight cannot pass.
WEIGHTS = ReinforcedLossWeights(real_clip=0.3, synthetic_clip=0.5, distill=0.7)


# ---------------------------------------------------------------- NumPy reference (float64) ----


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _gradients(d_logits, images, texts, scale):
    """From dL/dlogits (logits = scale * images @ texts.T) to the inputs' gradients."""
    return {
        "image": scale * d_logits @ texts,
        "text": scale * d_logits.T @ images,
        "scale": np.sum(d_logits * (images @ texts.T)),
    }


def clip_reference(images, texts, scale):
    batch = images.shape[0]
    logits = scale * images @ texts.T
    rows, columns = _softmax(logits), _softmax(logits.T)
    loss = -(np.log(np.diag(rows)).sum() + np.log(np.diag(columns)).sum()) / (2 * batch)
    eye = np.eye(batch)
    d_logits = ((rows - eye) + (columns - eye).T) / (2 * batch)
    return loss, _gradients(d_logits, images, texts, scale)


def _ensemble_probs(queries, keys, scales):
    """mean over teachers of softmax_rows(scale_k * queries_k @ keys_k.T); (B, K, d) inputs."""
    return np.mean(
        [_softmax(s * queries[:, k] @ keys[:, k].T) for k, s in enumerate(scales)], axis=0
    )


def distill_reference(images, texts, teacher_images, teacher_texts, scale, teacher_scale):
    """KL(teacher || student) of row softmaxes, both directions, / (2 B); analytic gradient.

    d KL(p || softmax(z)) / dz = softmax(z) - p for a row p that sums to 1.
    """
    if teacher_images.ndim == 2:
        teacher_images, teacher_texts = teacher_images[:, None], teacher_texts[:, None]
    scales = np.broadcast_to(teacher_scale, (teacher_images.shape[1],))
    batch = images.shape[0]
    teacher_i2t = _ensemble_probs(teacher_images, teacher_texts, scales)
    teacher_t2i = _ensemble_probs(teacher_texts, teacher_images, scales)
    logits = scale * images @ texts.T
    student_i2t, student_t2i = _softmax(logits), _softmax(logits.T)
    kl = lambda p, q: np.sum(p * (np.log(p) - np.log(q)))
    loss = (kl(teacher_i2t, student_i2t) + kl(teacher_t2i, student_t2i)) / (2 * batch)
    d_logits = ((student_i2t - teacher_i2t) + (student_t2i - teacher_t2i).T) / (2 * batch)
    return loss, _gradients(d_logits, images, texts, scale)


def reinforced_reference(student, teacher, scale, teacher_scale, weights):
    """Total, parts and gradients (image, real_text, synthetic_text, scale) of the weighted sum."""
    terms = {
        "clip_real": (weights.real_clip, "real_text", clip_reference(*student[:2], scale)),
        "clip_synthetic": (
            weights.synthetic_clip,
            "synthetic_text",
            clip_reference(student[0], student[2], scale),
        ),
        "distill_real": (
            weights.distill,
            "real_text",
            distill_reference(*student[:2], *teacher[:2], scale, teacher_scale),
        ),
        "distill_synthetic": (
            weights.distill,
            "synthetic_text",
            distill_reference(student[0], student[2], teacher[0], teacher[2], scale, teacher_scale),
        ),
    }
    total = 0.0
    grads = {name: 0.0 for name in ("image", "real_text", "synthetic_text", "scale")}
    for weight, text_name, (value, term_grads) in terms.values():
        total += weight * value
        grads["image"] = grads["image"] + weight * term_grads["image"]
        grads[text_name] = grads[text_name] + weight * term_grads["text"]
        grads["scale"] += weight * term_grads["scale"]
    parts = {name: value for name, (_, _, (value, _)) in terms.items()}
    return total, parts, grads


# ------------------------------------------------------------------------------ set-up ----


@pytest.fixture(scope="module")
def batch():
    """Global float64 student and teacher (ensemble of 2) embeddings, texts correlated to images."""
    rng = np.random.default_rng(0)
    normal = rng.normal

    def paired(shape):
        images = _normalise(normal(size=shape))
        real = _normalise(images + 0.8 * normal(size=shape))
        synthetic = _normalise(images + 0.5 * normal(size=shape))
        return images, real, synthetic

    student = paired((GLOBAL_BATCH, DIM))
    teacher = paired((GLOBAL_BATCH, NUM_TEACHERS, TEACHER_DIM))  # each teacher normalised
    return student, teacher


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _assert_close(actual, expected, rtol=RTOL, name=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    # Gradients have entries near zero: tolerance relative to the array's largest entry.
    atol = rtol * max(np.max(np.abs(expected)), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)


def _assert_zero(tree, name):
    for leaf in jax.tree_util.tree_leaves(tree):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0, err_msg=name)


def _shards(x):
    return x.reshape(NUM_DEVICES, LOCAL_BATCH, *x.shape[1:])


# Distillation: args (images, texts, teacher_images, teacher_texts, scale, teacher_scale).
STUDENT_ARGNUMS = {"image": 0, "text": 1, "scale": 4}
TEACHER_ARGNUMS = (2, 3, 5)


def _distill_args(batch, teachers=NUM_TEACHERS, teacher_scale=TEACHER_SCALE, dtype=jnp.float32):
    """NumPy reference args and their JAX twins; ``teachers=None`` drops the ensemble axis."""
    (images, texts, _), (teacher_images, teacher_texts, _) = batch
    if teachers is None:
        teacher_images, teacher_texts = teacher_images[:, 0], teacher_texts[:, 0]
    else:
        teacher_images, teacher_texts = teacher_images[:, :teachers], teacher_texts[:, :teachers]
    reference = (images, texts, teacher_images, teacher_texts, SCALE, np.asarray(teacher_scale))
    as_jax = (
        *(jnp.asarray(x, dtype) for x in reference[:4]),
        jnp.float32(SCALE),
        jnp.asarray(teacher_scale, jnp.float32),
    )
    return reference, as_jax


def _assert_distill_matches(value, grads, reference_args, pmap_factor=1):
    expected_value, expected = distill_reference(*reference_args)
    _assert_close(value, np.full(np.shape(value), expected_value), name="loss")
    for name, argnum in STUDENT_ARGNUMS.items():
        grad = grads[argnum]
        if name == "scale" and np.ndim(grad):  # pmap: per-device terms that pmean to the gradient
            grad = np.mean(grad)
        else:
            grad = np.reshape(grad, np.shape(expected[name]))
            grad = grad / (1 if name == "scale" else pmap_factor)
        _assert_close(grad, expected[name], name=f"d loss / d {name}")
    _assert_zero([grads[i] for i in TEACHER_ARGNUMS], "teacher gradient")


# ------------------------------------------------------------------------------- tests ----


def _finite_difference(fn, x, eps=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (fn(x + step) - fn(x - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("reference", ["clip", "distill"])
def test_reference_gradients_match_finite_differences(reference, batch):
    """The analytic gradients the JAX losses are checked against are right."""
    (images, texts, _), (teacher_images, teacher_texts, _) = batch
    images, texts = images[:6], texts[:6]
    if reference == "clip":
        loss = lambda i, t, s: clip_reference(i, t, s)
    else:
        teachers = (teacher_images[:6], teacher_texts[:6], np.asarray(TEACHER_SCALES))
        loss = lambda i, t, s: distill_reference(i, t, *teachers[:2], s, teachers[2])
    _, grads = loss(images, texts, SCALE)
    value = lambda *a: loss(*a)[0]
    checks = {
        "image": _finite_difference(lambda x: value(x, texts, SCALE), images),
        "text": _finite_difference(lambda x: value(images, x, SCALE), texts),
        "scale": _finite_difference(lambda x: value(images, texts, x), np.asarray(SCALE)),
    }
    for name, numeric in checks.items():
        _assert_close(grads[name], numeric, rtol=1e-6, name=name)


@pytest.mark.parametrize(
    ("teachers", "teacher_scale"),
    [(None, TEACHER_SCALE), (1, TEACHER_SCALE), (2, TEACHER_SCALE), (2, TEACHER_SCALES)],
    ids=["one_teacher_2d", "one_teacher_3d", "ensemble2", "ensemble2_per_teacher_scale"],
)
def test_distill_single_device_matches_reference(teachers, teacher_scale, batch):
    reference_args, args = _distill_args(batch, teachers, teacher_scale)
    loss = jax.jit(functools.partial(similarity_distillation_loss, axis_name=None))
    value, grads = jax.value_and_grad(loss, argnums=tuple(range(6)))(*args)
    assert value.dtype == jnp.float32 and value.shape == ()
    assert value > 0
    _assert_distill_matches(value, grads, reference_args)


def test_ensemble_averages_probabilities_not_logits(batch):
    """MobileCLIP averages the teachers' softmaxes; averaging their logits gives another loss."""
    reference_args, args = _distill_args(batch, NUM_TEACHERS, TEACHER_SCALE)
    value = similarity_distillation_loss(*args)
    _assert_close(value, distill_reference(*reference_args)[0], name="probability average")
    images, texts, teacher_images, teacher_texts, scale, teacher_scale = reference_args
    # Averaged logits: the concatenation of the teachers, each scaled by 1/sqrt(K), as one teacher.
    flat = lambda x: x.reshape(GLOBAL_BATCH, -1) / np.sqrt(NUM_TEACHERS)
    logit_average = distill_reference(
        images, texts, flat(teacher_images), flat(teacher_texts), scale, teacher_scale
    )[0]
    assert abs(float(value) - logit_average) > 1e-3 * logit_average


def test_distill_zero_when_student_is_teacher(batch):
    (images, texts, _), _ = batch
    images, texts = jnp.asarray(images, jnp.float32), jnp.asarray(texts, jnp.float32)
    loss = jax.value_and_grad(similarity_distillation_loss, argnums=(0, 1, 4))
    for teacher_images, teacher_texts in [
        (images, texts),
        (jnp.stack([images, images], 1), jnp.stack([texts, texts], 1)),  # identical ensemble
    ]:
        value, grads = loss(images, texts, teacher_images, teacher_texts, SCALE, SCALE)
        np.testing.assert_allclose(value, 0.0, atol=1e-6)
        for grad in grads:
            np.testing.assert_allclose(grad, 0.0, atol=1e-6)
    # Same embeddings, different temperature: not zero.
    assert similarity_distillation_loss(images, texts, images, texts, SCALE, 2 * SCALE) > 1e-2


def test_distill_is_stable_at_mobileclip_scales(batch):
    """Scales of 100 (ml-mobileclip's teacher scale): probabilities down to exp(-200) underflow in
    float32; the loss and gradients must stay finite and accurate."""
    reference_args, args = _distill_args(batch, NUM_TEACHERS, MOBILECLIP_TEACHER_SCALE)
    reference_args = (*reference_args[:4], 100.0, reference_args[5])
    args = (*args[:4], jnp.float32(100.0), args[5])
    value, grads = jax.value_and_grad(similarity_distillation_loss, argnums=(0, 1, 4))(*args)
    expected_value, expected = distill_reference(*reference_args)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
    _assert_close(value, expected_value, rtol=1e-4, name="loss")
    for name, grad in zip(("image", "text", "scale"), grads):
        _assert_close(grad, expected[name], rtol=1e-4, name=name)


@pytest.mark.parametrize(
    ("mesh_shape", "axis_name"),
    [((NUM_DEVICES,), "data"), ((4, 2), ("data", "fsdp"))],
    ids=["mesh8", "mesh4x2"],
)
def test_distill_shard_map_matches_reference(mesh_shape, axis_name, batch):
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    reference_args, args = _distill_args(batch, NUM_TEACHERS, TEACHER_SCALES)
    rows = P(axis_name)
    sharded = jax.shard_map(
        functools.partial(similarity_distillation_loss, axis_name=axis_name),
        mesh=_mesh(mesh_shape, names),
        in_specs=(rows, rows, rows, rows, P(), P()),
        out_specs=P(),
    )
    value, grads = jax.value_and_grad(jax.jit(sharded), argnums=tuple(range(6)))(*args)
    _assert_distill_matches(value, grads, reference_args)


def test_distill_pmap_matches_reference(batch):
    reference_args, args = _distill_args(batch, NUM_TEACHERS, TEACHER_SCALES)

    def per_device(*a):
        loss = functools.partial(similarity_distillation_loss, axis_name="batch")
        return jax.value_and_grad(loss, argnums=tuple(range(6)))(*a)

    mapped = jax.pmap(per_device, axis_name="batch", in_axes=(0, 0, 0, 0, None, None))
    values, grads = mapped(*(_shards(x) for x in args[:4]), *args[4:])
    assert values.shape == (NUM_DEVICES,)
    # pmap differentiates the sum of the devices' identical outputs: axis_size x the global one.
    _assert_distill_matches(values, grads, reference_args, pmap_factor=NUM_DEVICES)


def test_distill_bfloat16_inputs_are_computed_in_float32(batch):
    reference_args, args = _distill_args(batch, NUM_TEACHERS, TEACHER_SCALE, dtype=jnp.bfloat16)
    loss = jax.value_and_grad(similarity_distillation_loss, argnums=(0, 1))
    value, grads = loss(*args)
    assert value.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16
    equations = jax.make_jaxpr(loss)(*args).jaxpr.eqns
    matmuls = [eq for eq in _all_equations(equations) if eq.primitive.name == "dot_general"]
    assert matmuls
    for eq in matmuls:
        assert {v.aval.dtype for v in (*eq.invars, *eq.outvars)} == {jnp.dtype(jnp.float32)}
    rounded = [np.asarray(x.astype(jnp.float32), np.float64) for x in args[:4]]
    expected_value = distill_reference(*rounded, *reference_args[4:])[0]
    _assert_close(value, expected_value, name="loss of the bf16-rounded inputs")


def _all_equations(equations):
    for equation in equations:
        yield equation
        for param in equation.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _all_equations(inner.eqns)


def test_distill_shape_errors():
    x = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match="student image and text"):
        similarity_distillation_loss(x, jnp.zeros((4, 6)), x, x, 1.0, 1.0)
    with pytest.raises(ValueError, match="batch, teachers, dim"):
        similarity_distillation_loss(x, x, jnp.zeros((4, 1, 2, 8)), x, 1.0, 1.0)
    with pytest.raises(ValueError, match="teacher image and text shapes"):
        similarity_distillation_loss(x, x, jnp.zeros((4, 2, 8)), x, 1.0, 1.0)
    with pytest.raises(ValueError, match="teacher batch"):
        similarity_distillation_loss(x, x, jnp.zeros((2, 8)), jnp.zeros((2, 8)), 1.0, 1.0)


# ------------------------------------------------------------------- reinforced loss ----


def _reinforced_args(batch):
    student, teacher = batch
    as_jax = lambda arrays: ImageTextEmbeddings(*(jnp.asarray(x, jnp.float32) for x in arrays))
    return (as_jax(student), jnp.float32(SCALE), as_jax(teacher), jnp.asarray(TEACHER_SCALES))


def _reinforced_fn(weights, axis_name):
    def loss(student, scale, teacher, teacher_scale):
        return reinforced_clip_loss(
            student, scale, teacher, weights, teacher_scale=teacher_scale, axis_name=axis_name
        )

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)


def _assert_reinforced_matches(
    total, parts, grads, batch, weights=WEIGHTS, pmap_factor=1, mean_scale=False
):
    student, teacher = batch
    expected_total, expected_parts, expected = reinforced_reference(
        student, teacher, SCALE, np.asarray(TEACHER_SCALES), weights
    )
    _assert_close(total, np.full(np.shape(total), expected_total), name="total")
    assert set(parts) == set(expected_parts)
    for name, value in parts.items():
        _assert_close(value, np.full(np.shape(value), expected_parts[name]), name=name)
    d_student, d_scale, d_teacher, d_teacher_scale = grads
    for name in ("image", "real_text", "synthetic_text"):
        grad = np.reshape(getattr(d_student, name), expected[name].shape) / pmap_factor
        _assert_close(grad, expected[name], name=f"d total / d {name}")
    _assert_close(np.mean(d_scale) if mean_scale else d_scale, expected["scale"], name="d scale")
    _assert_zero([d_teacher, d_teacher_scale], "teacher gradient")


@pytest.mark.parametrize(
    "weights", [WEIGHTS, MOBILECLIP_B_WEIGHTS], ids=["distinct", "mobileclip_b"]
)
def test_reinforced_single_device_matches_reference(weights, batch):
    (total, parts), grads = jax.jit(_reinforced_fn(weights, None))(*_reinforced_args(batch))
    assert total.dtype == jnp.float32 and total.shape == ()
    _assert_reinforced_matches(total, parts, grads, batch, weights)


@pytest.mark.parametrize("placement", ["mesh4x2_grad_inside", "make_mesh_default_axes"])
def test_reinforced_shard_map_matches_reference(placement, batch):
    """As a trainer does it: the gradient taken inside shard_map, batch split over two axes."""
    axis_name = ("data", "fsdp")
    rows = P(axis_name)
    args = _reinforced_args(batch)
    if placement == "make_mesh_default_axes":  # Explicit axes on newer JAX, inputs placed sharded
        mesh = jax.make_mesh((4, 2), axis_name)
        place = lambda tree, spec: jax.tree.map(
            lambda x: jax.device_put(x, NamedSharding(mesh, spec)), tree
        )
        student, scale, teacher, teacher_scale = args
        args = (
            place(student, rows),
            place(scale, P()),
            place(teacher, rows),
            place(teacher_scale, P()),
        )
    else:
        mesh = _mesh((4, 2), axis_name)
    specs = (rows, P(), rows, P())
    step = jax.jit(
        jax.shard_map(
            _reinforced_fn(WEIGHTS, axis_name),
            mesh=mesh,
            in_specs=specs,
            out_specs=((P(), P()), specs),
        )
    )
    if placement == "make_mesh_default_axes":
        with jax.set_mesh(mesh):
            (total, parts), grads = step(*args)
    else:
        (total, parts), grads = step(*args)
    _assert_reinforced_matches(total, parts, grads, batch)


def test_reinforced_pmap_matches_reference(batch):
    student, scale, teacher, teacher_scale = _reinforced_args(batch)
    mapped = jax.pmap(
        _reinforced_fn(WEIGHTS, "batch"), axis_name="batch", in_axes=(0, None, 0, None)
    )
    (totals, parts), grads = mapped(
        jax.tree.map(_shards, student), scale, jax.tree.map(_shards, teacher), teacher_scale
    )
    assert totals.shape == (NUM_DEVICES,)
    _assert_reinforced_matches(
        totals, parts, grads, batch, pmap_factor=NUM_DEVICES, mean_scale=True
    )


def test_reinforced_optional_terms(batch):
    """No teacher (paper 000's ViT-B/16 recipe) and no synthetic captions drop their terms."""
    student, scale, teacher, teacher_scale = _reinforced_args(batch)
    (images, real, synthetic), _ = batch
    clip_real = clip_reference(images, real, SCALE)[0]
    clip_synthetic = clip_reference(images, synthetic, SCALE)[0]

    total, parts = reinforced_clip_loss(student, scale, None, QUALITY_CAPTIONS_WEIGHTS)
    assert set(parts) == {"clip_real", "clip_synthetic"}
    _assert_close(total, clip_real + clip_synthetic, name="CLIP on both captions")

    real_only = ImageTextEmbeddings(student.image, student.real_text)
    weights = ReinforcedLossWeights(real_clip=0.4, synthetic_clip=0.0, distill=0.6)
    total, parts = reinforced_clip_loss(
        real_only, scale, teacher, weights, teacher_scale=teacher_scale
    )
    assert set(parts) == {"clip_real", "distill_real"}
    teacher_images, teacher_real, _ = batch[1]
    distill_real = distill_reference(
        images, real, teacher_images, teacher_real, SCALE, np.asarray(TEACHER_SCALES)
    )[0]
    _assert_close(total, 0.4 * clip_real + 0.6 * distill_real, name="real captions only")

    with pytest.raises(ValueError, match="no teacher"):
        reinforced_clip_loss(student, scale, None, WEIGHTS)
    with pytest.raises(ValueError, match="no synthetic"):
        reinforced_clip_loss(real_only, scale, teacher, WEIGHTS)
    with pytest.raises(ValueError, match="synthetic captions too"):
        reinforced_clip_loss(
            student, scale, ImageTextEmbeddings(teacher.image, teacher.real_text), WEIGHTS
        )
