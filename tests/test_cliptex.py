"""CLIPTeX (paper 003): pseudo-label members, the pseudo-label tool with a JAX expert (round
trip, resume, refusal of another job), the task's heads on every tower family, its loss against
NumPy with per-example masks, a tiny run whose export is a plain CLIP, and (slow) exact resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_cliptex_config
import tiny_dense_config
from compile_recipe import compile_recipe
from ml_collections import ConfigDict
from PIL import Image
from safetensors.numpy import load_file

from pretrain import modes, pseudo_label, trainer
from pretrain.components.pseudo_label_maps import PseudoLabelMaps
from pretrain.data import image_text
from pretrain.data.dense import targets as dense_targets
from pretrain.data.scenes import builder
from pretrain.data.webdataset import write_shards
from pretrain.pseudo_labels.experts import DenseRunExpert
from pretrain.pseudo_labels.members import LabelEncoding, label_members
from pretrain.run import Run

SIZE = 24
REPO = Path(__file__).resolve().parents[1]


def _predictions(rng: np.random.Generator, height: int = SIZE, width: int = SIZE + 8) -> dict:
    segmentation = rng.integers(0, 7, (height, width)).astype(np.int32)
    segmentation[:3] = 255  # unlabelled rows
    depth = rng.uniform(1.0, 40.0, (height, width)).astype(np.float32)
    depth[:, :2] = 0.0  # invalid
    normals = rng.normal(size=(height, width, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[-2:] = 0.0
    return {"segmentation": segmentation, "depth": depth, "normals": normals.astype(np.float32)}


# ----------------------------------------------------------------------------- label members


@pytest.mark.parametrize("exact", [True, False], ids=["npy", "png"])
def test_label_members_round_trip_through_the_dense_reader(exact):
    predictions = _predictions(np.random.default_rng(0))
    storage = LabelEncoding(
        depth_member="depth.npy" if exact else "depth.png",
        normals_member="normals.npy" if exact else "normals.png",
        relative_depth=False,
    )
    members, shares = label_members(predictions, storage)
    assert shares["segmentation"] == pytest.approx(1 - 3 / SIZE)
    assert shares["depth"] == pytest.approx(1 - 2 / (SIZE + 8))
    record = {"image": np.zeros((SIZE, SIZE + 8, 3), np.uint8), **members}
    read = {t: dense_targets.read_target(record, t) for t in dense_targets.TARGETS}
    np.testing.assert_array_equal(read["segmentation"], predictions["segmentation"])
    valid = predictions["depth"] > 0
    if exact:
        np.testing.assert_array_equal(read["depth"], predictions["depth"])
        np.testing.assert_array_equal(read["normals"], predictions["normals"])
    else:  # a millimetre (depth x 1000 in 16 bits) and 8-bit normals (under 0.5 degrees)
        np.testing.assert_array_equal(read["depth"] > 0, valid)
        assert np.abs(read["depth"] - predictions["depth"]).max() <= 0.5e-3 + 1e-6
        labelled = np.linalg.norm(predictions["normals"], axis=-1) > 0
        cosine = np.sum(read["normals"] * predictions["normals"], axis=-1)[labelled]
        assert np.degrees(np.arccos(np.clip(cosine, -1, 1))).max() < 0.5
        assert not read["normals"][~labelled].any()


def test_relative_depth_is_divided_by_the_images_median():
    predictions = _predictions(np.random.default_rng(4))
    members, _ = label_members(predictions, LabelEncoding(depth_member="depth.npy"))
    depth = dense_targets.read_target({"image": None, **members}, "depth")
    valid = predictions["depth"] > 0
    np.testing.assert_array_equal(depth > 0, valid)
    np.testing.assert_allclose(
        depth[valid], predictions["depth"][valid] / np.median(predictions["depth"][valid]), 1e-6
    )


def test_a_target_below_the_labelled_share_gets_no_member():
    predictions = _predictions(np.random.default_rng(1))
    predictions["depth"][:] = 0.0
    predictions["segmentation"][: SIZE - 2] = 255  # 2 of 24 rows labelled
    members, shares = label_members(predictions, LabelEncoding(min_labelled_fraction=0.2))
    assert set(members) == {"normals.png"}
    assert shares["depth"] == 0.0 and shares["segmentation"] == pytest.approx(2 / SIZE)


def test_a_missing_member_is_a_constant_no_label_map_and_a_corrupt_one_a_skip():
    plugin = PseudoLabelMaps(("segmentation", "depth", "normals"), stride=2)
    members, _ = label_members(_predictions(np.random.default_rng(2)), LabelEncoding())
    fields = plugin({"seg.png": members["seg.png"]}, [], 0, np.random.default_rng(0))
    assert fields.maps["segmentation"].array.shape == (SIZE, SIZE + 8)
    assert fields.maps["depth"].array.tolist() == [[0.0]]  # no label: follows any image
    assert fields.maps["normals"].array.shape == (1, 1, 3) and fields.maps["normals"].stride == 2
    assert fields.maps["normals"].negate_x_on_flip and not fields.maps["depth"].negate_x_on_flip
    skip = plugin({"depth.png": b"not a png"}, [], 0, np.random.default_rng(0))
    assert skip.reason == dense_targets.CORRUPT_LABEL


# ----------------------------------------------------------------------------- the tool


@pytest.fixture(scope="module")
def depth_expert(teacher_workdir, tmp_path_factory):
    """A tiny depth run (linear head on the tiny CLIP's tower, L1 in metres): an expert."""
    workdir = tmp_path_factory.mktemp("depth_expert")
    config = tiny_dense_config.get_config("task=depth")
    config.dense.loss = "l1"
    config.tower.update({"workdir": teacher_workdir, "config": "", "step": "latest"})
    config.eval.every_steps = 0
    trainer.train_and_evaluate(config, str(workdir))
    return str(workdir)


def _tool_config(tmp_path, expert: str) -> ConfigDict:
    config = tiny_cliptex_config.get_config(f",{tmp_path / 'labelled'}")
    config.pseudo_label.experts = ConfigDict(
        {"depth": {"kind": "workdir", "workdir": expert, "step": "latest"}}
    )
    config.pseudo_label.update({"depth_member": "depth.npy", "relative_depth": False})
    return config


def test_pseudo_label_tool_writes_what_the_expert_predicts_and_resumes(tmp_path, depth_expert):
    config = _tool_config(tmp_path, depth_expert)
    manifest = pseudo_label.pseudo_label(config)
    output = tmp_path / "labelled"
    shards = sorted(output.glob("pseudo-*.tar"))
    assert len(shards) == 3 and manifest["written"] == 256 and manifest["skipped"] == {}
    assert manifest["labelled"] == {"depth": 256} and 0 < manifest["shares"]["depth"] <= 1
    assert json.loads((output / pseudo_label.MANIFEST).read_text())["written"] == 256
    # Read back as CLIPTeX reads its data: image, captions and the expert's exact depth.
    source = image_text.make_source(
        {"source": "webdataset", "shards": str(output / "pseudo-*.tar")},
        read_members=("depth.npy", "seg.png"),
    )
    scenes = builder.data_source("train", "tiny")
    expert = DenseRunExpert(depth_expert, step="latest")
    for index in (0, 77, 255):
        record = source[index]
        scene = scenes[index]
        assert record["seg.png"] is None  # no segmentation expert
        assert record["captions"] == [c.decode() for c in scene["captions"]]
        expected = expert.predict([scene["image"]])[0]["depth"]
        expected = np.where(expected > 0, expected, 0.0)
        np.testing.assert_array_equal(dense_targets.read_target(record, "depth"), expected)
    # An interrupted job resumes: a lost shard is written again, byte for byte.
    lost = shards[1].read_bytes()
    os.remove(shards[1])
    pseudo_label.pseudo_label(config)
    assert shards[1].read_bytes() == lost
    # Process 1 of 2 writes the odd shards only.
    other = _tool_config(tmp_path / "split", depth_expert)
    pseudo_label.pseudo_label(other, process_index=1, process_count=2)
    assert sorted(p.name for p in (tmp_path / "split" / "labelled").glob("*.tar")) == [
        "pseudo-00001.tar"
    ]
    # Another job (here: another label size) refuses the folder.
    config.pseudo_label.label_max_side = 16
    with pytest.raises(ValueError, match="label_max_side"):
        pseudo_label.pseudo_label(config)


def test_an_expert_must_predict_its_target_and_depth_in_metres(tmp_path, depth_expert):
    config = _tool_config(tmp_path, depth_expert)
    config.pseudo_label.experts = ConfigDict(
        {"normals": {"kind": "workdir", "workdir": depth_expert, "step": "latest"}}
    )
    with pytest.raises(ValueError, match="predicts depth, not normals"):
        pseudo_label.pseudo_label(config)
    config.pseudo_label.experts = ConfigDict({"depth": {"kind": "oracle"}})
    with pytest.raises(ValueError, match="kind='oracle'"):
        pseudo_label.pseudo_label(config)


# ----------------------------------------------------------------------------- the task


def _labelled_shards(directory, count: int = 48, seed: int = 0) -> str:
    """Shards of tiny scenes with random pseudo-labels (some members missing) at their size."""
    rng = np.random.default_rng(seed)
    scenes = builder.data_source("train", "tiny")
    samples = []
    for index in range(count):
        scene = scenes[index]
        predictions = _predictions(rng, 32, 32)
        members, _ = label_members(predictions, LabelEncoding())
        if index % 5 == 0:
            members.pop("seg.png")
        samples.append(
            {
                "__key__": f"{index:06d}",
                "png": _png(scene["image"]),
                "txt": "\n".join(c.decode() for c in scene["captions"]),
                **members,
            }
        )
    os.makedirs(directory, exist_ok=True)
    write_shards(samples, os.path.join(directory, "pseudo-%05d.tar"), 24)
    return str(directory)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _batch(rng: np.random.Generator, batch: int = 8, size: int = 32) -> dict:
    predictions = [_predictions(rng, size, size) for _ in range(batch)]
    fields = {
        t: np.stack([p[t] for p in predictions]) for t in ("segmentation", "depth", "normals")
    }
    fields["segmentation"][0] = 255  # example 0: no segmentation label at all
    fields["depth"][1] = 0.0  # example 1: no depth label
    return {
        "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "text": rng.integers(1, 400, (batch, 16)).astype(np.int32),
        **fields,
    }


def _reference_terms(outputs: dict, batch: dict) -> dict[str, float]:
    """Float64 NumPy: pixel cross-entropy and L1 means over the batch's labelled pixels."""
    logits = np.asarray(outputs["segmentation"], np.float64)
    labels = batch["segmentation"]
    valid = labels != 255
    peak = logits.max(-1, keepdims=True)
    log_probs = logits - (peak + np.log(np.exp(logits - peak).sum(-1, keepdims=True)))
    picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    terms = {"segmentation": -picked[valid].mean()}
    depth_valid = (batch["depth"] > 1e-3) & (batch["depth"] < 1e3)
    depth_error = np.abs(np.asarray(outputs["depth"], np.float64)[..., 0] - batch["depth"])
    terms["depth"] = depth_error[depth_valid].mean()
    normals_valid = np.sum(batch["normals"] ** 2, -1) > 0.25
    normals_error = np.abs(np.asarray(outputs["normals"], np.float64) - batch["normals"]).mean(-1)
    terms["normals"] = normals_error[normals_valid].mean()
    return terms


def test_loss_is_clip_plus_weighted_pixel_means_over_labelled_pixels(tmp_path):
    config = tiny_cliptex_config.get_config(f",{tmp_path}")
    task = Run.build(config).task
    params, model_state = task.init_variables(jax.random.key(0))
    assert set(model_state) == {"pseudo_label_heads"}
    batch = _batch(np.random.default_rng(3))
    rng = jax.random.key(1)
    loss, metrics, new_state = jax.jit(task.loss_fn)(
        params, batch, rng, jnp.int32(0), None, model_state
    )
    # The heads' outputs recomputed outside the task, with the same dropout draws.
    _, intermediates, _ = task._encode_unit_images(params, batch["image"] / 255.0, None)
    outputs, _ = task.pseudo.heads.apply(
        {"params": params["pseudo_label_heads"], "batch_stats": model_state["pseudo_label_heads"]},
        [intermediates["patch_tokens"]],
        (32, 32),
        train=True,
        rngs={"dropout": jax.random.fold_in(rng, 1)},
        mutable=["batch_stats"],
    )
    terms = _reference_terms(outputs, batch)
    weights = config.cliptex.loss_weights
    for name, value in terms.items():
        np.testing.assert_allclose(metrics[f"pseudo_{name}_loss"], value, rtol=2e-5)
    expected = weights.clip * float(metrics["contrastive_loss"]) + sum(
        weights[name] * value for name, value in terms.items()
    )
    np.testing.assert_allclose(loss, expected, rtol=2e-5)
    assert float(metrics["pseudo_segmentation_labelled"]) == pytest.approx(7 / 8)
    assert float(metrics["pseudo_depth_labelled"]) == pytest.approx(7 / 8)
    # The heads' BatchNorm statistics moved; nothing else is state.
    before, after = model_state["pseudo_label_heads"], new_state["pseudo_label_heads"]
    assert any(
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
    )


@pytest.mark.parametrize("tower", ["vit", "rn50", "mci0"])
def test_heads_fit_every_tower_family(tmp_path, tower):
    config = tiny_cliptex_config.get_config(f",{tmp_path}")
    if tower != "vit":
        from configs.clip_mci0 import get_config as mci0_config
        from configs.clip_rn50 import get_config as rn50_config

        recipe = (rn50_config if tower == "rn50" else mci0_config)("runlocal")
        config.model.image = recipe.model.image
    task = Run.build(config).task
    params, state = jax.eval_shape(task.init_variables, jax.random.key(0))
    heads = params["pseudo_label_heads"]
    assert heads["head_segmentation"]["kernel"].shape[-1] == 7
    assert heads["head_depth"]["kernel"].shape[-1] == 1
    assert heads["head_normals"]["kernel"].shape[-1] == 3
    assert heads["psp"]["fusion"]["conv"]["kernel"].shape[-1] == 16
    batch = jax.eval_shape(lambda: _batch(np.random.default_rng(0)))
    loss, metrics, _ = jax.eval_shape(
        task.loss_fn, params, batch, jax.random.key(0), jnp.int32(0), None, state
    )
    assert loss.shape == () and "pseudo_normals_loss" in metrics


def test_tiny_run_logs_each_term_and_exports_a_plain_clip(tmp_path, teacher_workdir):
    labelled = _labelled_shards(tmp_path / "labelled")
    config = tiny_cliptex_config.get_config(f"{teacher_workdir},{labelled}")
    config.pseudo_label.build_if_missing = False
    config.total_steps = 3
    results = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    for name in ("segmentation", "depth", "normals"):
        assert np.isfinite(results[f"train/pseudo_{name}_loss"])
    assert results["train/pseudo_segmentation_labelled"] < 1.0  # every 5th has none
    path = modes.export_checkpoint(config, str(tmp_path / "run"), str(tmp_path / "export"))
    exported = load_file(next(p for p in (tmp_path / "export").rglob("*.safetensors")))
    assert exported and not any("pseudo" in key or "psp" in key for key in exported)
    assert path


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("variant", ["B/16", "H/16", "RN50"])
def test_recipes_are_table_7(variant):
    from configs.cliptex import get_config

    config = get_config(f"variant={variant}")
    # 30 epochs of the ~2.9M CC3M pairs at batch 32.
    assert config.batch_size == 32 and config.total_steps == 2_718_750
    schedule = config.schedule
    assert (schedule.decay, schedule.warmup_steps, schedule.warmup_init_lr) == (
        "cosine",
        1000,
        1e-6,
    )
    assert (schedule.peak_lr, schedule.end_lr) == (3e-5, 1e-6)
    assert dict(config.cliptex.loss_weights) == {
        "clip": 1.0,
        "segmentation": 0.1,
        "depth": 1.0,
        "normals": 1.0,
    }
    head = config.cliptex.head
    assert (head.channels, tuple(head.bins), head.dropout, head.upsample) == (
        512,
        (1, 2, 3, 6),
        0.1,
        "nearest",
    )
    assert config.data.image_size == 512 and config.data.variable_resolution.enabled
    assert config.cliptex.enabled and not get_config(f"variant={variant},baseline").cliptex.enabled
    baseline = get_config(f"variant={variant},baseline")
    assert baseline.schedule == config.schedule and baseline.data == config.data


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["B/16", "RN50"])
def test_full_recipes_compile_on_eight_devices(tmp_path, variant):
    log = compile_recipe(
        f"configs/cliptex.py:variant={variant}", tmp_path, "--config.model.dtype=float32"
    )
    assert "compile: gflop_per_step" in log


@pytest.mark.nightly
def test_full_vit_h16_recipe_compiles_on_eight_devices(tmp_path):
    log = compile_recipe("configs/cliptex.py:variant=H/16", tmp_path)
    assert "compile: gflop_per_step" in log


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_a_killed_cliptex_run_resumes_to_the_same_parameters(tmp_path):
    """Variable-resolution batches, BatchNorm heads, dropout: a run killed after its step-3
    checkpoint and restarted ends with the parameters, statistics and optimizer state of a run
    that was never stopped."""
    from test_trainer import finished_steps, wait_for_checkpoint

    labelled = _labelled_shards(tmp_path / "labelled", count=96)
    arg = f",{labelled}"

    def launch(workdir):
        command = [
            sys.executable,
            "-m",
            "pretrain.main",
            f"--config=tests/tiny_cliptex_config.py:{arg}",
            f"--workdir={workdir}",
            "--config.pseudo_label.build_if_missing=False",
            "--config.eval.every_steps=0",
        ]
        # The tiny config imports its siblings from tests/.
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "",
            "PYTHONPATH": str(REPO / "tests"),
        }
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    reference = launch(tmp_path / "reference")
    assert reference.wait(timeout=900) == 0, reference.stdout.read()
    interrupted = launch(tmp_path / "interrupted")
    wait_for_checkpoint(interrupted, tmp_path / "interrupted", 3, timeout=900)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait(timeout=60)
    assert max(finished_steps(tmp_path / "interrupted")) < 6
    resumed = launch(tmp_path / "interrupted")
    output = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0 and "resumed from checkpoint" in output, output

    config = tiny_cliptex_config.get_config(arg)
    config.pseudo_label.build_if_missing = False
    config.eval.every_steps = 0
    states = [
        jax.device_get(modes.restore_trained(config, str(tmp_path / run), "6")[1])
        for run in ("reference", "interrupted")
    ]
    for part in ("params", "model_state", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, states[1][part], states[0][part])
