"""Mean attention distance (pretrain/evaluate/attention_distance.py, pretrain/attention_distance.py)
and the attention weights MultiHeadAttention sows (models/layers.py).

The tower's distances are checked against an independent NumPy forward pass (float64) that
recomputes queries and keys from the parameters, RoPE included, and the distance with explicit
loops over patch pairs; hand-made attention matrices check the definition itself."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy.special import erf

from models.layers import MultiHeadAttention
from models.vit import EVA02_OPTIONS, VisionTransformer
from pretrain import attention_distance as command
from pretrain.components.image_towers import tower_source_config
from pretrain.evaluate.attention_distance import (
    AttentionDistanceAccumulator,
    attention_distances,
    mean_attention_distance,
    patch_distances,
    plot_attention_distances,
    read_csv,
    sown_attention_weights,
    write_csv,
)

REPO = Path(__file__).resolve().parents[1]
PATCH = 4
IMAGE_HW = (16, 24)  # -> a 4 x 6 grid: non-square, so rows and columns cannot be swapped unseen
GRID = (IMAGE_HW[0] // PATCH, IMAGE_HW[1] // PATCH)
TINY = {"patch_size": PATCH, "width": 32, "depth": 3, "num_heads": 4, "output_dim": None}
# EVA-02's options (RoPE with a 16 x 16 reference grid, q/v biases, SwiGLU, no ln_pre...) with
# the attention's inner LayerNorm of the "eva02" family.
EVA_TINY = {**TINY, **EVA02_OPTIONS, "attn_inner_norm": True, "mlp_dim": 48}


# -- an independent NumPy forward pass -----------------------------------------------------------


def np_layer_norm(x: np.ndarray, p: dict, eps: float, axes: tuple[int, ...] = (-1,)) -> np.ndarray:
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_rope_angles(fields: dict) -> np.ndarray:
    """(1 + N, head_dim // 2) angles: pair k < n turns by row * f_k, pair n + k by col * f_k,
    f_k = theta ** (-k / n), positions scaled to the reference grid; class token not rotated."""
    head_dim = fields["width"] // fields["num_heads"]
    n = head_dim // 4
    freqs = fields["rope_theta"] ** (-np.arange(n) / n)
    ref = fields["rope_ref_grid"]
    angles = np.zeros((1 + GRID[0] * GRID[1], head_dim // 2))
    for row in range(GRID[0]):
        for col in range(GRID[1]):
            r, c = row / GRID[0] * ref, col / GRID[1] * ref
            angles[1 + row * GRID[1] + col] = np.concatenate([r * freqs, c * freqs])
    return angles


def np_rotate(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """x (tokens, heads, head_dim): rotate the interleaved pairs (x[2i], x[2i+1])."""
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out


def np_attention_maps(params: dict, image: np.ndarray, fields: dict) -> list[np.ndarray]:
    """One (heads, 1 + N, 1 + N) attention matrix per block for one (H, W, 3) image."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    eps = fields.get("layer_norm_eps", 1e-5)
    heads = fields["num_heads"]
    head_dim = fields["width"] // heads
    patches = [
        image[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH]
        for r in range(GRID[0])
        for c in range(GRID[1])
    ]
    x = np.stack([np.einsum("hwc,hwco->o", patch, p["conv1"]["kernel"]) for patch in patches])
    if fields.get("patch_bias"):
        x = x + p["conv1"]["bias"]
    x = np.concatenate([p["class_embedding"][None], x]) + p["positional_embedding"]
    if fields.get("pre_norm", True):
        x = np_layer_norm(x, p["ln_pre"], eps)
    angles = np_rope_angles(fields) if fields.get("rope") else None
    maps = []
    for index in range(fields["depth"]):
        block = p["transformer"][f"resblocks_{index}"]
        attn = block["attn"]
        h = np_layer_norm(x, block["ln_1"], eps)
        q, k, v = (
            np.einsum("td,dhe->the", h, attn[name]["kernel"]) + attn[name].get("bias", 0.0)
            for name in ("query", "key", "value")
        )
        if angles is not None:
            q, k = np_rotate(q, angles), np_rotate(k, angles)
        logits = np.einsum("qhe,khe->hqk", q, k) / math.sqrt(head_dim)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        maps.append(weights)
        attended = np.einsum("hqk,khe->qhe", weights, v)
        if fields.get("attn_inner_norm"):
            attended = np_layer_norm(attended, attn["inner_norm"], eps, axes=(-2, -1))
        x = x + np.einsum("qhe,hed->qd", attended, attn["out"]["kernel"]) + attn["out"]["bias"]
        h = np_layer_norm(x, block["ln_2"], eps)
        mlp = block["mlp"]
        if fields.get("mlp_type", "gelu") == "swiglu":
            gate = h @ mlp["fc1_g"]["kernel"] + mlp["fc1_g"]["bias"]
            hidden = (gate / (1 + np.exp(-gate))) * (
                h @ mlp["fc1_x"]["kernel"] + mlp["fc1_x"]["bias"]
            )
            hidden = np_layer_norm(hidden, mlp["norm"], eps)
            x = x + hidden @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
        else:
            hidden = h @ mlp["c_fc"]["kernel"] + mlp["c_fc"]["bias"]
            hidden = 0.5 * hidden * (1 + erf(hidden / math.sqrt(2)))
            x = x + hidden @ mlp["c_proj"]["kernel"] + mlp["c_proj"]["bias"]
    return maps


def np_mean_distance(maps: np.ndarray) -> np.ndarray:
    """(heads,) distance of (heads, 1 + N, 1 + N) weights by explicit loops (not renormalised)."""
    rows, cols = GRID
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    out = np.zeros(maps.shape[0])
    for head in range(maps.shape[0]):
        total = 0.0
        for qi, (qr, qc) in enumerate(cells):
            for ki, (kr, kc) in enumerate(cells):
                total += maps[head, 1 + qi, 1 + ki] * math.hypot(
                    (qr - kr) * PATCH, (qc - kc) * PATCH
                )
        out[head] = total / len(cells)
    return out


def random_params(
    module: VisionTransformer, seed: int, image_hw: tuple[int, int] = IMAGE_HW
) -> dict:
    """Random parameters far from uniform attention: kernels N(0, 1 / fan_in) with the query and
    key kernels doubled (peaked attention), non-zero biases and LayerNorm affines, so that errors
    in q, k or RoPE would show. Drawn in NumPy on the shapes of ``jax.eval_shape(module.init)``:
    tracing only, no compiled or eager init (seconds per tower on a busy CPU)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *image_hw, 3)))
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        names = [getattr(key, "key", "") for key in path]
        noise = rng.normal(size=leaf.shape)
        if names[-1] == "scale":
            value = 1 + 0.2 * noise
        elif names[-1] == "kernel" and names[-2] in ("query", "key", "value"):
            # (width, heads, head_dim): the fan-in is the width only.
            value = noise / math.sqrt(leaf.shape[0]) * (2.0 if names[-2] != "value" else 1.0)
        elif names[-1] == "kernel":
            value = noise / math.sqrt(math.prod(leaf.shape[:-1]))
        else:  # biases, class and position embeddings
            value = 0.2 * noise
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def test_patch_distances_non_square_grid() -> None:
    distances = patch_distances((2, 3), 4)
    assert distances.shape == (6, 6)
    # Row-major: index 1 is (row 0, col 1), index 3 is (row 1, col 0), index 5 (1, 2).
    assert distances[0, 1] == 4 and distances[0, 3] == 4 and distances[0, 2] == 8
    np.testing.assert_allclose(distances[0, 5], math.hypot(4, 8), rtol=1e-6)
    np.testing.assert_array_equal(distances, distances.T)
    assert not np.diag(distances).any()


@pytest.mark.parametrize("fields", [TINY, EVA_TINY], ids=["clip", "eva02_rope"])
def test_tower_distance_matches_numpy_forward(fields: dict) -> None:
    module = VisionTransformer(**fields)
    params = random_params(module, seed=1)
    image = np.random.default_rng(2).normal(size=(*IMAGE_HW, 3)).astype(np.float32)

    distances = attention_distances(module, {"params": params}, [image[None]])

    maps = np_attention_maps(params, image.astype(np.float64), fields)
    expected = np.stack([np_mean_distance(layer_maps) for layer_maps in maps])
    assert distances.shape == (fields["depth"], fields["num_heads"])
    np.testing.assert_allclose(distances, expected, rtol=1e-4, atol=1e-3)
    # The check has power: the heads differ clearly, and (EVA) leaving RoPE out changes them.
    assert np.ptp(expected, axis=1).max() > 0.5
    if fields.get("rope"):
        no_rope = np_attention_maps(params, image.astype(np.float64), {**fields, "rope": False})
        assert np.abs(np_mean_distance(no_rope[0]) - expected[0]).max() > 0.05


def test_sown_weights_and_unchanged_output() -> None:
    # Two blocks are enough here; the eager passes below run op by op.
    fields = {**EVA_TINY, "depth": 2}
    module = VisionTransformer(**fields)
    params = random_params(module, seed=3)
    images = jnp.asarray(np.random.default_rng(4).normal(size=(2, *IMAGE_HW, 3)), jnp.float32)
    variables = {"params": params}
    # Nothing is sown at init (where every collection is mutable).
    assert set(jax.eval_shape(module.init, jax.random.key(0), images)) == {"params"}

    plain, plain_inter = module.apply(variables, images)
    (recorded, recorded_inter), collections = module.apply(
        variables, images, mutable=["attention_weights"]
    )
    np.testing.assert_array_equal(plain, recorded)
    np.testing.assert_array_equal(plain_inter["tokens"], recorded_inter["tokens"])
    jitted = jax.jit(lambda v, x: module.apply(v, x)[0])(variables, images)
    jitted_recorded = jax.jit(lambda v, x: module.apply(v, x, mutable=["attention_weights"])[0][0])(
        variables, images
    )
    np.testing.assert_allclose(jitted, jitted_recorded, rtol=1e-6, atol=1e-6)

    layers = sown_attention_weights(collections)
    assert len(layers) == fields["depth"]
    tokens = 1 + GRID[0] * GRID[1]
    for weights in layers:
        assert weights.shape == (2, fields["num_heads"], tokens, tokens)
        assert weights.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-5)


def test_causal_attention_weights() -> None:
    module = MultiHeadAttention(num_heads=2)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 5, 8)), jnp.float32)
    variables = module.init(jax.random.key(0), x, causal=True)
    plain = module.apply(variables, x, causal=True)
    out, collections = module.apply(variables, x, causal=True, mutable=["attention_weights"])
    np.testing.assert_array_equal(plain, out)
    (weights,) = sown_attention_weights(collections)
    assert not np.triu(np.asarray(weights)[0, 0], k=1).any()  # no weight on later keys
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


def test_layer_order_beyond_ten_blocks() -> None:
    # "resblocks_10" sorts before "resblocks_2" as text; the layers must come in depth order.
    blocks = {f"resblocks_{i}": {"attn": {"weights": (i,)}} for i in (10, 2, 0, 11, 1)}
    assert sown_attention_weights({"attention_weights": {"transformer": blocks}}) == [
        0,
        1,
        2,
        10,
        11,
    ]

    # A real 11-block tower: the order read equals the blocks' names read one by one (one jitted
    # pass for both, to keep the test short).
    depth, grid = 11, (2, 3)
    module = VisionTransformer(patch_size=4, width=8, depth=depth, num_heads=2, output_dim=None)
    images = jnp.asarray(np.random.default_rng(6).normal(size=(1, 8, 12, 3)), jnp.float32)
    params = random_params(module, seed=7, image_hw=(8, 12))

    @jax.jit
    def both(params: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        _, collections = module.apply({"params": params}, images, mutable=["attention_weights"])
        named = collections["attention_weights"]["transformer"]
        by_name = [named[f"resblocks_{i}"]["attn"]["weights"][0] for i in range(depth)]
        in_order = sown_attention_weights(collections)
        return tuple(
            jnp.stack([mean_attention_distance(w, grid, 4)[0] for w in layers])
            for layers in (by_name, in_order)
        )

    by_name, in_order = both(params, images)
    assert np.ptp(np.asarray(by_name)) > 0.1  # the layers differ, so a wrong order would show
    np.testing.assert_array_equal(in_order, by_name)


def hand_made(key_of_query: list[int] | None, cls_weight: float = 0.0) -> np.ndarray:
    """(1, 1, 1 + N, 1 + N) weights on a 2 x 3 grid: each query patch q puts ``cls_weight`` on
    the class token and the rest on patch ``key_of_query[q]``; None: uniform over all tokens."""
    n = 6
    if key_of_query is None:
        return np.full((1, 1, 1 + n, 1 + n), 1 / (1 + n))
    weights = np.zeros((1, 1, 1 + n, 1 + n))
    for query, key in enumerate(key_of_query):
        weights[0, 0, 1 + query, 0] = cls_weight
        weights[0, 0, 1 + query, 1 + key] = 1 - cls_weight
    weights[0, 0, 0, 0] = 1.0  # the class token's own row is ignored
    return weights


@pytest.mark.parametrize("renormalize", [False, True])
def test_hand_made_attention(renormalize: bool) -> None:
    grid, patch = (2, 3), 4

    def distance(weights: np.ndarray) -> float:
        value = mean_attention_distance(weights, grid, patch, renormalize=renormalize)
        assert value.shape == (1, 1)
        return float(value[0, 0])

    all_pairs = patch_distances(grid, patch)
    # Uniform over 1 + N tokens: 1 / (1 + N) per patch key, 1 / N once renormalised.
    uniform = all_pairs.mean() if renormalize else all_pairs.sum(-1).mean() / 7
    np.testing.assert_allclose(distance(hand_made(None)), uniform, rtol=1e-6)
    # Each query on itself: 0.
    assert distance(hand_made(list(range(6)))) == 0
    # Each query on the patch one row away (index +- 3 on a 2 x 3 grid): one patch, 4 px. With
    # half the weight on the class token, 2 px unless renormalised.
    other_row = [3, 4, 5, 0, 1, 2]
    np.testing.assert_allclose(distance(hand_made(other_row)), 4.0, rtol=1e-6)
    np.testing.assert_allclose(
        distance(hand_made(other_row, cls_weight=0.5)), 4.0 if renormalize else 2.0, rtol=1e-6
    )
    # The diagonal neighbour of each query, at sqrt(4^2 + 4^2) px.
    diagonal = [4, 3, 4, 1, 0, 1]
    np.testing.assert_allclose(distance(hand_made(diagonal)), math.sqrt(32), rtol=1e-6)


def test_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="2x3 grid"):
        mean_attention_distance(np.zeros((1, 1, 6, 6)), (2, 3), 4)


def test_accumulator_averages_over_images() -> None:
    accumulator = AttentionDistanceAccumulator()
    accumulator.add(np.array([[[1.0, 2.0], [3.0, 4.0]]]))  # 1 layer, 2 images, 2 heads
    accumulator.add(np.array([[[7.0, 0.0]]]))  # a batch of one more image
    assert accumulator.num_images == 3
    np.testing.assert_allclose(accumulator.result(), [[11 / 3, 2.0]])


def test_csv_and_figure(tmp_path: Path) -> None:
    distances = np.arange(12, dtype=float).reshape(3, 4) * 1.5
    write_csv(tmp_path / "d.csv", distances)
    with open(tmp_path / "d.csv") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["layer", "head", "mean_distance_px"]
    assert (rows[0]["layer"], rows[0]["head"], rows[-1]["layer"], rows[-1]["head"]) == (
        "1",
        "0",
        "3",
        "3",
    )
    np.testing.assert_allclose(read_csv(tmp_path / "d.csv"), distances)
    plot_attention_distances(distances, tmp_path / "d.png", "a title")
    with Image.open(tmp_path / "d.png") as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_non_vit_tower_is_refused() -> None:
    source = tower_source_config(source="recipe", config="configs/clip_rn50.py:runlocal")
    with pytest.raises(command.SettingsError, match="ModifiedResNet"):
        command.compute_attention_distances(source, command.data_source_config())


def test_command_end_to_end(tmp_path: Path) -> None:
    """`python -m pretrain.attention_distance` on a randomly initialised two-block tiny CLIP."""
    recipe = tmp_path / "two_blocks.py"
    tiny_config = str(REPO / "tests" / "tiny_clip_config.py")
    recipe.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('tiny', {tiny_config!r})\n"
        "tiny = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(tiny)\n\n\n"
        "def get_config(arg=None):\n"
        "    config = tiny.get_config(arg)\n"
        "    config.model.image.depth = 2\n"
        "    return config\n"
    )
    output = tmp_path / "out"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.attention_distance",
            f"--output_dir={output}",
            "--tower.source=recipe",
            f"--tower.config={recipe}",
            "--data.scenes_config=tiny",
            "--num_images=20",
            "--batch_size=8",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "over 20 images" in result.stdout and "not renormalised" in result.stdout
    distances = read_csv(output / command.CSV_NAME)
    assert distances.shape == (2, 4)  # layers x heads of the tiny tower
    # 32 px images, patch 8: a 4 x 4 grid, so distances lie between 0 and the diagonal, 24 sqrt 2.
    assert np.all((distances > 0) & (distances < 24 * math.sqrt(2)))
    with Image.open(output / command.PNG_NAME) as image:
        image.verify()
