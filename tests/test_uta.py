"""UTA: teacher targets on the student's grid, the loss's gather, an end-to-end tiny run."""

import csv

import jax
import numpy as np
import pytest
import tiny_uta_config

from models.two_tower import TwoTowerModel
from models.vit import resize_position_grid
from pretrain import modes, sharding, trainer
from pretrain.data import masking
from pretrain.data.transforms import normalize_unit
from pretrain.tasks.uta import Task as UtaTask


def one_device_mesh():
    return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


def test_position_grid_resize_keeps_smooth_fields():
    rows = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")[0]
    constant = np.full((36, 4), 0.7, np.float32)
    np.testing.assert_allclose(resize_position_grid(constant, (6, 6), (4, 4)), 0.7, rtol=1e-6)
    same = np.random.default_rng(0).normal(size=(36, 4)).astype(np.float32)
    np.testing.assert_allclose(resize_position_grid(same, (6, 6), (6, 6)), same, rtol=1e-6)
    # A linear ramp sampled at pixel centres stays the same ramp (away from the border).
    ramp = ((rows + 0.5) / 6).reshape(36, 1).astype(np.float32)
    resized = np.asarray(resize_position_grid(ramp, (6, 6), (12, 12))).reshape(12, 12)
    expected = (np.arange(12) + 0.5) / 12
    np.testing.assert_allclose(resized[3:9, 5], expected[3:9], atol=1e-5)


def np_bilinear_upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """(B, n, n, C) -> (B, size, size, C): half-pixel centres, clamped at the edges."""
    n = grid.shape[1]
    coordinates = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    low = np.floor(coordinates).astype(int)
    high = np.minimum(low + 1, n - 1)
    frac = coordinates - low
    along_rows = frac[None, :, None, None]
    rows = grid[:, low] * (1 - along_rows) + grid[:, high] * along_rows
    along_cols = frac[None, None, :, None]
    return rows[:, :, low] * (1 - along_cols) + rows[:, :, high] * along_cols


def test_teacher_tokens_follow_the_student_grid(teacher_workdir):
    config = tiny_uta_config.get_config(teacher_workdir)
    task = UtaTask(config, one_device_mesh())
    teacher_params = task.load_frozen()["teacher"]
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    # Same grid (student 32 px / 8 = teacher 32 px / 8): exactly the teacher's projected tokens.
    tokens = task.teacher_tokens(teacher_params, images)
    from pretrain.data.transforms import normalize_unit

    _, reference = task.teacher.model.apply(
        {"params": teacher_params},
        normalize_unit(images),
        method=TwoTowerModel.encode_image,
    )
    np.testing.assert_allclose(tokens, reference["projected_tokens"], rtol=1e-5, atol=1e-6)
    assert tokens.shape == (2, 1 + 16, task.teacher.embed_dim)

    # A student with a finer grid (patch 4: 8 x 8) gets the teacher's 4 x 4 map resized
    # bilinearly (pixel centres aligned, edges clamped)...
    config.model.student.update({"variant": "uta_large/4"})
    fine = UtaTask(config, one_device_mesh())
    assert fine.grid == (8, 8)
    resized_tokens = np.asarray(fine.teacher_tokens(teacher_params, images))
    np.testing.assert_allclose(resized_tokens[:, 0], tokens[:, 0], rtol=1e-6)  # class token
    coarse = np.asarray(tokens[:, 1:]).reshape(2, 4, 4, -1)
    np.testing.assert_allclose(
        resized_tokens[:, 1:].reshape(2, 8, 8, -1), np_bilinear_upsample(coarse, 8), atol=1e-5
    )
    # ...or the teacher's input resized to 64 px so that its grid is 8 x 8 (its position
    # embeddings resized from its 4 x 4 training grid).
    config.teacher.grid_match = "resize_input"
    resized = UtaTask(config, one_device_mesh())
    assert resized.teacher_input_size() == 64
    assert resized.teacher_tokens(teacher_params, images).shape == (2, 65, task.teacher.embed_dim)


def test_loss_aligns_each_kept_token_with_the_teacher_token_at_its_position(teacher_workdir):
    config = tiny_uta_config.get_config(teacher_workdir)
    task = UtaTask(config, one_device_mesh())
    frozen = task.load_frozen()
    params, _ = task.init_variables(jax.random.key(3))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    keep = np.stack(
        [masking.reversed_block_mask_indices(rng, task.grid, 0.5) for _ in range(4)]
    ).astype(np.int32)
    loss = task.loss_fn(
        params, {"image": images, "keep_indices": keep}, jax.random.key(0), 0, frozen
    ).loss
    # Independent reference: the student on the kept tokens, the teacher on the whole image,
    # matched by position in NumPy.
    unit = images.astype(np.float32) / 255
    _, student = task.student.apply({"params": params}, normalize_unit(unit), keep_indices=keep)
    teacher = np.asarray(task.teacher_tokens(frozen["teacher"], unit))
    cosines = []
    for b in range(4):
        s = np.asarray(student["projected_tokens"][b])
        positions = [0, *(keep[b] + 1)]
        for row, position in enumerate(positions):
            t = teacher[b, position]
            cosines.append(s[row] @ t / np.linalg.norm(s[row]) / np.linalg.norm(t))
    np.testing.assert_allclose(loss, -np.mean(cosines), rtol=1e-5)


def test_tiny_uta_run_trains_evaluates_resumes_and_exports(teacher_workdir, tmp_path):
    config = tiny_uta_config.get_config(teacher_workdir)
    trainer.train_and_evaluate(config, str(tmp_path))
    losses = {}
    with (tmp_path / "metrics.csv").open() as file:
        for row in csv.DictReader(file):
            if row["name"] == "train/loss":
                losses[int(row["step"])] = float(row["value"])
    assert losses[8] < losses[2] - 0.1, losses  # -cosine to the teacher falls
    # The teacher is frozen and saved with the student.
    _, state = modes.restore_trained(config, str(tmp_path), "latest")
    teacher_before = jax.device_get(UtaTask(config, one_device_mesh()).load_frozen()["teacher"])
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(state["frozen"]["teacher"]), teacher_before
    )
    # Continuing the run from its checkpoint (more steps) works without the teacher's run.
    config.total_steps = 10
    config.teacher.workdir = str(tmp_path / "gone")
    trainer.train_and_evaluate(config, str(tmp_path))
    exported = modes.export_checkpoint(config, str(tmp_path), str(tmp_path / "timm"))
    assert sorted(p.name for p in (tmp_path / "timm").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert exported


def test_uta_step_compiles_sharded_without_data_or_weights(teacher_workdir):
    config = tiny_uta_config.get_config(teacher_workdir)
    config.mesh.update({"data": 4, "fsdp": 2})
    report = modes.compile_train_step(config)
    assert report["gflop_per_step"] > 0
    assert report["parameters"] > 0


def test_full_uta_recipe_compiles_one_sharded_step_on_8_devices(tmp_path):
    """`python -m pretrain.main --config=configs/uta_vitl.py --mode=compile` with a reduced batch:
    the ViT-L/16 student and the EVA01-g/14 teacher (no weights needed) on a fsdp=8 mesh."""
    from compile_recipe import compile_recipe

    log = compile_recipe(
        "configs/uta_vitl.py",
        tmp_path,
        "--config.batch_size=8",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=8",
    )
    assert "compile: gflop_per_step" in log
    # 304M student parameters (+ 2 Adam moments) and the 1.1B-parameter bf16 teacher, split 8 ways.
    assert "compile: parameters = 3.04" in log


@pytest.mark.torch
def test_fine_tuned_uta_model_exports_to_open_clip(tmp_path):
    """The contrastive fine-tuning's model (UTA image tower, CLIP text tower) loads in open_clip
    (the image tower as a timm trunk from the export's own timm_trunk/ folder) and computes the
    same embeddings."""
    import json

    from random_params import random_params
    from test_export_open_clip import TOLERANCE, jax_outputs, random_inputs
    from torch_env import require_torch_env, run_torch_script

    from configs.uta_ft_vitl import get_config as fine_tuning_config
    from pretrain.tasks.clip import Task as ClipTask

    require_torch_env()
    config = fine_tuning_config("runlocal")
    config.data.image_size = 32
    config.model.image.update({"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64})
    config.model.text.update({"width": 32, "depth": 1, "num_heads": 2, "context_length": 16})
    config.model.embed_dim = 24
    task = ClipTask(config, one_device_mesh())
    images = np.zeros((1, 32, 32, 3), np.float32)
    tokens = np.zeros((1, 16), np.int32)
    params = random_params(task.model, images, tokens, seed=3)
    export_dir = tmp_path / "export"
    task.export(params, str(export_dir))
    stored = json.loads((export_dir / "open_clip_config.json").read_text())["model_cfg"]
    assert stored["vision_cfg"]["timm_model_name"].startswith("local-dir:")
    inputs = random_inputs(3, (32, 32), 16, seed=4)
    np.savez(tmp_path / "inputs.npz", **inputs)
    run_torch_script("check_open_clip.py", "load-export", tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exported_keys"] == report["model_keys"]
    ours, theirs = jax_outputs(task.model, params, inputs), np.load(tmp_path / "torch_outputs.npz")
    for name in ("image_embeds", "text_embeds"):
        assert np.abs(ours[name] - theirs[name]).max() < TOLERANCE, name
