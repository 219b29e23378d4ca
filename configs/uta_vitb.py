"""UTA pretraining of the EVA-02-style ViT-B/16 (mask ratio 0.4); see configs/uta_common.py.

  python -m pretrain.main --config=configs/uta_vitb.py --workdir=DIR \
      --config.data.train.shards='/data/in21k/{000000..002047}.tar' \
      --config.teacher.open_clip_dir=/models/eva_clip
"""

from ml_collections import ConfigDict

from configs.uta_common import uta_config


def get_config(arg: str | None = None) -> ConfigDict:
    return uta_config("base", arg)
