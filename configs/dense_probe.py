"""Dense probes (paper 003, Table 8) and dense fine-tuning (paper 000, Tables 14 and 15) of an
image tower: semantic segmentation, monocular depth, surface normals.

  python -m pretrain.main --config=configs/dense_probe.py:task=segmentation,head=linear \
      --workdir=DIR --config.tower.workdir=A_CLIP_RUN

Arguments (after a colon, comma-separated):
  task=segmentation|depth|normals   the target (default segmentation)
  head=linear|deeplabv3|pspnet|upernet
                      paper 003's three probes, or paper 000's UperNet (over a ViTDet-style
                      simple feature pyramid for ViTs), which fine-tunes the tower (mode=finetune)
  set=...             voc | ade20k (segmentation), nyu (depth, normals); default: voc, nyu, nyu;
                      scenes: the embedded dense scenes
  mode=probe|finetune default probe (finetune for upernet, as paper 000 trains it)
  tower=workdir|random|open_clip|timm
                      where the tower comes from (default workdir: --config.tower.workdir=RUN);
                      random: the tower of --config.tower.config, randomly initialised (the
                      baseline that shows a probe measures the representation)
  runlocal            the :runlocal CLIP run (workdirs/clip_runlocal) probed on the embedded dense
                      scenes (64 px, 8,000 train / 500 test), a few minutes on 2 CPU cores

Data: PASCAL VOC segmentation (21 classes incl. background; TFDS has no masks) and NYUv2 surface
normals (Bae et al.'s split) come as folders in the dense layout (pretrain/data/dense:
``KEY.jpg`` + ``KEY.seg.png`` / ``KEY.depth.png`` / ``KEY.normals.png``) given with
``--config.data.train.directory`` and ``--config.eval.sets.<set>.directory``; ADE20k
(``scene_parse150``) and NYUv2 depth (``nyu_depth_v2``) are TFDS data sets the user prepares.
"""

from __future__ import annotations

import math

from ml_collections import ConfigDict

from configs.common import checkpoint_config, eval_config, parse_arg, placeholder, set_run_defaults

# Paper 003, Table 8 (probes of frozen towers; the same for the linear, DeepLabV3 and PSPNet
# heads). The optimizer is not in the table: AdamW without weight decay here.
TABLE8 = {
    "segmentation": {
        "epochs": 50,
        "warmup_steps": 500,
        "warmup_init_lr": 1e-6,
        "peak_lr": 3e-5,
        "end_lr": 3e-6,
        "batch_size": 32,
    },
    "depth": {
        "epochs": 50,
        "warmup_steps": 1000,
        "warmup_init_lr": 1e-6,
        "peak_lr": 1e-4,
        "end_lr": 1e-6,
        "batch_size": 16,
    },
    "normals": {
        "epochs": 50,
        "warmup_steps": 1000,
        "warmup_init_lr": 1e-6,
        "peak_lr": 1e-5,
        "end_lr": 1e-6,
        "batch_size": 16,
    },
}
# Paper 000, Table 14 (ADE20k, UperNet; trained with mmsegmentation): 160k iterations at batch 16,
# AdamW, polynomial decay after 1,500 warm-up iterations, weight decay 0.01, 512 x 512 crops; the
# peak learning rate was swept over {5e-4, 2e-4, 1e-4} (and stochastic depth over [0, 0.2]).
TABLE14 = {
    "total_steps": 160_000,
    "batch_size": 16,
    "peak_lr": 1e-4,
    "end_lr": 0.0,
    "warmup_steps": 1_500,
    "weight_decay": 0.01,
    "crop_size": (512, 512),
}
# Paper 000, Table 15 (NYUv2 depth): 25 epochs at batch 24, AdamW, layer decay 0.8, weight decay
# 0.05, 480 x 480 crops; peak learning rate swept over {7e-4, 5e-4, 2e-4, 1e-4}.
TABLE15 = {
    "epochs": 25,
    "batch_size": 24,
    "peak_lr": 2e-4,
    "end_lr": 0.0,
    "layer_decay": 0.8,
    "weight_decay": 0.05,
    "crop_size": (480, 480),
}

# The data sets: source, classes and sizes (training images, for epochs -> steps).
NYU_CROP = (45, 471, 41, 601)  # the NYUv2 evaluation crop: rows 45:471, columns 41:601
SETS = {
    "voc": {
        "train": {"source": "folder", "directory": placeholder(str)},
        "eval": {"source": "folder", "directory": placeholder(str)},
        "num_classes": 21,
        "train_images": 10_582,  # the augmented training set (SBD), as probes commonly use
        "crop_size": (512, 512),
        "eval_size": (512, 512),
    },
    "ade20k": {
        "train": {"source": "tfds", "tfds_name": "scene_parse150", "split": "train"},
        "eval": {"source": "tfds", "tfds_name": "scene_parse150", "split": "validation"},
        "num_classes": 150,
        "train_images": 20_210,
        "crop_size": (512, 512),
        "eval_size": (512, 512),
    },
    "nyu": {
        "train": {"source": "tfds", "tfds_name": "nyu_depth_v2", "split": "train"},
        "eval": {"source": "tfds", "tfds_name": "nyu_depth_v2", "split": "validation"},
        "num_classes": 0,
        "train_images": 47_584,
        "crop_size": (480, 480),
        "eval_size": (480, 640),  # the labels' own size, so that NYU_CROP applies
    },
    "nyu_normals": {
        "train": {"source": "folder", "directory": placeholder(str)},
        "eval": {"source": "folder", "directory": placeholder(str)},
        "num_classes": 0,
        "train_images": 30_816,
        "crop_size": (480, 480),
        "eval_size": (480, 640),
    },
    "scenes": {
        "train": {"source": "synthetic_scenes", "scenes_config": "dense", "split": "train"},
        "eval": {"source": "synthetic_scenes", "scenes_config": "dense", "split": "test"},
        "num_classes": 7,  # ground + 6 shapes
        "train_images": 8_000,
        "crop_size": (64, 64),
        "eval_size": (64, 64),
    },
}
DEFAULT_SET = {"segmentation": "voc", "depth": "nyu", "normals": "nyu_normals"}
# The loss each target trains with in a probe (paper 003, Section 4.3) and in fine-tuning.
PROBE_LOSS = {"segmentation": "cross_entropy", "depth": "ssi", "normals": "nll_angmf"}
FINETUNE_LOSS = {"segmentation": "cross_entropy", "depth": "l1", "normals": "nll_angmf"}
BEST_METRIC = {
    "segmentation": ("miou", "max"),
    "depth": ("abs_rel", "min"),
    "normals": ("within_30", "max"),
}
HEADS = ("linear", "deeplabv3", "pspnet", "upernet")
TOWER_SOURCES = {"workdir": "workdir", "random": "recipe", "open_clip": "open_clip", "timm": "timm"}


def get_config(arg: str | None = None) -> ConfigDict:
    args = parse_arg(
        arg, runlocal=False, task="segmentation", head="linear", set="", mode="", tower="workdir"
    )
    if args.task not in TABLE8:
        raise ValueError(f"task {args.task!r}; choose from {sorted(TABLE8)}")
    if args.head not in HEADS:
        raise ValueError(f"head {args.head!r}; choose from {HEADS}")
    if args.tower not in TOWER_SOURCES:
        raise ValueError(f"tower {args.tower!r}; choose from {sorted(TOWER_SOURCES)}")
    mode = args.mode or ("finetune" if args.head == "upernet" else "probe")
    set_name = "scenes" if args.runlocal and not args.set else args.set or DEFAULT_SET[args.task]
    if set_name == "nyu" and args.task == "normals":
        set_name = "nyu_normals"  # TFDS's NYUv2 has no normals: Bae et al.'s folders
    if set_name not in SETS:
        raise ValueError(f"set {set_name!r}; choose from {sorted(SETS)}")
    data_set = SETS[set_name]

    config = ConfigDict()
    config.task = "pretrain.tasks.dense"
    config.seed = 0
    config.tower = ConfigDict(
        {
            "source": TOWER_SOURCES[args.tower],
            "config": "configs/clip_vitb16.py",  # the recipe when the run has no config.json
            "workdir": placeholder(str),
            "step": "best",
            "use_ema": placeholder(bool),  # default: the EMA when the run kept one
            "seed": 0,  # of a randomly initialised tower
            "open_clip_dir": "",
            "open_clip_model": "",
            "timm_dir": "",
        }
    )
    config.dense = ConfigDict(
        {
            "mode": mode,
            "target": args.task,
            "loss": (PROBE_LOSS if mode == "probe" else FINETUNE_LOSS)[args.task],
            "num_classes": data_set["num_classes"],
            "ignore_label": 255,
            "min_depth": 1e-3,
            "max_depth": 10.0,
            "eval_crop": NYU_CROP if set_name == "nyu" else None,
            "head": {"name": args.head},
            # UperNet over a convolutional tower reads all four stages; a ViT gives one map.
            "pyramid": args.head == "upernet",
        }
    )
    config.model = ConfigDict(
        {"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "none"}
    )
    config.data = ConfigDict(
        {
            "crop_size": data_set["crop_size"],
            "eval_size": data_set["eval_size"],
            "scale_range": (0.5, 2.0),  # random rescaling before the crop (mmseg's ratio range)
            "random_horizontal_flip": True,
            "train": data_set["train"],
            "worker_count": 8,
            "worker_buffer_size": 2,
        }
    )
    config.grad_accum_steps = 1
    config.ema_decay = 0.0
    if mode == "probe":
        _probe_recipe(config, args.task, data_set["train_images"])
    else:
        _finetune_recipe(config, args.head, data_set["train_images"])
    metric, best_mode = BEST_METRIC[args.task]
    sets = {set_name: {**data_set["eval"], "max_examples": 0}}
    config.eval = eval_config(2_000, sets, batch_size=16, figure_examples=4)
    config.checkpoint = checkpoint_config(2_000, keep=2, best_metric=f"{set_name}/{metric}")
    config.checkpoint.best_mode = best_mode
    set_run_defaults(config)
    if args.runlocal:
        apply_runlocal(config, args.task)
    return config


def _adamw(weight_decay: float, layer_decay: float | None = None) -> ConfigDict:
    return ConfigDict(
        {
            "name": "adamw",
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": weight_decay,
            "grad_clip_norm": placeholder(float),
            "no_decay_patterns": (),
            "layer_decay": layer_decay if layer_decay is not None else placeholder(float),
        }
    )


def _probe_recipe(config: ConfigDict, task: str, train_images: int) -> None:
    recipe = TABLE8[task]
    config.batch_size = recipe["batch_size"]
    config.total_steps = math.ceil(recipe["epochs"] * train_images / config.batch_size)
    config.optimizer = _adamw(0.0)
    config.schedule = ConfigDict(
        {
            "decay": "cosine",
            "peak_lr": recipe["peak_lr"],
            "end_lr": recipe["end_lr"],
            "warmup_steps": recipe["warmup_steps"],
            "warmup_init_lr": recipe["warmup_init_lr"],
        }
    )


def _finetune_recipe(config: ConfigDict, head: str, train_images: int) -> None:
    """Table 14 for segmentation, Table 15 for depth (and normals, which paper 000 does not
    report: the depth recipe)."""
    if config.dense.target == "segmentation":
        recipe = TABLE14
        config.total_steps = recipe["total_steps"]
        layer_decay = None
        schedule = {"decay": "polynomial", "power": 1.0, "warmup_steps": recipe["warmup_steps"]}
    else:
        recipe = TABLE15
        config.total_steps = math.ceil(recipe["epochs"] * train_images / recipe["batch_size"])
        layer_decay = recipe["layer_decay"]
        schedule = {"decay": "cosine", "warmup_steps": 0}
    del head
    config.batch_size = recipe["batch_size"]
    config.data.crop_size = recipe["crop_size"]
    config.optimizer = _adamw(recipe["weight_decay"], layer_decay)
    config.schedule = ConfigDict(
        {**schedule, "peak_lr": recipe["peak_lr"], "end_lr": recipe["end_lr"]}
    )


def apply_runlocal(config: ConfigDict, task: str) -> None:
    """Probe the :runlocal CLIP run (workdirs/clip_runlocal, a 64 px ViT) on the embedded dense
    scenes: 600 steps at batch 32 (2.4 epochs of 8,000 scenes), evaluated on 500 held-out ones."""
    config.tower.update(
        {"config": "configs/clip_vitb16.py:runlocal", "workdir": "workdirs/clip_runlocal"}
    )
    config.total_steps = 600
    config.batch_size = 32
    # A head alone trains at 3e-3; a tower fine-tuned with it at a tenth of that.
    peak_lr = 3e-3 if config.dense.mode == "probe" else 3e-4
    config.schedule.update(
        {"decay": "cosine", "peak_lr": peak_lr, "end_lr": peak_lr / 100, "warmup_steps": 50}
    )
    config.schedule.warmup_init_lr = 1e-6
    config.model.dtype = "float32"  # bf16 is slow on CPUs
    config.data.update({"worker_count": 0, "scale_range": (0.75, 1.5)})
    # The scenes' 64 px crops also for fine-tuning (Tables 14 / 15 crop 512 / 480 px).
    config.data.crop_size = SETS["scenes"]["crop_size"]
    # The scenes' depth: 1 to 60 scene units; rays that hit nothing are invalid in the data.
    config.dense.update({"min_depth": 1e-3, "max_depth": 1e3, "eval_crop": None})
    config.eval.update({"every_steps": 300, "batch_size": 100, "worker_count": 0})
    config.checkpoint.update({"every_steps": 300, "keep": 1})
    config.log_every_steps = 50
    del task
