"""Optimizers: LAMB with a clamped trust ratio against a NumPy reference, layer-wise lr decay.

The LAMB reference follows the LAMB paper (You et al. 2019, Algorithm 2) with Adam's bias
correction as optax's ``scale_by_adam`` applies it (``eps`` added to ``sqrt(v_hat)``), decoupled
weight decay added to the direction before the trust ratio, and the ratio clamped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from pretrain.optim import (
    EMBEDDING_NO_DECAY_PATTERNS,
    LayerDecayRule,
    layer_decay_multipliers,
    layer_id,
    make_optimizer,
    num_blocks,
    weight_decay_mask,
)
from pretrain.sharding import path_to_name

B1, B2, EPS, WEIGHT_DECAY, LR = 0.9, 0.999, 1e-6, 0.05, 0.02
MIN_TRUST, MAX_TRUST = 0.01, 10.0
NUM_STEPS = 3


def optimizer_config(name: str = "lamb", **fields) -> ConfigDict:
    optimizer = {
        "name": name,
        "b1": B1,
        "b2": B2,
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "grad_clip_norm": None,
        "no_decay_patterns": (),
    }
    optimizer.update(fields)
    return ConfigDict(
        {
            "total_steps": 10,
            "schedule": {"decay": "constant", "peak_lr": LR, "end_lr": 0.0, "warmup_steps": 0},
            "optimizer": optimizer,
        }
    )


def flat(tree) -> dict[str, np.ndarray]:
    return {
        path_to_name(path): np.asarray(leaf, np.float64)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def run(tx: optax.GradientTransformation, params, gradients):
    """Parameters after applying ``gradients`` (one tree per step), and each step's updates."""
    state = tx.init(params)
    step = jax.jit(tx.update)
    all_updates = []
    for grads in gradients:
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        all_updates.append(updates)
    return params, all_updates


# ------------------------------------------------------------------------ LAMB reference ----


def lamb_reference(params, gradients, decays, adapts, min_trust, max_trust):
    """float64 LAMB; returns final parameters and the unclamped trust ratios of every step."""
    params = {name: value.copy() for name, value in params.items()}
    first = {name: np.zeros_like(value) for name, value in params.items()}
    second = {name: np.zeros_like(value) for name, value in params.items()}
    raw_ratios = []
    for t, grads in enumerate(gradients, start=1):
        ratios = {}
        for name, w in params.items():
            g = grads[name]
            first[name] = B1 * first[name] + (1 - B1) * g
            second[name] = B2 * second[name] + (1 - B2) * g * g
            m_hat = first[name] / (1 - B1**t)
            v_hat = second[name] / (1 - B2**t)
            update = m_hat / (np.sqrt(v_hat) + EPS)
            if decays[name]:
                update = update + WEIGHT_DECAY * w
            w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(update)
            ratio = 1.0
            if adapts[name] and w_norm > 0 and u_norm > 0:
                ratios[name] = w_norm / u_norm
                ratio = np.clip(w_norm / u_norm, min_trust, max_trust)
            params[name] = w - LR * ratio * update
        raw_ratios.append(ratios)
    return params, raw_ratios


@pytest.fixture(scope="module")
def lamb_problem():
    rng = np.random.default_rng(0)
    params = {
        "huge": {"kernel": 1000.0 * rng.normal(size=(4, 3))},  # raw trust ratio ~ 1/wd = 20
        "tiny": {"kernel": 1e-4 * rng.normal(size=(3, 5))},  # raw trust ratio ~ 1e-4
        "mid": {"kernel": rng.normal(size=(5, 2)), "bias": np.zeros(2)},
        "scale": 0.5 + rng.uniform(size=(6,)),  # 1-D: no weight decay
    }
    gradients = [jax.tree.map(lambda x: rng.normal(size=x.shape), params) for _ in range(NUM_STEPS)]
    as_f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    return params, gradients, as_f32


def test_lamb_matches_reference_with_active_clamp(lamb_problem):
    params, gradients, as_f32 = lamb_problem
    tx, _ = make_optimizer(optimizer_config(min_trust=MIN_TRUST, max_trust=MAX_TRUST))
    final, _ = run(tx, as_f32(params), [as_f32(g) for g in gradients])

    decays = {name: value.ndim >= 2 for name, value in flat(params).items()}
    expected, raw_ratios = lamb_reference(
        flat(params), [flat(g) for g in gradients], decays, dict.fromkeys(decays, True),
        MIN_TRUST, MAX_TRUST,
    )  # fmt: skip
    # The clamp is exercised at both ends on every step; the zero bias has ratio 1 on step 1.
    for ratios in raw_ratios:
        assert ratios["huge/kernel"] > MAX_TRUST
        assert ratios["tiny/kernel"] < MIN_TRUST
        assert MIN_TRUST < ratios["mid/kernel"] < MAX_TRUST
    assert "mid/bias" not in raw_ratios[0]
    for name, value in flat(final).items():
        np.testing.assert_allclose(value, expected[name], rtol=2e-5, atol=1e-7, err_msg=name)

    # Unclamped, the result differs: the clamp really changes the updates.
    unclamped, _ = lamb_reference(
        flat(params), [flat(g) for g in gradients], decays, dict.fromkeys(decays, True),
        0.0, np.inf,
    )  # fmt: skip
    for name in ("huge/kernel", "tiny/kernel"):
        assert not np.allclose(unclamped[name], expected[name], rtol=1e-4), name


def test_unclamped_lamb_equals_optax_lamb(lamb_problem):
    params, gradients, as_f32 = lamb_problem
    ours, _ = make_optimizer(optimizer_config())  # no min_trust / max_trust: plain LAMB
    mask = lambda tree: weight_decay_mask(tree)
    reference = optax.lamb(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WEIGHT_DECAY, mask=mask)
    grads = [as_f32(g) for g in gradients]
    for name, value in flat(run(ours, as_f32(params), grads)[0]).items():
        expected = flat(run(reference, as_f32(params), grads)[0])[name]
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-9, err_msg=name)


def test_lamb_without_trust_ratio_on_no_decay_params(lamb_problem):
    """EVA-CLIP's (NVIDIA/timm) LAMB: parameters without weight decay get the plain Adam step."""
    params, gradients, as_f32 = lamb_problem
    config = optimizer_config(
        min_trust=MIN_TRUST, max_trust=MAX_TRUST, trust_ratio_for_no_decay=False
    )
    tx, _ = make_optimizer(config)
    final, _ = run(tx, as_f32(params), [as_f32(g) for g in gradients])
    decays = {name: value.ndim >= 2 for name, value in flat(params).items()}
    expected, _ = lamb_reference(
        flat(params), [flat(g) for g in gradients], decays, decays, MIN_TRUST, MAX_TRUST
    )
    for name, value in flat(final).items():
        np.testing.assert_allclose(value, expected[name], rtol=2e-5, atol=1e-7, err_msg=name)


# ----------------------------------------------------------------- weight-decay mask ----


def vit_like_params(image_depth: int = 2, text_depth: int = 1, image_root="image_encoder"):
    zeros = lambda *shape: jnp.zeros(shape, jnp.float32)

    def blocks(depth, width):
        return {
            f"resblocks_{i}": {
                "attn": {
                    "query": {"kernel": zeros(width, 2, 2), "bias": zeros(2, 2)},
                    "out": {"kernel": zeros(2, 2, width), "bias": zeros(width)},
                },
                "ln_1": {"scale": zeros(width), "bias": zeros(width)},
            }
            for i in range(depth)
        }

    return {
        image_root: {
            "class_embedding": zeros(4),
            "positional_embedding": zeros(5, 4),
            "conv1": {"kernel": zeros(2, 2, 3, 4)},
            "ln_pre": {"scale": zeros(4), "bias": zeros(4)},
            "transformer": blocks(image_depth, 4),
            "ln_post": {"scale": zeros(4), "bias": zeros(4)},
            "proj": zeros(4, 3),
        },
        "text_encoder": {
            "token_embedding": {"embedding": zeros(10, 6)},
            "positional_embedding": zeros(7, 6),
            "transformer": blocks(text_depth, 6),
            "ln_final": {"scale": zeros(6), "bias": zeros(6)},
            "text_projection": zeros(6, 3),
        },
        "logit_scale": zeros(),
    }


def test_weight_decay_mask_excludes_embeddings_and_1d():
    mask = flat(weight_decay_mask(vit_like_params(), EMBEDDING_NO_DECAY_PATTERNS))
    decayed = sorted(name for name, value in mask.items() if value)
    assert decayed == [
        "image_encoder/conv1/kernel",
        "image_encoder/proj",
        "image_encoder/transformer/resblocks_0/attn/out/kernel",
        "image_encoder/transformer/resblocks_0/attn/query/kernel",
        "image_encoder/transformer/resblocks_1/attn/out/kernel",
        "image_encoder/transformer/resblocks_1/attn/query/kernel",
        "text_encoder/text_projection",
        "text_encoder/token_embedding/embedding",
        "text_encoder/transformer/resblocks_0/attn/out/kernel",
        "text_encoder/transformer/resblocks_0/attn/query/kernel",
    ]
    # Without the patterns only the 1-D rule applies: the 2-D position embeddings decay.
    plain = flat(weight_decay_mask(vit_like_params()))
    assert plain["image_encoder/positional_embedding"]
    assert plain["text_encoder/positional_embedding"]


# ----------------------------------------------------------- layer-wise lr decay ----


def test_layer_ids_of_a_vit():
    rule = LayerDecayRule(tower=r"^image_encoder/", decay=0.5)
    names = list(flat(vit_like_params(image_depth=12)))
    assert num_blocks(names, rule.tower, rule.block) == 12
    assert num_blocks(names, r"^text_encoder/", rule.block) == 1
    expected = {
        "image_encoder/class_embedding": 0,
        "image_encoder/positional_embedding": 0,
        "image_encoder/conv1/kernel": 0,
        "image_encoder/ln_pre/scale": 0,
        "image_encoder/transformer/resblocks_0/attn/query/kernel": 1,
        "image_encoder/transformer/resblocks_3/ln_1/bias": 4,
        "image_encoder/transformer/resblocks_11/attn/out/bias": 12,
        "image_encoder/ln_post/scale": 13,
        "image_encoder/proj": 13,
    }
    for name, want in expected.items():
        assert layer_id(name, 12, rule.embedding, rule.block) == want, name


def test_layer_decay_multipliers_by_hand():
    image_decay, text_decay = 0.75, 0.5
    rules = [
        LayerDecayRule(r"^image_encoder/", image_decay),
        LayerDecayRule(r"^text_encoder/", text_decay),
    ]
    multipliers = flat(layer_decay_multipliers(vit_like_params(image_depth=2), rules))
    # Image tower: 2 blocks -> layers 0..3, multiplier 0.75 ** (3 - layer).
    # Text tower: 1 block -> layers 0..2, multiplier 0.5 ** (2 - layer).
    expected = {
        "image_encoder/class_embedding": 0.421875,
        "image_encoder/positional_embedding": 0.421875,
        "image_encoder/conv1/kernel": 0.421875,
        "image_encoder/ln_pre/bias": 0.421875,
        "image_encoder/transformer/resblocks_0/attn/query/kernel": 0.5625,
        "image_encoder/transformer/resblocks_0/ln_1/scale": 0.5625,
        "image_encoder/transformer/resblocks_1/attn/out/bias": 0.75,
        "image_encoder/ln_post/scale": 1.0,
        "image_encoder/proj": 1.0,
        "text_encoder/token_embedding/embedding": 0.25,
        "text_encoder/positional_embedding": 0.25,
        "text_encoder/transformer/resblocks_0/attn/query/bias": 0.5,
        "text_encoder/ln_final/scale": 1.0,
        "text_encoder/text_projection": 1.0,
        "logit_scale": 1.0,
    }
    for name, want in expected.items():
        assert multipliers[name] == pytest.approx(want), name
    assert set(np.unique(list(multipliers.values()))) == {0.25, 0.421875, 0.5, 0.5625, 0.75, 1.0}


def _first_updates(config: ConfigDict, params):
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    tx, _ = make_optimizer(config)
    return flat(run(tx, params, [grads])[1][0])


def _random_params(tree):
    rng = np.random.default_rng(2)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_layer_decay_scales_each_update(name):
    params = _random_params(vit_like_params(image_depth=3))
    extra = {"min_trust": MIN_TRUST, "max_trust": MAX_TRUST} if name == "lamb" else {}
    plain = _first_updates(optimizer_config(name, **extra), params)
    decayed = _first_updates(
        optimizer_config(name, layer_decay=0.75, text_layer_decay=0.5, **extra), params
    )
    rules = [
        LayerDecayRule(r"^image_encoder/", 0.75),
        LayerDecayRule(r"^text_encoder/", 0.5),
    ]
    multipliers = flat(layer_decay_multipliers(params, rules))
    assert multipliers["image_encoder/conv1/kernel"] == pytest.approx(0.75**4)
    for leaf, update in decayed.items():
        np.testing.assert_allclose(update, multipliers[leaf] * plain[leaf], rtol=1e-6, err_msg=leaf)


def test_adamw_with_layer_decay_one_equals_plain_adamw():
    params = _random_params(vit_like_params(image_depth=2))
    rng = np.random.default_rng(3)
    gradients = [
        jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        for _ in range(NUM_STEPS)
    ]
    plain, _ = run(make_optimizer(optimizer_config("adamw"))[0], params, gradients)
    config = optimizer_config("adamw", layer_decay=1.0, text_layer_decay=1.0)
    with_decay, _ = run(make_optimizer(config)[0], params, gradients)
    for name, value in flat(with_decay).items():
        np.testing.assert_array_equal(value, flat(plain)[name], err_msg=name)


def test_layer_decay_patterns_for_another_tower_name():
    params = _random_params(vit_like_params(image_depth=2, image_root="visual"))
    config = optimizer_config(
        "adamw", layer_decay=0.5, layer_decay_patterns={"image_tower": r"^visual/"}
    )
    plain = _first_updates(optimizer_config("adamw"), params)
    decayed = _first_updates(config, params)
    for name, factor in [
        ("visual/conv1/kernel", 0.125),
        ("visual/transformer/resblocks_0/attn/query/kernel", 0.25),
        ("visual/transformer/resblocks_1/attn/query/kernel", 0.5),
        ("visual/proj", 1.0),
        ("text_encoder/text_projection", 1.0),  # no text decay configured
        ("text_encoder/token_embedding/embedding", 1.0),
    ]:
        np.testing.assert_allclose(decayed[name], factor * plain[name], rtol=1e-6, err_msg=name)


def test_layer_decay_configuration_errors():
    params = _random_params(vit_like_params())
    with pytest.raises(ValueError, match="matches the block pattern"):
        config = optimizer_config("adamw", layer_decay=0.5, layer_decay_patterns={"block": "x_"})
        _first_updates(config, params)
    with pytest.raises(ValueError, match=r"unknown optimizer\.layer_decay_patterns"):
        make_optimizer(optimizer_config("adamw", layer_decay_patterns={"head": "x"}))
    with pytest.raises(ValueError, match="must be positive"):
        make_optimizer(optimizer_config("adamw", layer_decay=0.0))
    with pytest.raises(ValueError, match="available: 'adamw', 'lamb'"):
        make_optimizer(optimizer_config("sgd"))
