"""RangeAugment: operations, learnable ranges, the PSNR-target loss and its curriculum."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from losses.range_augment import image_mse, psnr_target_loss, psnr_to_mse, target_mse_schedule
from models import range_augment as ra


def test_operations_match_their_formulas():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (3, 5, 4, 3)).astype(np.float32)
    magnitude = np.array([0.5, 1.0, 2.0], np.float32)[:, None, None, None]
    key = jax.random.key(7)
    np.testing.assert_allclose(ra.brightness(images, magnitude, key), images * magnitude, rtol=1e-6)
    channel_mean = images.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(
        ra.contrast(images, magnitude, key),
        (1 - magnitude) * channel_mean + magnitude * images,
        rtol=1e-5,
        atol=1e-6,
    )
    gaussian = np.asarray(jax.random.normal(key, images.shape))
    np.testing.assert_allclose(
        ra.noise(images, magnitude, key), images + magnitude * gaussian, rtol=1e-6
    )


def test_ranges_start_at_corenet_values_and_stay_in_bounds():
    module = ra.RangeAugment()
    images = jnp.zeros((2, 4, 4, 3))
    params = module.init(jax.random.key(0), images, jax.random.key(1))
    ranges = module.apply(params, method=ra.RangeAugment.magnitude_ranges)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))
    assert float(ranges["brightness"][0]) == pytest.approx(0.1 + 0.8 * sigmoid(0.5), rel=1e-6)
    assert float(ranges["brightness"][1]) == pytest.approx(1.1 + 8.9 * sigmoid(1.5), rel=1e-6)
    assert float(ranges["noise"][1]) == pytest.approx(1e-4 + (1 - 1e-4) * sigmoid(0.1), rel=1e-6)
    # Whatever the raw values become, the ranges stay inside their intervals.
    extreme = jax.tree.map(lambda x: x + 1e3, params)
    for low, high in module.apply(extreme, method=ra.RangeAugment.magnitude_ranges).values():
        assert float(low) < float(high)


def test_each_operation_touches_exactly_half_of_the_batch_within_its_range():
    module = ra.RangeAugment(operations=("brightness",))
    # Dark images, so that even the largest brightness factor does not clip.
    images = jnp.full((8, 4, 4, 3), 0.05)
    params = module.init(jax.random.key(0), images, jax.random.key(1))
    low, high = module.apply(params, method=ra.RangeAugment.magnitude_ranges)["brightness"]
    for seed in range(5):
        out = np.asarray(module.apply(params, images, jax.random.key(seed)))
        factors = out[:, 0, 0, 0] / 0.05
        changed = ~np.isclose(factors, 1.0)
        assert changed.sum() == 4
        assert np.all((factors[changed] >= float(low)) & (factors[changed] <= float(high)))


def test_output_is_clipped_and_ranges_receive_gradients():
    module = ra.RangeAugment()
    images = jax.random.uniform(jax.random.key(2), (8, 6, 6, 3))
    params = module.init(jax.random.key(0), images, jax.random.key(1))
    out = module.apply(params, images, jax.random.key(3))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    grads = jax.grad(lambda p: image_mse(images, module.apply(p, images, jax.random.key(3))).sum())(
        params
    )
    assert all(np.abs(float(g)) > 0 for g in jax.tree.leaves(grads))


def numpy_psnr_loss(original, augmented, target_mse, alpha):
    mse = np.mean(((augmented - original) * 255.0) ** 2, axis=(1, 2, 3))
    d = mse - target_mse
    huber = np.where(np.abs(d) < 1, 0.5 * d**2, np.abs(d) - 0.5)
    return huber.mean() * alpha / 255.0**2


def test_psnr_target_loss_matches_numpy_on_one_and_eight_devices():
    rng = np.random.default_rng(1)
    original = rng.uniform(0, 1, (16, 4, 4, 3)).astype(np.float32)
    # Some images within 1 of the target MSE (quadratic branch), most far from it (linear).
    augmented = np.clip(original + rng.normal(0, 0.02, original.shape), 0, 1).astype(np.float32)
    augmented[:3] = original[:3] + 0.01
    target = psnr_to_mse(40.0)
    expected = numpy_psnr_loss(original, augmented, target, 100.0)
    single = psnr_target_loss(image_mse(original, augmented), target, alpha=100.0)
    np.testing.assert_allclose(single, expected, rtol=1e-5)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.shard_map(
        functools.partial(psnr_target_loss, alpha=100.0, axis_name="data"),
        mesh=mesh,
        in_specs=(P("data"), P()),
        out_specs=P(),
    )
    np.testing.assert_allclose(
        sharded(image_mse(original, augmented), jnp.float32(target)), expected, rtol=1e-5
    )


def test_target_follows_the_cosine_from_40_to_20_db():
    assert psnr_to_mse(40.0) == pytest.approx(65025 / 1e4)
    assert psnr_to_mse(20.0) == pytest.approx(65025 / 1e2)
    total = 1000
    start, end = psnr_to_mse(40.0), psnr_to_mse(20.0)
    schedule = lambda step: float(target_mse_schedule(step, total, 40.0, 20.0))
    assert schedule(0) == pytest.approx(start)
    assert schedule(total) == pytest.approx(end, rel=1e-4)
    half = (total + 1) / 2
    assert float(target_mse_schedule(half, total, 40.0, 20.0)) == pytest.approx((start + end) / 2)
    assert schedule(10 * total) == schedule(total)  # held after the end
    linear = float(target_mse_schedule(250, total, 40.0, 20.0, "linear"))
    assert linear == pytest.approx(start + 0.25 * (end - start))
