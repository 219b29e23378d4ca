"""CLIP's modified ResNet image tower (models/resnet.py): shapes, open_clip's parameter count,
BatchNorm in training vs evaluation (running statistics against a NumPy computation, per-group
statistics), rematerialisation and position-embedding resizing.

Numerical parity of the whole tower with open_clip's ``ModifiedResNet`` is in
tests/test_export_open_clip_resnet.py (a NumPy forward pass and open_clip itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tree_compare import assert_close_at_scale

from models.resnet import ModifiedResNet, resnet_variant

# open_clip.create_model("RN50").visual: sum(p.numel() for p in parameters()), measured in the
# torch environment (open_clip 3.3.0); its BatchNorm buffers (running mean and variance) hold
# 53,248 more values, plus 55 num_batches_tracked counters.
OPEN_CLIP_RN50_VISUAL_PARAMETERS = 38_316_896
OPEN_CLIP_RN50_RUNNING_STATISTICS = 53_248

# A small tower with every kind of block: a stage with a second (shortcut-free) block, stages
# with strided downsampling; feature width 32 * 8 = 256, 4 heads of 64.
TINY = {"layers": (1, 2, 1, 1), "width": 8, "num_heads": 4, "output_dim": 24}


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def random_variables(model: ModifiedResNet, image_size: int, seed: int = 0):
    """Variables with random, non-trivial values: BatchNorm scales off 1 (including the
    zero-initialised last BatchNorm of each block), running statistics off 0 and 1."""
    example = jnp.zeros((1, image_size, image_size, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), example)
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "scale":
            return 1 + 0.2 * noise
        if name in ("bias", "mean"):
            return 0.2 * noise
        if name == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1]) if leaf.ndim == 4 else leaf.shape[0]
            return noise * np.float32(np.sqrt(1 / fan_in))
        return 0.1 * noise  # the attention pool's position embeddings

    return jax.tree_util.tree_map_with_path(value, shapes)


def images(batch: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def test_rn50_shapes_and_parameter_count_match_open_clip():
    model = ModifiedResNet.from_variant("RN50")
    fields = (model.layers, model.width, model.num_heads, model.output_dim)
    assert fields == ((3, 4, 6, 3), 64, 32, 1024)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert count(variables["params"]) == OPEN_CLIP_RN50_VISUAL_PARAMETERS
    assert count(variables["batch_stats"]) == OPEN_CLIP_RN50_RUNNING_STATISTICS
    attnpool = variables["params"]["attnpool"]
    assert attnpool["positional_embedding"].shape == (7 * 7 + 1, 2048)
    assert attnpool["q_proj"]["kernel"].shape == (2048, 32, 64)
    assert attnpool["c_proj"]["kernel"].shape == (32, 64, 1024)
    # Only each stage's first block has a downsampling shortcut.
    params = variables["params"]
    assert [name for name in params if "downsample_0" in params[name]] == [
        "layer1_0",
        "layer2_0",
        "layer3_0",
        "layer4_0",
    ]

    embedding, intermediates = jax.eval_shape(
        lambda v, x: model.apply(v, x), variables, jnp.zeros((2, 224, 224, 3))
    )
    assert embedding.shape == (2, 1024)
    assert {name: value.shape for name, value in intermediates.items()} == {
        "stem": (2, 56, 56, 64),
        "stage_1": (2, 56, 56, 256),
        "stage_2": (2, 28, 28, 512),
        "stage_3": (2, 14, 14, 1024),
        "stage_4": (2, 7, 7, 2048),
        "patch_tokens": (2, 7, 7, 2048),
        "pre_logits": (2, 2048),
    }


def test_variants_follow_open_clip_head_rule():
    assert resnet_variant("RN50x4") == {
        "layers": (4, 6, 10, 6),
        "width": 80,
        "output_dim": 640,
        "num_heads": 40,
    }
    assert ModifiedResNet.from_variant("RN101", output_dim=None).output_dim is None
    with pytest.raises(ValueError, match="RN18"):
        resnet_variant("RN18")


def test_output_dim_none_keeps_the_feature_width():
    model = ModifiedResNet(**{**TINY, "output_dim": None})
    embedding, _ = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros((1, 64, 64, 3))
    )
    assert embedding.shape == (1, 256)


def test_batch_norm_trains_on_batch_statistics_and_evaluates_on_running_ones():
    model = ModifiedResNet(**TINY)
    variables = random_variables(model, 64)
    x = images(4, 64)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    eval_embedding, _ = apply(variables, x)
    (train_embedding, _), updated = apply(variables, x, train=True, mutable="batch_stats")
    assert np.abs(np.asarray(train_embedding) - np.asarray(eval_embedding)).max() > 1e-2

    # Evaluation does not depend on the other examples of the batch; training does.
    alone, _ = apply(variables, x[:2])
    assert_close_at_scale(alone, eval_embedding[:2], rtol=1e-5, scale_atol=1e-5)
    (train_alone, _), _ = apply(variables, x[:2], train=True, mutable="batch_stats")
    assert np.abs(np.asarray(train_alone) - np.asarray(train_embedding[:2])).max() > 1e-3

    # The stem's first BatchNorm: running = 0.9 running + 0.1 batch statistic, torch's update
    # (the variance unbiased), from the first convolution's output computed in NumPy.
    kernel = np.asarray(variables["params"]["conv1"]["kernel"])  # (3, 3, 3, 4) HWIO
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    windows = windows[:, ::2, ::2]  # stride 2: (B, 32, 32, 3, 3, 3) as (B, H, W, C, kh, kw)
    conv = np.einsum("bhwcij,ijco->bhwo", windows, kernel, dtype=np.float64)
    values = conv.reshape(-1, conv.shape[-1])
    old = variables["batch_stats"]["bn1"]
    new = updated["batch_stats"]["bn1"]
    np.testing.assert_allclose(
        new["mean"], 0.9 * old["mean"] + 0.1 * values.mean(0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        new["var"], 0.9 * old["var"] + 0.1 * values.var(0, ddof=1), rtol=1e-5, atol=1e-6
    )
    # Every BatchNorm's statistics moved; evaluation changes none.
    moved = jax.tree.map(
        lambda a, b: bool(np.abs(np.asarray(a) - np.asarray(b)).max() > 0),
        updated["batch_stats"],
        variables["batch_stats"],
    )
    assert all(jax.tree.leaves(moved))
    _, unchanged = apply(variables, x, mutable="batch_stats")
    jax.tree.map(np.testing.assert_array_equal, unchanged["batch_stats"], variables["batch_stats"])


def test_batch_norm_groups_normalise_each_slice_of_the_batch_alone():
    grouped = ModifiedResNet(**TINY, bn_groups=2)
    single = ModifiedResNet(**TINY)
    variables = random_variables(single, 64, seed=2)
    x = images(4, 64, seed=3)
    apply = jax.jit(
        lambda model, v, batch: model.apply(v, batch, train=True, mutable="batch_stats"),
        static_argnums=0,
    )
    (together, _), together_stats = apply(grouped, variables, x)
    (first, _), first_stats = apply(single, variables, x[:2])
    (second, _), second_stats = apply(single, variables, x[2:])
    assert_close_at_scale(together, np.concatenate([first, second]), rtol=1e-5, scale_atol=1e-5)
    # The running statistics take the mean of the groups' statistics.
    halfway = jax.tree.map(lambda a, b: (a + b) / 2, first_stats, second_stats)
    assert_close_at_scale(together_stats, halfway, rtol=1e-5, scale_atol=1e-5)


def test_remat_gives_the_same_values_and_gradients():
    mini = {**TINY, "layers": (1, 1, 1, 1)}  # compiled twice with gradients: kept small
    x = images(2, 32, seed=4)
    plain = ModifiedResNet(**mini)
    remat = ModifiedResNet(**mini, remat_policy="full")
    variables = random_variables(plain, 32, seed=5)

    def loss(model, params):
        (embedding, _), updated = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable="batch_stats",
        )
        return jnp.sum(embedding**2), updated

    grad = jax.jit(jax.grad(loss, argnums=1, has_aux=True), static_argnums=0)
    plain_grads, plain_stats = grad(plain, variables["params"])
    remat_grads, remat_stats = grad(remat, variables["params"])
    # The key bias's true gradient is zero (a shift of every key is lost in the softmax): only
    # float noise to compare there.
    for grads in (remat_grads, plain_grads):
        del grads["attnpool"]["k_proj"]["bias"]
    assert_close_at_scale(remat_grads, plain_grads, rtol=1e-4, scale_atol=1e-5)
    assert_close_at_scale(remat_stats, plain_stats, rtol=1e-5, scale_atol=1e-6)
    with pytest.raises(ValueError, match="remat_policy"):
        jax.eval_shape(ModifiedResNet(**mini, remat_policy="sometimes").init, jax.random.key(0), x)


def test_position_embeddings_resize_to_other_image_sizes():
    stored = ModifiedResNet(**TINY, pos_embed_grid=2)
    variables = random_variables(ModifiedResNet(**TINY), 64, seed=6)
    assert variables["params"]["attnpool"]["positional_embedding"].shape == (5, 256)
    x = images(2, 64, seed=7)
    apply = jax.jit(lambda model, *args: model.apply(*args), static_argnums=0)
    # At the stored grid nothing is resized.
    np.testing.assert_array_equal(
        apply(stored, variables, x)[0], apply(ModifiedResNet(**TINY), variables, x)[0]
    )
    embedding, intermediates = apply(stored, variables, images(2, 96, seed=8))
    assert embedding.shape == (2, 24) and intermediates["stage_4"].shape == (2, 3, 3, 256)
    assert np.isfinite(np.asarray(embedding)).all()


def test_bfloat16_compute_keeps_float32_parameters():
    model = ModifiedResNet(**TINY, dtype=jnp.bfloat16)
    variables = random_variables(ModifiedResNet(**TINY), 64, seed=9)
    x = images(2, 64, seed=10)
    embedding, intermediates = jax.jit(model.apply)(variables, x)
    assert embedding.dtype == jnp.bfloat16 and intermediates["stage_2"].dtype == jnp.bfloat16
    reference, _ = jax.jit(ModifiedResNet(**TINY).apply)(variables, x)
    embedding = np.asarray(embedding, np.float32)
    cosine = np.sum(embedding * reference, -1) / (
        np.linalg.norm(embedding, axis=-1) * np.linalg.norm(reference, axis=-1)
    )
    assert cosine.min() > 0.99
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
