"""A ``models.two_tower.TwoTowerModel`` exported whole to an open_clip directory, as a task's
``--mode=export`` does: its image tower's family (families.py) names the timm trunk it needs,
writing the trunk's own timm export beside when no registered trunk has its architecture."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pretrain.export.open_clip.config import open_clip_model_config
from pretrain.export.open_clip.families import family_of_tower
from pretrain.export.open_clip.files import save_open_clip


def save_two_tower_model(
    directory: str | Path,
    model: Any,
    params: Mapping[str, Any],
    *,
    image_size: int | tuple[int, int],
    batch_stats: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s open_clip export directory; returns its path.

    ``params`` is the model's ``params`` tree (training-only entries removed), ``batch_stats``
    the ``batch_stats`` collection of a ResNet or MobileCLIP image tower (the trainer's
    ``model_state``). An EVA-style ViT without a registered timm trunk becomes its own timm
    export in ``directory/timm_trunk``, named ``local-dir:`` in the config (open_clip then needs
    that folder where it loads).
    """
    image = model.image_encoder
    trunk_name = family_of_tower(image).export_trunk(Path(directory), image, params, image_size)
    model_config = open_clip_model_config(
        image,
        model.text_encoder,
        image_size=image_size,
        init_logit_bias=model.logit_bias_init,
        timm_model_name=trunk_name,
    )
    return save_open_clip(directory, params, model_config, batch_stats=batch_stats)
