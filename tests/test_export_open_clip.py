"""Export of the two-tower ViT model to open_clip, and the import back.

Without torch: exact round trips, open_clip's ViT-B-16 key and parameter counts, the config
semantics, and a NumPy forward pass written from open_clip's conventions (torch ``Linear`` is
``x @ W.T + b``, ``in_proj`` rows are [q | k | v] split head-major, conv weights are OIHW) run on
the exported state dict. With the torch environment (``-m torch`` tests): open_clip itself loads
the export with strict=True and gives the same embeddings, and an open_clip-initialised ViT-B-16
imported into JAX does too.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from random_params import random_params as random_module_params
from torch_env import assert_outputs_close, require_torch_env, run_parity_case

from models.text import TextTransformer
from models.two_tower import SIGLIP_LOGIT_BIAS_INIT, TwoTowerModel
from models.vit import VisionTransformer, vit_variant
from pretrain.export import open_clip as export

SOT, EOT = 49406, 49407
TOLERANCE = 1e-4

# A small model that exercises every config field the mapping writes: heads != width / 64 in both
# towers, an MLP width whose ratio float-truncates in open_clip, LayerNorm eps 1e-6, average
# pooling, a bidirectional text tower, a non-square image and a SigLIP logit bias.
SMALL = {
    "image_encoder": {
        "patch_size": 8,
        "width": 64,
        "depth": 2,
        "num_heads": 2,
        "mlp_dim": 160,
        "output_dim": 48,
        "pool": "gap",
        "layer_norm_eps": 1e-6,
    },
    "text_encoder": {
        "width": 112,
        "depth": 2,
        "num_heads": 4,
        "mlp_dim": 115,
        "vocab_size": 49408,
        "context_length": 16,
        "output_dim": 48,
        "causal": False,
        "layer_norm_eps": 1e-6,
    },
    "logit_bias_init": SIGLIP_LOGIT_BIAS_INIT,
    "image_size": (32, 48),
}
# A text tower without projection (its width is the joint embedding), one block, one head.
NO_TEXT_PROJECTION = {
    "image_encoder": {"patch_size": 8, "width": 32, "depth": 1, "num_heads": 1, "output_dim": 40},
    "text_encoder": {
        "width": 40,
        "depth": 1,
        "num_heads": 5,
        "context_length": 12,
        "output_dim": None,
    },
    "logit_bias_init": None,
    "image_size": (16, 16),
}
# OpenAI's QuickGELU (open_clip's quick_gelu: true) in both towers, with a causal text tower.
QUICK_GELU = {
    "image_encoder": {
        "patch_size": 8,
        "width": 48,
        "depth": 2,
        "num_heads": 3,
        "output_dim": 32,
        "activation": "quick_gelu",
    },
    "text_encoder": {
        "width": 64,
        "depth": 2,
        "num_heads": 4,
        "context_length": 12,
        "output_dim": 32,
        "activation": "quick_gelu",
    },
    "logit_bias_init": None,
    "image_size": (24, 24),
}
VIT_B16 = {
    "image_encoder": {**vit_variant("B/16"), "output_dim": 512},
    "text_encoder": {},
    "logit_bias_init": None,
    "image_size": (224, 224),
}


# The text_cfg of open_clip's model_configs with its 512-wide text tower (ViT-B-16, RN50,
# MobileCLIP-S1...).
OPEN_CLIP_TEXT_CFG = {
    "context_length": 77,
    "vocab_size": 49408,
    "width": 512,
    "heads": 8,
    "layers": 12,
}


def build_model(spec: dict) -> TwoTowerModel:
    return TwoTowerModel(
        VisionTransformer(**spec["image_encoder"]),
        TextTransformer(**spec["text_encoder"]),
        logit_bias_init=spec["logit_bias_init"],
    )


def config_for(model: TwoTowerModel, spec: dict) -> dict:
    return export.open_clip_model_config(
        model.image_encoder,
        model.text_encoder,
        image_size=spec["image_size"],
        init_logit_bias=model.logit_bias_init,
    )


def random_params(model: TwoTowerModel, spec: dict, seed: int = 0):
    height, width = spec["image_size"]
    images = jnp.zeros((1, height, width, 3))
    tokens = jnp.zeros((1, model.text_encoder.context_length), jnp.int32)
    return random_module_params(model, images, tokens, seed=seed)


def random_inputs(batch: int, image_size: tuple[int, int], context: int, seed: int) -> dict:
    """Normal-noise images; token rows of SOT, random word ids, EOT at varied positions, then 0s."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, *image_size, 3)).astype(np.float32)
    tokens = np.zeros((batch, context), np.int32)
    eot_positions = np.linspace(2, context - 1, batch).round().astype(int)
    for row, eot in enumerate(eot_positions):
        tokens[row, 0] = SOT
        tokens[row, 1:eot] = rng.integers(1, SOT, eot - 1)
        tokens[row, eot] = EOT
    return {"images": images, "tokens": tokens}


def jax_outputs(model: TwoTowerModel, params, inputs: dict) -> dict[str, np.ndarray]:
    variables = {"params": params}
    encode_image = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image)[0])
    encode_text = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text)[0])
    return {
        "image_embeds": np.asarray(encode_image(variables, inputs["images"])),
        "text_embeds": np.asarray(encode_text(variables, inputs["tokens"])),
    }


# --------------------------------------------------------------------------------------------------
# NumPy forward pass of open_clip's CLIP, from its state dict (the independent reference).
# --------------------------------------------------------------------------------------------------


def np_layer_norm(x, state, prefix, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * state[f"{prefix}.weight"] + state[f"{prefix}.bias"]


def np_linear(x, state, prefix):
    return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]


def np_attention(x, state, prefix, num_heads, causal):
    batch, length, width = x.shape
    qkv = x @ state[f"{prefix}.in_proj_weight"].T + state[f"{prefix}.in_proj_bias"]
    heads = [
        part.reshape(batch, length, num_heads, width // num_heads).transpose(0, 2, 1, 3)
        for part in np.split(qkv, 3, axis=-1)
    ]
    query, key, value = heads
    scores = query @ key.transpose(0, 1, 3, 2) / np.sqrt(width // num_heads)
    if causal:
        scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = (weights @ value).transpose(0, 2, 1, 3).reshape(batch, length, width)
    return np_linear(attended, state, f"{prefix}.out_proj")


def np_gelu(x):
    return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))  # exact GELU


def np_quick_gelu(x):
    return x / (1 + np.exp(-1.702 * x))  # x * sigmoid(1.702 x), OpenAI's QuickGELU


def np_transformer(x, state, prefix, num_heads, eps, causal, activation=np_gelu):
    depth = len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})
    for index in range(depth):
        block = f"{prefix}{index}"
        x = x + np_attention(
            np_layer_norm(x, state, f"{block}.ln_1", eps), state, f"{block}.attn", num_heads, causal
        )
        hidden = np_linear(
            np_layer_norm(x, state, f"{block}.ln_2", eps), state, f"{block}.mlp.c_fc"
        )
        hidden = activation(hidden)
        x = x + np_linear(hidden, state, f"{block}.mlp.c_proj")
    return x


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_open_clip_forward(state, config, inputs) -> dict[str, np.ndarray]:
    state = {key: value.astype(np.float64) for key, value in state.items()}
    vision_cfg, text_cfg = config["vision_cfg"], config["text_cfg"]
    vision_eps = vision_cfg.get("norm_kwargs", {}).get("eps", 1e-5)
    text_eps = text_cfg.get("norm_kwargs", {}).get("eps", 1e-5)
    activation = np_quick_gelu if config.get("quick_gelu") else np_gelu

    images = inputs["images"].transpose(0, 3, 1, 2).astype(np.float64)  # NCHW, as torch takes it
    conv = state["visual.conv1.weight"]  # (width, 3, p, p)
    width, _, patch, _ = conv.shape
    batch, channels, height, image_width = images.shape
    grid_h, grid_w = height // patch, image_width // patch
    patches = images.reshape(batch, channels, grid_h, patch, grid_w, patch)
    patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(batch, grid_h * grid_w, -1)
    x = patches @ conv.reshape(width, -1).T
    cls = np.broadcast_to(state["visual.class_embedding"], (batch, 1, width))
    x = np.concatenate([cls, x], axis=1) + state["visual.positional_embedding"]
    x = np_layer_norm(x, state, "visual.ln_pre", vision_eps)
    vision_heads = width // vision_cfg.get("head_width", 64)
    x = np_transformer(
        x, state, "visual.transformer.resblocks.", vision_heads, vision_eps, False, activation
    )
    x = np_layer_norm(x, state, "visual.ln_post", vision_eps)
    pooled = x[:, 1:].mean(1) if vision_cfg.get("pool_type", "tok") == "avg" else x[:, 0]
    image_embeds = np_normalize(pooled @ state["visual.proj"])

    tokens = inputs["tokens"]
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"]
    causal = not text_cfg.get("no_causal_mask", False)
    x = np_transformer(
        x, state, "transformer.resblocks.", text_cfg["heads"], text_eps, causal, activation
    )
    x = np_layer_norm(x, state, "ln_final", text_eps)
    pooled = x[np.arange(len(tokens)), tokens.argmax(-1)]
    if "text_projection" in state:
        pooled = pooled @ state["text_projection"]
    return {"image_embeds": image_embeds, "text_embeds": np_normalize(pooled)}


# --------------------------------------------------------------------------------------------------
# Tests without torch
# --------------------------------------------------------------------------------------------------


def test_vit_b16_config_keys_and_parameter_count_match_open_clip():
    model = build_model(VIT_B16)
    config = config_for(model, VIT_B16)
    # open_clip's model_configs/ViT-B-16.json, plus the fields this exporter always states.
    assert config == {
        "embed_dim": 512,
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": 224,
            "layers": 12,
            "width": 768,
            "patch_size": 16,
            "head_width": 64,
            "mlp_ratio": 4.0,
            "pool_type": "tok",
        },
        "text_cfg": {**OPEN_CLIP_TEXT_CFG, "mlp_ratio": 4.0, "no_causal_mask": False},
    }
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 77), jnp.int32)
    )
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes["params"])
    state = export.to_open_clip_state_dict(zeros, model_config=config)
    assert len(state) == 302
    assert sum(value.size for value in state.values()) == 149_620_737
    assert state["visual.conv1.weight"].shape == (768, 3, 16, 16)
    assert state["visual.transformer.resblocks.11.attn.in_proj_weight"].shape == (2304, 768)
    assert state["logit_scale"].shape == ()


small_specs = pytest.mark.parametrize(
    "spec",
    [SMALL, NO_TEXT_PROJECTION, QUICK_GELU],
    ids=["small", "no_text_projection", "quick_gelu"],
)


@small_specs
def test_round_trip_is_exact(spec):
    model = build_model(spec)
    params = random_params(model, spec)
    config = config_for(model, spec)
    state = export.to_open_clip_state_dict(params, model_config=config)
    back = export.from_open_clip_state_dict(state, model_config=config)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert original.shape == restored.shape
        np.testing.assert_array_equal(original, restored)
    again = export.to_open_clip_state_dict(back, model_config=config)
    assert again.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


@small_specs
def test_exported_state_dict_runs_like_open_clip_in_numpy(spec):
    model = build_model(spec)
    params = random_params(model, spec, seed=3)
    config = config_for(model, spec)
    inputs = random_inputs(3, spec["image_size"], model.text_encoder.context_length, seed=4)
    state = export.to_open_clip_state_dict(params, model_config=config)
    reference = np_open_clip_forward(state, config, inputs)
    ours = jax_outputs(model, params, inputs)
    for name in ("image_embeds", "text_embeds"):
        np.testing.assert_allclose(ours[name], reference[name], atol=TOLERANCE, err_msg=name)
    # Sanity: the inputs give distinct embeddings, so a pooling at the wrong token would show.
    assert np.abs(reference["text_embeds"][0] - reference["text_embeds"][1]).max() > 1e-2


def test_config_expresses_the_small_model_and_maps_back():
    model = build_model(SMALL)
    config = config_for(model, SMALL)
    vision, text = config["vision_cfg"], config["text_cfg"]
    assert vision["image_size"] == [32, 48]
    # open_clip computes vision heads as width // head_width: 64 // 32 = 2.
    assert vision["head_width"] == 32 and vision["width"] // vision["head_width"] == 2
    assert vision["pool_type"] == "avg"
    assert vision["norm_kwargs"] == {"eps": 1e-6} and text["norm_kwargs"] == {"eps": 1e-6}
    assert text["heads"] == 4 and text["no_causal_mask"] is True
    # 115 / 112 * 112 truncates to 114 in floating point; the ratio must survive open_clip's int().
    assert int(112 * (115 / 112)) == 114
    assert int(text["width"] * text["mlp_ratio"]) == 115
    assert config["init_logit_bias"] == SIGLIP_LOGIT_BIAS_INIT
    json.dumps(config)  # plain JSON types only

    kwargs = export.jax_model_kwargs(config)
    assert kwargs["image_size"] == (32, 48)
    assert kwargs["logit_bias_init"] == SIGLIP_LOGIT_BIAS_INIT
    assert kwargs["image_encoder"] == SMALL["image_encoder"]
    assert kwargs["text_encoder"] == SMALL["text_encoder"]


def test_config_and_weights_that_disagree_are_rejected():
    model = build_model(NO_TEXT_PROJECTION)
    params = random_params(model, NO_TEXT_PROJECTION)
    wrong_size = export.open_clip_model_config(
        model.image_encoder, model.text_encoder, image_size=24
    )
    with pytest.raises(ValueError, match=r"visual\.positional_embedding"):
        export.to_open_clip_state_dict(params, model_config=wrong_size)
    with_bias = {**config_for(model, NO_TEXT_PROJECTION), "init_logit_bias": -10.0}
    with pytest.raises(ValueError, match=r"missing.*logit_bias"):
        export.to_open_clip_state_dict(params, model_config=with_bias)


def test_parameters_without_an_open_clip_place_are_rejected():
    model = build_model(NO_TEXT_PROJECTION)
    params = dict(random_params(model, NO_TEXT_PROJECTION))
    params["image_encoder"] = {**params["image_encoder"], "extra_token": np.zeros(32, np.float32)}
    with pytest.raises(ValueError, match="image_encoder/extra_token"):
        export.to_open_clip_state_dict(params)


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        (None, "nonscalar_logit_scale", True),
        ("vision_cfg", "ls_init_value", 0.1),
        ("vision_cfg", "timm_model_name", "vit_base_patch16_224"),
        ("text_cfg", "pool_type", "last"),
        ("text_cfg", "norm_kwargs", {"eps": 1e-6, "elementwise_affine": False}),
    ],
)
def test_open_clip_options_the_towers_lack_are_rejected(section, field, value):
    config = json.loads(json.dumps(config_for(build_model(VIT_B16), VIT_B16)))
    (config if section is None else config[section])[field] = value
    with pytest.raises(ValueError, match=field):
        export.jax_model_kwargs(config)


def test_quick_gelu_maps_to_the_activation_both_ways():
    model = build_model(QUICK_GELU)
    config = config_for(model, QUICK_GELU)
    assert config["quick_gelu"] is True
    kwargs = export.jax_model_kwargs(config)
    assert kwargs["image_encoder"]["activation"] == "quick_gelu"
    assert kwargs["text_encoder"]["activation"] == "quick_gelu"
    assert kwargs["image_encoder"] == {
        **QUICK_GELU["image_encoder"],
        "mlp_dim": 4 * 48,
        "pool": "cls",
        "layer_norm_eps": 1e-5,
    }
    # open_clip has one flag for both towers: towers that disagree cannot be expressed.
    mixed = TwoTowerModel(
        VisionTransformer(**QUICK_GELU["image_encoder"]),
        TextTransformer(**{**QUICK_GELU["text_encoder"], "activation": "gelu"}),
    )
    with pytest.raises(ValueError, match="quick_gelu"):
        config_for(mixed, QUICK_GELU)
    # The activation really differs from exact GELU (else the parity tests would prove nothing).
    inputs = random_inputs(2, QUICK_GELU["image_size"], 12, seed=1)
    params = random_params(model, QUICK_GELU, seed=2)
    gelu_model = build_model(
        {
            **QUICK_GELU,
            "image_encoder": {**QUICK_GELU["image_encoder"], "activation": "gelu"},
            "text_encoder": {**QUICK_GELU["text_encoder"], "activation": "gelu"},
        }
    )
    quick, exact = jax_outputs(model, params, inputs), jax_outputs(gelu_model, params, inputs)
    assert np.abs(quick["image_embeds"] - exact["image_embeds"]).max() > 1e-3


def test_save_and_load_an_export_directory(tmp_path, capsys):
    model = build_model(SMALL)
    params = random_params(model, SMALL)
    config = config_for(model, SMALL)
    directory = export.save_open_clip(tmp_path / "export", params, config, "tiny-siglip")
    assert sorted(path.name for path in directory.iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "tiny-siglip.json",
    ]
    written = json.loads((directory / "open_clip_config.json").read_text())
    assert written["model_cfg"] == json.loads(json.dumps(config))
    assert written["preprocess_cfg"]["size"] == [32, 48]
    assert written["preprocess_cfg"]["mean"] == list(export.OPENAI_DATASET_MEAN)
    assert json.loads((directory / "tiny-siglip.json").read_text()) == written["model_cfg"]

    weights = export.load_open_clip_weights(directory / "open_clip_model.safetensors")
    expected = export.to_open_clip_state_dict(params)
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        assert weights[key].dtype == np.float32
        np.testing.assert_array_equal(weights[key], value, err_msg=key)

    loaded_config, loaded_params = export.load_open_clip(directory)
    assert loaded_config == written["model_cfg"]
    for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(loaded_params)):
        np.testing.assert_array_equal(original, restored)

    export.main(["check", str(directory)])
    assert "consistent with its config" in capsys.readouterr().out


def test_bfloat16_safetensors_are_read(tmp_path):
    import safetensors.flax

    values = jnp.array([[1.5, -2.25], [3.0, 0.125]], jnp.bfloat16)
    safetensors.flax.save_file({"visual.proj": values}, str(tmp_path / "w.safetensors"))
    loaded = export.load_open_clip_weights(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(
        loaded["visual.proj"].astype(np.float32), np.asarray(values, np.float32)
    )


def test_custom_text_clip_keys_import_like_clip_keys():
    model = build_model(NO_TEXT_PROJECTION)
    params = random_params(model, NO_TEXT_PROJECTION)
    config = config_for(model, NO_TEXT_PROJECTION)
    state = export.to_open_clip_state_dict(params)
    custom_text = {
        key if key.startswith(("visual.", "logit_")) else f"text.{key}": value
        for key, value in state.items()
    }
    back = export.from_open_clip_state_dict(custom_text, model_config=config)
    for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(original, restored)


# --------------------------------------------------------------------------------------------------
# Parity with open_clip in the torch environment
# --------------------------------------------------------------------------------------------------


EMBEDDINGS = ("image_embeds", "text_embeds")


def assert_embeddings_close(ours: dict, theirs, what: str) -> str:
    return assert_outputs_close(ours, theirs, EMBEDDINGS, tolerance=TOLERANCE, what=what)


@pytest.mark.torch
@pytest.mark.parametrize(
    ("spec", "batch"),
    [
        pytest.param(VIT_B16, 2, id="ViT-B-16"),
        pytest.param(SMALL, 3, id="small"),
        pytest.param(QUICK_GELU, 2, id="quick_gelu"),
    ],
)
def test_open_clip_loads_the_export_and_matches(tmp_path, spec, batch, request):
    require_torch_env()
    started = time.perf_counter()
    model = build_model(spec)
    params = random_params(model, spec, seed=5)
    config = config_for(model, spec)
    context = model.text_encoder.context_length
    inputs = random_inputs(batch, spec["image_size"], context, seed=6)
    export.save_open_clip(tmp_path / "export", params, config, "exported-model")
    ours = jax_outputs(model, params, inputs)
    report, theirs = run_parity_case(
        tmp_path,
        "check_open_clip.py",
        "load-export",
        tmp_path,
        "exported-model",
        inputs=inputs,
        timeout=600,
    )

    exported = export.load_open_clip_weights(tmp_path / "export" / "open_clip_model.safetensors")
    assert report["model_class"] == "CLIP"
    assert report["exported_keys"] == report["model_keys"] == sorted(exported)
    assert all(list(exported[key].shape) == shape for key, shape in report["model_shapes"].items())
    assert report["num_parameters"] == sum(value.size for value in exported.values())
    if spec is VIT_B16:
        assert (len(report["model_keys"]), report["num_parameters"]) == (302, 149_620_737)
    assert report["named_model_matches"]
    assert report["tokenizer_class"] == "SimpleTokenizer"
    summary = assert_embeddings_close(ours, theirs, "JAX vs open_clip")
    np.testing.assert_allclose(theirs["logit_scale"], params["logit_scale"], rtol=0, atol=0)
    if "logit_bias" in params:
        np.testing.assert_allclose(theirs["logit_bias"], params["logit_bias"], rtol=0, atol=0)
    elapsed = time.perf_counter() - started
    print(f"export parity {request.node.callspec.id}: {summary}; {elapsed:.1f} s")


@pytest.mark.torch
@pytest.mark.parametrize(
    "model_spec",
    [
        pytest.param("ViT-B-16", id="ViT-B-16"),
        pytest.param("small.json", id="small"),
        pytest.param("quick_gelu.json", id="quick_gelu"),
    ],
)
def test_open_clip_weights_import_into_jax_and_match(tmp_path, model_spec, request):
    require_torch_env()
    started = time.perf_counter()
    if model_spec.endswith(".json"):
        spec = QUICK_GELU if model_spec == "quick_gelu.json" else SMALL
        spec_config = config_for(build_model(spec), spec)
        (tmp_path / model_spec).write_text(json.dumps(spec_config))
        model_spec = str(tmp_path / model_spec)
        image_size, context = spec["image_size"], spec["text_encoder"]["context_length"]
    else:
        image_size, context = (224, 224), 77
    inputs = random_inputs(2, image_size, context, seed=7)
    _, theirs = run_parity_case(
        tmp_path,
        "check_open_clip.py",
        "make-reference",
        tmp_path,
        model_spec,
        inputs=inputs,
        timeout=600,
    )

    config, params = export.load_open_clip(tmp_path / "reference")
    kwargs = export.jax_model_kwargs(config)
    assert kwargs["image_size"] == tuple(image_size)
    model = TwoTowerModel(
        VisionTransformer(**kwargs["image_encoder"]),
        TextTransformer(**kwargs["text_encoder"]),
        logit_bias_init=kwargs["logit_bias_init"],
    )
    ours = jax_outputs(model, params, inputs)
    summary = assert_embeddings_close(ours, theirs, "open_clip vs JAX import")
    np.testing.assert_array_equal(params["logit_scale"], theirs["logit_scale"])
    elapsed = time.perf_counter() - started
    print(f"import parity {request.node.callspec.id}: {summary}; {elapsed:.1f} s")
