"""A very small dense probe for task tests: the :runlocal probe shrunk to seconds per run, on the
embedded scenes' "tiny" config (32 px), over a tower given by the test (``config.tower``)."""

from ml_collections import ConfigDict

from configs.dense_probe import get_config as dense_config


def get_config(arg: str = "") -> ConfigDict:
    config = dense_config("runlocal" + (f",{arg}" if arg else ""))
    config.total_steps = 4
    config.batch_size = 8
    config.schedule.warmup_steps = 2
    config.data.update({"crop_size": (32, 32), "eval_size": (32, 32)})
    config.data.train.scenes_config = "tiny"
    for eval_set in config.eval.sets.values():
        eval_set.update({"scenes_config": "tiny", "max_examples": 16})
    config.eval.update({"every_steps": 4, "batch_size": 8, "figure_examples": 2})
    config.checkpoint.update({"every_steps": 4, "keep": 1})
    config.log_every_steps = 2
    return config
