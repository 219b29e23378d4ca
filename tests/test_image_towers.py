"""Image towers for dense tasks and analyses, from each source: a run of this project, its
open_clip export, a timm eva directory and a random initialisation of a recipe, and the spatial
feature maps every tower family gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from random_params import random_params

from models.mobileclip import MobileClipImageTower
from models.resnet import ModifiedResNet
from models.vit import VisionTransformer, eva02_variant
from pretrain import modes
from pretrain.components.feature_maps import feature_maps, tower_feature_maps
from pretrain.components.image_towers import build_image_tower, tower_source_config
from pretrain.export import timm_eva


def assert_same_tree(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert len(flat_a) == len(flat_b)
    for path, value in flat_a:
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]), str(path))


def test_a_run_and_its_open_clip_export_give_the_same_tower(teacher_workdir, tmp_path):
    from pretrain.components.runs import run_config

    run = build_image_tower(
        tower_source_config(source="workdir", workdir=teacher_workdir, step="latest")
    )
    assert isinstance(run.module, VisionTransformer) and run.module.output_dim is None
    config = run_config(teacher_workdir)
    exported = modes.export_checkpoint(config, teacher_workdir, str(tmp_path / "export"))
    imported = build_image_tower(tower_source_config(source="open_clip", open_clip_dir=exported))
    assert imported.image_size == run.image_size == config.data.image_size
    ours, theirs = run.load_variables(), imported.load_variables()
    assert set(ours) == {"params"}
    assert_same_tree(jax.tree.map(np.shape, ours), jax.tree.map(np.shape, theirs))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-6)  # the export stores float32
    # Other image sizes than the training one: the position embeddings are resized.
    images = jnp.zeros((1, 48, 64, 3))
    (grid,) = tower_feature_maps(run.module, ours, images)
    assert grid.shape == (1, 48 // run.module.patch_size, 64 // run.module.patch_size, 64)


def test_timm_eva_directory_gives_its_tower(tmp_path):
    fields = {**eva02_variant("eva02_tiny/8"), "width": 32, "depth": 2, "num_heads": 2}
    fields.update(mlp_dim=int(32 * 4 * 2 / 3), output_dim=None)
    vit = VisionTransformer(**fields)
    params = random_params(vit, jnp.zeros((1, 32, 32, 3)))
    timm_eva.save_timm(tmp_path, params, vit, image_size=32)
    tower = build_image_tower(tower_source_config(source="timm", timm_dir=str(tmp_path)))
    assert tower.image_size == 32 and tower.module.rope and tower.module.depth == 2
    assert_same_tree(tower.load_variables()["params"], params)


def test_random_recipe_towers_are_seeded():
    source = tower_source_config(source="recipe", config="tests/tiny_clip_config.py")
    first = build_image_tower(source).load_variables()
    again = build_image_tower(source).load_variables()
    other = build_image_tower(ConfigDict({**source.to_dict(), "seed": 1})).load_variables()
    assert_same_tree(first, again)
    assert not np.array_equal(jax.tree.leaves(first)[0], jax.tree.leaves(other)[0])


def test_bad_sources_say_what_is_missing():
    with pytest.raises(ValueError, match="choose from"):
        build_image_tower(tower_source_config(source="hub"))
    with pytest.raises(ValueError, match=r"tower\.workdir"):
        build_image_tower(tower_source_config(source="workdir"))
    with pytest.raises(ValueError, match=r"tower\.config"):
        build_image_tower(tower_source_config(source="recipe"))


@pytest.mark.parametrize(
    "tower, images, last, pyramid",
    [
        (
            VisionTransformer(patch_size=8, width=16, depth=1, num_heads=2, output_dim=None),
            (1, 24, 40, 3),
            (1, 3, 5, 16),  # a non-square grid, the class token left out
            1,
        ),
        (
            ModifiedResNet(layers=(1, 1, 1, 1), width=8, num_heads=2),
            (1, 64, 64, 3),
            (1, 2, 2, 256),
            4,
        ),
        (
            MobileClipImageTower(depths=(1, 1, 1, 1), widths=(8, 16, 32, 64), output_dim=None),
            (1, 64, 64, 3),
            (1, 2, 2, 64),
            4,
        ),
    ],
)
def test_every_tower_gives_its_grids(tower, images, last, pyramid):
    variables = jax.eval_shape(tower.init, jax.random.key(0), jnp.zeros(images))
    _, intermediates = jax.eval_shape(
        lambda v: tower.apply(v, jnp.zeros(images), train=False), variables
    )
    (single,) = feature_maps(intermediates)
    assert single.shape == last
    maps = feature_maps(intermediates, pyramid=True)
    assert len(maps) == pyramid and maps[-1].shape == last
    assert [m.shape[1] for m in maps] == sorted((m.shape[1] for m in maps), reverse=True)
