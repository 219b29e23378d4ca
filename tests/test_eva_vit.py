"""EVA-02 options of the ViT: 2-D RoPE against a NumPy reference, token dropping against the reduced
sequence built by hand, variants' parameter counts (timm's), sharding rules for the new names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_params import random_params

from models.layers import MultiHeadAttention, Transformer
from models.rope import apply_rope, rope_angles
from models.vit import VisionTransformer, eva02_variant
from pretrain import sharding

# --------------------------------------------------------------------------------------------------
# NumPy references (float64)
# --------------------------------------------------------------------------------------------------


def np_rope_angles(rows, cols, head_dim, theta=10000.0, ref_grid=None):
    """(rows * cols, head_dim / 2) angles: pair k < n turns by row * f_k, pair n + k by col * f_k,
    f_k = theta^(-k / n), n = head_dim / 4; positions scaled to a reference grid if given."""
    n = head_dim // 4
    frequencies = theta ** (-np.arange(n) / n)
    row_positions, col_positions = np.arange(rows, dtype=float), np.arange(cols, dtype=float)
    if ref_grid is not None:
        row_positions = row_positions * ref_grid / rows
        col_positions = col_positions * ref_grid / cols
    angles = np.zeros((rows * cols, head_dim // 2))
    for row in range(rows):
        for col in range(cols):
            token = row * cols + col
            angles[token, :n] = row_positions[row] * frequencies
            angles[token, n:] = col_positions[col] * frequencies
    return angles


def np_rotate_pairs(x, angles):
    """Rotate (x[2i], x[2i+1]) by angles[..., i]; x (..., tokens, heads, D), angles (tokens, D/2)"""
    out = np.empty_like(x, dtype=np.float64)
    cos, sin = np.cos(angles)[..., None, :], np.sin(angles)[..., None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def np_attention_with_rope(x, params, num_heads, angles, inner_norm_eps=None):
    """Multi-head attention in float64 with q/k rotated by ``angles`` (tokens, D/2), q/v biases."""

    def project(name):
        kernel = np.asarray(params[name]["kernel"], np.float64)
        out = np.einsum("btw,whd->bthd", x, kernel)
        if "bias" in params[name]:
            out = out + np.asarray(params[name]["bias"], np.float64)
        return out

    query = np_rotate_pairs(project("query"), angles)
    key = np_rotate_pairs(project("key"), angles)
    value = project("value")
    head_dim = query.shape[-1]
    scores = np.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(head_dim)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bhqk,bkhd->bqhd", weights, value)
    if inner_norm_eps is not None:
        flat = attended.reshape(*attended.shape[:2], -1)
        mean = flat.mean(-1, keepdims=True)
        var = ((flat - mean) ** 2).mean(-1, keepdims=True)
        flat = (flat - mean) / np.sqrt(var + inner_norm_eps)
        norm = params["inner_norm"]
        attended = flat.reshape(attended.shape) * np.asarray(norm["scale"]) + np.asarray(
            norm["bias"]
        )
    out = np.einsum("bthd,hdw->btw", attended, np.asarray(params["out"]["kernel"], np.float64))
    return out + np.asarray(params["out"]["bias"], np.float64)


def np_layer_norm(x, params, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * params["scale"] + params["bias"]


# --------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "cols", "ref_grid"), [(4, 4, None), (3, 5, None), (3, 5, 4), (14, 14, 16)]
)
def test_rope_angles_match_numpy(rows, cols, ref_grid):
    head_dim = 16
    ours = rope_angles((rows, cols), head_dim, ref_grid=ref_grid)
    assert ours.dtype == np.float32 and ours.shape == (rows * cols, head_dim // 2)
    np.testing.assert_allclose(
        ours, np_rope_angles(rows, cols, head_dim, ref_grid=ref_grid), rtol=1e-6, atol=1e-6
    )


def test_apply_rope_matches_numpy_and_keeps_dtype():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 3, 16)).astype(np.float32)
    angles = np_rope_angles(3, 4, 16, ref_grid=5)
    ours = apply_rope(jnp.asarray(x), jnp.asarray(angles, jnp.float32))
    np.testing.assert_allclose(ours, np_rotate_pairs(x, angles), rtol=1e-5, atol=1e-5)
    # bf16 inputs rotate in float32 and come back as bf16.
    ours_bf16 = apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(angles, jnp.float32))
    assert ours_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(ours_bf16, np.float32), np_rotate_pairs(x, angles), atol=0.05
    )


def test_rope_rejects_head_dim_not_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_angles((4, 4), 6)


@pytest.mark.parametrize("keep", [False, True], ids=["all_tokens", "kept_tokens"])
def test_attention_with_rope_matches_numpy(keep):
    """Queries and keys are rotated by their patch's angles; the class token (first) is not; with
    dropped tokens each row uses the angles of its own kept positions (a non-reference grid)."""
    rows, cols, width, heads = 3, 5, 32, 2
    rng = np.random.default_rng(1)
    full = np_rope_angles(rows, cols, width // heads, ref_grid=4)
    if keep:
        kept = np.stack([np.sort(rng.permutation(rows * cols)[:7]) for _ in range(2)])
        patch_angles = full[kept]  # (B, K, D/2)
    else:
        patch_angles = np.broadcast_to(full, (2, *full.shape))
    angles = np.concatenate([np.zeros((2, 1, width // heads // 2)), patch_angles], axis=1)
    x = rng.standard_normal((2, angles.shape[1], width)).astype(np.float32)
    attention = MultiHeadAttention(heads, qkv_bias="qv", inner_norm=True, layer_norm_eps=1e-6)
    variables = attention.init(jax.random.key(0), x)
    params = jax.tree.map(
        lambda leaf: leaf + 0.1 * rng.standard_normal(leaf.shape).astype(np.float32),
        variables["params"],
    )
    assert "bias" not in params["key"] and "bias" in params["query"]
    ours = attention.apply({"params": params}, x, rope_angles=jnp.asarray(angles, jnp.float32))
    reference = np.stack(
        [
            np_attention_with_rope(x[i : i + 1], params, heads, angles[i], inner_norm_eps=1e-6)[0]
            for i in range(2)
        ]
    )
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
    # Rotating the class token too would change the result: the zero angle is what spares it.
    rotated_cls = angles.copy()
    rotated_cls[:, 0] = full[3]
    changed = attention.apply(
        {"params": params}, x, rope_angles=jnp.asarray(rotated_cls, jnp.float32)
    )
    assert np.abs(np.asarray(changed) - reference).max() > 1e-3


# --------------------------------------------------------------------------------------------------
# Token dropping
# --------------------------------------------------------------------------------------------------

TINY_EVA = dict(
    patch_size=4,
    width=32,
    depth=2,
    num_heads=2,
    mlp_dim=int(32 * 4 * 2 / 3),
    output_dim=24,
    mlp_type="swiglu",
    qkv_bias="qv",
    attn_inner_norm=True,
    layer_norm_eps=1e-6,
    rope_ref_grid=6,
    use_abs_pos=True,
    pre_norm=False,
    patch_bias=True,
)
IMAGE_SHAPE = (16, 20)  # a 4 x 5 grid: non-square, and not the RoPE reference grid


def perturbed_params(model, images, seed=0):
    return random_params(model, jnp.asarray(images), seed=seed)


def reduced_sequence_reference(model, params, images, keep):
    """The ViT's forward on the class token + kept patches, assembled by hand from its parameters:
    patchify + conv as a matmul, position embeddings gathered with NumPy, RoPE angles from the
    NumPy reference, then the model's own Transformer module on the short sequence."""
    batch, height, width_px, _ = images.shape
    patch, width = model.patch_size, model.width
    rows, cols = height // patch, width_px // patch
    patches = images.reshape(batch, rows, patch, cols, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, rows * cols, patch * patch * 3)
    kernel = np.asarray(params["conv1"]["kernel"]).reshape(-1, width)
    embedded = patches @ kernel
    if model.patch_bias:
        embedded = embedded + np.asarray(params["conv1"]["bias"])
    cls = np.broadcast_to(np.asarray(params["class_embedding"]), (batch, 1, width))
    if model.use_abs_pos:
        position = np.asarray(params["positional_embedding"])
        embedded = embedded + position[1:]
        cls = cls + position[0]
    kept = np.stack([embedded[row, keep[row]] for row in range(batch)])
    x = np.concatenate([cls, kept], axis=1).astype(np.float32)
    if model.pre_norm:
        x = np_layer_norm(x, params["ln_pre"], model.layer_norm_eps).astype(np.float32)
    angles = None
    if model.rope:
        full = np_rope_angles(rows, cols, width // model.num_heads, ref_grid=model.rope_ref_grid)
        angles = np.concatenate(
            [np.zeros((batch, 1, full.shape[1])), np.stack([full[k] for k in keep])], axis=1
        ).astype(np.float32)
    transformer = Transformer(
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_dim=model.mlp_dim,
        layer_norm_eps=model.layer_norm_eps,
        mlp_type=model.mlp_type,
        qkv_bias=model.qkv_bias,
        attn_inner_norm=model.attn_inner_norm,
    )
    x = np.asarray(transformer.apply({"params": params["transformer"]}, x, angles))
    tokens = np_layer_norm(x, params["ln_post"], model.layer_norm_eps)
    pooled = tokens[:, 0] if model.pool == "cls" else tokens[:, 1:].mean(1)
    proj = np.asarray(params["proj"])
    return {"tokens": tokens, "pooled": pooled @ proj, "projected_tokens": tokens @ proj}


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="eva_rope"),
        pytest.param({"rope": False, "attn_inner_norm": False}, id="eva_no_rope"),
        pytest.param(
            {
                "mlp_type": "gelu",
                "qkv_bias": "qkv",
                "pre_norm": True,
                "patch_bias": False,
                "rope": False,
                "pool": "gap",
                "layer_norm_eps": 1e-5,
            },
            id="clip",
        ),
    ],
)
def test_token_dropping_equals_the_reduced_sequence(options):
    model = VisionTransformer(**{**TINY_EVA, "rope": True, **options})
    rng = np.random.default_rng(2)
    images = rng.standard_normal((3, *IMAGE_SHAPE, 3)).astype(np.float32)
    params = perturbed_params(model, images)
    num_patches = (IMAGE_SHAPE[0] // 4) * (IMAGE_SHAPE[1] // 4)
    apply = jax.jit(lambda p, x, k: model.apply({"params": p}, x, keep_indices=k))
    for kept_count in (1, 11):
        # A different random kept set per image, in random order (not sorted).
        keep = np.stack([rng.permutation(num_patches)[:kept_count] for _ in range(3)])
        keep = keep.astype(np.int32)
        out, inter = apply(params, images, keep)
        reference = reduced_sequence_reference(model, params, images, keep)
        assert inter["tokens"].shape == (3, 1 + kept_count, model.width)
        assert "patch_tokens" not in inter
        np.testing.assert_allclose(inter["tokens"], reference["tokens"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out, reference["pooled"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            inter["projected_tokens"], reference["projected_tokens"], rtol=1e-4, atol=1e-4
        )

    # Keeping every patch (in grid order) is the full run.
    everything = np.broadcast_to(np.arange(num_patches, dtype=np.int32), (3, num_patches))
    out_all, inter_all = apply(params, images, everything)
    out_full, inter_full = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
    np.testing.assert_allclose(out_all, out_full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(inter_all["tokens"], inter_full["tokens"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        inter_full["patch_tokens"].reshape(3, num_patches, -1),
        inter_full["tokens"][:, 1:],
    )
    # Sanity: attention mixes tokens, so dropping some changes the kept ones' features.
    partial_keep = np.stack([np.arange(0, num_patches, 2, dtype=np.int32)] * 3)
    _, inter_partial = apply(params, images, partial_keep)
    from_full = np.asarray(inter_full["tokens"])[:, 1:][:, partial_keep[0]]
    assert np.abs(np.asarray(inter_partial["tokens"])[:, 1:] - from_full).max() > 1e-3


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])


def test_token_dropping_cost_falls_with_the_mask_ratio():
    model = VisionTransformer(**{**TINY_EVA, "rope": True, "depth": 4, "width": 64})
    images = jnp.zeros((2, 32, 32, 3))  # 8 x 8 = 64 patches
    params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    forward = jax.jit(lambda p, x, k: model.apply({"params": p}, x, keep_indices=k)[0])
    full = _flops(forward.lower(params, images, jnp.zeros((2, 64), jnp.int32)).compile())
    half = _flops(forward.lower(params, images, jnp.zeros((2, 32), jnp.int32)).compile())
    # Linear layers scale with the token count, attention with its square; the embedding of all
    # 64 patches is shared. Half the patches must cost well under 60 % of all of them.
    assert half / full < 0.6, (half, full)


def test_keep_indices_shape_is_checked():
    model = VisionTransformer(**{**TINY_EVA, "rope": True})
    images = jnp.zeros((2, *IMAGE_SHAPE, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), images)
    wrong = jnp.zeros((3, 4), jnp.int32)
    with pytest.raises(ValueError, match="keep_indices must be"):
        jax.eval_shape(lambda p: model.apply(p, images, keep_indices=wrong), params)


# --------------------------------------------------------------------------------------------------
# Variants, defaults, sharding
# --------------------------------------------------------------------------------------------------

# timm's parameter counts (sum of numel over parameters, num_classes=0) of the same architectures:
# eva02_base_patch16_clip_224; eva02_base_patch14_224(patch_size=16);
# eva02_large_patch14_clip_224(patch_size=16); eva02_large_patch14_224(patch_size=16).
# test_export_timm_eva.py recomputes them in timm when the torch environment is present.
TIMM_PARAMETER_COUNTS = {
    "eva02_base/16": 85_869_312,
    "uta_base/16": 85_850_880,
    "eva02_large/16": 303_440_832,
    "uta_large/16": 303_391_680,
}


@pytest.mark.parametrize("variant", sorted(TIMM_PARAMETER_COUNTS))
def test_variant_parameter_counts_match_timm(variant):
    model = VisionTransformer.from_variant(variant, output_dim=None)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert sum(leaf.size for leaf in jax.tree.leaves(shapes)) == TIMM_PARAMETER_COUNTS[variant]


def test_variant_fields():
    base = eva02_variant("uta_base/16")
    assert base["mlp_dim"] == 2048 and eva02_variant("uta_large/16")["mlp_dim"] == 2730
    shape = (base["width"], base["depth"], base["num_heads"], base["patch_size"])
    assert shape == (768, 12, 12, 16)
    assert base["attn_inner_norm"] is False and eva02_variant("eva02_base/16")["attn_inner_norm"]
    assert base["rope"] and base["qkv_bias"] == "qv" and base["layer_norm_eps"] == 1e-6
    assert base["mlp_type"] == "swiglu" and not base["pre_norm"] and base["patch_bias"]
    assert VisionTransformer.from_variant("uta_large/16", output_dim=None).depth == 24
    assert VisionTransformer.from_variant("B/16").mlp_type == "gelu"  # CLIP names still parse
    with pytest.raises(ValueError, match="unknown EVA-02 variant"):
        eva02_variant("uta_huge/16")
    with pytest.raises(ValueError, match="unknown ViT variant"):
        VisionTransformer.from_variant("bogus_base/16")


def test_clip_defaults_keep_the_clip_parameter_names():
    model = VisionTransformer(patch_size=8, width=32, depth=1, num_heads=4, output_dim=16)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    names = {sharding.path_to_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert names == {
        "class_embedding", "positional_embedding", "proj", "conv1/kernel",
        "ln_pre/scale", "ln_pre/bias", "ln_post/scale", "ln_post/bias",
        *(
            f"transformer/resblocks_0/{name}"
            for name in (
                "ln_1/scale", "ln_1/bias", "ln_2/scale", "ln_2/bias",
                "attn/query/kernel", "attn/query/bias", "attn/key/kernel", "attn/key/bias",
                "attn/value/kernel", "attn/value/bias", "attn/out/kernel", "attn/out/bias",
                "mlp/c_fc/kernel", "mlp/c_fc/bias", "mlp/c_proj/kernel", "mlp/c_proj/bias",
            )
        ),
    }  # fmt: skip


def test_sharding_rules_split_the_eva_weights_over_model():
    mesh = sharding.make_mesh({"data": -1, "model": 2})
    model = VisionTransformer(
        **{**TINY_EVA, "rope": True, "width": 64, "num_heads": 4, "mlp_dim": 170}
    )
    images = jnp.asarray(
        np.random.default_rng(3).standard_normal((4, *IMAGE_SHAPE, 3)), jnp.float32
    )
    params = perturbed_params(model, images)
    specs = {
        sharding.path_to_name(path): sharding.partition_spec(
            sharding.path_to_name(path), leaf.shape, mesh
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    block = "transformer/resblocks_1"
    P = jax.sharding.PartitionSpec
    assert specs[f"{block}/attn/query/kernel"] == P(None, "model", None)
    assert specs[f"{block}/attn/query/bias"] == P("model", None)
    assert specs[f"{block}/attn/key/kernel"] == P(None, "model", None)
    assert specs[f"{block}/attn/inner_norm/scale"] == P("model", None)
    assert specs[f"{block}/attn/out/kernel"] == P("model", None, None)
    for name in ("fc1_g", "fc1_x"):
        assert specs[f"{block}/mlp/{name}/kernel"] == P(None, "model")
        assert specs[f"{block}/mlp/{name}/bias"] == P("model")
    assert specs[f"{block}/mlp/norm/scale"] == P("model")
    assert specs[f"{block}/mlp/fc2/kernel"] == P("model", None)

    # The tensor-parallel forward (with token dropping and RoPE) equals the single-device one.
    keep = jnp.asarray(np.stack([np.arange(0, 20, 3)] * 4), jnp.int32)
    forward = lambda p, x, k: model.apply({"params": p}, x, keep_indices=k)[1]["tokens"]
    expected = jax.jit(forward)(params, images, keep)
    placed = jax.device_put(params, sharding.tree_shardings(params, mesh))
    batch = jax.device_put(images, sharding.batch_sharding(mesh, 4))
    sharded = jax.jit(forward)(
        placed, batch, jax.device_put(keep, sharding.batch_sharding(mesh, 2))
    )
    np.testing.assert_allclose(sharded, expected, rtol=1e-5, atol=1e-5)


def test_eva_remat_and_bfloat16_with_token_dropping():
    model = VisionTransformer(**{**TINY_EVA, "rope": True})
    images = np.random.default_rng(4).standard_normal((2, *IMAGE_SHAPE, 3)).astype(np.float32)
    params = perturbed_params(model, images)
    keep = jnp.asarray([[3, 1, 4, 15, 9], [2, 6, 5, 19, 0]], jnp.int32)

    def run(module):
        return jax.jit(lambda p: module.apply({"params": p}, images, keep_indices=keep))(params)

    reference, _ = run(model)
    rematerialised, _ = run(VisionTransformer(**{**TINY_EVA, "rope": True, "remat_policy": "full"}))
    np.testing.assert_allclose(rematerialised, reference, rtol=1e-5, atol=1e-5)
    low, inter = run(VisionTransformer(**{**TINY_EVA, "rope": True, "dtype": jnp.bfloat16}))
    assert low.dtype == jnp.bfloat16 and inter["tokens"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), reference, rtol=0.1, atol=0.1)
