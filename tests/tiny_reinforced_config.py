"""A very small reinforced CLIP run for tests: the :runlocal reinforced recipe shrunk, reinforced
by the tiny CLIP of tests/tiny_clip_config.py trained into ``teacher_workdir``; the reinforced
shards go to ``reinforced_dir``."""

import tiny_clip_config
from ml_collections import ConfigDict

from configs.clip_reinforced import get_config as reinforced_config
from configs.clip_reinforced import shards_glob


def get_config(arg: str | None = None) -> ConfigDict:
    """``arg``: "teacher_workdir,reinforced_dir"."""
    teacher_workdir, reinforced_dir = (arg or ",").split(",")
    config = reinforced_config("runlocal")
    tiny = tiny_clip_config.get_config()  # the same small model, sizes and schedule
    config.model = tiny.model
    config.data.image_size = tiny.data.image_size
    config.schedule = tiny.schedule
    config.batch_size = tiny.batch_size
    config.total_steps = 8
    config.reinforced.teacher_embed_dim = 32  # the tiny teacher's embedding
    config.reinforce.teachers.clip_runlocal.update(
        {"config": "tests/tiny_clip_config.py", "workdir": teacher_workdir, "step": "latest"}
    )
    config.reinforce.source.scenes_config = "tiny"
    config.reinforce.update(
        {"output_dir": reinforced_dir, "samples_per_shard": 100, "batch_size": 64}
    )
    config.data.train.shards = shards_glob(reinforced_dir)
    config.eval.update({"every_steps": 4, "batch_size": 32})
    config.eval.sets.scenes.update({"scenes_config": "tiny", "max_examples": 64, "captions": 2})
    config.checkpoint.update({"every_steps": 4, "keep": 2})
    config.log_every_steps = 2
    return config
