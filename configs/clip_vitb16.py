"""CLIP ViT-B/16 pretraining, paper 000 ("CLIP with Quality Captions"), Table 11.

  python -m pretrain.main --config=configs/clip_vitb16.py --workdir=DIR \
      --config.data.train.shards='/data/datacomp/{00000000..00012895}.tar'

Arguments (after a colon, comma-separated):
  runlocal       a small CLIP on the embedded synthetic-scenes data set (CPU, minutes)
  variant=L/14   the image tower (B/16, L/14, H/14, ...); text tower and embedding as in open_clip
  loss=sigmoid   SigLIP loss (all-gather form); loss=sigmoid_ring for the ppermute ring form
e.g. --config=configs/clip_vitb16.py:variant=L/14,loss=sigmoid
"""

from __future__ import annotations

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

# open_clip's text towers and embedding sizes that go with each image tower.
TEXT_TOWERS = {
    "B": {"embed_dim": 512, "width": 512, "depth": 12, "num_heads": 8},
    "L": {"embed_dim": 768, "width": 768, "depth": 12, "num_heads": 12},
    "H": {"embed_dim": 1024, "width": 1024, "depth": 24, "num_heads": 16},
}


def get_config(arg: str | None = None) -> ConfigDict:
    args = parse_arg(arg, runlocal=False, variant="B/16", loss="clip")
    size = args.variant.split("/")[0]
    if size not in TEXT_TOWERS:
        raise ValueError(
            f"variant {args.variant!r}: the text tower is defined for {list(TEXT_TOWERS)}"
        )
    text = TEXT_TOWERS[size]

    config = ConfigDict()
    config.task = "pretrain.tasks.clip"
    config.seed = 0

    # Table 11.
    config.total_steps = 200_000  # train iterations
    config.batch_size = 65_536  # global batch size
    config.grad_accum_steps = (
        1  # exact for the contrastive loss (see trainer.accumulated_gradients)
    )
    config.optimizer = ConfigDict(
        {
            "name": "adamw",
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-6,  # not in Table 11; OpenAI CLIP's value for ViTs
            "weight_decay": 0.2,
            "grad_clip_norm": placeholder(float),  # Table 11 lists no clipping
            "no_decay_patterns": (),
        }
    )
    config.schedule = ConfigDict(
        {"decay": "cosine", "peak_lr": 1e-3, "end_lr": 1e-6, "warmup_steps": 2_000}
    )
    config.ema_decay = 0.9995
    config.range_augment = ConfigDict(
        {
            "enabled": True,
            "target_psnr": (40.0, 20.0),  # Table 11: RangeAugment target value
            "curriculum": "cosine",  # CoreNet's default annealing of the target
            "alpha": 100.0,  # weight of the similarity loss (CoreNet's default)
            "operations": ("brightness", "contrast", "noise"),
        }
    )

    config.model = ConfigDict(
        {
            "image": {
                "module": "models.vit.VisionTransformer",
                "variant": args.variant,
                "pool": "cls",
            },
            "text": {
                "module": "models.text.TextTransformer",
                "width": text["width"],
                "depth": text["depth"],
                "num_heads": text["num_heads"],
                "context_length": 77,  # Table 11: context length
                "vocab_size": 49_408,
                "causal": True,
            },
            "embed_dim": text["embed_dim"],
            "dtype": "bfloat16",  # Table 11: mixed precision BFloat16
            "param_dtype": "float32",
            "remat_policy": "none",
        }
    )
    config.loss = ConfigDict({"name": args.loss})

    config.data = ConfigDict(
        {
            "image_size": 224,  # Table 11: input resolution
            "random_resized_crop_scale": (0.9, 1.0),  # Table 11
            "random_resized_crop_ratio": (0.75, 1.33),  # Table 11
            "train": {
                "source": "webdataset",  # DataComp-style tar shards
                "shards": placeholder(str),
                "txt_captions": "single",  # a .txt member is one (alt-text) caption
                "json_caption_fields": ("captions", "caption"),  # more captions, e.g. synthetic
                "index_cache_dir": "",  # e.g. a local SSD folder: shard indexes built once
                "strict": False,  # a damaged shard is cut at the damage, logged, counted
                "tfds_name": "",
                "split": "train",
                "caption_choice": "random",
            },
            "worker_count": 16,
            "worker_buffer_size": 2,
        }
    )
    # Sets that are not available (e.g. ImageNet not prepared for TFDS) are skipped with a
    # warning at start-up. ImageNet-1k zero-shot uses the 80 OpenAI templates.
    config.eval = eval_config(
        5_000,
        {"imagenet": imagenet_eval_set(templates="openai_imagenet", captions=0)},
        include_ema=True,
    )
    config.checkpoint = checkpoint_config(
        every_steps=2_000, keep=3, best_metric="imagenet/zeroshot_top1"
    )
    set_run_defaults(config)

    if args.runlocal:
        apply_runlocal(config)
    return config


def apply_runlocal(config: ConfigDict) -> None:
    """A tiny CLIP on the embedded synthetic scenes: trains on 2 CPU cores in a few minutes."""
    config.total_steps = 1_000
    config.batch_size = 64
    config.schedule.update({"peak_lr": 2e-3, "end_lr": 1e-5, "warmup_steps": 50})
    config.optimizer.weight_decay = 0.1
    config.ema_decay = 0.0  # EMA at 0.9995 would lag a 1k-step run; off here
    # The embedded set's classes are colours: photometric augmentation of RangeAugment's
    # strength changes them (measured: 18% instead of 70% zero-shot top-1 after 1k steps).
    config.range_augment.enabled = False
    config.model.image.update(
        {"variant": "", "patch_size": 8, "width": 96, "depth": 4, "num_heads": 4}
    )
    config.model.text.update({"width": 96, "depth": 3, "num_heads": 4, "context_length": 32})
    config.model.embed_dim = 96
    config.model.dtype = "float32"  # bf16 is slow on CPUs
    config.data.image_size = 64
    config.data.train.update(
        {"source": "synthetic_scenes", "scenes_config": "base", "split": "train"}
    )
    set_runlocal_evaluation(
        config,
        {"scenes": scenes_eval_set(templates="synthetic_scenes", captions=5)},
        best_metric="scenes/zeroshot_top1",
    )
