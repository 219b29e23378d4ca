"""The smallest input for the CatLIP vocabulary builder: the tiny embedded scenes (256 train
records, built in $TFDS_DATA_DIR on first use) and a low count threshold."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = ConfigDict()
    train = {"source": "synthetic_scenes", "scenes_config": "tiny", "split": "train"}
    config.data = ConfigDict({"train": train})
    config.vocab = ConfigDict({"min_count": 5, "max_size": 0})
    return config
