"""The dense task end to end: probes and fine-tuning over towers of this project's runs (and
randomly initialised ones), the frozen tower left untouched, BatchNorm heads' statistics kept,
evaluation figures written, metrics the same on one and eight devices, and the full recipes
compiled for ViT-B/16 at 512 px."""

import jax
import numpy as np
import pytest
import tiny_dense_config
from compile_recipe import compile_recipe

from pretrain import modes, sharding, trainer
from pretrain.task import build_task


def probe_config(teacher_workdir: str, arg: str = ""):
    config = tiny_dense_config.get_config(arg)
    config.tower.update({"workdir": teacher_workdir, "config": "", "step": "latest"})
    return config


@pytest.mark.parametrize(
    "arg, metric",
    [
        ("task=segmentation,head=linear", "scenes/miou"),
        ("task=depth,head=pspnet", "scenes/abs_rel"),
        ("task=normals,head=deeplabv3", "scenes/within_30"),
    ],
)
def test_probe_trains_the_head_on_a_frozen_tower(tmp_path, teacher_workdir, arg, metric):
    config = probe_config(teacher_workdir, arg)
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(results[f"eval/{metric}"])
    task, state = modes.restore_trained(config, str(tmp_path), "latest")
    # The tower is frozen: exactly the weights of the run it came from.
    tower = jax.device_get(state["frozen"]["image_encoder"]["params"])
    loaded = task.tower.load_variables()["params"]
    for ours, theirs in zip(jax.tree.leaves(tower), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(ours, theirs)
    assert set(state["params"]) == {"head"}
    figures = sorted((tmp_path / "figures").glob("scenes_step*.png"))
    assert figures, "the evaluation wrote no figure"
    if "pspnet" in arg or "deeplabv3" in arg:  # BatchNorm heads carry running statistics
        assert state["model_state"] is not None


def test_finetune_trains_the_tower_too(tmp_path, teacher_workdir):
    config = probe_config(teacher_workdir, "task=segmentation,head=linear,mode=finetune")
    trainer.train_and_evaluate(config, str(tmp_path))
    task, state = modes.restore_trained(config, str(tmp_path), "latest")
    assert set(state["params"]) == {"head", "image_encoder"}
    tuned = jax.tree.leaves(jax.device_get(state["params"]["image_encoder"]))
    loaded = jax.tree.leaves(task.tower.load_variables()["params"])
    assert any(not np.array_equal(a, b) for a, b in zip(tuned, loaded))


def test_upernet_fine_tunes_a_vit_through_a_simple_feature_pyramid(tmp_path, teacher_workdir):
    config = probe_config(teacher_workdir, "task=depth,head=upernet")
    config.dense.head.update({"channels": 16, "pyramid_channels": 16})
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(results["eval/scenes/abs_rel"])


def test_random_tower_is_a_fresh_initialisation_of_the_recipe(tmp_path):
    config = tiny_dense_config.get_config("tower=random")
    config.tower.config = "tests/tiny_clip_config.py"
    config.total_steps = 2
    trainer.train_and_evaluate(config, str(tmp_path))
    _, state = modes.restore_trained(config, str(tmp_path), "latest")
    assert "image_encoder" in state["frozen"]


def test_metrics_are_the_same_on_one_and_eight_devices(tmp_path, teacher_workdir):
    config = probe_config(teacher_workdir, "task=normals,head=linear")
    config.eval.every_steps = 0
    trainer.train_and_evaluate(config, str(tmp_path))
    task, state = modes.restore_trained(config, str(tmp_path), "latest")
    variables = jax.device_get(
        {"params": state["params"], "frozen": state["frozen"], "model_state": None}
    )
    results = {}
    for count in (1, 8):
        task.mesh = sharding.make_mesh({"data": count}, jax.devices()[:count])
        results[count] = task.make_evaluator()(variables, step=4)
    assert results[1] and results[1].keys() == results[8].keys()
    for key in results[1]:
        np.testing.assert_allclose(results[1][key], results[8][key], rtol=1e-6, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["task=segmentation,head=pspnet,set=ade20k", "head=upernet"])
def test_full_recipes_compile_for_vit_b16_at_512_px(tmp_path, arg):
    log = compile_recipe(
        f"configs/dense_probe.py:{arg},tower=random",
        tmp_path,
        "--config.model.dtype=float32",
        "--config.batch_size=8",
    )
    assert "compile: gflop_per_step" in log


@pytest.mark.parametrize(
    "task, steps, peak, end, warmup, batch",
    # Paper 003, Table 8 (50 epochs of VOC's 10,582 / NYUv2's 47,584 and 30,816 images).
    [
        ("segmentation", 16_535, 3e-5, 3e-6, 500, 32),
        ("depth", 148_700, 1e-4, 1e-6, 1000, 16),
        ("normals", 96_300, 1e-5, 1e-6, 1000, 16),
    ],
)
def test_probe_recipes_are_table_8(task, steps, peak, end, warmup, batch):
    from configs.dense_probe import get_config

    for head in ("linear", "deeplabv3", "pspnet"):
        config = get_config(f"task={task},head={head}")
        assert config.dense.mode == "probe" and config.dense.head.name == head
        assert (config.total_steps, config.batch_size) == (steps, batch)
        schedule = config.schedule
        assert (schedule.peak_lr, schedule.end_lr, schedule.warmup_steps) == (peak, end, warmup)
        assert schedule.warmup_init_lr == 1e-6 and schedule.decay == "cosine"


def test_upernet_recipes_are_tables_14_and_15():
    from configs.dense_probe import get_config

    ade = get_config("head=upernet,set=ade20k")  # Table 14
    assert ade.dense.mode == "finetune" and ade.dense.num_classes == 150
    assert (ade.total_steps, ade.batch_size, tuple(ade.data.crop_size)) == (160_000, 16, (512, 512))
    assert (ade.schedule.decay, ade.schedule.warmup_steps) == ("polynomial", 1_500)
    assert ade.optimizer.weight_decay == 0.01
    nyu = get_config("task=depth,head=upernet")  # Table 15
    assert (nyu.batch_size, tuple(nyu.data.crop_size), nyu.total_steps) == (24, (480, 480), 49_567)
    assert (nyu.optimizer.layer_decay, nyu.optimizer.weight_decay) == (0.8, 0.05)
    assert tuple(nyu.dense.eval_crop) == (45, 471, 41, 601)
    with pytest.raises(ValueError, match="unknown config argument"):
        get_config("heads=linear")


def test_batchnorm_towers_train_their_weights_and_keep_their_statistics():
    config = tiny_dense_config.get_config("tower=random,mode=finetune,head=linear")
    config.tower.config = "configs/clip_rn50.py:runlocal"  # one block per stage, BatchNorm
    task = build_task(config, sharding.make_mesh({"data": -1}))
    params, model_state = jax.jit(task.init_variables)(jax.random.key(0))
    assert set(params) == {"head", "image_encoder"} and model_state is None
    frozen = task.load_frozen()  # the tower's running statistics, outside the optimizer
    assert set(frozen["image_encoder"]) == {"batch_stats"}
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
        "segmentation": rng.integers(0, 7, (8, 32, 32)).astype(np.int32),
    }

    def loss(p):
        return task.loss_fn(p, batch, jax.random.key(1), 0, frozen=frozen).loss

    grads = jax.jit(jax.grad(loss))(params)["image_encoder"]
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    # The gradient reaches the stem and the last stage (the bottlenecks' main branches start at
    # zero: their last BatchNorm scale is initialised to 0), not the unused attention pool.
    for used in (grads["conv1"], grads["layer4_0"]["downsample_0"], grads["layer4_0"]["bn3"]):
        assert all(np.abs(g).sum() > 0 for g in jax.tree.leaves(used))
    assert all(np.abs(g).sum() == 0 for g in jax.tree.leaves(grads["attnpool"]))
