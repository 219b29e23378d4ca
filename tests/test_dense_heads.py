"""Dense heads (models/dense_heads.py), their context modules (models/pyramid.py) and the spatial
ops under them (models/spatial.py).

* Shapes: every head on one map (square, non-square and odd grids) and UperNet on four maps
  (sizes that halve exactly and sizes that do not); the ViTDet pyramid's levels.
* Parameter counts of each head for a 768-channel ViT and 150 classes, against counts written
  out from the reference architectures (CoreNet's DeepLabV3 / PSPNet, mmsegmentation's UPerHead
  over detectron2's ViTDet pyramid).
* Modes: ``train=True`` updates every BatchNorm's running statistics and draws dropout from the
  ``dropout`` rng; ``train=False`` is deterministic and needs no rng.
* Values: ``adaptive_avg_pool2d`` against a NumPy loop over the floor / ceil bin edges and (torch
  environment) against ``F.adaptive_avg_pool2d``, with ``F.interpolate`` for the resizing; the
  linear head against a NumPy einsum + bias + an independent NumPy bilinear / nearest resize.
* Gradients reach every parameter of every head.
"""

from __future__ import annotations

import functools
import json
import math
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_params import random_params, random_variables
from torch_env import assert_outputs_close, require_torch_env, run_parity_case
from torch_side.parity_files import write_inputs

from models.dense_heads import (
    DENSE_HEADS,
    DeepLabV3Head,
    LinearHead,
    PSPHead,
    UperNetHead,
    build_dense_head,
    classifier_conv,
)
from models.pyramid import PyramidPoolingModule, SimpleFeaturePyramid, psp_branch_channels
from models.spatial import (
    adaptive_avg_pool2d,
    adaptive_bin_edges,
    resize_bilinear,
    resize_nearest,
)

WIDTH = 16
CLASSES = 5
OUTPUT_SIZE = (13, 19)  # not a multiple of any grid below: non-integer resize ratios
# Test-sized heads (channel counts shrunk; rates, bins, dropout and scales are the defaults).
SMALL_FIELDS = {
    "linear": {},
    "deeplabv3": {"channels": 8},
    "pspnet": {"channels": 8},
    "upernet": {"channels": 8, "pyramid_channels": 8},
}
# Stage maps of a convolutional tower, finest first: exact halvings, and odd sizes.
FOUR_MAPS = {
    "even": ((16, 24, 6), (8, 12, 8), (4, 6, 10), (2, 3, 12)),
    "odd": ((15, 11, 6), (8, 6, 8), (4, 3, 10), (2, 2, 12)),
}


def random_maps(shapes, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32) for shape in shapes]


def small_head(name, **fields):
    return build_dense_head(name, CLASSES, **SMALL_FIELDS[name], **fields)


def traced(head, maps, output_size=OUTPUT_SIZE):
    """``(output, variables)`` shapes of ``head`` on maps of (h, w, c) shapes, batch 2: traced,
    never compiled or run (shape checks cost no XLA compile)."""
    features = [jax.ShapeDtypeStruct((2, *shape), jnp.float32) for shape in maps]
    init = lambda x: head.init_with_output(jax.random.key(0), x, output_size)
    return jax.eval_shape(init, features)


@functools.cache
def _variables(name, shapes, seed):
    head, features = small_head(name), random_maps(shapes)
    # The output size must stay static: random_params traces ``init``'s positional arguments.
    static = types.SimpleNamespace(init=lambda key, x: head.init(key, x, OUTPUT_SIZE))
    if name == "linear":  # no BatchNorm
        return {"params": random_params(static, features, seed=seed)}
    return random_variables(static, features, seed=seed)


def head_variables(name, features, seed=0):
    """Random variables of ``small_head(name)`` drawn in NumPy (Flax's eager init compiles every
    initialiser per shape: tens of seconds on a busy CPU), cached per head and input shapes."""
    return _variables(name, tuple(f.shape[1:] for f in features), seed)


# The values are computed by jitted functions, one XLA compile per head and mode: Flax's eager,
# op-by-op run compiles every operation per shape, which costs several times more on a CPU.
@functools.cache
def evaluate_fn(name, output_size=OUTPUT_SIZE):
    head = small_head(name)
    return jax.jit(lambda variables, features: head.apply(variables, features, output_size))


@functools.cache
def train_fn(name):
    """``((loss, (output, batch_stats updates)), grads)`` of a train-mode apply, jitted:
    ``fn(variables, features, weights, dropout_key)`` with loss = sum(output * weights)."""
    head = small_head(name)

    def loss(params, variables, features, weights, key):
        out, updates = head.apply(
            {**variables, "params": params},
            features,
            OUTPUT_SIZE,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        return jnp.sum(out * weights), (out, updates)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return lambda variables, *args: step(variables["params"], variables, *args)


def count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------------
# Shapes and structure
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DENSE_HEADS))
@pytest.mark.parametrize("grid", [(4, 4), (4, 6), (7, 5)])
def test_one_map_output_shape(name, grid):
    out, _ = traced(small_head(name), [(*grid, WIDTH)])
    assert (out.shape, out.dtype) == ((2, *OUTPUT_SIZE, CLASSES), jnp.float32)


@pytest.mark.parametrize("case", sorted(FOUR_MAPS))
def test_upernet_on_four_maps(case):
    head = small_head("upernet")
    out, variables = traced(head, FOUR_MAPS[case], (32, 48))
    assert out.shape == (2, 32, 48, CLASSES)
    params = variables["params"]
    assert "pyramid" not in params
    assert [params[f"lateral_{i}"]["conv"]["kernel"].shape for i in range(3)] == [
        (1, 1, 6, 8),
        (1, 1, 8, 8),
        (1, 1, 10, 8),
    ]
    assert params["ppm"]["branch_0"]["conv"]["kernel"].shape == (1, 1, 12, 8)
    if case == "odd":  # run once: the top-down sums resize 2x2 -> 4x3 -> 8x6 -> 15x11
        features = random_maps(FOUR_MAPS[case])
        out = evaluate_fn("upernet", (32, 48))(head_variables("upernet", features), features)
        assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        ((14, 14), [(56, 56), (28, 28), (14, 14), (7, 7)]),
        ((7, 5), [(28, 20), (14, 10), (7, 5), (3, 2)]),
    ],
)
def test_simple_feature_pyramid_levels(grid, expected):
    pyramid = SimpleFeaturePyramid(channels=8)
    x = jax.ShapeDtypeStruct((1, *grid, WIDTH), jnp.float32)
    levels, variables = jax.eval_shape(lambda x: pyramid.init_with_output(jax.random.key(0), x), x)
    assert [level.shape for level in levels] == [(1, *size, 8) for size in expected]
    params = variables["params"]
    assert sorted(params) == ["simfp_2", "simfp_3", "simfp_4", "simfp_5"]
    # ViTDet's widths: C/2 then C/4 at stride 4, C/2 at stride 8, C at strides 16 and 32.
    lateral_inputs = [
        params[f"simfp_{s}"]["lateral"]["conv"]["kernel"].shape[2] for s in (2, 3, 4, 5)
    ]
    assert lateral_inputs == [WIDTH // 4, WIDTH // 2, WIDTH, WIDTH]


def test_upernet_builds_the_pyramid_from_one_map():
    _, variables = traced(small_head("upernet"), [(7, 5, WIDTH)])
    assert "pyramid" in variables["params"]
    assert variables["params"]["lateral_0"]["conv"]["kernel"].shape == (1, 1, 8, 8)


def test_registry_and_bad_names():
    assert {
        "linear": LinearHead,
        "deeplabv3": DeepLabV3Head,
        "pspnet": PSPHead,
        "upernet": UperNetHead,
    } == DENSE_HEADS
    with pytest.raises(ValueError, match="unknown dense head"):
        build_dense_head("fcn", CLASSES)
    with pytest.raises(ValueError, match="unknown upsample"):
        traced(LinearHead(CLASSES, upsample="bicubic"), [(4, 4, WIDTH)])
    with pytest.raises(ValueError, match="non-empty list"):
        LinearHead(CLASSES).init(jax.random.key(0), jnp.zeros((2, 4, 4, WIDTH)), (8, 8))
    with pytest.raises(ValueError, match="too small"):
        traced(small_head("upernet"), [(1, 4, WIDTH)])


def _conv(kernel, cin, cout):
    return kernel * kernel * cin * cout


def _unit(kernel, cin, cout):
    """conv without bias + BatchNorm scale and bias."""
    return _conv(kernel, cin, cout) + 2 * cout


def _classifier(cin, classes):
    return cin * classes + classes


def _upernet_count(width, classes, channels=512, pyramid=256, bins=4):
    vitdet = (
        _conv(2, width, width // 2) + 2 * (width // 2) + _conv(2, width // 2, width // 4)
        + _unit(1, width // 4, pyramid)
        + _conv(2, width, width // 2) + _unit(1, width // 2, pyramid)
        + 2 * _unit(1, width, pyramid)
        + 4 * _unit(3, pyramid, pyramid)
    )  # fmt: skip
    ppm = bins * _unit(1, pyramid, channels) + _unit(3, pyramid + bins * channels, channels)
    fpn = 3 * _unit(1, pyramid, channels) + 3 * _unit(3, channels, channels)
    fusion = _unit(3, 4 * channels, channels)
    return vitdet + ppm + fpn + fusion + _classifier(channels, classes)


# Parameter counts for a ViT-B grid (768 channels) and ADE20K's 150 classes, written out from the
# reference heads' layers.
REFERENCE_COUNTS = {
    "linear": _classifier(768, 150),
    "deeplabv3": _unit(1, 768, 256)
    + 3 * _unit(3, 768, 256)
    + _unit(1, 768, 256)
    + _unit(1, 5 * 256, 256)
    + _classifier(256, 150),
    "pspnet": 4 * _unit(1, 768, 192) + _unit(3, 768 + 4 * 192, 512) + _classifier(512, 150),
    "upernet": _upernet_count(768, 150),
}


@pytest.mark.parametrize("name", sorted(DENSE_HEADS))
def test_parameter_counts_match_reference_architectures(name):
    head = build_dense_head(name, 150)
    features = [jax.ShapeDtypeStruct((1, 32, 32, 768), jnp.float32)]
    shapes = jax.eval_shape(lambda x: head.init(jax.random.key(0), x, (512, 512)), features)
    assert count(shapes["params"]) == REFERENCE_COUNTS[name]
    # Two running statistics per BatchNorm channel, i.e. one per BatchNorm parameter.
    flat = flax.traverse_util.flatten_dict(shapes["params"])
    norm_params = count([leaf for path, leaf in flat.items() if path[-2].startswith("norm")])
    assert count(shapes.get("batch_stats", {})) == norm_params


def test_psp_branch_channels_follow_corenet():
    assert psp_branch_channels(768, 4) == 192
    assert psp_branch_channels(100, 4) == 16  # 25 rounded down to a multiple of 16
    assert psp_branch_channels(16, 4) == 4  # under 16: unrounded


def test_psp_head_is_pyramid_module_plus_classifier():
    """What a multi-task head (CLIPTeX) does: one PyramidPoolingModule, a 1x1 conv per task."""
    head = small_head("pspnet")
    features = random_maps([(4, 6, WIDTH)])
    variables = head_variables("pspnet", features)
    assert sorted(variables["params"]) == ["classifier", "psp"]

    @jax.jit
    def by_parts(variables, x):
        module_variables = {name: tree["psp"] for name, tree in variables.items()}
        shared = PyramidPoolingModule(channels=8).apply(module_variables, x)
        task = classifier_conv(CLASSES, jnp.float32, jnp.float32)
        logits = task.apply({"params": variables["params"]["classifier"]}, shared)
        return resize_bilinear(logits, OUTPUT_SIZE), head.apply(variables, [x], OUTPUT_SIZE)

    parts, whole = by_parts(variables, features[-1])
    np.testing.assert_allclose(whole, parts, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Training and evaluation modes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deeplabv3", "pspnet", "upernet"])
def test_train_updates_batch_stats_and_draws_dropout(name):
    features = random_maps([(4, 6, WIDTH)])
    variables = head_variables(name, features)
    weights = jnp.ones((2, *OUTPUT_SIZE, CLASSES))

    def train(seed):
        (_, (out, updates)), _ = train_fn(name)(variables, features, weights, jax.random.key(seed))
        return out, updates

    out, updates = train(1)
    before = flax.traverse_util.flatten_dict(variables["batch_stats"])
    after = flax.traverse_util.flatten_dict(updates["batch_stats"])
    assert sorted(before) == sorted(after)
    # Exact comparison: some means move very little (a level after a BatchNorm without activation
    # has a batch mean near zero), but every statistic moves.
    unchanged = [path for path in before if np.array_equal(before[path], after[path])]
    assert not unchanged, unchanged
    np.testing.assert_array_equal(out, train(1)[0])
    assert not np.allclose(out, train(2)[0])

    evaluated = evaluate_fn(name)(variables, features)
    assert bool(jnp.all(jnp.isfinite(evaluated)))
    np.testing.assert_array_equal(evaluated, evaluate_fn(name)(variables, features))
    assert not np.allclose(evaluated, out)
    without_rng = lambda v, x: small_head(name).apply(
        v, x, OUTPUT_SIZE, train=True, mutable=["batch_stats"]
    )
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(without_rng, variables, features)


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------


def reference_adaptive_pool(x, bins_h, bins_w):
    """A direct loop over PyTorch's documented bin edges: floor(i L / n) to ceil((i + 1) L / n)."""
    batch, height, width, channels = x.shape
    out = np.zeros((batch, bins_h, bins_w, channels))
    for i in range(bins_h):
        top, bottom = math.floor(i * height / bins_h), math.ceil((i + 1) * height / bins_h)
        for j in range(bins_w):
            left, right = math.floor(j * width / bins_w), math.ceil((j + 1) * width / bins_w)
            out[:, i, j] = x[:, top:bottom, left:right].mean(axis=(1, 2))
    return out


def test_adaptive_bin_edges_overlap():
    assert adaptive_bin_edges(7, 3) == [(0, 3), (2, 5), (4, 7)]
    assert adaptive_bin_edges(2, 6) == [(0, 1), (0, 1), (0, 1), (1, 2), (1, 2), (1, 2)]
    assert adaptive_bin_edges(6, 3) == [(0, 2), (2, 4), (4, 6)]


@pytest.mark.parametrize(
    ("shape", "sizes"),
    [
        ((2, 7, 5, 3), [1, 2, 3, 6, (3, 4)]),
        ((1, 64, 48, 2), [1, 2, 3, 6]),
        ((1, 2, 3, 1), [6]),  # more bins than pixels: pixels repeat
    ],
)
def test_adaptive_avg_pool2d_matches_numpy_loop(shape, sizes):
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    for size in sizes:
        bins = (size, size) if isinstance(size, int) else size
        ours = adaptive_avg_pool2d(jnp.asarray(x), size)
        assert ours.shape == (shape[0], *bins, shape[3])
        np.testing.assert_allclose(ours, reference_adaptive_pool(x, *bins), rtol=1e-5, atol=1e-6)


def reference_bilinear(x, size):
    """PyTorch's bilinear, align_corners=False, written out per output pixel and axis:
    source = (dst + 0.5) * in / out - 0.5, clamped at 0; neighbours floor and floor + 1."""

    def weights(in_size, out_size):
        matrix = np.zeros((out_size, in_size))
        for dst in range(out_size):
            source = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
            low = min(int(source), in_size - 1)
            high = min(low + 1, in_size - 1)
            matrix[dst, low] += 1 - (source - low)
            matrix[dst, high] += source - low
        return matrix

    rows, cols = weights(x.shape[1], size[0]), weights(x.shape[2], size[1])
    return np.einsum("oh,pw,bhwc->bopc", rows, cols, x)


def reference_nearest(x, size):
    """PyTorch's legacy nearest: source floor(dst * in / out)."""
    rows = [dst * x.shape[1] // size[0] for dst in range(size[0])]
    cols = [dst * x.shape[2] // size[1] for dst in range(size[1])]
    return x[:, rows][:, :, cols]


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
def test_linear_head_equals_einsum_bias_resize(upsample):
    rng = np.random.default_rng(4)
    (x,) = random_maps([(4, 6, WIDTH)])
    kernel = rng.normal(size=(1, 1, WIDTH, CLASSES)).astype(np.float32)
    bias = rng.normal(size=(CLASSES,)).astype(np.float32)
    params = {"params": {"classifier": {"kernel": kernel, "bias": bias}}}
    head = LinearHead(CLASSES, upsample=upsample)
    initialised = head.init(jax.random.key(0), [x], OUTPUT_SIZE)
    assert jax.tree.map(np.shape, initialised) == jax.tree.map(np.shape, params)
    low = np.einsum("bhwc,ck->bhwk", np.asarray(x, np.float64), kernel[0, 0]) + bias
    resize = reference_bilinear if upsample == "bilinear" else reference_nearest
    np.testing.assert_allclose(
        head.apply(params, [x], OUTPUT_SIZE), resize(low, OUTPUT_SIZE), atol=1e-4
    )
    # At the head's own resolution nothing is resized; at twice it nearest repeats pixels.
    np.testing.assert_allclose(head.apply(params, [x], (4, 6)), low, atol=1e-4)
    if upsample == "nearest":
        doubled = np.repeat(np.repeat(low, 2, axis=1), 2, axis=2)
        np.testing.assert_allclose(head.apply(params, [x], (8, 12)), doubled, atol=1e-4)
    # bf16 arithmetic still returns float32 logits.
    bf16 = LinearHead(CLASSES, dtype=jnp.bfloat16, upsample=upsample)
    assert bf16.apply(params, [x], OUTPUT_SIZE).dtype == jnp.float32


def test_nearest_and_bilinear_differ():
    (x,) = random_maps([(4, 6, 3)])
    assert not np.allclose(resize_nearest(x, (8, 12)), resize_bilinear(x, (8, 12)))


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DENSE_HEADS))
def test_gradient_reaches_every_parameter(name):
    features = random_maps([(4, 6, WIDTH)])
    variables = head_variables(name, features)
    weights = jnp.asarray(np.random.default_rng(5).normal(size=(2, *OUTPUT_SIZE, CLASSES)))
    _, grads = train_fn(name)(variables, features, weights, jax.random.key(6))
    flat = flax.traverse_util.flatten_dict(grads)
    assert sorted(flat) == sorted(flax.traverse_util.flatten_dict(variables["params"]))
    unused = [path for path, grad in flat.items() if not np.any(np.asarray(grad) != 0)]
    assert not unused, unused


# --------------------------------------------------------------------------------------------------
# Parity with torch.nn.functional in the torch environment
# --------------------------------------------------------------------------------------------------


def _spatial_cases():
    rng = np.random.default_rng(7)
    inputs = {
        "x7x5": rng.normal(size=(2, 7, 5, 3)).astype(np.float32),
        "x64x48": rng.normal(size=(1, 64, 48, 4)).astype(np.float32),
        "x4x6": rng.normal(size=(2, 4, 6, 3)).astype(np.float32),
    }
    spec, ours = [], {}

    def add(name, source, op, size, result, **options):
        spec.append({"name": name, "input": source, "op": op, "size": list(size), **options})
        ours[name] = np.asarray(result)

    for source in ("x7x5", "x64x48"):
        for size in [(1, 1), (2, 2), (3, 3), (6, 6), (3, 4)]:
            x = jnp.asarray(inputs[source])
            add(
                f"pool_{source}_{size}",
                source,
                "adaptive_avg_pool2d",
                size,
                adaptive_avg_pool2d(x, size),
            )
    for source, sizes in [("x4x6", [(13, 19), (3, 2), (8, 12)]), ("x64x48", [(17, 11)])]:
        x = jnp.asarray(inputs[source])
        for size in sizes:
            for align in (False, True):
                add(
                    f"bilinear_{align}_{source}_{size}",
                    source,
                    "interpolate",
                    size,
                    resize_bilinear(x, size, align_corners=align),
                    mode="bilinear",
                    align_corners=align,
                )
            add(
                f"nearest_{source}_{size}",
                source,
                "interpolate",
                size,
                resize_nearest(x, size),
                mode="nearest",
            )
    return inputs, spec, ours


@pytest.mark.torch
def test_spatial_ops_match_torch(tmp_path):
    require_torch_env()
    inputs, spec, ours = _spatial_cases()
    write_inputs(tmp_path, inputs)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    _, theirs = run_parity_case(tmp_path, "check_adaptive_pool.py", tmp_path)
    assert sorted(theirs) == sorted(ours)
    assert_outputs_close(
        ours, theirs, sorted(ours), tolerance=2e-6, what="JAX vs torch.nn.functional"
    )
