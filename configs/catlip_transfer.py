"""Transfer learning of a CatLIP (or CLIP/UTA) image tower on ImageNet-1k, paper 002, Table 7.

  python -m pretrain.main --config=configs/catlip_transfer.py:mode=linear_probe --workdir=DIR \
      --config.transfer.pretrained.workdir=CATLIP_RUN

Arguments (after a colon, comma-separated):
  mode=linear_probe   frozen tower, linear classifier (Table 7 (a)); mode=finetune: everything
                      trains (Table 7 (b))
  head_init=transfer  Transfer Init of the classifier from the CatLIP run's synset classifier;
                      head_init=random: a fresh classifier (the paper's Random Init)
  runlocal            probe the `configs/catlip_vitb16.py:runlocal` run (workdirs/catlip_runlocal)
                      on 1,000 labelled images of the embedded scenes (CPU, a minute or two)
The ImageNet-1k sets come from TFDS (`imagenet2012`, prepared by the user); their label names are
WordNet ids, so Transfer Init matches the vocabulary's synsets exactly where they are present.
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
)

IMAGENET_TRAIN_IMAGES = 1_281_167
# Table 7: (a) linear probing, (b) full fine-tuning on ImageNet-1k (one A100).
TABLE7 = {
    "linear_probe": {
        "epochs": 30,
        "peak_lr": 3e-5,
        "end_lr": 1e-6,
        "weight_decay": 0.0,
        "batch_size": 256,
    },
    "finetune": {
        "epochs": 10,
        "peak_lr": 3e-5,
        "end_lr": 3e-6,
        "weight_decay": 0.05,
        "batch_size": 128,
    },
}


def get_config(arg: str | None = None) -> ConfigDict:
    args = parse_arg(arg, runlocal=False, mode="linear_probe", head_init="transfer")
    if args.mode not in TABLE7:
        raise ValueError(f"mode {args.mode!r}: Table 7 covers {list(TABLE7)}")
    recipe = TABLE7[args.mode]

    config = ConfigDict()
    config.task = "pretrain.tasks.classify"
    config.seed = 0
    config.transfer = ConfigDict(
        {
            "mode": args.mode,
            "head_init": args.head_init,
            "pretrained": {
                "config": "configs/catlip_vitb16.py",  # used when the run has no config.json
                "workdir": placeholder(str),
                "step": "best",
                "use_ema": placeholder(bool),  # default: the EMA when the run kept one
            },
            "alpha": 0.5,  # Transfer Init's path-similarity threshold
            # Appendix A: cross-entropy with label smoothing (its value is CoreNet's default).
            "label_smoothing": 0.1,
        }
    )
    config.epochs = recipe["epochs"]
    config.batch_size = recipe["batch_size"]
    config.total_steps = math.ceil(config.epochs * IMAGENET_TRAIN_IMAGES / config.batch_size)
    config.grad_accum_steps = 1
    config.optimizer = ConfigDict(
        {
            "name": "adamw",
            "b1": 0.9,  # AdamW's default betas (Appendix A)
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": recipe["weight_decay"],
            "grad_clip_norm": placeholder(float),
            "no_decay_patterns": (),
        }
    )
    config.schedule = ConfigDict(
        {
            "decay": "cosine",
            "peak_lr": recipe["peak_lr"],
            "end_lr": recipe["end_lr"],
            "warmup_steps": 0,  # Table 7 lists none
        }
    )
    config.ema_decay = 0.0
    config.model = ConfigDict(
        {"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "none"}
    )
    config.data = ConfigDict(
        {
            "image_size": 0,  # 0: the pretrained run's resolution (224)
            "random_resized_crop_scale": (0.08, 1.0),
            "random_resized_crop_ratio": (0.75, 1.33),
            "random_horizontal_flip": True,
            "train": {
                "source": "tfds",
                "tfds_name": "imagenet2012",
                "split": "train",
                "classnames": "imagenet",
                "max_examples": 0,  # 0: all; N: the first N (data-efficiency curves, Fig. 5)
            },
            "worker_count": 16,
            "worker_buffer_size": 2,
        }
    )
    config.eval = eval_config(
        5_000,
        {"imagenet": imagenet_eval_set()},
        at_start=True,  # the initial head's accuracy (Transfer Init before training)
        include_ema=False,
    )
    config.checkpoint = checkpoint_config(every_steps=5_000, keep=2, best_metric="imagenet/top1")
    set_run_defaults(config)

    if args.runlocal:
        apply_runlocal(config)
    return config


def apply_runlocal(config: ConfigDict) -> None:
    """Probe the :runlocal CatLIP run on 1,000 labelled scenes (a low-data regime, where the
    paper finds Transfer Init helps most) for 200 steps, evaluated on 1,000 held-out scenes."""
    config.transfer.pretrained.update(
        {"config": "configs/catlip_vitb16.py:runlocal", "workdir": "workdirs/catlip_runlocal"}
    )
    config.total_steps = 200
    config.batch_size = 64
    config.schedule.update({"peak_lr": 1e-3, "end_lr": 1e-5, "warmup_steps": 0})
    config.model.dtype = "float32"
    config.data.random_resized_crop_scale = (0.9, 1.0)
    config.data.train = ConfigDict(
        {
            "source": "synthetic_scenes",
            "scenes_config": "base",
            "split": "train",
            "classnames": "synthetic_scenes",
            "max_examples": 1_000,
        }
    )
    config.data.worker_count = 0
    config.eval.update({"every_steps": 50, "batch_size": 200, "worker_count": 0})
    config.eval.sets = ConfigDict({"scenes": scenes_eval_set()})
    config.checkpoint.update({"every_steps": 100, "keep": 1, "best_metric": "scenes/top1"})
    config.log_every_steps = 25
