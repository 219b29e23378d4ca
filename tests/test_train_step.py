"""The sharded train step: data/fsdp/model parallel on 8 fake devices == one device; exact
gradient accumulation; partition rules."""

import jax
import numpy as np
import pytest
import tiny_clip_config as tiny_clip
from jax.sharding import PartitionSpec
from tree_compare import assert_close_at_scale, without_key_biases

from pretrain import sharding, train_step
from pretrain import state as state_lib
from pretrain.gradients import accumulated_gradients
from pretrain.optim import make_optimizer
from pretrain.tasks.clip import Task

BATCH = 16


def tiny_config(**overrides):
    config = tiny_clip.get_config()
    config.ema_decay = 0.99  # exercise the EMA path too
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    size, length = config.data.image_size, config.model.text.context_length
    images = rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)
    tokens = rng.integers(1, 49_000, (BATCH, length), dtype=np.int32)
    tokens[:, 0] = 49_406
    ends = rng.integers(2, length, BATCH)
    for row, end in enumerate(ends):
        tokens[row, end] = 49_407
        tokens[row, end + 1 :] = 0
    return {"image": images, "text": tokens}


def run_one_step(config, mesh, batch):
    task = Task(config, mesh)
    tx, schedule = make_optimizer(config)
    build = state_lib.init_state(task, tx, seed=0, use_ema=True)
    shardings = sharding.tree_shardings(jax.eval_shape(build), mesh)
    state = jax.jit(build, out_shardings=shardings)()
    step = jax.jit(
        train_step.make_train_step(
            task,
            tx,
            schedule,
            mesh,
            grad_accum_steps=config.grad_accum_steps,
            ema_decay=config.ema_decay,
        ),
        out_shardings=(shardings, None),
    )
    # Two steps, so that the second one uses non-zero Adam moments and learning rate.
    for _ in range(2):
        state, metrics = step(state, sharding.global_batch_from_local(batch, mesh))
    return jax.device_get(state), jax.device_get(metrics), shardings


def assert_trees_close(actual, expected, rtol=2e-5, atol=1e-6):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), actual, expected
    )


def full_batch_gradients(config, mesh, batch):
    task = Task(config, mesh)
    init_params = lambda rng: task.init_variables(rng)[0]
    params = jax.jit(
        init_params,
        out_shardings=sharding.tree_shardings(jax.eval_shape(init_params, jax.random.key(0)), mesh),
    )(jax.random.key(0))
    global_batch = sharding.global_batch_from_local(batch, mesh)
    grad_fn = jax.jit(jax.grad(lambda p, b: task.loss_fn(p, b, jax.random.key(1), 0)[0]))
    return jax.device_get(grad_fn(params, global_batch))


SINGLE_DEVICE = {"data": 1}
THREE_WAYS = {"data": 2, "fsdp": 2, "model": 2}


def test_sharded_step_equals_single_device_step():
    config = tiny_config()
    batch = random_batch(config)
    single = sharding.make_mesh(SINGLE_DEVICE, devices=jax.devices()[:1])
    parallel = sharding.make_mesh(THREE_WAYS)
    state_1, metrics_1, _ = run_one_step(config, single, batch)
    state_8, metrics_8, shardings = run_one_step(config, parallel, batch)

    # The 8-device run really is sharded three ways.
    specs = {
        sharding.path_to_name(path): s.spec
        for path, s in jax.tree_util.tree_flatten_with_path(shardings["params"])[0]
    }
    # (64, 4, 16) is below the fsdp size threshold: heads split over "model" only.
    query = specs["image_encoder/transformer/resblocks_0/attn/query/kernel"]
    assert query == PartitionSpec(None, "model", None)
    assert specs["image_encoder/transformer/resblocks_0/mlp/c_fc/kernel"] == PartitionSpec(
        "fsdp", "model"
    )

    # Two full AdamW steps agree. Adam divides each gradient by its own RMS, so where a gradient
    # is tiny float reordering moves a parameter by a small fraction of the learning rate (2e-3
    # here); a sharding mistake would move whole steps. (The gradients themselves are compared
    # tightly, for each loss, below.)
    np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-5)
    for key in ("params", "ema_params"):
        assert_trees_close(
            without_key_biases(state_8[key]), without_key_biases(state_1[key]), atol=4e-5
        )
    assert int(state_8["step"]) == 2


@pytest.mark.parametrize("loss", ["clip", "sigmoid", "sigmoid_ring"])
def test_sharded_gradients_equal_single_device_gradients(loss):
    """Each loss over the global batch on a three-way mesh: the optimizer and EMA that follow do
    not depend on the loss (the step test above covers them once)."""
    config = tiny_config(**{"loss.name": loss})
    batch = random_batch(config)
    single = sharding.make_mesh(SINGLE_DEVICE, devices=jax.devices()[:1])
    parallel = sharding.make_mesh(THREE_WAYS)
    # Each tensor relative to its own scale.
    assert_close_at_scale(
        without_key_biases(full_batch_gradients(config, parallel, batch)),
        without_key_biases(full_batch_gradients(config, single, batch)),
    )


def test_gradient_accumulation_is_exact_for_contrastive_loss():
    """4 micro-batches give the same update as the whole batch: every example stays a negative."""
    # Without RangeAugment: micro-batches draw their augmentations from their own RNG streams.
    plain = {"range_augment.enabled": False}
    batch = random_batch(tiny_config())
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    whole, metrics_whole, _ = run_one_step(tiny_config(**plain), mesh, batch)
    accumulated, metrics_acc, _ = run_one_step(
        tiny_config(grad_accum_steps=4, **plain), mesh, batch
    )
    np.testing.assert_allclose(metrics_acc["loss"], metrics_whole["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_acc["grad_norm"], metrics_whole["grad_norm"], rtol=1e-4)
    assert_trees_close(
        without_key_biases(accumulated["params"]), without_key_biases(whole["params"]), atol=4e-5
    )


class NonSplittingTask(Task):
    """The CLIP task seen as an ordinary task: accumulation averages micro-batch gradients."""

    splits_loss = False


def test_plain_gradient_accumulation_averages_microbatch_gradients():
    config = tiny_config(grad_accum_steps=2, **{"range_augment.enabled": False})
    mesh = sharding.make_mesh({"data": 8})
    task = NonSplittingTask(config, mesh)
    params = jax.jit(lambda rng: task.init_variables(rng)[0])(jax.random.key(0))
    batch = sharding.global_batch_from_local(random_batch(config), mesh)
    rng = jax.random.key(1)
    accumulate = lambda p, b: accumulated_gradients(task, p, b, rng, 0, 2, mesh)
    _, grads = jax.jit(accumulate)(params, batch)
    host_batch = jax.device_get(batch)
    expected = None
    micro_gradients = jax.jit(jax.grad(lambda p, m: task.loss_fn(p, m, rng, 0)[0]))
    for index in range(2):  # micro-batch i holds rows i, i + 2, i + 4, ...
        micro = sharding.global_batch_from_local(
            {k: v[index::2] for k, v in host_batch.items()}, mesh
        )
        g = micro_gradients(params, micro)
        expected = g if expected is None else jax.tree.map(np.add, expected, g)
    expected = jax.tree.map(lambda g: np.asarray(g) / 2, expected)
    assert_close_at_scale(
        without_key_biases(jax.device_get(grads)), without_key_biases(expected), rtol=1e-3
    )


def test_partition_rules_fall_back_when_dimensions_do_not_divide():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    # 3 heads cannot be split over 2 model shards: replicated on "model", fsdp on the width.
    spec = sharding.partition_spec("x/attn/query/kernel", (192, 3, 64), mesh)
    assert spec == PartitionSpec("fsdp", None, None)
    # Small parameters are not worth sharding.
    assert sharding.partition_spec("x/ln_1/scale", (192,), mesh) == PartitionSpec(None)
    # fsdp goes on the largest divisible dimension not used by "model".
    spec = sharding.partition_spec("x/mlp/c_proj/kernel", (1024, 256), mesh)
    assert spec == PartitionSpec("model", "fsdp")


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.mesh_shape({"tensor": 2}, 8)
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.mesh_shape({"data": -1, "model": 3}, 8)


def test_batch_rows_shared_between_processes_are_refused(monkeypatch):
    """With the model axis across hosts two processes would feed the same rows different data."""

    class Device:
        def __init__(self, process_index):
            self.process_index = process_index

    class SharedRows:
        def devices_indices_map(self, shape):
            del shape
            return {Device(0): (slice(0, 1),), Device(1): (slice(0, 1),)}

    mesh = sharding.make_mesh({"data": 8})
    sharding.check_processes_own_distinct_rows(mesh)  # one process: fine
    monkeypatch.setattr(sharding, "batch_sharding", lambda mesh, ndim=1: SharedRows())
    with pytest.raises(ValueError, match="must stay within one host"):
        sharding.check_processes_own_distinct_rows(mesh)


def test_pretrained_subtrees_replace_the_fresh_initialisation():
    params = {
        "a": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)},
        "c": np.ones((), np.float32),
    }
    out = state_lib.overlay(params, {"a": {"w": np.full((2, 3), 5.0)}})
    np.testing.assert_array_equal(out["a"]["w"], 5.0)
    assert out["a"]["w"].dtype == np.float32
    np.testing.assert_array_equal(out["a"]["b"], 0.0)
    assert float(out["c"]) == 1.0
    with pytest.raises(ValueError, match="/a/w has shape"):
        state_lib.overlay(params, {"a": {"w": np.zeros((3, 2))}})
    with pytest.raises(ValueError, match=r"\['x'\] under /: not in the model"):
        state_lib.overlay(params, {"x": np.zeros(1)})
