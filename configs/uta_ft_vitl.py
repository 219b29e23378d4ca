"""Contrastive fine-tuning of a UTA ViT-L/16 (paper 004, A.1); see configs/uta_ft_common.py.

  python -m pretrain.main --config=configs/uta_ft_vitl.py --workdir=DIR \
      --config.init.image_from.workdir=UTA_WORKDIR --config.init.text_from.open_clip_dir=TEACHER \
      --config.data.train.shards='/data/datacomp/{00000000..00139999}.tar'
"""

from ml_collections import ConfigDict

from configs.uta_ft_common import uta_ft_config


def get_config(arg: str | None = None) -> ConfigDict:
    return uta_ft_config("large", arg)
