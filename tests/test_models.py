"""Model tests: shapes and parameter counts against open_clip's, masking, pooling, remat, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tree_compare import assert_close_at_scale, without_key_biases

from models.text import TextTransformer
from models.two_tower import TwoTowerModel
from models.vit import VisionTransformer, vit_variant


def tiny_vit(**kwargs):
    defaults = dict(patch_size=8, width=32, depth=2, num_heads=4, output_dim=16)
    return VisionTransformer(**{**defaults, **kwargs})


def tiny_text(**kwargs):
    defaults = dict(
        width=32, depth=2, num_heads=4, context_length=12, vocab_size=100, output_dim=16
    )
    return TextTransformer(**{**defaults, **kwargs})


def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "variant,text,embed,expected",
    [
        # open_clip's parameter counts (sum of numel over state_dict parameters).
        ("B/16", dict(width=512, depth=12, num_heads=8), 512, 149_620_737),
        ("L/14", dict(width=768, depth=12, num_heads=12), 768, 427_616_513),
    ],
)
def test_parameter_count_matches_open_clip(variant, text, embed, expected):
    model = TwoTowerModel(
        VisionTransformer.from_variant(variant, output_dim=embed),
        TextTransformer(**text, output_dim=embed),
    )
    size = 224
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, size, size, 3)),
        jnp.zeros((1, 77), jnp.int32),
    )
    assert count(shapes["params"]) == expected


def test_vit_variant_parsing():
    assert vit_variant("L/14") == {"width": 1024, "depth": 24, "num_heads": 16, "patch_size": 14}
    with pytest.raises(ValueError, match="unknown ViT variant"):
        vit_variant("Q/16")


def test_vit_outputs_and_intermediates():
    model = tiny_vit()
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    params = model.init(jax.random.key(0), images)
    out, inter = model.apply(params, images)
    assert out.shape == (3, 16)
    assert inter["tokens"].shape == (3, 1 + 16, 32)
    assert inter["patch_tokens"].shape == (3, 4, 4, 32)
    assert inter["pre_logits"].shape == (3, 32)
    # The pooled embedding is the class token after ln_post, projected.
    proj = params["params"]["proj"]
    np.testing.assert_allclose(out, inter["tokens"][:, 0] @ proj, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        inter["projected_patch_tokens"], inter["patch_tokens"] @ proj, rtol=1e-5, atol=1e-6
    )


def test_vit_rejects_indivisible_image_size():
    model = tiny_vit()
    with pytest.raises(ValueError, match="not divisible by patch size"):
        model.init(jax.random.key(0), jnp.zeros((1, 30, 30, 3)))


def test_text_tower_is_causal_and_pools_at_end_of_text():
    model = tiny_text()
    tokens = np.array([[98, 5, 6, 99, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)  # 99 plays EOT (max id)
    params = model.init(jax.random.key(0), tokens)
    out, inter = model.apply(params, tokens)
    # Changing tokens after EOT cannot change the pooled output under a causal mask...
    changed = tokens.copy()
    changed[0, 5:] = 7
    out_changed, _ = model.apply(params, changed)
    np.testing.assert_allclose(out, out_changed, rtol=1e-6, atol=1e-6)
    # ...but changes it without the mask.
    bidirectional = tiny_text(causal=False)
    out_b, _ = bidirectional.apply(params, tokens)
    out_b_changed, _ = bidirectional.apply(params, changed)
    assert np.abs(np.asarray(out_b) - np.asarray(out_b_changed)).max() > 1e-4
    # Pooled = ln_final output at argmax(tokens) = position 3.
    np.testing.assert_allclose(inter["pre_logits"], inter["tokens"][:, 3], rtol=1e-6)


def test_two_tower_normalised_embeddings_and_scale():
    model = TwoTowerModel(tiny_vit(), tiny_text(), logit_bias_init=-10.0)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    tokens = jnp.array([[98, 4, 99] + [0] * 9, [98, 99] + [0] * 10], jnp.int32)
    params = model.init(jax.random.key(0), images, tokens)
    out, inter = model.apply(params, images, tokens)
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    assert float(out["logit_bias"]) == -10.0
    assert set(inter) == {"image", "text"}


def test_remat_gives_same_values_and_gradients():
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    plain, remat = tiny_vit(), tiny_vit(remat_policy="full")
    params = plain.init(jax.random.key(0), images)

    def loss(model, p):
        return jnp.sum(model.apply(p, images)[0] ** 2)

    np.testing.assert_allclose(loss(plain, params), loss(remat, params), rtol=1e-6)
    g_plain = jax.grad(lambda p: loss(plain, p))(params)
    g_remat = jax.grad(lambda p: loss(remat, p))(params)
    # Recomputation may fuse differently: equal up to float32 rounding at each tensor's scale.
    assert_close_at_scale(
        without_key_biases(g_remat), without_key_biases(g_plain), rtol=1e-5, scale_atol=1e-5
    )


def test_bfloat16_compute_keeps_float32_params():
    model = tiny_vit(dtype=jnp.bfloat16)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = model.init(jax.random.key(0), images)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    out, _ = model.apply(params, images)
    assert out.dtype == jnp.bfloat16
    reference, _ = tiny_vit().apply(params, images)
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=0.1, atol=0.05)
