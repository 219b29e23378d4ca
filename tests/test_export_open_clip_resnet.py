"""Export of a two-tower model with CLIP's modified ResNet image tower to open_clip, and back.

Without torch: open_clip's RN50 config, key and parameter counts, exact round trips of params and
BatchNorm running statistics, refusals, files, and a NumPy forward pass of open_clip's
``ModifiedResNet`` written from its conventions (NCHW, OIHW convolutions, torch BatchNorm in
evaluation, ``AvgPool2d``, ``F.multi_head_attention_forward`` with separate q/k/v weights) run on
the exported state dict. With the torch environment (``-m torch`` tests): open_clip's ``RN50``
loads the export with strict=True and gives the same image and text features in eval mode, and an
open_clip RN50 with calibrated, perturbed running statistics imports into JAX and matches.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_export_open_clip import EMBEDDINGS, OPEN_CLIP_TEXT_CFG, random_inputs
from torch_env import assert_outputs_close, require_torch_env, run_parity_case

from models.resnet import ModifiedResNet
from models.text import TextTransformer
from models.two_tower import TwoTowerModel
from pretrain.export import open_clip as export
from pretrain.export.open_clip import resnet

TOLERANCE = 1e-4
# open_clip.create_model("RN50") (open_clip 3.3.0, torch env): state_dict keys, parameters (the
# BatchNorm buffers not counted: 53,248 running statistics and 55 counters more).
OPEN_CLIP_RN50_KEYS = 489
OPEN_CLIP_RN50_PARAMETERS = 102_007_137
OPEN_CLIP_RN50_BUFFER_VALUES = 53_303

RN50 = {
    "image_encoder": {"layers": (3, 4, 6, 3), "width": 64, "num_heads": 32, "output_dim": 1024},
    "text_encoder": {"output_dim": 1024},
    "image_size": 224,
}
# Every kind of block (a second block without shortcut, strided stages), 3 heads of 64 over a
# 192-wide feature map, a 2 x 2 final grid, and a small text tower.
TINY = {
    "image_encoder": {"layers": (1, 2, 1, 1), "width": 6, "num_heads": 3, "output_dim": 20},
    "text_encoder": {
        "width": 32,
        "depth": 1,
        "num_heads": 2,
        "context_length": 12,
        "vocab_size": 49408,
        "output_dim": 20,
    },
    "image_size": 64,
}


def build_model(spec: dict) -> TwoTowerModel:
    return TwoTowerModel(
        ModifiedResNet(**spec["image_encoder"]), TextTransformer(**spec["text_encoder"])
    )


def config_for(model: TwoTowerModel, spec: dict) -> dict:
    return export.open_clip_model_config(
        model.image_encoder, model.text_encoder, image_size=spec["image_size"]
    )


def random_variables(model: TwoTowerModel, spec: dict, seed: int = 0) -> dict:
    """``{"params", "batch_stats"}`` with random, non-trivial values at roughly the init's scale:
    BatchNorm scales off 1, running means off 0, running variances in [0.5, 2]. Spread wider than
    random_params.random_variables': through a deep random ResNet and an attention pool, less
    spread leaves the images' embeddings too alike for the sanity checks below."""
    size = spec["image_size"]
    context = model.text_encoder.context_length
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, size, size, 3)),
        jnp.zeros((1, context), jnp.int32),
    )
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        names = [entry.key for entry in path]
        name, parent = names[-1], names[-2]
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if name == "mean":
            return 0.2 * noise
        if name == "scale":
            return 1 + 0.2 * noise
        if name == "bias":
            return 0.1 * noise
        if name == "logit_scale":
            return np.float32(np.log(1 / 0.07)) + 0.1 * noise
        if name == "kernel":
            # q/k/v kernels are (width, heads, head_dim): their fan-in is the first axis alone.
            projections = ("query", "key", "value", "q_proj", "k_proj", "v_proj")
            fan_in = leaf.shape[0] if parent in projections else np.prod(leaf.shape[:-1])
            return noise / np.sqrt(fan_in).astype(np.float32)
        if name == "text_projection":
            return noise / np.sqrt(leaf.shape[0]).astype(np.float32)
        return 0.1 * noise  # token and position embeddings

    return jax.tree_util.tree_map_with_path(value, shapes)


def structured_images(batch: int, size: int, seed: int) -> np.ndarray:
    """Blocky images of different contrast plus noise: white noise alone has the same statistics
    in every image, which an attention pool over a deep random network averages into nearly
    the same embedding, so a layout mistake could hide."""
    rng = np.random.default_rng(seed)
    contrast = np.linspace(1.0, 2.0, batch)[:, None, None, None]
    blocks = rng.standard_normal((batch, 4, 4, 3)) * contrast
    smooth = np.repeat(np.repeat(blocks, size // 4, axis=1), size // 4, axis=2)
    return (smooth + 0.3 * rng.standard_normal((batch, size, size, 3))).astype(np.float32)


def make_inputs(spec: dict, batch: int, seed: int) -> dict:
    context = spec["text_encoder"].get("context_length", 77)
    inputs = random_inputs(batch, (spec["image_size"],) * 2, context, seed)
    inputs["images"] = structured_images(batch, spec["image_size"], seed)
    return inputs


def jax_outputs(model: TwoTowerModel, variables: dict, inputs: dict) -> dict[str, np.ndarray]:
    encode_image = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image)[0])
    encode_text = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text)[0])
    return {
        "image_embeds": np.asarray(encode_image(variables, inputs["images"])),
        "text_embeds": np.asarray(encode_text(variables, inputs["tokens"])),
    }


# --------------------------------------------------------------------------------------------------
# NumPy forward pass of open_clip's ModifiedResNet (eval mode) from its state dict.
# --------------------------------------------------------------------------------------------------


def np_conv(x, weight, stride=1):
    """torch Conv2d without bias, padding k // 2: x (B, C, H, W), weight (O, C, k, k)."""
    kernel = weight.shape[-1]
    pad = kernel // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride]  # (B, C, H', W', k, k)
    return np.einsum("bchwij,ocij->bohw", windows, weight)


def np_batch_norm(x, state, prefix, eps=1e-5):
    channel = lambda name: state[f"{prefix}.{name}"][None, :, None, None]
    return (x - channel("running_mean")) / np.sqrt(channel("running_var") + eps) * channel(
        "weight"
    ) + channel("bias")


def np_avg_pool(x, size):
    batch, channels, height, width = x.shape
    rows, cols = height // size, width // size
    x = x[:, :, : rows * size, : cols * size].reshape(batch, channels, rows, size, cols, size)
    return x.mean(axis=(3, 5))


def np_relu(x):
    return np.maximum(x, 0)


def np_bottleneck(x, state, prefix, stride):
    def conv_bn(y, index):
        conv = np_conv(y, state[f"{prefix}.conv{index}.weight"])
        return np_batch_norm(conv, state, f"{prefix}.bn{index}")

    out = np_relu(conv_bn(x, 1))
    out = np_relu(conv_bn(out, 2))
    if stride > 1:
        out = np_avg_pool(out, stride)
    out = conv_bn(out, 3)
    identity = x
    if f"{prefix}.downsample.0.weight" in state:
        if stride > 1:
            identity = np_avg_pool(identity, stride)
        identity = np_conv(identity, state[f"{prefix}.downsample.0.weight"])
        identity = np_batch_norm(identity, state, f"{prefix}.downsample.1")
    return np_relu(out + identity)


def np_attention_pool(x, state, prefix, num_heads):
    batch, width = x.shape[:2]
    tokens = x.reshape(batch, width, -1).transpose(0, 2, 1)  # (B, HW, C)
    tokens = np.concatenate([tokens.mean(1, keepdims=True), tokens], axis=1)
    tokens = tokens + state[f"{prefix}.positional_embedding"]
    linear = lambda y, name: y @ state[f"{prefix}.{name}.weight"].T + state[f"{prefix}.{name}.bias"]
    split = lambda y: y.reshape(batch, y.shape[1], num_heads, -1).transpose(0, 2, 1, 3)
    query, key, value = (split(linear(tokens, name)) for name in ("q_proj", "k_proj", "v_proj"))
    scores = query @ key.transpose(0, 1, 3, 2) / np.sqrt(query.shape[-1])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = (weights @ value).transpose(0, 2, 1, 3).reshape(batch, -1, width)
    return linear(attended, "c_proj")[:, 0]  # the mean token's output


def np_modified_resnet(state, images, num_heads, prefix="visual."):
    state = {key: value.astype(np.float64) for key, value in state.items()}
    x = images.transpose(0, 3, 1, 2).astype(np.float64)  # NCHW, as torch takes it
    for index, stride in ((1, 2), (2, 1), (3, 1)):
        x = np_conv(x, state[f"{prefix}conv{index}.weight"], stride)
        x = np_relu(np_batch_norm(x, state, f"{prefix}bn{index}"))
    x = np_avg_pool(x, 2)
    for stage in range(1, 5):
        index = 0
        while f"{prefix}layer{stage}.{index}.conv1.weight" in state:
            stride = 2 if stage > 1 and index == 0 else 1
            x = np_bottleneck(x, state, f"{prefix}layer{stage}.{index}", stride)
            index += 1
    return np_attention_pool(x, state, f"{prefix}attnpool", num_heads)


# --------------------------------------------------------------------------------------------------
# Tests without torch
# --------------------------------------------------------------------------------------------------


def test_rn50_config_keys_and_parameter_count_match_open_clip():
    model = build_model(RN50)
    config = config_for(model, RN50)
    # open_clip's model_configs/RN50.json, plus the fields this exporter always states.
    assert config == {
        "embed_dim": 1024,
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": 224,
            "layers": [3, 4, 6, 3],
            "width": 64,
            "head_width": 64,
            "patch_size": None,
        },
        "text_cfg": {**OPEN_CLIP_TEXT_CFG, "mlp_ratio": 4.0, "no_causal_mask": False},
    }
    kwargs = export.jax_model_kwargs(config)
    assert kwargs["image_encoder"] == RN50["image_encoder"]
    assert kwargs["image_size"] == (224, 224)
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 77), jnp.int32)
    )
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)
    state = export.to_open_clip_state_dict(zeros, model_config=config)
    assert len(state) == OPEN_CLIP_RN50_KEYS
    counters = [key for key in state if key.endswith("num_batches_tracked")]
    buffers = [key for key in state if key.endswith(("running_mean", "running_var"))] + counters
    assert sum(state[key].size for key in buffers) == OPEN_CLIP_RN50_BUFFER_VALUES
    parameters = sum(value.size for key, value in state.items() if key not in buffers)
    assert parameters == OPEN_CLIP_RN50_PARAMETERS
    assert {state[key].dtype for key in counters} == {np.dtype(np.int64)}
    assert state["visual.conv1.weight"].shape == (32, 3, 3, 3)
    assert state["visual.layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert state["visual.attnpool.positional_embedding"].shape == (50, 2048)
    assert state["visual.attnpool.c_proj.weight"].shape == (1024, 2048)


def test_round_trip_of_params_and_running_statistics_is_exact():
    model = build_model(TINY)
    variables = random_variables(model, TINY)
    config = config_for(model, TINY)
    state = export.to_open_clip_state_dict(
        variables["params"], model_config=config, batch_stats=variables["batch_stats"]
    )
    # A variables dict holding both collections exports the same.
    again = export.to_open_clip_state_dict(variables, model_config=config)
    assert again.keys() == state.keys()
    back = export.from_open_clip_variables(state, model_config=config)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for original, restored in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
        assert original.shape == restored.shape
        np.testing.assert_array_equal(original, restored)
    # Converted checkpoints without BatchNorm's counters import the same.
    no_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    back = export.from_open_clip_variables(no_counters, model_config=config)
    for original, restored in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
        np.testing.assert_array_equal(original, restored)


def test_running_statistics_are_required_and_never_dropped():
    model = build_model(TINY)
    variables = random_variables(model, TINY)
    config = config_for(model, TINY)
    with pytest.raises(ValueError, match="batch_stats"):
        export.to_open_clip_state_dict(variables["params"], model_config=config)
    stats = dict(variables["batch_stats"])
    stats["image_encoder"] = {**stats["image_encoder"], "extra": {"mean": np.zeros(3)}}
    with pytest.raises(ValueError, match="image_encoder/extra/mean"):
        export.to_open_clip_state_dict(variables["params"], batch_stats=stats)
    state = export.to_open_clip_state_dict(variables, model_config=config)
    with pytest.raises(ValueError, match="from_open_clip_variables"):
        export.from_open_clip_state_dict(state, model_config=config)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_size": 72}, "multiple of 32"),
        ({"image_size": (64, 96)}, "square"),
        ({"image_encoder": {"batch_norm_eps": 1e-3}}, "batch_norm_eps"),
        ({"image_encoder": {"num_heads": 5}}, "heads"),
        ({"image_encoder": {"pos_embed_grid": 3}}, "pos_embed_grid"),
    ],
)
def test_towers_open_clip_cannot_express_are_rejected(change, message):
    image = {**TINY["image_encoder"], **change.get("image_encoder", {})}
    with pytest.raises(ValueError, match=message):
        export.open_clip_model_config(
            image, TINY["text_encoder"], image_size=change.get("image_size", 64)
        )


def test_output_dim_none_exports_with_the_feature_width_as_embedding():
    image = {**TINY["image_encoder"], "output_dim": None}
    text = {**TINY["text_encoder"], "output_dim": 192}
    config = export.open_clip_model_config(image, text, image_size=64)
    assert config["embed_dim"] == 192  # 32 * width
    assert resnet.is_vision_cfg(config["vision_cfg"])


def test_exported_state_dict_runs_like_open_clip_in_numpy():
    model = build_model(TINY)
    variables = random_variables(model, TINY, seed=3)
    config = config_for(model, TINY)
    inputs = make_inputs(TINY, 3, seed=4)
    state = export.to_open_clip_state_dict(variables, model_config=config)
    features = np_modified_resnet(state, inputs["images"], TINY["image_encoder"]["num_heads"])
    reference = features / np.linalg.norm(features, axis=-1, keepdims=True)
    ours = jax_outputs(model, variables, inputs)["image_embeds"]
    np.testing.assert_allclose(ours, reference, atol=TOLERANCE)
    # Sanity: the images give distinct embeddings, so a misplaced weight would show.
    assert np.abs(reference[0] - reference[1]).max() > 1e-2


def test_save_and_load_an_export_directory(tmp_path):
    model = build_model(TINY)
    variables = random_variables(model, TINY)
    config = config_for(model, TINY)
    params, batch_stats = variables["params"], variables["batch_stats"]
    directory = export.save_open_clip(
        tmp_path / "export", params, config, "tiny-rn", batch_stats=batch_stats
    )
    written = json.loads((directory / "open_clip_config.json").read_text())
    assert written["model_cfg"] == json.loads(json.dumps(config))
    assert written["preprocess_cfg"]["size"] == 64
    loaded_config, loaded = export.load_open_clip_variables(directory)
    assert loaded_config == written["model_cfg"]
    for original, restored in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(original, restored)
    with pytest.raises(ValueError, match="load_open_clip_variables"):
        export.load_open_clip(directory)
    export.main(["check", str(directory)])


# --------------------------------------------------------------------------------------------------
# Parity with open_clip in the torch environment
# --------------------------------------------------------------------------------------------------


def assert_embeddings_close(ours: dict, theirs, what: str) -> str:
    summary = assert_outputs_close(ours, theirs, EMBEDDINGS, tolerance=TOLERANCE, what=what)
    # Sanity: the two images' embeddings differ, so a misplaced weight would show.
    assert np.abs(theirs["image_embeds"][0] - theirs["image_embeds"][1]).max() > 1e-3
    return summary


@pytest.mark.torch
def test_open_clip_rn50_loads_the_export_and_matches(tmp_path):
    require_torch_env()
    started = time.perf_counter()
    model = build_model(RN50)
    variables = random_variables(model, RN50, seed=5)
    config = config_for(model, RN50)
    inputs = make_inputs(RN50, 2, seed=6)
    export.save_open_clip(tmp_path / "export", variables, config, "exported-rn50")
    ours = jax_outputs(model, variables, inputs)
    arguments = ("check_open_clip.py", "load-export", tmp_path, "exported-rn50")
    report, theirs = run_parity_case(tmp_path, *arguments, inputs=inputs, timeout=600)

    exported = export.load_open_clip_weights(tmp_path / "export" / "open_clip_model.safetensors")
    assert report["model_class"] == "CLIP"
    assert report["exported_keys"] == report["model_keys"] == sorted(exported)
    assert len(exported) == OPEN_CLIP_RN50_KEYS
    assert all(list(exported[key].shape) == shape for key, shape in report["model_shapes"].items())
    assert report["num_parameters"] == OPEN_CLIP_RN50_PARAMETERS
    assert report["named_model_matches"]
    summary = assert_embeddings_close(ours, theirs, "JAX vs open_clip RN50")
    np.testing.assert_array_equal(theirs["logit_scale"], variables["params"]["logit_scale"])
    print(f"RN50 export parity: {summary}; {time.perf_counter() - started:.1f} s")


@pytest.mark.torch
def test_open_clip_rn50_weights_import_into_jax_and_match(tmp_path):
    require_torch_env()
    started = time.perf_counter()
    inputs = make_inputs(RN50, 2, seed=7)
    arguments = ("check_open_clip.py", "make-reference", tmp_path, "RN50")
    _, theirs = run_parity_case(tmp_path, *arguments, inputs=inputs, timeout=600)

    config, variables = export.load_open_clip_variables(tmp_path / "reference")
    kwargs = export.jax_model_kwargs(config)
    assert kwargs["image_encoder"] == RN50["image_encoder"]
    model = TwoTowerModel(
        ModifiedResNet(**kwargs["image_encoder"]), TextTransformer(**kwargs["text_encoder"])
    )
    # The reference's running statistics are calibrated on the inputs, not the init's 0 and 1.
    running_var = variables["batch_stats"]["image_encoder"]["layer3_0"]["bn2"]["var"]
    assert np.abs(running_var - 1).max() > 0.1
    ours = jax_outputs(model, variables, inputs)
    summary = assert_embeddings_close(ours, theirs, "open_clip RN50 vs JAX import")
    print(f"RN50 import parity: {summary}; {time.perf_counter() - started:.1f} s")
