"""CLIP on a reinforced data set (DataCompDR): real and synthetic captions and the stored
embeddings of a CLIP teacher ensemble, as MobileCLIP trains (paper 000's quality captions plus
similarity distillation); pretrain/components/reinforced_training.py.

Arguments:
  tower=vitb16|mci0|mci1|mci2   the image tower (configs/clip_vitb16.py, configs/clip_towers.py)
  weights=b|s|captions          loss weights: ml-mobileclip's MobileCLIP-B recipe (b: CLIP 0.25
                                on real and on synthetic captions, distillation 0.75), its
                                MobileCLIP-S recipe (s: distillation only), or paper 000's
                                (captions: CLIP on real + synthetic captions, no teacher);
                                default b for vitb16, s for the MCi towers
  runlocal                      the embedded scenes, reinforced by the :runlocal CLIP run
                                (workdirs/clip_runlocal) as teacher, on a CPU in minutes

The full recipe reads DataCompDR shards (``--config.data.train.shards=...``; the ensemble of
two ViT-L/14 teachers, OpenAI's and DataComp-XL's, gives 2 x 768-d embeddings) or shards made by
``python -m pretrain.reinforce`` from ``config.reinforce`` (fill in its source, teachers'
weights and output_dir).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from configs.clip_towers import mobileclip_config
from configs.clip_vitb16 import get_config as clip_vit_config
from configs.common import parse_arg, placeholder

WEIGHTS = {
    "b": {"real_clip_weight": 0.25, "synthetic_clip_weight": 0.25, "distill_weight": 0.75},
    "s": {"real_clip_weight": 0.0, "synthetic_clip_weight": 0.0, "distill_weight": 1.0},
    "captions": {"real_clip_weight": 1.0, "synthetic_clip_weight": 1.0, "distill_weight": 0.0},
}
TOWERS = ("vitb16", "mci0", "mci1", "mci2")
RUNLOCAL_REINFORCED_DIR = "workdirs/reinforced_scenes"


def shards_glob(directory: str) -> str:
    """The shards ``python -m pretrain.reinforce`` writes into ``directory``."""
    return f"{directory}/reinforced-*.tar"


def get_config(arg: str | None = None) -> ConfigDict:
    args = parse_arg(arg, runlocal=False, tower="vitb16", weights="")
    if args.tower not in TOWERS:
        raise ValueError(f"tower={args.tower!r}; choose from {TOWERS}")
    weights = args.weights or ("b" if args.tower == "vitb16" else "s")
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; choose from {sorted(WEIGHTS)}")
    base_arg = "runlocal" if args.runlocal else ""
    if args.tower == "vitb16":
        config = clip_vit_config(base_arg)
    else:
        config = mobileclip_config(args.tower, base_arg)

    config.reinforced = ConfigDict(
        {
            "enabled": True,
            **WEIGHTS[weights],
            "synthetic_captions": True,
            # DataCompDR: OpenAI's and DataComp-XL's ViT-L/14, 768-d each, side by side.
            "teacher_embed_dim": 1536,
            "num_teachers": 2,
            "teacher_logit_scale": 100.0,  # MobileCLIP distils at a fixed scale
        }
    )
    config.data.train = ConfigDict(
        {"source": "webdataset", "shards": placeholder(str), "index_cache_dir": ""}
    )
    # How to make reinforced shards of one's own data (python -m pretrain.reinforce).
    config.reinforce = ConfigDict(
        {
            "source": ConfigDict({"source": "webdataset", "shards": placeholder(str)}),
            "teachers": ConfigDict(
                {
                    "openai": {
                        "source": "open_clip",
                        "open_clip_model": "ViT-L-14-quickgelu",
                        "open_clip_dir": placeholder(str),
                    },
                    "datacomp": {
                        "source": "open_clip",
                        "open_clip_model": "ViT-L-14",
                        "open_clip_dir": placeholder(str),
                    },
                }
            ),
            # DataCompDR's order of the embeddings (ConfigDict sorts the keys above).
            "ensemble_order": ("openai", "datacomp"),
            "output_dir": placeholder(str),
            "build_if_missing": False,
            "samples_per_shard": 10_000,
            "num_augmentations": 30,  # DataCompDR-12M (DataCompDR-1B: 10)
            "crop_scale": tuple(config.data.random_resized_crop_scale),
            "crop_ratio": tuple(config.data.random_resized_crop_ratio),
            "seed": 0,
            "batch_size": 256,
            "storage_dtype": "float16",
        }
    )
    if args.runlocal:
        apply_runlocal(config)
    return config


def apply_runlocal(config: ConfigDict) -> None:
    """The embedded scenes (with their synthetic captions) reinforced by the :runlocal CLIP run:
    built on first use into workdirs/reinforced_scenes, then trained like the plain :runlocal."""
    teacher = {
        "source": "workdir",
        "config": "configs/clip_vitb16.py:runlocal",
        "workdir": "workdirs/clip_runlocal",
        "step": "best",
        "dtype": "float32",
    }
    config.reinforced.update({"teacher_embed_dim": 96, "num_teachers": 1})
    # Assigned, not updated: update() would merge them into the full recipe's entries.
    config.reinforce.source = ConfigDict(
        {"source": "synthetic_scenes", "scenes_config": "base", "split": "train"}
    )
    config.reinforce.teachers = ConfigDict({"clip_runlocal": teacher})
    config.reinforce.ensemble_order = ("clip_runlocal",)
    config.reinforce.update(
        {
            "output_dir": RUNLOCAL_REINFORCED_DIR,
            "build_if_missing": True,
            "samples_per_shard": 2_000,
            "num_augmentations": 4,
            "batch_size": 500,
        }
    )
    config.data.train = ConfigDict(
        {
            "source": "webdataset",
            "shards": shards_glob(RUNLOCAL_REINFORCED_DIR),
            "index_cache_dir": "",
        }
    )
