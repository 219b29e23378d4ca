"""CLIP with the MobileCLIP MCi2 image tower (paper 000; open_clip's MobileCLIP-S2 vision tower,
timm fastvit_mci2), trained with paper 000's Table 11 recipe at MobileCLIP's 256 px; embedding 512,
the 12-layer 512-wide text tower without a causal mask (MobileCLIP's).

Arguments: runlocal (a shallow MCi2 on the embedded scenes, CPU), loss=sigmoid|sigmoid_ring.
"""

from ml_collections import ConfigDict

from configs.clip_towers import mobileclip_config


def get_config(arg: str | None = None) -> ConfigDict:
    return mobileclip_config("mci2", arg)
