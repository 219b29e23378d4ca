"""A very small CLIP for trainer tests: the runlocal recipe shrunk to seconds per run.

Data: the embedded scenes' "tiny" builder config (32 px, a few hundred examples), built into
$TFDS_DATA_DIR (the tests point it to a shared temporary folder).
"""

from ml_collections import ConfigDict

from configs.clip_vitb16 import get_config as clip_config


def get_config(arg: str | None = None) -> ConfigDict:
    config = clip_config("runlocal" + (f",{arg}" if arg else ""))
    config.total_steps = 12
    config.batch_size = 16
    config.schedule.warmup_steps = 2
    config.model.image.update({"patch_size": 8, "width": 64, "depth": 1, "num_heads": 4})
    config.model.text.update({"width": 32, "depth": 1, "num_heads": 2, "context_length": 16})
    config.model.embed_dim = 32
    config.data.image_size = 32
    config.data.train.scenes_config = "tiny"
    config.eval.update({"every_steps": 6, "batch_size": 32})
    config.eval.sets.scenes.update({"scenes_config": "tiny", "max_examples": 64, "captions": 2})
    config.checkpoint.update({"every_steps": 4, "keep": 2})
    config.log_every_steps = 2
    config.range_augment.enabled = True  # exercised by the trainer tests, off in runlocal
    return config
