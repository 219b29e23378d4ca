"""CLIP with the MobileCLIP MCi0 image tower (paper 000; MobileCLIP-S0's vision tower, timm
fastvit_mci0), trained with paper 000's Table 11 recipe at MobileCLIP's 256 px; embedding 512, the
12-layer 512-wide text tower without a causal mask (S1/S2's; S0's own RepMixer text tower is not
implemented).

Arguments: runlocal (a shallow MCi0 on the embedded scenes, CPU), loss=sigmoid|sigmoid_ring.
"""

from ml_collections import ConfigDict

from configs.clip_towers import mobileclip_config


def get_config(arg: str | None = None) -> ConfigDict:
    return mobileclip_config("mci0", arg)
