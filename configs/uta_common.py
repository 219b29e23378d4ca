"""UTA pretraining recipe (paper 004, Sec. 3 "Pre-training"), shared by uta_vitb.py and uta_vitl.py.

Paper: ImageNet-21K, 224 px, 150 epochs, batch 4096, AdamW weight decay 0.05, lr linearly up to
1.5e-3 in 1 epoch then cosine to 1e-5, reversed block-wise masking with mask ratio 0.4 (B) / 0.5
(L), EVA-02-style ViT student (without the attention's inner LayerNorm), a giant EVA-CLIP teacher.
Not in the paper (EVA-02's MIM values): AdamW betas (0.9, 0.98), eps 1e-6.

`:runlocal` trains a tiny student on the embedded scenes against the small CLIP teacher of
`configs/clip_vitb16.py:runlocal` (train that first: see the README).
"""

from __future__ import annotations

import math

from ml_collections import ConfigDict

from configs.common import (
    checkpoint_config,
    eval_config,
    imagenet_eval_set,
    parse_arg,
    placeholder,
    scenes_eval_set,
    set_run_defaults,
    set_runlocal_evaluation,
)

# ImageNet-21K (fall 2011 release, all 21,841 classes) has 14,197,122 images.
IMAGENET21K_IMAGES = 14_197_122
SIZES = {
    "base": {"variant": "uta_base/16", "mask_ratio": 0.4},
    "large": {"variant": "uta_large/16", "mask_ratio": 0.5},
}


def steps_for_epochs(epochs: float, examples: int, batch_size: int) -> int:
    return math.ceil(epochs * examples / batch_size)


def uta_config(size: str, arg: str | None) -> ConfigDict:
    args = parse_arg(arg, runlocal=False)
    recipe = SIZES[size]
    config = ConfigDict()
    config.task = "pretrain.tasks.uta"
    config.seed = 0

    config.epochs = 150
    config.num_train_examples = IMAGENET21K_IMAGES
    config.batch_size = 4096
    config.total_steps = steps_for_epochs(config.epochs, config.num_train_examples, 4096)
    config.grad_accum_steps = 1
    config.optimizer = ConfigDict(
        {
            "name": "adamw",
            "b1": 0.9,
            "b2": 0.98,
            "eps": 1e-6,
            "weight_decay": 0.05,
            "grad_clip_norm": placeholder(float),  # not in the paper
            # Not in the paper: EVA-02/BEiT keep position and class embeddings out of the decay.
            "no_decay_patterns": (r"(^|/)positional_embedding$", r"(^|/)class_embedding$"),
        }
    )
    config.schedule = ConfigDict(
        {
            "decay": "cosine",
            "peak_lr": 1.5e-3,
            "end_lr": 1e-5,
            # 1 warm-up epoch.
            "warmup_steps": steps_for_epochs(1, config.num_train_examples, 4096),
        }
    )
    config.ema_decay = 0.0

    config.masking = ConfigDict(
        {"mask_ratio": recipe["mask_ratio"], "reverse_probability": 0.5}  # Sec. 2.2
    )
    config.model = ConfigDict(
        {
            "student": {"module": "models.vit.VisionTransformer", "variant": recipe["variant"]},
            "dtype": "bfloat16",
            "param_dtype": "float32",
            "remat_policy": "none",
        }
    )
    config.teacher = ConfigDict(
        {
            # The paper's teacher: the giant EVA-CLIP (open_clip "EVA01-g-14"). Download its
            # weights (e.g. open_clip_pytorch_model.bin converted to safetensors, or
            # open_clip_model.safetensors) and point open_clip_dir at their folder. Other
            # open_clip CLIPs work too, e.g. open_clip_model="ViT-L-14-quickgelu" for OpenAI's.
            "source": "open_clip",
            "open_clip_model": "EVA01-g-14",
            "open_clip_dir": placeholder(str),
            "config": "",
            "workdir": "",
            "step": "best",
            "dtype": "bfloat16",
            "grid_match": "interpolate_tokens",
        }
    )
    config.data = ConfigDict(
        {
            "image_size": 224,
            "random_resized_crop_scale": (0.2, 1.0),  # not in the paper: EVA-02's MIM crop
            "random_resized_crop_ratio": (0.75, 1.33),
            "train": {
                "source": "webdataset",  # ImageNet-21K as tar shards (images; labels unused)
                "shards": placeholder(str),
                "tfds_name": "",
                "split": "train",
            },
            "worker_count": 16,
            "worker_buffer_size": 2,
        }
    )
    # Zero-shot: the student's class token against the teacher's text tower.
    config.eval = eval_config(
        10_000,
        {"imagenet": imagenet_eval_set(templates="openai_imagenet", captions=0)},
        include_ema=False,
    )
    config.checkpoint = checkpoint_config(
        every_steps=5_000, keep=3, best_metric="imagenet/zeroshot_top1"
    )
    set_run_defaults(config)
    if args.runlocal:
        apply_runlocal(config)
    return config


def apply_runlocal(config: ConfigDict) -> None:
    """A tiny student against the :runlocal CLIP teacher, on the embedded scenes (CPU, minutes)."""
    config.total_steps = 1_000
    config.batch_size = 64
    config.schedule.update({"peak_lr": 1.5e-3, "end_lr": 1e-5, "warmup_steps": 50})
    config.model.student.update({"variant": config.model.student.variant.split("/")[0] + "/8"})
    config.model.student.update({"width": 96, "depth": 4, "num_heads": 4, "mlp_dim": 256})
    config.model.dtype = "float32"  # bf16 is slow on CPUs
    config.teacher.update(
        {
            "source": "workdir",
            "config": "configs/clip_vitb16.py:runlocal",
            "workdir": "workdirs/clip_runlocal",
            "step": "best",
            "dtype": "float32",
        }
    )
    config.data.image_size = 64
    config.data.random_resized_crop_scale = (0.9, 1.0)  # the scenes' objects must stay in view
    config.data.train = ConfigDict(
        {"source": "synthetic_scenes", "scenes_config": "base", "split": "train"}
    )
    set_runlocal_evaluation(
        config,
        {"scenes": scenes_eval_set(templates="synthetic_scenes", captions=5)},
        best_metric="scenes/zeroshot_top1",
    )
