"""UTA's contrastive fine-tuning (paper 004, Appendix A.1), shared by uta_ft_vit{b,l}.py.

Paper: image tower initialised from the UTA-pretrained ViT, text tower from the CLIP teacher;
DataComp-1B; CLIP loss with the temperature fixed to 0.01; batch 49,152; LAMB (following EVA-CLIP)
with peak lr 2e-4 (B) / 4e-4 (L), layer-wise lr decay 0.75 (B) / 0.85 (L), weight decay 0.05 (none
on 1-D parameters, position and class embeddings), cosine schedule to 0; 2B (B) / 4B (L) samples
seen (Table 1). Not in the paper (EVA-CLIP's values): LAMB betas (0.9, 0.98), eps 1e-6, the trust
ratio clamped to [0.01, 10], 2k warm-up steps.

`:runlocal` fine-tunes the UTA `:runlocal` student with the `clip_vitb16.py:runlocal` teacher's
text tower on the embedded scenes (run both first: see the README).
"""

from __future__ import annotations

import math

from ml_collections import ConfigDict

from configs.clip_vitb16 import get_config as clip_config
from configs.common import parse_arg, placeholder

SIZES = {
    "base": {"variant": "uta_base/16", "peak_lr": 2e-4, "layer_decay": 0.75, "samples": 2e9},
    "large": {"variant": "uta_large/16", "peak_lr": 4e-4, "layer_decay": 0.85, "samples": 4e9},
}
# The paper's teacher (EVA01-CLIP-g/14): its text tower and embedding size.
TEACHER_TEXT = {"width": 768, "depth": 12, "num_heads": 12, "embed_dim": 1024}
BATCH_SIZE = 49_152


def uta_ft_config(size: str, arg: str | None) -> ConfigDict:
    args = parse_arg(arg, runlocal=False)
    recipe = SIZES[size]
    config = clip_config()  # the CLIP task and data plumbing, with the values replaced below
    config.batch_size = BATCH_SIZE
    config.total_steps = math.ceil(recipe["samples"] / BATCH_SIZE)
    config.optimizer = ConfigDict(
        {
            "name": "lamb",
            "b1": 0.9,
            "b2": 0.98,
            "eps": 1e-6,
            "weight_decay": 0.05,
            "min_trust": 0.01,
            "max_trust": 10.0,
            "layer_decay": recipe["layer_decay"],
            "text_layer_decay": placeholder(float),
            "grad_clip_norm": placeholder(float),
            # No weight decay on position and class embeddings (and, always, 1-D parameters).
            "no_decay_patterns": (
                r"(^|/)positional_embedding$",
                r"(^|/)class_embedding$",
            ),
        }
    )
    config.schedule = ConfigDict(
        {"decay": "cosine", "peak_lr": recipe["peak_lr"], "end_lr": 0.0, "warmup_steps": 2_000}
    )
    config.ema_decay = 0.0
    config.range_augment.enabled = False
    config.loss = ConfigDict({"name": "clip", "fixed_logit_scale": 100.0})  # temperature 0.01
    config.model.image = ConfigDict(
        {"module": "models.vit.VisionTransformer", "variant": recipe["variant"]}
    )
    config.model.text.update({k: TEACHER_TEXT[k] for k in ("width", "depth", "num_heads")})
    config.model.embed_dim = TEACHER_TEXT["embed_dim"]
    config.init = ConfigDict(
        {
            "image_from": {
                "config": f"configs/uta_vit{size[0]}.py",
                "workdir": placeholder(str),
                "step": "best",
                "subtree": "",  # the UTA student is the whole parameter tree
            },
            "text_from": {
                "source": "open_clip",
                "open_clip_model": "EVA01-g-14",  # the UTA teacher's text tower
                "open_clip_dir": placeholder(str),
                "config": "",
                "workdir": "",
                "step": "best",
            },
        }
    )
    config.data.train.shards = placeholder(str)  # DataComp-1B
    if args.runlocal:
        apply_runlocal(config, size)
    return config


def apply_runlocal(config: ConfigDict, size: str) -> None:
    """Fine-tune the UTA :runlocal student with the :runlocal CLIP teacher's text tower."""
    local = clip_config("runlocal")
    for field in ("data", "eval", "checkpoint", "log_every_steps"):
        config[field] = local[field]
    config.total_steps = 300
    config.batch_size = 64
    config.schedule.update({"peak_lr": 5e-4, "warmup_steps": 30})
    config.model.dtype = "float32"
    config.model.text = local.model.text
    config.model.embed_dim = local.model.embed_dim
    config.model.image.update({"variant": config.model.image.variant.split("/")[0] + "/8"})
    config.model.image.update({"width": 96, "depth": 4, "num_heads": 4, "mlp_dim": 256})
    config.init.image_from.update(
        {"config": f"configs/uta_vit{size[0]}.py:runlocal", "workdir": "workdirs/uta_runlocal"}
    )
    config.init.text_from.update(
        {
            "source": "workdir",
            "config": "configs/clip_vitb16.py:runlocal",
            "workdir": "workdirs/clip_runlocal",
        }
    )
