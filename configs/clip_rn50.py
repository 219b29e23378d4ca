"""CLIP with open_clip's modified ResNet-50 image tower (RN50; CLIPTeX, paper 003, uses it),
trained with paper 000's Table 11 recipe; embedding 1024, the 12-layer 512-wide causal text tower.

Arguments: runlocal (a small ResNet on the embedded scenes, CPU), loss=sigmoid|sigmoid_ring.
"""

from ml_collections import ConfigDict

from configs.clip_towers import tower_config


def get_config(arg: str | None = None) -> ConfigDict:
    return tower_config(
        arg,
        image={"module": "models.resnet.ModifiedResNet", "variant": "RN50", "bn_groups": 1},
        runlocal_image={
            "module": "models.resnet.ModifiedResNet",
            "variant": "",
            "layers": (1, 1, 1, 1),
            "width": 16,
            "num_heads": 4,
            "bn_groups": 1,
        },
        embed_dim=1024,
        image_size=224,
        causal_text=True,
    )
