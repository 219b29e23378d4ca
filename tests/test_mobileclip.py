"""MobileCLIP's MCi image towers: parameter counts (the paper's), shapes of the named
intermediates, per-group BatchNorm in training, rematerialisation, bfloat16, the sharded global
batch, and the depthwise convs as shifted copies against XLA's grouped convs in the whole tower.
Re-parameterisation: test_mobileclip_reparam.py; the depthwise op itself: test_depthwise.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from random_params import random_params
from tree_compare import assert_close_at_one_scale, assert_close_at_scale

from models.mobileclip import MCI_VARIANTS, MobileClipImageTower
from pretrain import sharding

IMAGE_SIZE = 64
# A reduced-depth tower with every kind of layer (stem, RepMixer stages, SE patch embeddings,
# RepCPE, attention, final conv with SE) for the quick tests.
SMALL = {"depths": (1, 1, 2, 1), "widths": (16, 32, 64, 128)}
# The narrowest such tower (two attention heads), for the tests that compile several programs.
TINY = {"depths": (1, 1, 1, 1), "widths": (8, 16, 32, 64)}
# MobileCLIP paper (Table: MCi0 / MCi1 / MCi2 image encoders), millions of parameters.
PAPER_MILLIONS = {"mci0": 11.4, "mci1": 21.5, "mci2": 35.7}


def count(tree) -> int:
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(tree))


def variable_shapes(tower: MobileClipImageTower, image_size: int = IMAGE_SIZE):
    images = jnp.zeros((1, image_size, image_size, 3))
    return jax.eval_shape(tower.init, jax.random.key(0), images)


def random_batch_stats(tower: MobileClipImageTower, seed: int):
    """Running means around 0 with spread, running variances in [0.5, 2]: BatchNorm folding that
    ignored either would show."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "mean":
            return (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, variable_shapes(tower)["batch_stats"])


def random_variables(tower: MobileClipImageTower, seed: int = 0) -> dict:
    """Random params (BN scales near 1, biases and layer scales around 0.1) + random BN stats."""
    images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
    return {
        "params": random_params(tower, images, seed=seed),
        "batch_stats": random_batch_stats(tower, seed=seed + 1),
    }


def random_images(batch: int, seed: int, image_size: int = IMAGE_SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)


def evaluate(tower: MobileClipImageTower, variables, images):
    return jax.jit(lambda v, x: tower.apply(v, x))(variables, images)


# --------------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(MCI_VARIANTS))
def test_parameter_counts_are_the_papers(variant):
    """The paper's sizes are the inference (re-parameterised) tower with its 512-d projection
    (timm's head.fc, 1024 or 1280 -> 512 with a bias). The train-time form is larger: its extra
    BatchNorms and branches make MCi2 35.8M."""
    inference = MobileClipImageTower.from_variant(variant, output_dim=512, reparameterized=True)
    train_form = MobileClipImageTower.from_variant(variant, output_dim=512)
    inference_count = count(variable_shapes(inference)["params"])
    train_count = count(variable_shapes(train_form)["params"])
    assert round(inference_count / 1e6, 1) == PAPER_MILLIONS[variant]
    assert train_count > inference_count
    head = train_form.width * 512 + 512
    assert count(variable_shapes(train_form.clone(output_dim=None))["params"]) == train_count - head


def test_variants_fields_and_width():
    tower = MobileClipImageTower.from_variant("mci2", output_dim=256)
    assert tower.depths == (4, 12, 24, 4) and tower.widths == (80, 160, 320, 640)
    assert tower.width == 1280 and tower.output_dim == 256
    with pytest.raises(ValueError, match="unknown MobileCLIP variant"):
        MobileClipImageTower.from_variant("mci9")
    with pytest.raises(ValueError, match="widths"):
        variable_shapes(MobileClipImageTower(depths=(1, 1), widths=(16, 32, 64)))
    with pytest.raises(ValueError, match="head_dim"):
        variable_shapes(MobileClipImageTower(**{**SMALL, "widths": (16, 32, 64, 100)}))
    with pytest.raises(ValueError, match="depthwise_impl"):
        variable_shapes(MobileClipImageTower(**TINY, depthwise_impl="fft"))


def test_intermediates_shapes_and_embedding():
    tower = MobileClipImageTower(**SMALL, output_dim=24)
    variables = random_variables(tower)
    embedding, intermediates = evaluate(tower, variables, random_images(2, seed=0))
    for index, (width, stride) in enumerate(zip(SMALL["widths"], (4, 8, 16, 32))):
        side = IMAGE_SIZE // stride
        assert intermediates[f"stage_{index}"].shape == (2, side, side, width)
    assert intermediates["final_features"].shape == (2, 2, 2, 256)
    np.testing.assert_allclose(
        intermediates["pre_logits"], intermediates["final_features"].mean(axis=(1, 2)), rtol=1e-6
    )
    head = variables["params"]["head"]
    np.testing.assert_allclose(
        embedding, intermediates["pre_logits"] @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6
    )
    pooled, _ = evaluate(
        tower.clone(output_dim=None),
        {
            **variables,
            "params": {
                name: value for name, value in variables["params"].items() if name != "head"
            },
        },
        random_images(2, seed=0),
    )
    np.testing.assert_allclose(pooled, intermediates["pre_logits"], rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Training mode
# --------------------------------------------------------------------------------------------------


def train_apply(tower, variables, images):
    return jax.jit(lambda v, x: tower.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images
    )


def test_training_uses_group_statistics_and_updates_running_stats():
    """With bn_groups=2 each half of the batch is normalised on its own: the first half's
    outputs equal a one-group run on that half alone, and differ from whole-batch statistics."""
    tower = MobileClipImageTower(**TINY, output_dim=24, bn_groups=2)
    variables = random_variables(tower, seed=3)
    images = random_images(4, seed=4)
    images[2:] = 3.0 * images[2:] + 1.0  # the second half has other statistics
    (grouped, _), updated = train_apply(tower, variables, images)
    (alone, _), _ = train_apply(tower.clone(bn_groups=1), variables, images[:2])
    (whole, _), _ = train_apply(tower.clone(bn_groups=1), variables, images)
    np.testing.assert_allclose(grouped[:2], alone, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(whole[:2]) - np.asarray(alone)).max() > 1e-3
    # Every running statistic moved; evaluation differs from training-mode outputs.
    for old, new in zip(
        jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updated["batch_stats"])
    ):
        assert np.abs(np.asarray(new) - old).max() > 0
    evaluated, _ = evaluate(tower, variables, images)
    assert np.abs(np.asarray(evaluated) - np.asarray(grouped)).max() > 1e-3


def train_step_values(tower: MobileClipImageTower, variables, images, scalar=jnp.sin):
    """Train-mode loss sum(scalar(embedding)), its parameter gradients and the updated BatchNorm
    statistics: ``((loss, updated), grads)``."""

    def loss(params):
        (embedding, _), updated = tower.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(scalar(embedding)), updated

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


@pytest.mark.slow
def test_remat_gives_the_same_values_and_gradients():
    images = random_images(2, seed=5)
    towers = [
        MobileClipImageTower(**TINY, output_dim=8, remat_policy=policy)
        for policy in ("none", "full")
    ]
    variables = random_variables(towers[0], seed=6)
    results = [train_step_values(tower, variables, images, scalar=jnp.square) for tower in towers]
    (value, stats), grads = results[0]
    (remat_value, remat_stats), remat_grads = results[1]
    np.testing.assert_allclose(value, remat_value, rtol=1e-5)
    assert_close_at_scale(remat_stats, stats)
    assert_close_at_one_scale(remat_grads, grads)


def test_bfloat16_computation_float32_parameters():
    tower = MobileClipImageTower(**TINY, output_dim=8, dtype=jnp.bfloat16)
    variables = random_variables(tower, seed=7)
    images = random_images(2, seed=8)
    # Training-mode dtypes from shapes alone (a compile would cost more than it checks).
    (embedding, intermediates), updated = jax.eval_shape(
        lambda v, x: tower.apply(v, x, train=True, mutable=["batch_stats"]), variables, images
    )
    assert embedding.dtype == jnp.bfloat16 and intermediates["stage_3"].dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updated["batch_stats"]))
    reference, _ = evaluate(tower.clone(dtype=jnp.float32), variables, images)
    low, _ = evaluate(tower, variables, images)
    scale = np.abs(np.asarray(reference)).max()
    assert np.abs(np.asarray(low, np.float32) - np.asarray(reference)).max() < 0.1 * scale


def test_sharded_batch_with_per_device_groups_matches_unsharded():
    """The trainer's setting: a global batch sharded over 8 devices under jit; bn_groups=8 is
    per-device statistics and must equal the same groups computed without sharding."""
    mesh = sharding.make_mesh({"data": -1})
    tower = MobileClipImageTower(**TINY, output_dim=8, bn_groups=8)
    variables = random_variables(tower, seed=9)
    # 64 px: stage 4 is 2 x 2, so each group's statistics there cover 8 values (at 1 x 1, two
    # values per group make the normalisation ill-conditioned and float reordering visible).
    images = random_images(16, seed=10)
    (expected, _), expected_stats = train_apply(tower, variables, images)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    (embedding, _), stats = train_apply(tower, variables, jax.device_put(images, batch_sharding))
    np.testing.assert_allclose(embedding, expected, rtol=1e-4, atol=1e-5)
    for actual, wanted in zip(jax.tree.leaves(stats), jax.tree.leaves(expected_stats)):
        np.testing.assert_allclose(actual, wanted, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Depthwise implementations (models/depthwise.py)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~45 s on 2 cores, most of it compiling the grouped-conv gradients
def test_tower_with_shifts_equals_tower_with_grouped_convs():
    images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    conv_tower = MobileClipImageTower(**TINY, output_dim=8, depthwise_impl="conv")
    shifts_tower = conv_tower.clone(depthwise_impl="shifts")
    variables = conv_tower.init(jax.random.key(0), images[:1])
    shifts_shapes = jax.eval_shape(shifts_tower.init, jax.random.key(0), images[:1])
    assert jax.tree.map(np.shape, shifts_shapes) == jax.tree.map(np.shape, variables)
    (value, stats), grads = train_step_values(conv_tower, variables, images)
    (shifts_value, shifts_stats), shifts_grads = train_step_values(shifts_tower, variables, images)
    np.testing.assert_allclose(shifts_value, value, rtol=1e-5)
    assert_close_at_scale(shifts_stats, stats)
    assert_close_at_one_scale(shifts_grads, grads)
