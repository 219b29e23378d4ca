"""A very small transfer run (linear probe / fine-tuning) of a tiny CatLIP run for tests."""

from ml_collections import ConfigDict

from configs.catlip_transfer import get_config as transfer_config


def get_config(arg: str = "") -> ConfigDict:
    """``arg``: "<catlip workdir>[,mode=...][,head_init=...]"."""
    workdir, _, options = arg.partition(",")
    config = transfer_config(",".join(filter(None, ["runlocal", options])))
    config.transfer.pretrained.update({"config": "tests/tiny_catlip_config.py", "workdir": workdir})
    config.transfer.pretrained.step = "latest"
    config.total_steps = 6
    config.batch_size = 16
    config.data.train.update({"scenes_config": "tiny", "max_examples": 64})
    config.eval.update({"every_steps": 3, "batch_size": 32})
    config.eval.sets.scenes.update({"scenes_config": "tiny", "max_examples": 64})
    config.checkpoint.update({"every_steps": 3, "keep": 1})
    config.log_every_steps = 2
    return config
