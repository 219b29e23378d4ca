"""CLIP with other image towers: paper 000's recipe (configs/clip_vitb16.py, Table 11) with the
CLIP ResNet-50 or a MobileCLIP MCi tower, and the text tower and embedding size that open_clip's
matching model (RN50, MobileCLIP-S0/S1/S2) has. Used by clip_rn50.py and clip_mci{0,1,2}.py.

BatchNorm (both towers): ``model.image.bn_groups`` = 1 computes the batch statistics over the
whole global batch (synchronised over the data-parallel devices); N > 1 splits the batch into N
groups of consecutive rows, one per device when N is the number of data-parallel devices (as
PyTorch without SyncBatchNorm). The running statistics live in the train state.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from configs.clip_vitb16 import get_config as clip_vit_config
from configs.common import parse_arg


def tower_config(
    arg: str | None,
    *,
    image: dict[str, Any],
    runlocal_image: dict[str, Any],
    embed_dim: int,
    image_size: int,
    causal_text: bool,
) -> ConfigDict:
    args = parse_arg(arg, runlocal=False, loss="clip")
    config = clip_vit_config(f"loss={args.loss}" + (",runlocal" if args.runlocal else ""))
    config.model.text.causal = causal_text
    if args.runlocal:  # the runlocal text tower and sizes of configs/clip_vitb16.py:runlocal
        config.model.image = ConfigDict(runlocal_image)
        return config
    config.model.image = ConfigDict(image)
    config.model.embed_dim = embed_dim
    config.data.image_size = image_size
    return config


def mobileclip_config(variant: str, arg: str | None) -> ConfigDict:
    """CLIP with the MobileCLIP tower ``variant`` ("mci0" | "mci1" | "mci2") at 256 px, with
    MobileCLIP's text tower without causal mask; embedding 512."""
    tower = {"module": "models.mobileclip.MobileClipImageTower", "variant": variant, "bn_groups": 1}
    return tower_config(
        arg,
        image=tower,
        # One block per stage at half width: the full MCi trains ~20x slower on a CPU.
        runlocal_image={**tower, "depths": (1, 1, 1, 1), "widths": (32, 64, 128, 256)},
        embed_dim=512,
        image_size=256,
        causal_text=False,
    )
