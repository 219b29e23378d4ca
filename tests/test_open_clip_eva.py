"""open_clip's EVA-CLIP models (timm ``Eva`` image trunks) and QuickGELU towers as teachers.

Without torch: the named configs (EVA01-g-14, EVA02-L-14...) map onto the ViT's EVA options with
open_clip's key layout and parameter counts; exact round trips through small EVA-CLIP models
whose trunks are timm ``local-dir:`` configs (fused and separate q/k/v, the trunk's head or
``visual.head.proj`` as projection); the projection bias; the teacher's weight discovery and
named configs. With the torch environment (``-m torch``): open_clip's own registry gives the same
configs, keys and shapes, timm gives the same trunk architectures, and small random EVA-CLIP
models imported through the teacher path give open_clip's embeddings (and projected tokens, UTA's
targets) to 1e-4, as does the export of a JAX EVA-CLIP model loaded by open_clip.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from random_params import random_params as random_module_params
from test_export_open_clip import (
    TOLERANCE,
    assert_embeddings_close,
    jax_outputs,
    random_inputs,
    random_params,
)
from test_export_timm_eva import SMALL_EVA
from torch_env import require_torch_env, run_parity_case, run_torch_script

from models.text import TextTransformer
from models.two_tower import TwoTowerModel
from models.vit import VisionTransformer, eva02_variant
from pretrain.components.teachers import build_teacher
from pretrain.export import open_clip as export
from pretrain.export import timm_eva, timm_hub
from pretrain.export.open_clip import timm_trunks
from pretrain.export.open_clip_configs import OPEN_CLIP_MODEL_CONFIGS

TEXT = {
    "width": 32,
    "depth": 1,
    "num_heads": 2,
    "vocab_size": 49408,
    "context_length": 10,
    "output_dim": 24,
}
# EVA02-CLIP-like: test_export_timm_eva's small EVA-02 ViT (SwiGLU + sub-LN, q/v biases, the
# attention's inner LN, RoPE on a 4 x 4 grid scaled to a reference grid of 5) with a biased
# projection, separate q/k/v (timm's eva02 layout).
EVA02_LIKE = {"vit": {**SMALL_EVA["vit"], "proj_bias": True}, "image_size": 32, "qkv_fused": False}
# EVA01-CLIP-like: GELU MLP, q/v biases in timm's fused qkv layout, no RoPE, no inner LN.
EVA01_LIKE = {
    "vit": {
        **eva02_variant("uta_tiny/8"),
        "width": 48,
        "depth": 2,
        "num_heads": 3,
        "mlp_dim": 80,
        "mlp_type": "gelu",
        "rope": False,
        "output_dim": 24,
        "proj_bias": True,
    },
    "image_size": 24,
    "qkv_fused": True,
}


def write_trunk(directory: Path, spec: dict, architecture: str | None = None) -> str:
    """A timm ``local-dir:`` trunk config for the spec's ViT; returns the timm model name."""
    config = timm_eva.timm_config(spec["vit"], image_size=spec["image_size"])
    config["model_args"]["qkv_fused"] = spec["qkv_fused"]
    if architecture is not None:
        config["architecture"] = architecture
    directory.mkdir(parents=True, exist_ok=True)
    (directory / timm_hub.CONFIG_FILE_NAME).write_text(json.dumps(config))
    return f"local-dir:{directory}"


def eva_clip(spec: dict, trunk: str, *, quick_gelu: bool = False, timm_proj=None):
    """(model_config, JAX model) of a small EVA-CLIP with the spec's tower as a timm trunk."""
    text = {**TEXT, "activation": "quick_gelu" if quick_gelu else "gelu"}
    config = export.open_clip_model_config(
        spec["vit"], text, image_size=spec["image_size"], timm_model_name=trunk
    )
    if timm_proj == "linear":
        config["vision_cfg"].update({"timm_proj": "linear", "timm_proj_bias": True})
    kwargs = export.jax_model_kwargs(config)
    model = TwoTowerModel(
        VisionTransformer(**kwargs["image_encoder"]), TextTransformer(**kwargs["text_encoder"])
    )
    return config, model


def spec_for(model: TwoTowerModel, image_size: int) -> dict:
    return {"image_size": (image_size, image_size), "logit_bias_init": None}


# --------------------------------------------------------------------------------------------------
# Named configs
# --------------------------------------------------------------------------------------------------


def test_eva_clip_configs_map_to_the_vit_eva_options():
    eva02_l = export.jax_model_kwargs(OPEN_CLIP_MODEL_CONFIGS["EVA02-L-14"])
    assert eva02_l["image_size"] == (224, 224)
    assert eva02_l["image_encoder"] == {
        **eva02_variant("eva02_large/14"),
        "output_dim": 768,
        "proj_bias": True,  # open_clip projects with timm's classifier head, a biased Linear
    }
    eva01_g = export.jax_model_kwargs(OPEN_CLIP_MODEL_CONFIGS["EVA01-g-14"])["image_encoder"]
    assert (eva01_g["width"], eva01_g["depth"], eva01_g["num_heads"]) == (1408, 40, 16)
    assert (eva01_g["mlp_dim"], eva01_g["patch_size"], eva01_g["output_dim"]) == (6144, 14, 1024)
    assert eva01_g["mlp_type"] == "gelu" and eva01_g["qkv_bias"] == "qv"
    assert not eva01_g["rope"] and not eva01_g["attn_inner_norm"] and not eva01_g["pre_norm"]
    assert eva01_g["patch_bias"] and eva01_g["proj_bias"] and eva01_g["layer_norm_eps"] == 1e-6
    eva02_b = export.jax_model_kwargs(OPEN_CLIP_MODEL_CONFIGS["EVA02-B-16"])["image_encoder"]
    # Patch 16 at 224 px: a 14 x 14 grid whose RoPE positions scale to timm's 16 x 16 reference.
    assert eva02_b["patch_size"] == 16 and eva02_b["rope_ref_grid"] == 16
    openai_l = export.jax_model_kwargs(OPEN_CLIP_MODEL_CONFIGS["ViT-L-14-quickgelu"])
    assert openai_l["image_encoder"]["activation"] == "quick_gelu"
    assert openai_l["text_encoder"]["activation"] == "quick_gelu"


@pytest.mark.parametrize(
    ("name", "keys", "parameters"),
    [
        # Counts of open_clip's own models (the torch test compares every key and shape).
        ("EVA01-g-14", 678, 1_136_435_841),
        ("EVA02-L-14", 662, 427_755_457),
        ("EVA02-B-16", 410, 149_691_137),
    ],
)
def test_eva_clip_state_dict_layout(name, keys, parameters):
    shapes = export.open_clip_state_dict_shapes(OPEN_CLIP_MODEL_CONFIGS[name])
    assert len(shapes) == keys
    assert sum(int(np.prod(shape)) for shape in shapes.values()) == parameters
    embed_dim = OPEN_CLIP_MODEL_CONFIGS[name]["embed_dim"]
    assert shapes["visual.trunk.head.bias"] == (embed_dim,)
    assert not any(key.startswith(("visual.head.", "visual.proj")) for key in shapes)
    assert "text.text_projection" in shapes and "text_projection" not in shapes
    if name == "EVA01-g-14":  # timm's fused layout: q/v biases beside one qkv matrix
        assert shapes["visual.trunk.blocks.0.attn.qkv.weight"] == (3 * 1408, 1408)
        assert "visual.trunk.blocks.0.attn.q_bias" in shapes
    else:
        assert "visual.trunk.blocks.0.attn.k_proj.bias" not in shapes
        assert "visual.trunk.blocks.0.attn.norm.weight" in shapes


def test_eva_vit_exports_with_the_registered_trunk_name():
    text = {"width": 768, "depth": 12, "num_heads": 12, "context_length": 77, "output_dim": 768}
    text["vocab_size"] = 49408
    vit = VisionTransformer.from_variant("eva02_large/14", output_dim=768, proj_bias=True)
    config = export.open_clip_model_config(vit, text, image_size=224)
    assert config["vision_cfg"] == OPEN_CLIP_MODEL_CONFIGS["EVA02-L-14"]["vision_cfg"]
    assert config["custom_text"] is True and config["quick_gelu"] is False
    assert (
        export.jax_model_kwargs(config)["text_encoder"]
        == export.jax_model_kwargs(OPEN_CLIP_MODEL_CONFIGS["EVA02-L-14"])["text_encoder"]
    )
    eva01 = export.jax_model_kwargs(OPEN_CLIP_MODEL_CONFIGS["EVA01-g-14"])["image_encoder"]
    config = export.open_clip_model_config(eva01, {**text, "output_dim": 1024}, image_size=224)
    assert config["vision_cfg"]["timm_model_name"] == "eva_giant_patch14_224"
    # UTA's student drops the attention's inner LN: no registered trunk has that architecture.
    student = VisionTransformer.from_variant("uta_large/16", output_dim=768)
    with pytest.raises(ValueError, match="attn_inner_norm"):
        export.open_clip_model_config(student, text, image_size=224)


def test_unsupported_trunks_are_rejected_by_name():
    config = json.loads(json.dumps(OPEN_CLIP_MODEL_CONFIGS["EVA02-L-14"]))
    for name, message in [
        ("vit_large_patch14_clip_224", "not a timm EVA trunk"),
        ("eva02_enormous_patch14_clip_224", "use_post_norm"),
        ("hf-hub:timm/eva02_large_patch14_clip_224", "local-dir"),
    ]:
        config["vision_cfg"]["timm_model_name"] = name
        with pytest.raises(ValueError, match=message):
            export.jax_model_kwargs(config)
    config["vision_cfg"].update(timm_model_name="eva02_large_patch14_clip_224", timm_pool="")
    with pytest.raises(ValueError, match="timm_pool"):
        export.jax_model_kwargs(config)
    config["vision_cfg"].update(timm_pool="token", image_size=336)
    with pytest.raises(ValueError, match="img_size"):
        export.jax_model_kwargs(config)


def test_fused_and_separate_qkv_layouts_convert_both_ways():
    rng = np.random.default_rng(0)
    separate = {
        "blocks.0.attn.q_proj.weight": rng.standard_normal((6, 6)),
        "blocks.0.attn.k_proj.weight": rng.standard_normal((6, 6)),
        "blocks.0.attn.v_proj.weight": rng.standard_normal((6, 6)),
        "blocks.0.attn.q_proj.bias": rng.standard_normal(6),
        "blocks.0.attn.v_proj.bias": rng.standard_normal(6),
        "norm.weight": rng.standard_normal(6),
    }
    fused = timm_eva.fuse_qkv(separate)
    assert sorted(fused) == [
        "blocks.0.attn.q_bias",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.v_bias",
        "norm.weight",
    ]
    np.testing.assert_array_equal(
        fused["blocks.0.attn.qkv.weight"][6:12], separate["blocks.0.attn.k_proj.weight"]
    )
    back = timm_eva.split_qkv(fused)
    assert back.keys() == separate.keys()
    for key, value in separate.items():
        np.testing.assert_array_equal(back[key], value)


# --------------------------------------------------------------------------------------------------
# Small EVA-CLIP models: round trips and the projection bias
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "timm_proj"),
    [(EVA02_LIKE, None), (EVA01_LIKE, "linear")],
    ids=["eva02_trunk_head", "eva01_fused_head_proj"],
)
def test_eva_clip_round_trip_is_exact(tmp_path, spec, timm_proj):
    trunk = write_trunk(tmp_path / "trunk", spec)
    config, model = eva_clip(spec, trunk, timm_proj=timm_proj)
    params = random_params(model, spec_for(model, spec["image_size"]), seed=1)
    state = export.to_open_clip_state_dict(params, model_config=config)
    if timm_proj == "linear":
        assert "visual.head.proj.bias" in state and "visual.trunk.head.weight" not in state
    else:
        np.testing.assert_array_equal(
            state["visual.trunk.head.bias"], params["image_encoder"]["proj_bias"]
        )
    if spec["qkv_fused"]:
        assert "visual.trunk.blocks.1.attn.qkv.weight" in state
    assert "text.token_embedding.weight" in state  # custom_text: CustomTextCLIP's layout
    back = export.from_open_clip_state_dict(state, model_config=config)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(original, restored)
    # open_clip converts CLIP-layout text keys for a CustomTextCLIP; so does the import.
    plain_text = {key.removeprefix("text."): value for key, value in state.items()}
    again = export.from_open_clip_state_dict(plain_text, model_config=config)
    for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(original, restored)


def test_projection_bias_is_added_to_pooled_and_token_projections():
    vit = VisionTransformer(**EVA02_LIKE["vit"])
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    params = jax.tree.map(jnp.asarray, random_module_params(vit, images, seed=3))
    pooled, intermediates = vit.apply({"params": params}, images)
    zero_bias = {**params, "proj_bias": jnp.zeros_like(params["proj_bias"])}
    pooled_0, intermediates_0 = vit.apply({"params": zero_bias}, images)
    bias = np.asarray(params["proj_bias"])
    np.testing.assert_allclose(pooled - pooled_0, np.broadcast_to(bias, pooled.shape), atol=1e-6)
    np.testing.assert_allclose(
        intermediates["projected_tokens"] - intermediates_0["projected_tokens"],
        np.broadcast_to(bias, intermediates["projected_tokens"].shape),
        atol=1e-6,
    )
    # Without the option there is no such parameter (existing checkpoints are unchanged).
    plain = VisionTransformer(**{**EVA02_LIKE["vit"], "proj_bias": False})
    shapes = jax.eval_shape(plain.init, jax.random.key(0), images)["params"]
    assert "proj_bias" not in shapes


# --------------------------------------------------------------------------------------------------
# Teacher: named configs and weight files
# --------------------------------------------------------------------------------------------------


def teacher_config(directory: Path | str, name: str = "") -> ConfigDict:
    return ConfigDict(
        {"source": "open_clip", "open_clip_dir": str(directory), "open_clip_model": name}
        | {"dtype": "float32"}
    )


def test_named_teacher_builds_without_weights_or_config():
    teacher = build_teacher(teacher_config("/nonexistent", "EVA02-B-16"))
    assert teacher.embed_dim == 512 and teacher.patch_size == 16 and teacher.image_size == 224
    assert teacher.model.image_encoder.proj_bias and teacher.model.image_encoder.rope
    shapes = teacher.spec()
    assert shapes["image_encoder"]["proj_bias"].shape == (512,)
    with pytest.raises(FileNotFoundError, match="open_clip_model"):
        build_teacher(teacher_config("/nonexistent"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        build_teacher(teacher_config("/nonexistent", "EVA02-X-99"))


def test_teacher_finds_weights_as_open_clip_and_the_hub_name_them(tmp_path):
    spec = EVA02_LIKE
    trunk = write_trunk(tmp_path / "trunk", spec)
    config, model = eva_clip(spec, trunk)
    params = random_params(model, spec_for(model, spec["image_size"]), seed=2)
    directory = export.save_open_clip(tmp_path / "teacher", params, config)
    weights = directory / export.WEIGHTS_FILE_NAME
    # A single safetensors file under any name, without open_clip_config.json but with the config
    # given (here through load_open_clip; a teacher names it with open_clip_model).
    renamed = weights.rename(directory / "eva02_small.safetensors")
    (directory / export.CONFIG_FILE_NAME).rename(tmp_path / "config.json")
    assert export.find_open_clip_weights(directory) == renamed
    with pytest.raises(FileNotFoundError, match="open_clip_model"):
        export.load_open_clip(directory)
    _, loaded = export.load_open_clip(directory, config)
    for original, restored in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(original, restored)
    # open_clip's own name wins over other files; several unnamed files are ambiguous.
    (directory / "other.safetensors").write_bytes(renamed.read_bytes())
    with pytest.raises(FileNotFoundError, match="several weight files"):
        export.find_open_clip_weights(directory)
    bin_path = directory / "open_clip_pytorch_model.bin"
    bin_path.write_bytes(b"not read here")
    assert export.find_open_clip_weights(directory) == bin_path
    # The JAX environment has no torch: .bin/.pt say how to convert them.
    if not _torch_importable():
        with pytest.raises(ImportError, match="safetensors"):
            export.load_open_clip_weights(bin_path)
    (directory / export.WEIGHTS_FILE_NAME).write_bytes(renamed.read_bytes())
    assert export.find_open_clip_weights(directory).name == export.WEIGHTS_FILE_NAME


def _torch_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


# --------------------------------------------------------------------------------------------------
# Parity with open_clip and timm in the torch environment
# --------------------------------------------------------------------------------------------------


@pytest.mark.torch
def test_named_configs_and_trunks_match_open_clip_and_timm(tmp_path):
    require_torch_env()
    names = ["EVA01-g-14", "EVA02-L-14", "EVA02-B-16", "ViT-L-14-quickgelu", "ViT-B-16"]
    run_torch_script("check_open_clip.py", "describe", tmp_path / "models.json", *names)
    described = json.loads((tmp_path / "models.json").read_text())
    for name in names:
        assert described[name]["model_cfg"] == OPEN_CLIP_MODEL_CONFIGS[name], name
        ours = export.open_clip_state_dict_shapes(OPEN_CLIP_MODEL_CONFIGS[name])
        theirs = {key: tuple(shape) for key, shape in described[name]["shapes"].items()}
        assert ours == theirs, name
        assert described[name]["model_class"] == (
            "CustomTextCLIP" if name.startswith("EVA") else "CLIP"
        )

    trunks = list(timm_trunks.TIMM_EVA_TRUNKS)
    run_torch_script("check_open_clip.py", "describe-trunks", tmp_path / "trunks.json", *trunks)
    described = json.loads((tmp_path / "trunks.json").read_text())
    checked = 0
    for name in trunks:
        # As open_clip builds a trunk with timm_pool "token" and no extra projection.
        args = {**timm_trunks.trunk_model_args(name), "num_classes": 0, "global_pool": "token"}
        try:
            vit = timm_eva.vit_kwargs_from_timm(args)
        except ValueError as error:
            # SwiGLU without its hidden LN (eva02 tiny/small) and post-norm blocks (EVA02-E).
            assert "scale_mlp" in str(error) or "use_post_norm" in str(error), name
            continue
        timm_side = described[name]
        ours = timm_trunks.trunk_state_dict_shapes(args)
        assert ours == {key: tuple(shape) for key, shape in timm_side["shapes"].items()}, name
        assert list(vit["image_size"]) == timm_side["img_size"], name
        assert vit["rope"] == timm_side["rope"], name
        if vit["rope"]:
            assert [vit["rope_ref_grid"]] * 2 == timm_side["rope_ref_feat_shape"], name
        assert timm_side["final_norm"] and not timm_side["fc_norm"], name
        assert timm_side["norm_eps"] == vit["layer_norm_eps"], name
        checked += 1
    assert checked == 7


@pytest.mark.torch
@pytest.mark.parametrize(
    ("spec", "timm_proj", "quick_gelu"),
    [
        pytest.param(EVA02_LIKE, None, False, id="eva02_trunk_head"),
        pytest.param(EVA01_LIKE, "linear", True, id="eva01_fused_head_proj_quick_gelu_text"),
    ],
)
def test_open_clip_eva_weights_import_through_the_teacher(tmp_path, spec, timm_proj, quick_gelu):
    require_torch_env()
    started = time.perf_counter()
    trunk = write_trunk(tmp_path / "trunk", spec)
    config, _ = eva_clip(spec, trunk, quick_gelu=quick_gelu, timm_proj=timm_proj)
    (tmp_path / "model.json").write_text(json.dumps(config))
    size = spec["image_size"]
    inputs = random_inputs(2, (size, size), TEXT["context_length"], seed=8)
    arguments = ("check_open_clip.py", "make-reference", tmp_path, tmp_path / "model.json")
    report, theirs = run_parity_case(tmp_path, *arguments, inputs=inputs)
    assert report["model_class"] == "CustomTextCLIP"

    teacher = build_teacher(teacher_config(tmp_path / "reference"))
    params = teacher.load()
    assert params["image_encoder"]["proj_bias"].shape == (config["embed_dim"],)
    ours = jax_outputs(teacher.model, params, inputs)
    summary = assert_embeddings_close(ours, theirs, "open_clip EVA vs teacher import")
    # UTA's targets: every token after the final LN and the (biased) projection.
    _, intermediates = jax.jit(
        lambda p, x: teacher.model.apply({"params": p}, x, method=teacher.model.encode_image)
    )(params, inputs["images"])
    projected = np.asarray(intermediates["projected_tokens"])
    scale = max(1.0, float(np.abs(theirs["projected_tokens"]).max()))
    difference = float(np.abs(projected - theirs["projected_tokens"]).max())
    assert difference < TOLERANCE * scale, difference
    # The bias matters: without it the tokens would differ (so the test can fail).
    bias = np.asarray(params["image_encoder"]["proj_bias"])
    assert np.abs(bias).max() > 10 * TOLERANCE * scale
    elapsed = time.perf_counter() - started
    summary += f", projected_tokens max |diff| {difference:.1e}"
    print(f"EVA import parity {spec['qkv_fused']=}: {summary}; {elapsed:.1f} s")


@pytest.mark.torch
def test_open_clip_loads_an_exported_eva_clip(tmp_path):
    require_torch_env()
    spec = EVA02_LIKE
    trunk = write_trunk(tmp_path / "trunk", spec)
    config, model = eva_clip(spec, trunk)
    params = random_params(model, spec_for(model, spec["image_size"]), seed=4)
    size = spec["image_size"]
    inputs = random_inputs(3, (size, size), TEXT["context_length"], seed=5)
    export.save_open_clip(tmp_path / "export", params, config, "tiny-eva-clip")
    arguments = ("check_open_clip.py", "load-export", tmp_path, "tiny-eva-clip")
    report, theirs = run_parity_case(tmp_path, *arguments, inputs=inputs)
    assert report["model_class"] == "CustomTextCLIP"
    assert report["exported_keys"] == report["model_keys"]
    assert report["named_model_matches"]
    assert_embeddings_close(jax_outputs(model, params, inputs), theirs, "JAX EVA-CLIP vs open_clip")
