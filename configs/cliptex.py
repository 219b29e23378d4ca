"""CLIPTeX (paper 003): a pretrained CLIP fine-tuned on image-text pairs together with hard
pseudo-labels from task experts (segmentation, depth, surface normals); Table 7.

  # 1. the experts label the data set (once; see pretrain/pseudo_label.py)
  python -m pretrain.pseudo_label --config=configs/cliptex.py \
      --config.pseudo_label.source.shards='/data/cc3m/{00000..00331}.tar' \
      --config.pseudo_label.output_dir=/data/cc3m_pseudo \
      --config.pseudo_label.experts.segmentation.weights=maskrcnn_resnet50_fpn_coco.pth ...
  # 2. fine-tune a CLIP on the labelled shards
  python -m pretrain.main --config=configs/cliptex.py --workdir=DIR \
      --config.data.train.shards='/data/cc3m_pseudo/pseudo-*.tar' \
      --config.init.clip_from.open_clip_dir=CLIP_WEIGHTS

Arguments (after a colon, comma-separated):
  variant=B/16|H/16|RN50   the CLIP (paper 003's three image towers; default B/16)
  baseline                 CLIP-FT (Section 4.2): the same data, resolution and schedule without
                           experts, the paper's fairer baseline
  runlocal                 fine-tune the Quick start's CLIP (workdirs/clip_runlocal) on 10,000
                           new embedded scenes labelled by three dense runs of this project
                           trained on other scenes (workdirs/cliptex_experts/*; the README says
                           how to make them), on a CPU in minutes

Table 7: 30 epochs (of CC3M), cosine decay, 1,000 warm-up steps from 1e-6 to 3e-5, down to
1e-6, batch 32, loss weights CLIP 1, segmentation 0.1, depth 1, normals 1. Section 4.2: base
resolution 512 with a variable-resolution batch sampler (``data.variable_resolution``). The
optimizer is not in the table: AdamW (0.9, 0.999), weight decay 0.05 here.
"""

from __future__ import annotations

import math

from ml_collections import ConfigDict

from configs.clip_rn50 import get_config as clip_rn50_config
from configs.clip_vitb16 import get_config as clip_vit_config
from configs.common import parse_arg, placeholder, scenes_eval_set, set_runlocal_evaluation

VARIANTS = ("B/16", "H/16", "RN50")
TABLE7 = {
    "epochs": 30,
    "warmup_steps": 1_000,
    "warmup_init_lr": 1e-6,
    "peak_lr": 3e-5,
    "end_lr": 1e-6,
    "batch_size": 32,
    "loss_weights": {"clip": 1.0, "segmentation": 0.1, "depth": 1.0, "normals": 1.0},
}
CC3M_SAMPLES = 2_900_000  # the image-text pairs of CC3M that can still be downloaded, roughly
BASE_RESOLUTION = 512  # Section 4.2: CLIP-FT and CLIPTeX fine-tune at 512 px
# COCO's 80 thing classes + background: the classes of the Mask R-CNN expert's maps.
COCO_SEMANTIC_CLASSES = 81
PRETRAINED_GRID = {"B/16": 14, "H/16": 14}  # the 224 px CLIPs' position-embedding grids
RUNLOCAL_EXPERTS = "workdirs/cliptex_experts"
RUNLOCAL_LABELLED = "workdirs/cliptex_scenes"


def get_config(arg: str | None = None) -> ConfigDict:
    args = parse_arg(arg, runlocal=False, variant="B/16", baseline=False)
    if args.variant not in VARIANTS:
        raise ValueError(f"variant={args.variant!r}; choose from {VARIANTS}")
    base_arg = "runlocal" if args.runlocal else ""
    if args.variant == "RN50":
        config = clip_rn50_config(base_arg)
    else:
        config = clip_vit_config(",".join(filter(None, [base_arg, f"variant={args.variant}"])))
    # Fine-tuning: no RangeAugment, no EMA (neither is in Table 7).
    config.range_augment.enabled = False
    config.ema_decay = 0.0
    config.batch_size = TABLE7["batch_size"]
    config.total_steps = math.ceil(TABLE7["epochs"] * CC3M_SAMPLES / config.batch_size)
    config.optimizer.update({"b1": 0.9, "b2": 0.999, "weight_decay": 0.05})
    config.schedule = ConfigDict(
        {
            "decay": "cosine",
            "warmup_steps": TABLE7["warmup_steps"],
            "warmup_init_lr": TABLE7["warmup_init_lr"],
            "peak_lr": TABLE7["peak_lr"],
            "end_lr": TABLE7["end_lr"],
        }
    )
    config.data.image_size = BASE_RESOLUTION
    config.data.random_resized_crop_scale = (0.08, 1.0)  # torchvision's default
    config.data.random_horizontal_flip = True
    config.data.train = ConfigDict(
        {
            "source": "webdataset",
            "shards": placeholder(str),  # written by python -m pretrain.pseudo_label
            "txt_captions": "single",
            "json_caption_fields": ("captions", "caption"),
            "index_cache_dir": "",
            "strict": False,
        }
    )
    # Section 4.2: batches of several resolutions around the base one, pixels per batch kept.
    config.data.variable_resolution = ConfigDict(
        {"enabled": True, "min_scale": 0.5, "max_scale": 1.5, "num_sizes": 5, "multiple": 32}
    )
    if args.variant in PRETRAINED_GRID:
        # The pretrained position embeddings keep their grid, resized to each input's.
        config.model.image.pos_embed_grid = PRETRAINED_GRID[args.variant]
    config.init = ConfigDict(
        {
            "clip_from": {
                "source": "open_clip",
                "open_clip_dir": placeholder(str),
                "open_clip_model": "",
                "config": "",
                "workdir": "",
                "step": "best",
            }
        }
    )
    config.cliptex = ConfigDict(
        {
            "enabled": not args.baseline,
            "targets": ("segmentation", "depth", "normals"),
            "loss_weights": TABLE7["loss_weights"],
            "num_classes": COCO_SEMANTIC_CLASSES,
            "ignore_label": 255,
            "min_depth": 1e-3,
            "max_depth": 65.0,
            "label_stride": 1,
            # Section 3: one shared PSP module (CoreNet's: bins 1, 2, 3, 6, 512 channels, dropout
            # 0.1), a 1x1 convolution per task, nearest upsampling to the label size.
            "head": {
                "channels": 512,
                "bins": (1, 2, 3, 6),
                "dropout": 0.1,
                "upsample": "nearest",
                "bn_groups": 1,
            },
        }
    )
    config.pseudo_label = ConfigDict(
        {
            "source": {"source": "webdataset", "shards": placeholder(str)},
            "output_dir": placeholder(str),
            "build_if_missing": False,
            "samples_per_shard": 10_000,
            "experts": {
                "segmentation": {
                    "kind": "mask_rcnn",
                    "weights": placeholder(str),
                    "score_threshold": 0.5,
                    "mask_threshold": 0.5,
                    "overlap": "score",
                },
                "depth": {"kind": "dpt", "weights": placeholder(str)},
                "normals": {"kind": "nll_angmf", "weights": placeholder(str), "min_kappa": 0.0},
            },
            "torch_python": "",
            "batch_size": 32,
            "label_max_side": BASE_RESOLUTION,
            "min_labelled_fraction": 0.0,
            # Depth relative to each image's median (DPT's is relative; a metric expert's too).
            "relative_depth": True,
            "depth_member": "depth.png",
            "normals_member": "normals.png",
        }
    )
    if args.runlocal:
        apply_runlocal(config, args.baseline, args.variant)
    return config


# The :runlocal CLIP each variant fine-tunes (the ViTs shrink to the same small model).
RUNLOCAL_CLIPS = {
    "B/16": ("configs/clip_vitb16.py:runlocal", "workdirs/clip_runlocal"),
    "H/16": ("configs/clip_vitb16.py:runlocal", "workdirs/clip_runlocal"),
    "RN50": ("configs/clip_rn50.py:runlocal", "workdirs/clip_rn50_runlocal"),
}


def apply_runlocal(config: ConfigDict, baseline: bool, variant: str) -> None:
    """The :runlocal CLIP (the Quick start's 64 px ViT; workdirs/clip_rn50_runlocal for RN50)
    fine-tuned for 500 steps on the embedded scenes' ``unlabelled`` config, which the three
    :runlocal experts (dense fine-tunes of the Quick start's CLIP on the ``dense`` config's
    scenes) label first (workdirs/cliptex_scenes)."""
    config.total_steps = 500
    config.batch_size = 64
    config.schedule.update({"warmup_steps": 50, "peak_lr": 1e-4, "end_lr": 1e-6})
    config.data.image_size = 64
    config.data.random_resized_crop_scale = (0.5, 1.0)
    config.data.variable_resolution.update({"min_scale": 0.75, "max_scale": 1.25, "multiple": 8})
    if variant in PRETRAINED_GRID:
        config.model.image.pos_embed_grid = 8  # the Quick start's 64 px / patch 8
    recipe, workdir = RUNLOCAL_CLIPS[variant]
    config.init.clip_from = ConfigDict(
        {"source": "workdir", "config": recipe, "workdir": workdir, "step": "best"}
    )
    config.cliptex.update({"num_classes": 7, "max_depth": 1e3})  # ground + 6 shapes
    config.cliptex.head.update({"channels": 64})
    shards = f"{RUNLOCAL_LABELLED}/pseudo-*.tar"
    config.data.train = ConfigDict(
        {"source": "webdataset", "shards": shards, "index_cache_dir": ""}
    )
    config.pseudo_label.source = ConfigDict(
        {"source": "synthetic_scenes", "scenes_config": "unlabelled", "split": "train"}
    )
    config.pseudo_label.experts = ConfigDict(
        {
            target: {"kind": "workdir", "workdir": f"{RUNLOCAL_EXPERTS}/{target}", "step": "best"}
            for target in ("segmentation", "depth", "normals")
        }
    )
    config.pseudo_label.update(
        {
            "output_dir": RUNLOCAL_LABELLED,
            "build_if_missing": True,
            "samples_per_shard": 2_000,
            "batch_size": 250,
            "label_max_side": 0,
        }
    )
    set_runlocal_evaluation(
        config,
        {"scenes": scenes_eval_set(templates="synthetic_scenes", captions=5)},
        best_metric="scenes/zeroshot_top1",
    )
    if baseline:  # CLIP-FT reads the same shards (their labels unused)
        config.cliptex.enabled = False
