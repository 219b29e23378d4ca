"""GroupedBatchNorm against a NumPy reference of PyTorch's BatchNorm semantics.

Reference (written from PyTorch's documented behaviour): in training each group of consecutive
rows is normalised with its own mean and biased variance; running statistics move by
``(1 - momentum)`` (Flax convention) towards the mean over groups of the group means and of the
UNBIASED group variances; evaluation uses the running statistics. Also: the running statistics are
created but not updated at init, bf16 inputs keep float32 statistics, the sharded run (batch over 8
devices, one group per device) equals the unsharded one, and bad group counts are rejected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from models.batchnorm import GroupedBatchNorm, group_statistics
from pretrain import sharding

EPS = 1e-5
MOMENTUM = 0.9


def reference_train(x, scale, bias, running_mean, running_var, groups, momentum=MOMENTUM):
    """(output, new_running_mean, new_running_var) in float64, PyTorch BatchNorm per group."""
    x = np.asarray(x, np.float64)
    outputs, means, unbiased = [], [], []
    for part in np.split(x, groups, axis=0):
        values = part.reshape(-1, part.shape[-1])
        mean, var = values.mean(axis=0), values.var(axis=0)  # biased, for normalising
        outputs.append((part - mean) / np.sqrt(var + EPS) * scale + bias)
        means.append(mean)
        unbiased.append(values.var(axis=0, ddof=1))
    new_mean = momentum * running_mean + (1 - momentum) * np.mean(means, axis=0)
    new_var = momentum * running_var + (1 - momentum) * np.mean(unbiased, axis=0)
    return np.concatenate(outputs), new_mean, new_var


def reference_eval(x, scale, bias, running_mean, running_var):
    return (np.asarray(x, np.float64) - running_mean) / np.sqrt(running_var + EPS) * scale + bias


def random_state(channels: int, seed: int):
    rng = np.random.default_rng(seed)
    params = {
        "scale": (1 + 0.3 * rng.standard_normal(channels)).astype(np.float32),
        "bias": (0.2 * rng.standard_normal(channels)).astype(np.float32),
    }
    stats = {
        "mean": (0.5 * rng.standard_normal(channels)).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }
    return params, stats


def random_input(shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Per-channel offsets and spreads, and a different shift per row, so that group statistics
    # differ from the whole batch's.
    channels = shape[-1]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, channels) + rng.normal(0, 2, channels)
    return (x + rng.normal(0, 1, (shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("shape", [(8, 5, 3, 6), (8, 6)])
def test_training_matches_reference(groups, shape):
    params, stats = random_state(shape[-1], seed=groups)
    x = random_input(shape, seed=10 + groups)
    module = GroupedBatchNorm(num_groups=groups)
    out, updated = module.apply(
        {"params": params, "batch_stats": stats},
        x,
        use_running_average=False,
        mutable=["batch_stats"],
    )
    expected, new_mean, new_var = reference_train(
        x, params["scale"], params["bias"], stats["mean"], stats["var"], groups
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["mean"], new_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updated["batch_stats"]["var"], new_var, rtol=1e-5, atol=1e-6)
    # Groups really are separate: with >1 group the output differs from whole-batch statistics.
    if groups > 1:
        whole, _, _ = reference_train(
            x, params["scale"], params["bias"], stats["mean"], stats["var"], 1
        )
        assert np.abs(whole - expected).max() > 1e-2


def test_evaluation_uses_running_statistics_without_update():
    params, stats = random_state(6, seed=3)
    x = random_input((4, 3, 3, 6), seed=4)
    module = GroupedBatchNorm(num_groups=2, use_running_average=True)
    out, updated = module.apply(
        {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
    )
    expected = reference_eval(x, params["scale"], params["bias"], stats["mean"], stats["var"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(updated["batch_stats"]["mean"], stats["mean"])
    np.testing.assert_array_equal(updated["batch_stats"]["var"], stats["var"])
    # Evaluation needs no batch divisible by num_groups (one image at a time works).
    single = module.apply({"params": params, "batch_stats": stats}, x[:1])
    np.testing.assert_allclose(single, expected[:1], rtol=1e-5, atol=1e-5)


def test_momentum_convention_is_torch_complement():
    """Flax momentum 0.9 == torch momentum 0.1: one step from (0, 1) by a batch of constant-per-
    channel data moves the running mean 10% of the way."""
    x = np.broadcast_to(np.arange(1.0, 4.0, dtype=np.float32), (4, 2, 2, 3)).copy()
    x[:, 0] += 1.0  # some spread so that the variance is defined
    module = GroupedBatchNorm()
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    _, updated = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    values = x.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(updated["batch_stats"]["mean"], 0.1 * values.mean(0), rtol=1e-6)
    np.testing.assert_allclose(
        updated["batch_stats"]["var"], 0.9 + 0.1 * values.var(0, ddof=1), rtol=1e-6
    )


def test_init_creates_but_does_not_update_statistics():
    x = random_input((4, 2, 2, 5), seed=5)
    variables = GroupedBatchNorm(num_groups=2).init(jax.random.key(0), x, use_running_average=False)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(5))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(5))
    np.testing.assert_array_equal(variables["params"]["scale"], np.ones(5))
    np.testing.assert_array_equal(variables["params"]["bias"], np.zeros(5))
    assert variables["batch_stats"]["mean"].dtype == jnp.float32


def test_bfloat16_inputs_keep_float32_statistics():
    params, stats = random_state(4, seed=6)
    x = random_input((8, 3, 3, 4), seed=7)
    module = GroupedBatchNorm(num_groups=2, dtype=jnp.bfloat16)
    out, updated = module.apply(
        {"params": params, "batch_stats": stats},
        jnp.asarray(x, jnp.bfloat16),
        use_running_average=False,
        mutable=["batch_stats"],
    )
    assert out.dtype == jnp.bfloat16
    assert updated["batch_stats"]["var"].dtype == jnp.float32
    x_rounded = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    expected, new_mean, new_var = reference_train(
        x_rounded, params["scale"], params["bias"], stats["mean"], stats["var"], 2
    )
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(updated["batch_stats"]["mean"], new_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updated["batch_stats"]["var"], new_var, rtol=1e-5, atol=1e-6)


def test_group_statistics_counts_values_per_group():
    x = random_input((6, 4, 5, 3), seed=8)
    mean, var, count = group_statistics(jnp.asarray(x), 3)
    assert mean.shape == var.shape == (3, 3) and count == 2 * 4 * 5
    np.testing.assert_allclose(mean[1], x[2:4].reshape(-1, 3).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[2], x[4:6].reshape(-1, 3).var(0), rtol=1e-5, atol=1e-6)


def test_rejects_batches_that_groups_do_not_divide():
    x = np.zeros((6, 2, 2, 3), np.float32)
    module = GroupedBatchNorm(num_groups=4)
    variables = module.init(jax.random.key(0), x, use_running_average=True)
    with pytest.raises(ValueError, match="not divisible"):
        module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="num_groups"):
        GroupedBatchNorm(num_groups=0).init(jax.random.key(0), x, use_running_average=True)


@pytest.mark.parametrize("groups", [1, 8])
def test_sharded_global_batch_matches_unsharded(groups):
    """Under jit on a global batch sharded over 8 devices (the trainer's GSPMD setting), one group
    per device gives per-device statistics and one group the synchronised ones, as unsharded."""
    devices = jax.devices()
    assert len(devices) == 8
    mesh = sharding.make_mesh({"data": -1})
    params, stats = random_state(6, seed=9)
    x = random_input((16, 4, 4, 6), seed=11)
    module = GroupedBatchNorm(num_groups=groups)

    def step(variables, images):
        return module.apply(variables, images, use_running_average=False, mutable=["batch_stats"])

    variables = {"params": params, "batch_stats": stats}
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    sharded_x = jax.device_put(x, batch_sharding)
    out, updated = jax.jit(step)(variables, sharded_x)
    expected, new_mean, new_var = reference_train(
        x, params["scale"], params["bias"], stats["mean"], stats["var"], groups
    )
    assert out.sharding.is_equivalent_to(batch_sharding, out.ndim)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["mean"], new_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updated["batch_stats"]["var"], new_var, rtol=1e-5, atol=1e-6)


def test_per_device_groups_need_no_gathered_activations():
    """With one group per device the reshape keeps each group on its device: the compiled step
    gathers no activations; its only collective reduces the (C,) running statistics."""
    mesh = sharding.make_mesh({"data": -1})
    module = GroupedBatchNorm(num_groups=8)
    x = jax.device_put(
        np.ones((16, 8, 8, 32), np.float32), NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    )
    variables = module.init(jax.random.key(0), x[:1], use_running_average=True)
    step = jax.jit(
        lambda v, images: module.apply(
            v, images, use_running_average=False, mutable=["batch_stats"]
        )
    )
    compiled = step.lower(variables, x).compile().as_text()
    assert "all-gather" not in compiled and "all-to-all" not in compiled
    reductions = [line for line in compiled.splitlines() if " all-reduce(" in line]
    assert reductions and all("f32[32]" in line for line in reductions), reductions
