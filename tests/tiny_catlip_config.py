"""A very small CatLIP run for tests: the :runlocal recipe shrunk to the tiny scenes."""

from ml_collections import ConfigDict

from configs.catlip_vitb16 import get_config as catlip_config


def get_config(vocab_path: str | None = None) -> ConfigDict:
    config = catlip_config("runlocal")
    config.total_steps = 8
    config.batch_size = 16
    config.schedule.warmup_steps = 2
    config.vocab.update({"min_count": 5, "path": vocab_path or ""})
    config.model.image.update({"width": 32, "depth": 1, "num_heads": 2})
    config.data.image_size = 32
    config.data.train.scenes_config = "tiny"
    config.eval.update({"every_steps": 4, "batch_size": 32})
    config.eval.sets.scenes.update({"scenes_config": "tiny", "max_examples": 64})
    config.checkpoint.update({"every_steps": 4, "keep": 2})
    config.log_every_steps = 2
    return config
