"""Export of the MobileCLIP MCi tower to timm's fastvit_mci* layout (BatchNorm buffers included)
and the import back.

Without torch: exact round trips (train-time and re-parameterised towers), keys and shapes of
MCi0 as timm names them, model arguments and architecture names, rejected options, the export
directory. With the torch environment (``-m torch``): timm builds each export from
``config.json`` (by name + model_args, and through ``local-dir:``), loads it with strict=True
(key sets equal), and in eval mode its forward_features / pooled features / embedding / stage
maps match the JAX tower to 1e-4 in float32 with random weights and random BatchNorm statistics;
timm's own re-parameterisation matches ours (weights and outputs); timm-initialised weights
import into JAX and match; timm's parameter counts equal the JAX ones.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
from test_mobileclip import (
    IMAGE_SIZE,
    SMALL,
    count,
    evaluate,
    random_images,
    random_variables,
    variable_shapes,
)
from torch_env import assert_outputs_close, require_torch_env, run_torch_script
from torch_side.parity_files import read_inputs, read_results, write_inputs

from models.mobileclip import MobileClipImageTower
from models.mobileclip_reparam import reparameterize
from pretrain.export import fastvit_layout
from pretrain.export import timm_fastvit as export
from pretrain.export.tree_io import flatten

TOLERANCE = 1e-4
OUTPUT_NAMES = ("features", "pre_logits", "embedding", "stage_0", "stage_1", "stage_2", "stage_3")

CASES = {
    "mci0": MobileClipImageTower.from_variant("mci0", output_dim=512),
    "small_no_head": MobileClipImageTower(**SMALL, output_dim=None),
}


def assert_trees_equal(expected, actual) -> None:
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    for original, restored in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
        assert np.shape(original) == np.shape(restored)
        np.testing.assert_array_equal(original, restored)


def jax_outputs(tower: MobileClipImageTower, variables, images) -> dict[str, np.ndarray]:
    embedding, intermediates = evaluate(tower, variables, images)
    outputs = {"embedding": embedding, "features": intermediates["final_features"]}
    outputs.update({name: intermediates[name] for name in OUTPUT_NAMES if name in intermediates})
    return {name: np.asarray(value) for name, value in outputs.items()}


def bn_count(tower: MobileClipImageTower) -> int:
    return len(jax.tree.leaves(variable_shapes(tower)["batch_stats"])) // 2


# --------------------------------------------------------------------------------------------------
# Without torch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reparameterized", [False, True])
def test_round_trip_is_exact(reparameterized):
    tower = MobileClipImageTower(**SMALL, output_dim=24)
    variables = random_variables(tower, seed=0)
    if reparameterized:
        variables, tower = reparameterize(variables, tower)
    state = export.to_timm_state_dict(variables, tower, num_batches_tracked=17)
    assert_trees_equal(variables, export.from_timm_state_dict(state, tower))
    counters = {key: value for key, value in state.items() if key.endswith("num_batches_tracked")}
    assert len(counters) == bn_count(tower)
    assert all(
        value.dtype == np.int64 and value.shape == () and value == 17 for value in counters.values()
    )
    weights = [
        value
        for key, value in state.items()
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    assert sum(value.size for value in weights) == count(variables["params"])
    assert any("reparam_conv" in key for key in state) == reparameterized


@pytest.mark.parametrize("reparameterized", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_layout_from_fields_holds_the_towers_variables(name, reparameterized):
    """The layout computed from the tower's fields names exactly the variables Flax creates."""
    tower = CASES[name].clone(reparameterized=reparameterized)
    fields = fastvit_layout.mci_fields(tower)
    layout = fastvit_layout.jax_variable_shapes(
        fastvit_layout.fastvit_leaves(fields), fields["head_dim"]
    )
    flax = {key: tuple(leaf.shape) for key, leaf in flatten(variable_shapes(tower)).items()}
    assert layout == flax


def test_mci0_keys_and_shapes_are_timms():
    """Keys and shapes of timm's fastvit_mci0 (read off timm 1.0's state dict), from shapes only."""
    tower = CASES["mci0"]
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), variable_shapes(tower))
    state = export.to_timm_state_dict(zeros, tower)
    expected = {
        "stem.0.conv_kxk.0.conv.weight": (64, 3, 3, 3),
        "stem.0.conv_scale.conv.weight": (64, 3, 1, 1),
        "stem.1.conv_kxk.0.conv.weight": (64, 1, 3, 3),
        "stem.2.identity.running_var": (64,),
        "stem.2.conv_kxk.0.conv.weight": (64, 64, 1, 1),
        "stages.0.blocks.1.token_mixer.norm.identity.weight": (64,),
        "stages.0.blocks.0.token_mixer.mixer.conv_scale.conv.weight": (64, 1, 1, 1),
        "stages.0.blocks.0.token_mixer.layer_scale.gamma": (64, 1, 1),
        "stages.0.blocks.0.mlp.conv.conv.weight": (64, 1, 7, 7),
        "stages.0.blocks.0.mlp.fc1.weight": (192, 64, 1, 1),
        "stages.0.blocks.0.layer_scale.gamma": (64, 1, 1),
        "stages.1.downsample.proj.0.large_conv.conv.weight": (128, 1, 7, 7),
        "stages.2.downsample.proj.0.se.fc1.weight": (64, 256, 1, 1),
        "stages.3.downsample.proj.0.small_conv.bn.running_mean": (512,),
        "stages.3.downsample.proj.0.se.fc2.weight": (512, 128, 1, 1),
        "stages.3.downsample.proj.1.identity.num_batches_tracked": (),
        "stages.3.pos_emb.pos_enc.weight": (512, 1, 7, 7),
        "stages.3.blocks.1.norm.running_var": (512,),
        "stages.3.blocks.1.token_mixer.qkv.weight": (1536, 512),
        "stages.3.blocks.1.token_mixer.proj.bias": (512,),
        "stages.3.blocks.1.layer_scale_2.gamma": (512, 1, 1),
        "final_conv.se.fc1.weight": (64, 1024, 1, 1),
        "final_conv.conv_kxk.0.conv.weight": (1024, 1, 3, 3),
        "final_conv.conv_scale.bn.weight": (1024,),
        "head.fc.weight": (512, 1024),
        "head.fc.bias": (512,),
    }
    for key, shape in expected.items():
        assert state[key].shape == shape, key
    assert "stages.1.downsample.proj.0.se.fc1.weight" not in state  # SE in stages 2-3 only
    assert "stem.1.identity.weight" not in state  # stride 2: no identity branch
    assert "stages.3.blocks.0.token_mixer.qkv.bias" not in state
    assert len([k for k in state if k.endswith("num_batches_tracked")]) == bn_count(tower)
    # timm's fastvit_mci0 with a 512-d head has 11,406,976 parameters; buffers are not counted.
    weights = [v.size for k, v in state.items() if not k.endswith(("_mean", "_var", "_tracked"))]
    assert sum(weights) == count(variable_shapes(tower)["params"])


def test_model_args_and_architecture():
    tower = CASES["mci0"]
    args = export.timm_model_args(tower)
    assert args == {
        "layers": [2, 6, 10, 2],
        "embed_dims": [64, 128, 256, 512],
        "se_downsamples": [False, False, True, True],
        "token_mixers": ["repmixer", "repmixer", "repmixer", "attention"],
        "cls_ratio": 2.0,
        "mlp_ratios": [3.0, 3.0, 3.0, 3.0],
        "lkc_use_act": True,
        "num_classes": 512,
        "global_pool": "avg",
    }
    assert export.timm_architecture(tower) == "fastvit_mci0"
    assert export.timm_architecture(MobileClipImageTower.from_variant("mci2")) == "fastvit_mci2"
    assert export.timm_architecture(MobileClipImageTower(**SMALL)) == "fastvit_mci0"
    small = MobileClipImageTower(**SMALL, output_dim=None, reparameterized=True)
    small_args = export.timm_model_args(small)
    assert small_args["num_classes"] == 0 and small_args["inference_mode"] is True
    assert export.tower_from_timm_args(json.loads(json.dumps(small_args))) == small
    assert export.tower_from_timm_args(args) == tower


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"head_dim": 16}, "head_dim"),
        ({"bn_epsilon": 1e-3}, "bn_epsilon"),
        ({"pos_embs": (False, False, True, True)}, "pos_embs"),
        (
            {
                "depths": (1, 1, 1),
                "widths": (16, 32, 64),
                "token_mixers": ("repmixer",) * 2 + ("attention",),
                "pos_embs": (False,) * 3,
                "se_downsamples": (False,) * 3,
            },
            "depths",
        ),
    ],
)
def test_options_timm_lacks_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        export.timm_model_args(MobileClipImageTower(**{**SMALL, **fields}))


def test_mismatched_variables_are_rejected():
    tower = MobileClipImageTower(**SMALL, output_dim=24)
    variables = random_variables(tower, seed=1)
    with pytest.raises(ValueError, match="batch_stats"):
        export.to_timm_state_dict({"params": variables["params"]}, tower)
    with pytest.raises(ValueError, match="do not fit"):
        export.to_timm_state_dict(variables, tower.clone(output_dim=None))
    state = export.to_timm_state_dict(variables, tower)
    with pytest.raises(KeyError, match=r"head\.fc\.bias"):
        export.from_timm_state_dict({k: v for k, v in state.items() if k != "head.fc.bias"}, tower)
    with pytest.raises(ValueError, match="no mapping"):
        export.from_timm_state_dict({**state, "extra.weight": np.zeros(1)}, tower)


def test_export_directory_round_trip(tmp_path):
    tower = MobileClipImageTower(**SMALL, output_dim=24)
    variables = random_variables(tower, seed=2)
    directory = export.save_timm_fastvit(
        tmp_path / "export", variables, tower, image_size=IMAGE_SIZE, num_batches_tracked=5
    )
    config = json.loads((directory / "config.json").read_text())
    assert config["architecture"] == "fastvit_mci0"
    assert config["model_args"] == export.timm_model_args(tower)
    assert config["num_features"] == 256 and config["num_classes"] == 24
    assert config["pretrained_cfg"]["classifier"] == "head.fc"
    assert config["pretrained_cfg"]["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    stored = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    assert stored["stem.0.conv_kxk.0.bn.num_batches_tracked"].dtype == np.int64
    loaded, loaded_tower = export.load_timm_fastvit(directory)
    assert loaded_tower == tower
    assert_trees_equal(variables, loaded)
    with pytest.raises(ValueError, match="another tower"):
        export.load_timm_fastvit(directory, tower.clone(output_dim=None))
    with pytest.raises(ValueError, match="train-time"):
        export.save_timm_fastvit(
            tmp_path / "inference", *reparameterize(variables, tower), image_size=IMAGE_SIZE
        )


# --------------------------------------------------------------------------------------------------
# Parity with timm in the torch environment
# --------------------------------------------------------------------------------------------------


def assert_tower_outputs_close(ours: dict, theirs, what: str, prefix: str = "") -> str:
    """Every output the JAX tower has (stages, features, pooled, embedding) against timm's
    ``prefix + name``."""
    theirs = {
        name.removeprefix(prefix): value
        for name, value in theirs.items()
        if name.startswith(prefix)
    }
    names = [name for name in OUTPUT_NAMES if name in ours]
    return assert_outputs_close(ours, theirs, names, tolerance=TOLERANCE, what=what)


IMPORT_TOWER = MobileClipImageTower(**SMALL, output_dim=24)
NUM_BATCHES_TRACKED = 3


@pytest.fixture(scope="module")
def torch_results(tmp_path_factory):
    """Everything timm has to say, from one torch process (torch and timm import once): each
    case exported and run through timm, a timm-initialised reference for the import, and timm's
    parameter counts."""
    require_torch_env()
    root = tmp_path_factory.mktemp("timm_fastvit")
    cases = {}
    for index, (name, tower) in enumerate(CASES.items()):
        variables = random_variables(tower, seed=20 + index)
        images = random_images(2, seed=30 + index)
        case_dir = root / name
        export.save_timm_fastvit(
            case_dir / "export",
            variables,
            tower,
            image_size=IMAGE_SIZE,
            num_batches_tracked=NUM_BATCHES_TRACKED,
        )
        write_inputs(case_dir, {"images": images})
        inference_variables, inference_tower = reparameterize(variables, tower)
        cases[name] = {
            "dir": case_dir,
            "ours": jax_outputs(tower, variables, images),
            "ours_reparam": jax_outputs(inference_tower, inference_variables, images),
            "reparam_state": export.to_timm_state_dict(
                inference_variables, inference_tower, num_batches_tracked=NUM_BATCHES_TRACKED
            ),
            "params": count(variables["params"]),
            "reparam_params": count(inference_variables["params"]),
        }
    import_dir = root / "import"
    import_dir.mkdir()
    spec = {
        "architecture": export.timm_architecture(IMPORT_TOWER),
        "model_args": export.timm_model_args(IMPORT_TOWER),
    }
    (import_dir / "spec.json").write_text(json.dumps(spec))
    write_inputs(import_dir, {"images": random_images(2, seed=40)})
    run_torch_script(
        "check_timm_fastvit.py",
        "load-export",
        *(case["dir"] for case in cases.values()),
        "--",
        "make-reference",
        import_dir,
        "--",
        "count",
        root / "counts.json",
    )
    counts = json.loads((root / "counts.json").read_text())
    return {"cases": cases, "import_dir": import_dir, "counts": counts}


@pytest.mark.torch
@pytest.mark.parametrize("name", list(CASES))
def test_timm_loads_the_export_and_matches(torch_results, name):
    case = torch_results["cases"][name]
    report, theirs = read_results(case["dir"])
    assert report["model_class"] == "FastVit"
    assert report["exported_keys"] == report["model_keys"]
    assert report["num_parameters"] == case["params"]
    assert report["local_dir_matches"] and report["local_dir_max_diff"] == 0
    assert report["batch_norm_eps"] == [1e-5] and report["batch_norm_momentum"] == [0.1]
    assert report["counter_dtypes"] == ["torch.int64"]
    assert report["counter_values"] == [NUM_BATCHES_TRACKED]
    summary = assert_tower_outputs_close(case["ours"], theirs, f"timm fastvit export {name}")
    print(f"timm fastvit export parity {name}: {summary}")


@pytest.mark.torch
@pytest.mark.parametrize("name", list(CASES))
def test_timm_reparameterization_matches_ours(torch_results, name):
    """timm's reparameterize_model of the loaded export equals our reparameterize(): same keys
    (timm's inference layout), same folded weights, same outputs."""
    case = torch_results["cases"][name]
    report, theirs = read_results(case["dir"])
    assert report["reparam_num_parameters"] == case["reparam_params"]
    theirs_state = safetensors.numpy.load_file(str(case["dir"] / "reparam_state.safetensors"))
    ours_state = case["reparam_state"]
    assert sorted(ours_state) == sorted(theirs_state)
    worst = 0.0
    for key, value in ours_state.items():
        scale = max(1.0, float(np.abs(theirs_state[key]).max()))
        difference = float(np.abs(value - theirs_state[key]).max())
        assert difference <= 1e-5 * scale, (key, difference)
        worst = max(worst, difference)
    what = f"timm fastvit reparameterized {name}"
    summary = assert_tower_outputs_close(case["ours_reparam"], theirs, what, prefix="reparam_")
    print(f"timm fastvit reparameterized parity {name}: weights {worst:.1e}, outputs {summary}")


@pytest.mark.torch
def test_timm_weights_import_into_jax_and_match(torch_results):
    import_dir = torch_results["import_dir"]
    variables, loaded_tower = export.load_timm_fastvit(import_dir / "reference")
    assert loaded_tower == IMPORT_TOWER
    images = read_inputs(import_dir)["images"]
    _, theirs = read_results(import_dir)
    ours = jax_outputs(IMPORT_TOWER, variables, images)
    summary = assert_tower_outputs_close(ours, theirs, "timm fastvit import")
    print(f"timm fastvit import parity: {summary}")


@pytest.mark.torch
def test_parameter_counts_are_timms(torch_results):
    counts = torch_results["counts"]
    for variant in ("mci0", "mci1", "mci2"):
        for form, reparameterized in (("train", False), ("inference", True)):
            tower = MobileClipImageTower.from_variant(
                variant, output_dim=512, reparameterized=reparameterized
            )
            ours = count(variable_shapes(tower)["params"])
            assert ours == counts[f"fastvit_{variant}"][form], (variant, form)
    print(f"timm fastvit parameter counts: {counts}")
