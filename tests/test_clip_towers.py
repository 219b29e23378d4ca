"""CLIP with BatchNorm image towers (ResNet, MobileCLIP MCi) through the config only: recipes,
a tiny sharded run whose BatchNorm statistics train and evaluate, and the RN50 export."""

import csv

import jax
import numpy as np
import pytest
import tiny_clip_config
from ml_collections import ConfigDict

from configs import clip_mci0, clip_mci1, clip_mci2, clip_rn50
from pretrain import modes, trainer

TINY_TOWERS = {
    "resnet": {
        "module": "models.resnet.ModifiedResNet",
        "variant": "",
        "layers": (1, 1, 1, 1),
        "width": 8,
        "num_heads": 2,
        "bn_groups": 2,
    },
    "mci": {
        "module": "models.mobileclip.MobileClipImageTower",
        "variant": "mci0",
        "depths": (1, 1, 1, 1),
        "widths": (16, 32, 64, 64),
        "head_dim": 16,
        "bn_groups": 2,
    },
}


@pytest.mark.parametrize(
    "module,tower,size,embed,causal",
    [
        (clip_rn50, "models.resnet.ModifiedResNet", 224, 1024, True),
        (clip_mci0, "models.mobileclip.MobileClipImageTower", 256, 512, False),
        (clip_mci1, "models.mobileclip.MobileClipImageTower", 256, 512, False),
        (clip_mci2, "models.mobileclip.MobileClipImageTower", 256, 512, False),
    ],
)
def test_tower_recipes_keep_table_11_and_open_clips_shapes(module, tower, size, embed, causal):
    config = module.get_config()
    assert config.model.image.module == tower
    assert (config.data.image_size, config.model.embed_dim) == (size, embed)
    assert config.model.text.causal is causal and config.model.text.width == 512
    assert (config.total_steps, config.batch_size, config.schedule.peak_lr) == (
        200_000,
        65_536,
        1e-3,
    )
    runlocal = module.get_config("runlocal")
    assert runlocal.data.image_size == 64 and runlocal.model.image.module == tower


def tiny_config(tower: str) -> ConfigDict:
    config = tiny_clip_config.get_config()
    config.model.image = ConfigDict(TINY_TOWERS[tower])
    config.range_augment.enabled = False
    config.total_steps = 6
    config.eval.every_steps = 3
    config.checkpoint.every_steps = 3
    config.mesh.update({"data": 4, "fsdp": 2})
    return config


@pytest.mark.parametrize(
    "tower",
    ["resnet", pytest.param("mci", marks=pytest.mark.slow)],  # mci: ~100 s on 2 cores
)
def test_tiny_run_trains_batch_statistics_evaluates_and_exports(tower, tmp_path):
    config = tiny_config(tower)
    trainer.train_and_evaluate(config, str(tmp_path))
    with (tmp_path / "metrics.csv").open() as file:
        names = {row["name"] for row in csv.DictReader(file)}
    assert "eval/scenes/zeroshot_top1" in names
    task, state = modes.restore_trained(config, str(tmp_path), "latest")
    _, fresh_state = task.init_variables(jax.random.key(0))
    trained = jax.tree.leaves(jax.device_get(state["model_state"]))
    initial_stats = jax.tree.leaves(jax.device_get(fresh_state))
    assert len(trained) == len(initial_stats) > 0
    assert any(not np.allclose(a, b) for a, b in zip(trained, initial_stats))
    if tower == "resnet":  # open_clip's RN50 layout carries the trained running statistics
        from safetensors.numpy import load_file

        out = tmp_path / "export"
        modes.export_checkpoint(config, str(tmp_path), str(out))
        state_dict = load_file(str(out / "open_clip_model.safetensors"))
        stem_mean = np.asarray(jax.device_get(state["model_state"]["image_encoder"]["bn1"]["mean"]))
        np.testing.assert_allclose(state_dict["visual.bn1.running_mean"], stem_mean, rtol=1e-6)
