"""Export of CLIP models with a MobileCLIP (MCi) image tower to open_clip's MobileCLIP-S1 / -S2
layout (a timm ``fastvit_mci*`` trunk under ``visual.trunk``, the text tower under ``text.``),
and back.

Without torch: open_clip's MobileCLIP-S1/S2 (and MobileCLIP2-S0, the MCi0 layout) configs, key
and parameter counts, exact round trips of parameters and BatchNorm running statistics, refusals,
the export directory and the CLIP task's export. With the torch environment (``-m torch``): the
keys and shapes equal those of open_clip's own ``MobileCLIP-S1``, ``-S2`` and ``MobileCLIP2-S0``
(built on the meta device); open_clip loads an MCi1 export with strict=True,
both from the export directory and into ``create_model("MobileCLIP-S1")``, and gives the same
image and text features as JAX in eval mode (random weights and BatchNorm statistics, 256 px);
slow: the same for MCi2, and open_clip's MobileCLIP-S1 weights imported into JAX.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from random_params import random_variables as random_module_variables
from test_export_open_clip import OPEN_CLIP_TEXT_CFG, random_inputs
from test_export_open_clip_resnet import assert_embeddings_close, structured_images
from torch_env import require_torch_env, run_parity_case, run_torch_script

from configs import clip_mci0
from models.mobileclip import MobileClipImageTower
from models.text import TextTransformer
from models.two_tower import TwoTowerModel
from pretrain import sharding
from pretrain.export import open_clip as export
from pretrain.tasks.clip import Task

IMAGE_SIZE = 256  # open_clip's MobileCLIP configs
# open_clip's models of each MCi variant and this text tower (open_clip 3.3.0 has no timm-based
# "MobileCLIP-S0"; MobileCLIP2-S0 has the same layout with fastvit_mci0).
MODEL_NAMES = {"mci0": "MobileCLIP2-S0", "mci1": "MobileCLIP-S1", "mci2": "MobileCLIP-S2"}
# open_clip.create_model(MODEL_NAMES[variant]) (open_clip 3.3.0, timm 1.0.31, torch env):
# state-dict keys and parameters (BatchNorm buffers not counted).
OPEN_CLIP_KEYS = {"mci0": 934, "mci1": 1586, "mci2": 1722}
OPEN_CLIP_PARAMETERS = {"mci0": 74_835_073, "mci1": 84_969_729, "mci2": 99_243_329}
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
# A small text tower for the tests that need no full model.
SMALL_TEXT = {"width": 32, "depth": 1, "num_heads": 2, "context_length": 12, "output_dim": 512}


def open_clip_mobileclip_config(variant: str) -> dict:
    """open_clip's model_configs/MobileCLIP-S1.json (mci1), -S2.json (mci2) and
    MobileCLIP2-S0.json (mci0), as read there."""
    return {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": f"fastvit_{variant}",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": None,
            "timm_drop": 0.0,
            "timm_drop_path": 0.0,
            "image_size": 256,
        },
        "text_cfg": {**OPEN_CLIP_TEXT_CFG, "no_causal_mask": True},
        "custom_text": True,
    }


def build_model(variant: str, text: dict | None = None) -> TwoTowerModel:
    """MobileCLIP's towers: MCi with a 512-d projection, the non-causal 512-wide text tower."""
    return TwoTowerModel(
        MobileClipImageTower.from_variant(variant, output_dim=512),
        TextTransformer(**(text or {"causal": False})),
    )


def config_for(model: TwoTowerModel, image_size: int = IMAGE_SIZE) -> dict:
    return export.open_clip_model_config(
        model.image_encoder, model.text_encoder, image_size=image_size
    )


def random_variables(model: TwoTowerModel, seed: int, image_size: int = IMAGE_SIZE) -> dict:
    images = jnp.zeros((1, image_size, image_size, 3))
    tokens = jnp.zeros((1, model.text_encoder.context_length), jnp.int32)
    return random_module_variables(model, images, tokens, seed=seed)


def make_inputs(batch: int, seed: int) -> dict:
    inputs = random_inputs(batch, (IMAGE_SIZE, IMAGE_SIZE), 77, seed)
    inputs["images"] = structured_images(batch, IMAGE_SIZE, seed)
    return inputs


_ENCODERS: dict[str, tuple] = {}


def jax_outputs(variant: str, variables: dict, inputs: dict) -> dict[str, np.ndarray]:
    """Normalised embeddings in eval mode (running statistics); compiled once per variant."""
    if variant not in _ENCODERS:
        model = build_model(variant)
        _ENCODERS[variant] = (
            jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image)[0]),
            jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text)[0]),
        )
    encode_image, encode_text = _ENCODERS[variant]
    return {
        "image_embeds": np.asarray(encode_image(variables, inputs["images"])),
        "text_embeds": np.asarray(encode_text(variables, inputs["tokens"])),
    }


def assert_trees_equal(expected, actual) -> None:
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    for original, restored in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        assert np.shape(original) == np.shape(restored)
        np.testing.assert_array_equal(original, restored)


# --------------------------------------------------------------------------------------------------
# Without torch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(MODEL_NAMES))
def test_config_keys_and_parameter_counts_are_open_clips(variant):
    model = build_model(variant)
    config = config_for(model)
    reference = open_clip_mobileclip_config(variant)
    # The exporter also states open_clip's defaults for these two fields.
    assert config == {
        **reference,
        "quick_gelu": False,
        "text_cfg": {**reference["text_cfg"], "mlp_ratio": 4.0},
    }
    kwargs = export.jax_model_kwargs(config)
    assert MobileClipImageTower(**kwargs["image_encoder"]) == model.image_encoder
    assert TextTransformer(**kwargs["text_encoder"]) == model.text_encoder.clone(mlp_dim=2048)
    assert kwargs["image_size"] == (IMAGE_SIZE, IMAGE_SIZE)
    shapes = export.open_clip_state_dict_shapes(config)
    assert len(shapes) == OPEN_CLIP_KEYS[variant]
    parameters = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(BUFFER_SUFFIXES))
    assert parameters == OPEN_CLIP_PARAMETERS[variant]
    assert shapes["visual.trunk.head.fc.weight"] == (512, model.image_encoder.width)
    assert shapes["visual.trunk.head.fc.bias"] == (512,)
    assert shapes["text.text_projection"] == (512, 512)
    assert not any(key.startswith("visual.head") for key in shapes)  # timm_proj null


def test_round_trip_of_params_and_running_statistics_is_exact():
    model = build_model("mci0", SMALL_TEXT)
    variables = random_variables(model, seed=0, image_size=64)
    config = config_for(model, image_size=64)
    assert config["vision_cfg"]["timm_model_name"] == "fastvit_mci0"
    state = export.to_open_clip_state_dict(variables, model_config=config)
    # Every key the config's layout has, written independently of the mapping (checked inside).
    assert state.keys() == export.open_clip_state_dict_shapes(config).keys()
    counters = [key for key in state if key.endswith("num_batches_tracked")]
    assert len(counters) == len(jax.tree.leaves(variables["batch_stats"])) // 2
    assert all(state[key].dtype == np.int64 and state[key].shape == () for key in counters)
    np.testing.assert_array_equal(
        state["visual.trunk.head.fc.weight"],
        variables["params"]["image_encoder"]["head"]["kernel"].T,
    )
    np.testing.assert_array_equal(
        state["visual.trunk.stem.0.conv_kxk.0.bn.running_var"],
        variables["batch_stats"]["image_encoder"]["stem_0"]["conv_kxk_0"]["bn"]["var"],
    )
    assert_trees_equal(variables, export.from_open_clip_variables(state, model_config=config))
    # Converted checkpoints without BatchNorm's counters import the same.
    no_counters = {k: v for k, v in state.items() if k not in counters}
    assert_trees_equal(variables, export.from_open_clip_variables(no_counters, model_config=config))
    with pytest.raises(ValueError, match="from_open_clip_variables"):
        export.from_open_clip_state_dict(state, model_config=config)


def test_towers_open_clip_cannot_build_are_refused():
    text = TextTransformer(**SMALL_TEXT)
    shallow = MobileClipImageTower(depths=(1, 1, 2, 1))  # configs/clip_mci*.py's runlocal tower
    with pytest.raises(ValueError, match=r"none of timm's registered.*fastvit_mci0: .*'layers'"):
        export.open_clip_model_config(shallow, text, image_size=64)
    folded = MobileClipImageTower.from_variant("mci0", reparameterized=True)
    with pytest.raises(ValueError, match="inference_mode"):
        export.open_clip_model_config(folded, text, image_size=64)
    mci0 = MobileClipImageTower.from_variant("mci0")
    with pytest.raises(ValueError, match="fastvit_mci0"):
        export.open_clip_model_config(mci0, text, image_size=64, timm_model_name="fastvit_mci1")
    config = export.open_clip_model_config(mci0, text, image_size=64)
    config["vision_cfg"]["timm_proj"] = "linear"  # open_clip would add its own visual.head.proj
    with pytest.raises(ValueError, match="timm_proj='linear'"):
        export.jax_model_kwargs(config)


def test_batch_stats_and_config_are_required():
    model = build_model("mci0", SMALL_TEXT)
    variables = random_variables(model, seed=1, image_size=64)
    config = config_for(model, image_size=64)
    with pytest.raises(ValueError, match="batch_stats"):
        export.to_open_clip_state_dict(variables["params"], model_config=config)
    with pytest.raises(ValueError, match="model_config"):
        export.to_open_clip_state_dict(variables)


def test_tower_without_projection_exports_with_timm_proj_none():
    image = MobileClipImageTower.from_variant("mci0", output_dim=None)
    text = TextTransformer(**{**SMALL_TEXT, "output_dim": image.width})
    config = export.open_clip_model_config(image, text, image_size=256)
    assert config["embed_dim"] == image.width == 1024
    assert config["vision_cfg"]["timm_proj"] == "none"
    assert export.jax_model_kwargs(config)["image_encoder"]["output_dim"] is None
    assert not any("head.fc" in key for key in export.open_clip_state_dict_shapes(config))


def test_save_load_and_check_an_export_directory(tmp_path):
    model = build_model("mci0", SMALL_TEXT)
    variables = random_variables(model, seed=2, image_size=64)
    config = config_for(model, image_size=64)
    directory = export.save_open_clip(
        tmp_path / "export", variables["params"], config, batch_stats=variables["batch_stats"]
    )
    written = json.loads((directory / "open_clip_config.json").read_text())
    assert written["model_cfg"] == json.loads(json.dumps(config))
    loaded_config, loaded = export.load_open_clip_variables(directory)
    assert loaded_config == written["model_cfg"]
    assert_trees_equal(variables, loaded)
    export.main(["check", str(directory)])


def mci_task(image: dict) -> Task:
    config = clip_mci0.get_config()
    config.model.image = ConfigDict(image)
    config.model.text.update({"width": 32, "depth": 1, "num_heads": 2, "context_length": 12})
    return Task(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))


def test_clip_task_exports_its_mobileclip_model(tmp_path):
    image = {"module": "models.mobileclip.MobileClipImageTower", "variant": "mci0"}
    task = mci_task(image)
    variables = random_variables(task.model, seed=3, image_size=64)
    params = {**variables["params"], "range_augment": {"unused": np.zeros(2, np.float32)}}
    directory = task.export(params, str(tmp_path / "export"), model_state=variables["batch_stats"])
    config, loaded = export.load_open_clip_variables(directory)
    assert config["vision_cfg"]["timm_model_name"] == "fastvit_mci0"
    assert config["vision_cfg"]["image_size"] == 256 and config["custom_text"]
    assert_trees_equal(variables, loaded)
    shallow = mci_task({**image, "depths": (1, 1, 2, 1)})
    with pytest.raises(ValueError, match="save_timm_fastvit"):
        shallow.export({}, str(tmp_path / "shallow"), model_state={})


# --------------------------------------------------------------------------------------------------
# With open_clip in the torch environment
# --------------------------------------------------------------------------------------------------


@pytest.mark.torch
def test_layouts_are_open_clips_mobileclip_models(tmp_path):
    require_torch_env()
    run_torch_script(
        "check_open_clip.py", "describe", tmp_path / "models.json", *MODEL_NAMES.values()
    )
    described = json.loads((tmp_path / "models.json").read_text())
    for variant, name in MODEL_NAMES.items():
        theirs = described[name]
        assert theirs["model_class"] == "CustomTextCLIP"
        assert theirs["model_cfg"] == open_clip_mobileclip_config(variant)
        shapes = export.open_clip_state_dict_shapes(config_for(build_model(variant)))
        assert shapes == {key: tuple(shape) for key, shape in theirs["shapes"].items()}


def export_and_compare(tmp_path, variant: str, seed: int) -> str:
    """Export random MobileCLIP weights, load them in open_clip (export directory, and open_clip's
    registered model) with strict=True and compare keys, shapes and features."""
    model = build_model(variant)
    variables = random_variables(model, seed=seed)
    inputs = make_inputs(2, seed=seed + 1)
    export.save_open_clip(tmp_path / "export", variables, config_for(model))
    ours = jax_outputs(variant, variables, inputs)
    name = MODEL_NAMES[variant]
    arguments = ("check_open_clip.py", "load-export", tmp_path, "--registered", name)
    report, theirs = run_parity_case(tmp_path, *arguments, inputs=inputs, timeout=600)
    exported = export.load_open_clip_weights(tmp_path / "export" / "open_clip_model.safetensors")
    assert report["model_class"] == report["registered"]["model_class"] == "CustomTextCLIP"
    assert report["registered"]["model_cfg"] == open_clip_mobileclip_config(variant)
    assert report["exported_keys"] == report["model_keys"] == sorted(exported)
    assert len(exported) == OPEN_CLIP_KEYS[variant]
    assert all(list(exported[key].shape) == shape for key, shape in report["model_shapes"].items())
    assert report["num_parameters"] == OPEN_CLIP_PARAMETERS[variant]
    summary = assert_embeddings_close(ours, theirs, f"JAX vs open_clip {name} (export directory)")
    registered = {
        key.removeprefix("registered_"): value
        for key, value in theirs.items()
        if key.startswith("registered_")
    }
    summary_registered = assert_embeddings_close(ours, registered, f"JAX vs open_clip {name}")
    np.testing.assert_array_equal(theirs["logit_scale"], variables["params"]["logit_scale"])
    return f"{name}: directory {summary}; registered {summary_registered}"


@pytest.mark.torch
@pytest.mark.parametrize(
    ("variant", "seed"),
    [
        pytest.param("mci1", 4, id="MobileCLIP-S1"),
        pytest.param("mci2", 6, id="MobileCLIP-S2", marks=pytest.mark.slow),
    ],
)
def test_open_clip_mobileclip_loads_the_export_and_matches(tmp_path, variant, seed):
    require_torch_env()
    started = time.perf_counter()
    summary = export_and_compare(tmp_path, variant, seed=seed)
    print(f"{summary}; {time.perf_counter() - started:.1f} s")


@pytest.mark.torch
@pytest.mark.slow
def test_open_clip_mobileclip_s1_weights_import_into_jax_and_match(tmp_path):
    require_torch_env()
    started = time.perf_counter()
    inputs = make_inputs(2, seed=8)
    arguments = ("check_open_clip.py", "make-reference", tmp_path, MODEL_NAMES["mci1"])
    _, theirs = run_parity_case(tmp_path, *arguments, inputs=inputs, timeout=600)
    config, variables = export.load_open_clip_variables(tmp_path / "reference")
    kwargs = export.jax_model_kwargs(config)
    assert MobileClipImageTower(**kwargs["image_encoder"]) == build_model("mci1").image_encoder
    # The reference's running statistics are calibrated on the inputs, not the init's 0 and 1.
    running_var = variables["batch_stats"]["image_encoder"]["stages_2"]["blocks_0"]["mlp"]
    running_var = running_var["conv"]["bn"]["var"]
    assert np.abs(running_var - 1).max() > 0.1
    ours = jax_outputs("mci1", variables, inputs)
    summary = assert_embeddings_close(ours, theirs, "open_clip MobileCLIP-S1 vs JAX import")
    print(f"MobileCLIP-S1 import parity: {summary}; {time.perf_counter() - started:.1f} s")
