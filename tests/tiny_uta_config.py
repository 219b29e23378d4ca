"""A very small UTA run for tests: the :runlocal recipe shrunk, its teacher the tiny CLIP of
tests/tiny_clip_config.py trained into the workdir given as the config argument."""

from ml_collections import ConfigDict

from configs.uta_vitl import get_config as uta_config


def get_config(teacher_workdir: str | None = None) -> ConfigDict:
    config = uta_config("runlocal")
    config.total_steps = 8
    config.batch_size = 16
    config.schedule.warmup_steps = 2
    config.model.student.update({"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64})
    config.teacher.update(
        {"config": "tests/tiny_clip_config.py", "workdir": teacher_workdir or "", "step": "latest"}
    )
    config.data.image_size = 32
    config.data.train.scenes_config = "tiny"
    config.eval.update({"every_steps": 4, "batch_size": 32})
    config.eval.sets.scenes.update({"scenes_config": "tiny", "max_examples": 64, "captions": 2})
    config.checkpoint.update({"every_steps": 4, "keep": 2})
    config.log_every_steps = 2
    return config
