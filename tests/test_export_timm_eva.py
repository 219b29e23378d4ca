"""Export of the EVA-02-style ViT to timm's eva.py layout, and the import back.

Without torch: exact round trips, the model arguments both ways, rejected options, the export
directory. With the torch environment (``-m torch``): timm builds the model from the exported
``config.json`` (by name + model_args, and through ``local-dir:``), loads the weights with
strict=True, and its ``forward_features`` / ``forward`` match the JAX ViT to 1e-4 in float32; a
timm-initialised model imported into JAX matches too; the variants' parameter counts equal timm's.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_params import random_params
from test_eva_vit import TIMM_PARAMETER_COUNTS
from torch_env import assert_outputs_close, require_torch_env, run_parity_case, run_torch_script

from models.vit import VisionTransformer, eva02_variant
from pretrain.export import timm_eva as export

TOLERANCE = 1e-4

# Small EVA-02 ViT: every EVA option on, a head (projection), a non-square image whose grid (3 x 4)
# is not the RoPE reference grid (5), 2 heads of 16 dims.
SMALL_EVA = {
    "vit": {
        **eva02_variant("eva02_tiny/8"),
        "width": 32,
        "depth": 2,
        "num_heads": 2,
        "mlp_dim": int(32 * 4 * 2 / 3),
        "rope_ref_grid": 5,
        "output_dim": 24,
    },
    "image_size": (24, 32),
}
# The other branches: UTA (no inner norm), GELU MLP, ln_pre (so no patch bias), no RoPE, no
# absolute position embedding, no q/v biases, average pooling, no head.
SMALL_OTHER = {
    "vit": {
        **eva02_variant("uta_tiny/8"),
        "width": 48,
        "depth": 2,
        "num_heads": 3,
        "mlp_dim": 100,
        "mlp_type": "gelu",
        "pre_norm": True,
        "patch_bias": False,
        "rope": False,
        "use_abs_pos": False,
        "qkv_bias": "none",
        "pool": "gap",
        "output_dim": None,
    },
    "image_size": (16, 16),
}
# UTA-B/16 at 224 px (its grid 14 x 14 scales RoPE positions to the 16 x 16 reference).
UTA_BASE = {"vit": {**eva02_variant("uta_base/16"), "output_dim": None}, "image_size": (224, 224)}


def build(spec: dict) -> VisionTransformer:
    return VisionTransformer(**spec["vit"])


def spec_params(spec: dict, seed: int = 0):
    height, width = spec["image_size"]
    return random_params(build(spec), jnp.zeros((1, height, width, 3)), seed=seed)


def jax_outputs(model: VisionTransformer, params, images: np.ndarray) -> dict[str, np.ndarray]:
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    pooled, intermediates = forward(params, images)
    return {"features": np.asarray(intermediates["tokens"]), "pooled": np.asarray(pooled)}


def random_images(batch: int, image_size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *image_size, 3)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Without torch
# --------------------------------------------------------------------------------------------------


def test_uta_base_arguments_and_state_dict():
    model = build(UTA_BASE)
    args = export.timm_model_args(model, image_size=224)
    assert args == {
        "img_size": 224,
        "patch_size": 16,
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        "qkv_bias": True,
        "qkv_fused": False,
        "mlp_ratio": 4 * 2 / 3,
        "swiglu_mlp": True,
        "scale_mlp": True,
        "scale_attn_inner": False,
        "use_abs_pos_emb": True,
        "use_rot_pos_emb": True,
        "rope_temperature": 10000.0,
        "ref_feat_shape": [16, 16],
        "use_pre_transformer_norm": False,
        "use_post_transformer_norm": True,
        "use_fc_norm": False,
        "global_pool": "token",
        "class_token": True,
        "num_classes": 0,
    }
    assert export.timm_architecture(model) == "eva02_base_patch14_224"
    assert export.timm_architecture(build({"vit": eva02_variant("eva02_large/16")})) == (
        "eva02_large_patch14_clip_224"
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)
    state = export.to_timm_state_dict(zeros, model_args=args)
    assert sum(value.size for value in state.values()) == TIMM_PARAMETER_COUNTS["uta_base/16"]
    assert state["cls_token"].shape == (1, 1, 768)
    assert state["pos_embed"].shape == (1, 197, 768)
    assert state["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert state["blocks.11.attn.q_proj.weight"].shape == (768, 768)
    assert "blocks.0.attn.k_proj.bias" not in state and "blocks.0.attn.norm.weight" not in state
    assert state["blocks.0.mlp.fc1_g.weight"].shape == (2048, 768)
    assert state["blocks.0.mlp.norm.weight"].shape == (2048,)
    assert "norm.weight" in state and "fc_norm.weight" not in state and "head.weight" not in state


@pytest.mark.parametrize("spec", [SMALL_EVA, SMALL_OTHER], ids=["small_eva", "small_other"])
def test_round_trip_is_exact(spec):
    params = spec_params(spec)
    args = export.timm_model_args(build(spec), image_size=spec["image_size"])
    state = export.to_timm_state_dict(params, model_args=args)
    back = export.from_timm_state_dict(state, model_args=args)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert original.shape == restored.shape
        np.testing.assert_array_equal(original, restored)
    assert np.all(state["head.bias"] == 0) if "head.bias" in state else True


@pytest.mark.parametrize("spec", [SMALL_EVA, SMALL_OTHER, UTA_BASE], ids=["eva", "other", "uta"])
def test_arguments_map_back_to_the_same_vit(spec):
    args = json.loads(
        json.dumps(export.timm_model_args(build(spec), image_size=spec["image_size"]))
    )
    kwargs = export.vit_kwargs_from_timm(args)
    assert kwargs.pop("image_size") == spec["image_size"]
    expected = {name: value for name, value in spec["vit"].items() if name not in ("remat_policy",)}
    if not expected["rope"]:
        kwargs.pop("rope_ref_grid"), expected.pop("rope_ref_grid")
    assert kwargs == expected


def test_fused_qkv_layout_imports_like_separate_projections():
    params = spec_params(SMALL_EVA)
    args = export.timm_model_args(build(SMALL_EVA), image_size=SMALL_EVA["image_size"])
    state = export.to_timm_state_dict(params)
    fused = {key: value for key, value in state.items() if ".attn." not in key or "proj" not in key}
    for index in range(2):
        prefix = f"blocks.{index}.attn"
        fused[f"{prefix}.proj.weight"] = state[f"{prefix}.proj.weight"]
        fused[f"{prefix}.proj.bias"] = state[f"{prefix}.proj.bias"]
        fused[f"{prefix}.qkv.weight"] = np.concatenate(
            [state[f"{prefix}.{name}_proj.weight"] for name in "qkv"], axis=0
        )
        fused[f"{prefix}.q_bias"] = state[f"{prefix}.q_proj.bias"]
        fused[f"{prefix}.v_bias"] = state[f"{prefix}.v_proj.bias"]
    back = export.from_timm_state_dict(fused, model_args={**args, "qkv_fused": True})
    for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(original, restored)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("qkv_bias", "qkv", "no key bias"),
        ("layer_norm_eps", 1e-5, "layer_norm_eps"),
        ("patch_bias", False, "patch_bias"),
    ],
)
def test_vit_options_timm_lacks_are_rejected(field, value, message):
    vit = {**SMALL_EVA["vit"], field: value}
    with pytest.raises(ValueError, match=message):
        export.timm_model_args(vit, image_size=32)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("init_values", 1e-5),
        ("num_reg_tokens", 4),
        ("qk_norm", True),
        ("rope_rotate_half", True),
        ("use_fc_norm", True),
        ("global_pool", "map"),
    ],
)
def test_timm_options_the_vit_lacks_are_rejected(field, value):
    args = {**export.timm_model_args(build(SMALL_EVA), image_size=32), field: value}
    with pytest.raises(ValueError, match=field):
        export.vit_kwargs_from_timm(args)


def test_mismatched_weights_and_a_head_bias_are_rejected():
    params = spec_params(SMALL_EVA)
    args = export.timm_model_args(build(SMALL_EVA), image_size=(24, 24))  # wrong grid
    with pytest.raises(ValueError, match="pos_embed"):
        export.to_timm_state_dict(params, model_args=args)
    args = export.timm_model_args(build(SMALL_EVA), image_size=SMALL_EVA["image_size"])
    state = export.to_timm_state_dict(params)
    state["head.bias"] = state["head.bias"] + 1
    with pytest.raises(ValueError, match=r"head\.bias"):
        export.from_timm_state_dict(state, model_args=args)
    extra = {**params, "extra_token": np.zeros(32, np.float32)}
    with pytest.raises(ValueError, match="extra_token"):
        export.to_timm_state_dict(extra)


def test_open_clip_export_refuses_an_eva_tower():
    from models.text import TextTransformer
    from pretrain.export import open_clip

    text = TextTransformer(width=32, depth=1, num_heads=2, context_length=8, output_dim=24)
    with pytest.raises(ValueError, match="timm_eva"):
        open_clip.open_clip_model_config(build(SMALL_EVA), text, image_size=(24, 32))


def test_save_and_load_an_export_directory(tmp_path):
    params = spec_params(SMALL_EVA)
    model = build(SMALL_EVA)
    directory = export.save_timm(tmp_path / "export", params, model, image_size=(24, 32))
    assert sorted(path.name for path in directory.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((directory / "config.json").read_text())
    assert config["architecture"] == "eva02_base_patch16_clip_224"  # closest name; args decide
    assert config["model_args"]["img_size"] == [24, 32]
    assert config["num_classes"] == 24 and config["pretrained_cfg"]["input_size"] == [3, 24, 32]
    model_args, loaded = export.load_timm(directory)
    assert model_args == config["model_args"]
    for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(original, restored)


# --------------------------------------------------------------------------------------------------
# Parity with timm in the torch environment
# --------------------------------------------------------------------------------------------------


VIT_OUTPUTS = ("features", "pooled")


def assert_vit_outputs_close(ours: dict, theirs, what: str) -> str:
    return assert_outputs_close(ours, theirs, VIT_OUTPUTS, tolerance=TOLERANCE, what=what)


@pytest.mark.torch
@pytest.mark.parametrize(
    ("spec", "batch"),
    [
        pytest.param(SMALL_EVA, 3, id="small_eva"),
        pytest.param(SMALL_OTHER, 2, id="small_other"),
        pytest.param(UTA_BASE, 2, id="uta_base_16"),
    ],
)
def test_timm_loads_the_export_and_matches(tmp_path, spec, batch, request):
    require_torch_env()
    started = time.perf_counter()
    model = build(spec)
    params = spec_params(spec, seed=5)
    images = random_images(batch, spec["image_size"], seed=6)
    export.save_timm(tmp_path / "export", params, model, image_size=spec["image_size"])
    ours = jax_outputs(model, params, images)
    arguments = ("check_timm_eva.py", "load-export", tmp_path)
    report, theirs = run_parity_case(tmp_path, *arguments, inputs={"images": images}, timeout=600)
    exported = export.to_timm_state_dict(params)
    assert report["model_class"] == "Eva"
    assert report["exported_keys"] == report["model_keys"] == sorted(exported)
    assert all(list(exported[key].shape) == shape for key, shape in report["model_shapes"].items())
    assert report["num_parameters"] == sum(value.size for value in exported.values())
    assert report["rope"] == spec["vit"]["rope"]
    assert report["local_dir_matches"] and report["local_dir_max_diff"] == 0
    summary = assert_vit_outputs_close(ours, theirs, "JAX vs timm")
    elapsed = time.perf_counter() - started
    print(f"timm export parity {request.node.callspec.id}: {summary}; {elapsed:.1f} s")


@pytest.mark.torch
@pytest.mark.parametrize("spec", [SMALL_EVA, SMALL_OTHER], ids=["small_eva", "small_other"])
def test_timm_weights_import_into_jax_and_match(tmp_path, spec, request):
    require_torch_env()
    started = time.perf_counter()
    reference_spec = {
        "architecture": "eva02_tiny_patch14_224",
        "model_args": export.timm_model_args(build(spec), image_size=spec["image_size"]),
    }
    (tmp_path / "spec.json").write_text(json.dumps(reference_spec))
    images = random_images(2, spec["image_size"], seed=7)
    arguments = ("check_timm_eva.py", "make-reference", tmp_path, tmp_path / "spec.json")
    _, theirs = run_parity_case(tmp_path, *arguments, inputs={"images": images}, timeout=600)
    model_args, params = export.load_timm(tmp_path / "reference")
    kwargs = export.vit_kwargs_from_timm(model_args)
    assert kwargs.pop("image_size") == spec["image_size"]
    ours = jax_outputs(VisionTransformer(**kwargs), params, images)
    summary = assert_vit_outputs_close(ours, theirs, "timm import")
    elapsed = time.perf_counter() - started
    print(f"timm import parity {request.node.callspec.id}: {summary}; {elapsed:.1f} s")


@pytest.mark.torch
def test_variant_parameter_counts_are_timms(tmp_path):
    require_torch_env()
    specs = []
    for variant in sorted(TIMM_PARAMETER_COUNTS):
        vit = VisionTransformer.from_variant(variant, output_dim=None)
        specs.append(
            {
                "architecture": export.timm_architecture(vit),
                "model_args": export.timm_model_args(vit, image_size=224),
            }
        )
    # timm's own registered model, unchanged, for the EVA-02-CLIP base tower.
    specs.append({"architecture": "eva02_base_patch16_clip_224", "model_args": {"num_classes": 0}})
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    run_torch_script("check_timm_eva.py", "count", tmp_path / "specs.json", tmp_path / "out.json")
    counts = json.loads((tmp_path / "out.json").read_text())
    assert counts[:-1] == [TIMM_PARAMETER_COUNTS[name] for name in sorted(TIMM_PARAMETER_COUNTS)]
    assert counts[-1] == TIMM_PARAMETER_COUNTS["eva02_base/16"]
