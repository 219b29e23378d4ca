"""A very small CLIPTeX run for tests: the :runlocal recipe shrunk to the tiny CLIP of
tests/tiny_clip_config.py (which it fine-tunes when ``clip_workdir`` is given), reading
pseudo-labelled shards ``shards`` and pseudo-labelling the "tiny" scenes into ``labelled_dir``
with experts the test names."""

import tiny_clip_config
from ml_collections import ConfigDict

from configs.cliptex import get_config as cliptex_config


def get_config(arg: str | None = None) -> ConfigDict:
    """``arg``: "clip_workdir,labelled_dir[,baseline]"."""
    clip_workdir, labelled_dir, *rest = (arg or ",").split(",")
    config = cliptex_config("runlocal" + ("".join(f",{r}" for r in rest if r)))
    tiny = tiny_clip_config.get_config()  # the same small model, sizes and schedule
    config.model = tiny.model
    config.model.image.pos_embed_grid = 4  # 32 px / patch 8
    config.data.image_size = tiny.data.image_size
    config.data.variable_resolution.update({"min_scale": 0.5, "max_scale": 1.5, "num_sizes": 3})
    config.schedule = tiny.schedule
    config.batch_size = tiny.batch_size
    config.total_steps = 6
    config.cliptex.head.channels = 16
    if clip_workdir:
        config.init.clip_from.update(
            {"config": "tests/tiny_clip_config.py", "workdir": clip_workdir, "step": "latest"}
        )
    else:
        config.init = ConfigDict()
    config.pseudo_label.source.scenes_config = "tiny"
    config.pseudo_label.update(
        {"output_dir": labelled_dir, "samples_per_shard": 100, "batch_size": 32}
    )
    config.data.train.shards = f"{labelled_dir}/pseudo-*.tar"
    config.eval.update({"every_steps": 3, "batch_size": 32})
    config.eval.sets.scenes.update({"scenes_config": "tiny", "max_examples": 64, "captions": 2})
    config.checkpoint.update({"every_steps": 3, "keep": 2})
    config.log_every_steps = 1
    return config
