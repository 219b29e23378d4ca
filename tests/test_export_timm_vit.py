"""Export of the CLIP-style ViT (with a classifier, its own projection, or no head) to timm's
vision_transformer.py layout, and the import back.

Without torch: exact round trips, the model arguments and architecture names, the keys and shapes
of a ViT-B/16 with CatLIP's classifier, rejected options, the export directory. With the torch
environment (``-m torch``): timm builds each exported model from ``config.json`` (by name +
model_args, and through ``local-dir:``), loads the weights with strict=True, and its
``forward_features`` tokens and ``forward`` logits match the JAX ViT to 1e-4 in float32; timm-
initialised weights imported into JAX match too; the architecture names carry the LayerNorm eps
and activation they are chosen for, and timm's parameter counts equal the JAX ones.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_params import random_params
from test_export_timm_eva import assert_vit_outputs_close
from torch_env import require_torch_env, run_torch_script
from torch_side.parity_files import read_inputs, read_results, write_inputs

from models.vit import VisionTransformer, eva02_variant
from pretrain.export import timm_vit as export

TOLERANCE = 1e-4
TINY = {"patch_size": 8, "width": 64, "depth": 2, "num_heads": 4}

# "head": classes of a classifier given beside the ViT (CatLIP), None for none; the ViT's own
# projection (output_dim) is timm's head otherwise.
CASES = {
    "classifier": {"vit": {**TINY, "output_dim": None}, "image_size": (32, 32), "head": 10},
    "clip_proj": {"vit": {**TINY, "output_dim": 24}, "image_size": (32, 32), "head": None},
    "quick_gelu_proj_bias": {
        "vit": {**TINY, "output_dim": 24, "activation": "quick_gelu", "proj_bias": True},
        "image_size": (24, 32),
        "head": None,
    },
    "gap_classifier": {
        "vit": {**TINY, "output_dim": None, "pool": "gap"},
        "image_size": (32, 32),
        "head": 7,
    },
    # The other branches: a classic (non-CLIP) ViT with a patch bias and no ln_pre, timm's eps,
    # no q/k/v biases, no position embeddings, an MLP width that is not 4x; no head.
    "no_head_classic": {
        "vit": {
            "patch_size": 8,
            "width": 48,
            "depth": 2,
            "num_heads": 3,
            "mlp_dim": 100,
            "output_dim": None,
            "pre_norm": False,
            "patch_bias": True,
            "layer_norm_eps": 1e-6,
            "qkv_bias": "none",
            "use_abs_pos": False,
        },
        "image_size": (32, 32),
        "head": None,
    },
}
# CatLIP's ViT-B/16 on DataComp (24,320 synsets, V_tau = 500), and an OpenAI-style L/14 tower.
CATLIP_B16 = {
    "vit": {"patch_size": 16, "width": 768, "depth": 12, "num_heads": 12, "output_dim": None}
}
CATLIP_CLASSES = 24_320


def build(spec: dict) -> VisionTransformer:
    return VisionTransformer(**spec["vit"])


def spec_params(spec: dict, seed: int = 0):
    height, width = spec["image_size"]
    return random_params(build(spec), jnp.zeros((1, height, width, 3)), seed=seed)


def spec_head(spec: dict, seed: int = 0) -> dict[str, np.ndarray] | None:
    if spec["head"] is None:
        return None
    rng = np.random.default_rng(seed)
    width = spec["vit"]["width"]
    kernel = rng.standard_normal((width, spec["head"])) / np.sqrt(width)
    bias = 0.1 * rng.standard_normal(spec["head"])
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def jax_outputs(model: VisionTransformer, params, head, images: np.ndarray) -> dict:
    """Final-normed tokens and the logits (classifier / projection) or the pooled embedding."""
    pooled, intermediates = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
    pooled = np.asarray(pooled, np.float64)
    if head is not None:
        pooled = pooled @ np.asarray(head["kernel"], np.float64) + head["bias"]
    return {"features": np.asarray(intermediates["tokens"]), "pooled": pooled.astype(np.float32)}


def random_images(batch: int, image_size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *image_size, 3)).astype(np.float32)


def timm_parameter_count(vit: dict, params, head) -> int:
    """The JAX parameter count (ViT + classifier), plus the zero ``head.bias`` timm adds to a
    projection that has no bias."""
    leaves = jax.tree.leaves(params) + (jax.tree.leaves(head) if head is not None else [])
    count = sum(int(np.prod(np.shape(leaf))) for leaf in leaves)
    if vit.get("output_dim") is not None and not vit.get("proj_bias"):
        count += vit["output_dim"]
    return count


def assert_trees_equal(expected, actual) -> None:
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    for original, restored in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        assert np.shape(original) == np.shape(restored)
        np.testing.assert_array_equal(original, restored)


case_param = pytest.mark.parametrize("name", sorted(CASES))


# --------------------------------------------------------------------------------------------------
# Without torch
# --------------------------------------------------------------------------------------------------


@case_param
def test_round_trip_is_exact(name):
    spec = CASES[name]
    model, params, head = build(spec), spec_params(spec), spec_head(spec)
    state = export.to_timm_state_dict(params, model, head)
    back, back_head = export.from_timm_state_dict(state, model)
    assert_trees_equal(params, back)
    assert_trees_equal(head, back_head)
    assert sum(value.size for value in state.values()) == timm_parameter_count(
        spec["vit"], params, head
    )
    # timm's qkv rows are [q | k | v], each head-major (H*D, W).
    width = spec["vit"]["width"]
    attention = params["transformer"]["resblocks_1"]["attn"]
    for index, name in enumerate(("query", "key", "value")):
        rows = state["blocks.1.attn.qkv.weight"][index * width : (index + 1) * width]
        np.testing.assert_array_equal(rows, attention[name]["kernel"].reshape(width, -1).T)
    if spec["vit"].get("output_dim") is not None and not spec["vit"].get("proj_bias"):
        np.testing.assert_array_equal(state["head.bias"], 0.0)


def test_catlip_b16_arguments_and_state_dict():
    model = build(CATLIP_B16)
    args = export.timm_model_args(model, image_size=224, num_classes=CATLIP_CLASSES)
    assert args == {
        "img_size": 224,
        "patch_size": 16,
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "pre_norm": True,
        "class_token": True,
        "global_pool": "token",
        "fc_norm": False,
        "act_layer": "gelu",
        "num_classes": CATLIP_CLASSES,
    }
    assert export.timm_architecture(model) == "vit_base_patch16_clip_224"
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)
    head = (np.zeros((768, CATLIP_CLASSES), np.float32), np.zeros(CATLIP_CLASSES, np.float32))
    state = export.to_timm_state_dict(zeros, model, head)
    # ViT-B/16 without a projection, counted by hand: patches 589,824 + class 768 + positions
    # 151,296 + ln_pre 1,536 + 12 blocks x 7,087,872 + ln_post 1,536 (timm's vit_base_patch16_224,
    # 86,567,656 with a 1000-class head, has a patch bias instead of norm_pre: 768 fewer).
    assert sum(value.size for value in state.values()) == 85_799_424 + 769 * CATLIP_CLASSES
    assert state["cls_token"].shape == (1, 1, 768)
    assert state["pos_embed"].shape == (1, 197, 768)
    assert state["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert "patch_embed.proj.bias" not in state and "norm_pre.weight" in state
    assert state["blocks.11.attn.qkv.weight"].shape == (2304, 768)
    assert state["blocks.11.attn.qkv.bias"].shape == (2304,)
    assert state["blocks.0.mlp.fc1.weight"].shape == (3072, 768)
    assert state["head.weight"].shape == (CATLIP_CLASSES, 768)
    assert "fc_norm.weight" not in state and "norm.weight" in state


@pytest.mark.parametrize(
    ("fields", "architecture"),
    [
        ({"width": 1024, "patch_size": 14, "activation": "quick_gelu"}, "large_patch14_clip_quick"),
        ({"width": 768, "patch_size": 32}, "base_patch32_clip_224"),
        ({"width": 64, "patch_size": 8}, "base_patch16_clip_224"),
        ({"width": 64, "patch_size": 8, "activation": "quick_gelu"}, "patch16_clip_quickgelu"),
        ({"width": 384, "patch_size": 16, "layer_norm_eps": 1e-6}, "vit_small_patch16_224"),
        ({"width": 64, "patch_size": 8, "layer_norm_eps": 1e-6}, "vit_base_patch16_224"),
    ],
)
def test_architecture_names_carry_eps_and_activation(fields, architecture):
    vit = {"depth": 1, "num_heads": 4, **fields}
    assert architecture in export.timm_architecture(vit)
    assert export.timm_architecture(vit) in export.ARCHITECTURE_NAMES


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rope": True}, "rope"),
        ({"mlp_type": "swiglu"}, "mlp_type"),
        ({"qkv_bias": "qv"}, "qkv_bias"),
        ({"attn_inner_norm": True}, "attn_inner_norm"),
        ({"layer_norm_eps": 1e-3}, "layer_norm_eps"),
        ({"patch_bias": True}, "patch_bias"),
        ({"pre_norm": False}, "patch_bias"),
        ({"pool": "map"}, "pool"),
        ({"pos_embed_grid": 7}, "pos_embed_grid"),
    ],
)
def test_vit_options_timm_lacks_are_rejected(fields, message):
    vit = {**TINY, "output_dim": None, **fields}
    with pytest.raises(ValueError, match=message):
        export.timm_model_args(vit, image_size=32)


def test_eva_variant_is_rejected_with_every_field_named():
    with pytest.raises(ValueError, match=r"rope.*mlp_type.*qkv_bias.*attn_inner_norm"):
        export.to_timm_state_dict({}, eva02_variant("eva02_tiny/8"))


def test_head_mismatches_are_rejected():
    spec = CASES["clip_proj"]
    model, params = build(spec), spec_params(spec)
    with pytest.raises(ValueError, match="pass no head"):
        export.to_timm_state_dict(params, model, spec_head(CASES["classifier"]))
    with pytest.raises(ValueError, match="output_dim=24"):
        export.timm_model_args(model, image_size=32, num_classes=10)
    state = export.to_timm_state_dict(params, model)
    with pytest.raises(ValueError, match=r"head\.bias"):
        export.from_timm_state_dict({**state, "head.bias": state["head.bias"] + 1}, model)
    classifier = CASES["classifier"]
    classifier_params = spec_params(classifier)
    classifier_state = export.to_timm_state_dict(
        classifier_params, build(classifier), spec_head(classifier)
    )
    with pytest.raises(ValueError, match="10 outputs"):
        export.from_timm_state_dict(classifier_state, model)
    with pytest.raises(ValueError, match="width, classes"):
        bad_head = (np.zeros((64, 3)), np.zeros(4))
        export.to_timm_state_dict(classifier_params, build(classifier), bad_head)


def test_unmapped_parameters_and_keys_are_rejected():
    spec = CASES["classifier"]
    model, params, head = build(spec), spec_params(spec), spec_head(spec)
    with pytest.raises(ValueError, match="extra_token"):
        export.to_timm_state_dict({**params, "extra_token": np.zeros(64, np.float32)}, model, head)
    state = export.to_timm_state_dict(params, model, head)
    with pytest.raises(ValueError, match=r"ls1\.gamma"):
        export.from_timm_state_dict({**state, "blocks.0.ls1.gamma": np.ones(64)}, model)
    with pytest.raises(ValueError, match=r"mlp\.fc1"):
        wider = {**spec["vit"], "mlp_dim": 128}
        export.from_timm_state_dict(state, wider)


def test_save_and_load_an_export_directory(tmp_path):
    spec = CASES["quick_gelu_proj_bias"]
    model, params = build(spec), spec_params(spec)
    directory = export.save_timm_vit(tmp_path / "export", params, model, image_size=(24, 32))
    assert sorted(path.name for path in directory.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((directory / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_clip_quickgelu_224"
    assert config["model_args"]["img_size"] == [24, 32]
    assert config["model_args"]["act_layer"] == "quick_gelu"
    assert config["num_classes"] == 24 and config["pretrained_cfg"]["input_size"] == [3, 24, 32]
    loaded, head = export.load_timm_vit(directory, model)
    assert head is None
    assert_trees_equal(params, loaded)
    with pytest.raises(ValueError, match="another ViT"):
        export.load_timm_vit(directory, VisionTransformer(**{**spec["vit"], "depth": 3}))
    with pytest.raises(ValueError, match="pos_embed"):
        export.save_timm_vit(tmp_path / "wrong", params, model, image_size=32)

    spec = CASES["classifier"]
    model, params, head = build(spec), spec_params(spec), spec_head(spec)
    directory = export.save_timm_vit(tmp_path / "cls", params, model, image_size=32, head=head)
    assert json.loads((directory / "config.json").read_text())["num_classes"] == 10
    loaded, loaded_head = export.load_timm_vit(directory, model)
    assert_trees_equal(params, loaded)
    assert_trees_equal(head, loaded_head)


# --------------------------------------------------------------------------------------------------
# Parity with timm in the torch environment
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_cases(tmp_path_factory):
    """Every case exported and run through timm in one torch process: {name: (dir, ours)}."""
    require_torch_env()
    root = tmp_path_factory.mktemp("timm_vit")
    cases = {}
    for index, name in enumerate(sorted(CASES)):
        spec = CASES[name]
        model, params, head = build(spec), spec_params(spec, seed=5), spec_head(spec, seed=6)
        images = random_images(3, spec["image_size"], seed=7 + index)
        case_dir = root / name
        export.save_timm_vit(
            case_dir / "export", params, model, image_size=spec["image_size"], head=head
        )
        write_inputs(case_dir, {"images": images})
        ours = jax_outputs(model, params, head, images)
        cases[name] = (case_dir, ours, timm_parameter_count(spec["vit"], params, head))
    run_torch_script("check_timm_vit.py", "load-export", *(d for d, _, _ in cases.values()))
    return cases


@pytest.mark.torch
@case_param
def test_timm_loads_the_export_and_matches(exported_cases, name):
    spec = CASES[name]
    case_dir, ours, jax_count = exported_cases[name]
    report, theirs = read_results(case_dir)
    assert report["model_class"] == "VisionTransformer"
    assert report["exported_keys"] == report["model_keys"]
    assert report["num_parameters"] == jax_count
    assert report["local_dir_matches"] and report["local_dir_max_diff"] == 0
    eps = spec["vit"].get("layer_norm_eps", 1e-5)
    assert report["norm_eps"] == report["block_norm_eps"] == eps
    quick = spec["vit"].get("activation") == "quick_gelu"
    assert report["activation"] == ("QuickGELU" if quick else "GELU")
    summary = assert_vit_outputs_close(ours, theirs, "JAX vs timm")
    print(f"timm vit export parity {name}: {summary}")


@pytest.mark.torch
def test_timm_weights_import_into_jax_and_match(tmp_path):
    require_torch_env()
    started = time.perf_counter()
    specs = {
        "classifier": (CASES["classifier"], True),
        "quick_gelu_proj_bias": (CASES["quick_gelu_proj_bias"], True),
        "clip_proj": (CASES["clip_proj"], False),
    }
    for index, (name, (spec, random_head_bias)) in enumerate(specs.items()):
        model = build(spec)
        num_classes = spec["head"] or spec["vit"].get("output_dim") or 0
        reference = {
            "architecture": export.timm_architecture(model),
            "model_args": export.timm_model_args(
                model, image_size=spec["image_size"], num_classes=num_classes
            ),
            "random_head_bias": random_head_bias,
        }
        (tmp_path / name).mkdir()
        (tmp_path / name / "spec.json").write_text(json.dumps(reference))
        images = random_images(2, spec["image_size"], seed=11 + index)
        write_inputs(tmp_path / name, {"images": images})
    run_torch_script("check_timm_vit.py", "make-reference", *(tmp_path / n for n in specs))
    for name, (spec, _) in specs.items():
        model = build(spec)
        params, head = export.load_timm_vit(tmp_path / name / "reference", model)
        assert (head is None) == (spec["head"] is None)
        images = read_inputs(tmp_path / name)["images"]
        ours = jax_outputs(model, params, head, images)
        _, theirs = read_results(tmp_path / name)
        summary = assert_vit_outputs_close(ours, theirs, f"timm import {name}")
        print(f"timm vit import parity {name}: {summary}")
    print(f"import parity: {time.perf_counter() - started:.1f} s")


@pytest.mark.torch
def test_architecture_names_and_parameter_counts_are_timms(tmp_path):
    require_torch_env()
    large_openai = {"patch_size": 14, "width": 1024, "depth": 24, "num_heads": 16}
    towers = [
        (build(CATLIP_B16), 224, CATLIP_CLASSES),  # CatLIP ViT-B/16 + synset classifier
        (VisionTransformer(**large_openai, output_dim=768, activation="quick_gelu"), 224, None),
        (build(CASES["no_head_classic"]), 32, None),
    ]
    specs, jax_counts = [], []
    for vit, image_size, classes in towers:
        images = jnp.zeros((1, image_size, image_size, 3))
        shapes = jax.eval_shape(vit.init, jax.random.key(0), images)["params"]
        head = None
        if classes is not None:
            head = {"kernel": np.zeros((vit.width, classes)), "bias": np.zeros(classes)}
        fields = {"output_dim": vit.output_dim, "proj_bias": vit.proj_bias}
        jax_counts.append(timm_parameter_count(fields, shapes, head))
        args = export.timm_model_args(vit, image_size=image_size, num_classes=classes)
        specs.append({"architecture": export.timm_architecture(vit), "model_args": args})
    request = {"names": list(export.ARCHITECTURE_NAMES), "specs": specs}
    (tmp_path / "in.json").write_text(json.dumps(request))
    run_torch_script("check_timm_vit.py", "inspect", tmp_path / "in.json", tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["counts"] == jax_counts
    for name, found in out["names"].items():
        assert found["registered"] and found["model_class"] == "VisionTransformer", name
        clip = "_clip_" in name
        assert found["norm_eps"] == (1e-5 if clip else 1e-6), name
        assert found["pre_norm"] == clip, name
        assert found["activation"] == ("QuickGELU" if "quickgelu" in name else "GELU"), name
