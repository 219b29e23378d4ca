"""CatLIP pretraining on DataComp-1.3B, paper 002 ("CatLIP"), Table 6 (b) and Appendix A.

  python -m pretrain.data.synsets.vocabulary --config=configs/catlip_vitb16.py --output=vocab.tsv \
      --config.data.train.shards='/data/datacomp/{00000000..00139999}.tar'
  python -m pretrain.main --config=configs/catlip_vitb16.py --workdir=DIR \
      --config.data.train.shards='/data/datacomp/{00000000..00139999}.tar' \
      --config.vocab.path=vocab.tsv

Arguments (after a colon, comma-separated):
  runlocal        a small CatLIP on the embedded synthetic-scenes data set (CPU, minutes); its
                  vocabulary is built from the scenes' captions on first use
  variant=L/16    the image tower: B/16 (default), L/16 or H/16, each with its Table 6 learning
                  rates and per-GPU batch (the global batch is 65,536 for all three)
e.g. --config=configs/catlip_vitb16.py:variant=H/16
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

# Table 6 (b): max / min learning rate, batch per GPU and number of A100 GPUs.
TABLE6 = {
    "B/16": {"peak_lr": 1e-3, "end_lr": 1e-5, "batch_per_gpu": 1024, "gpus": 64},
    "L/16": {"peak_lr": 6e-4, "end_lr": 6e-6, "batch_per_gpu": 512, "gpus": 128},
    "H/16": {"peak_lr": 4e-4, "end_lr": 4e-6, "batch_per_gpu": 256, "gpus": 256},
}


def get_config(arg: str | None = None) -> ConfigDict:
    args = parse_arg(arg, runlocal=False, variant="B/16")
    if args.variant not in TABLE6:
        raise ValueError(f"variant {args.variant!r}: Table 6 covers {list(TABLE6)}")
    recipe = TABLE6[args.variant]

    config = ConfigDict()
    config.task = "pretrain.tasks.catlip"
    config.seed = 0

    # Table 6 (b).
    config.total_steps = 200_000  # max. iterations
    config.batch_size = recipe["batch_per_gpu"] * recipe["gpus"]  # 65,536
    config.grad_accum_steps = 1  # the loss is per example: accumulation is exact
    config.optimizer = ConfigDict(
        {
            "name": "adamw",
            "b1": 0.9,  # AdamW's default betas (Appendix A)
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.2,
            "grad_clip_norm": 1.0,  # not in Table 6: CoreNet's CatLIP recipes
            "no_decay_patterns": (),  # 1-D parameters are never decayed (pretrain/optim.py)
        }
    )
    config.schedule = ConfigDict(
        {
            "decay": "cosine",
            "peak_lr": recipe["peak_lr"],
            "end_lr": recipe["end_lr"],
            "warmup_steps": 10_000,  # not in Table 6: CoreNet's CatLIP recipes
        }
    )
    config.ema_decay = 0.9995  # not in Table 6: CoreNet's CatLIP recipes
    config.vocab = ConfigDict(
        {
            # TSV from `python -m pretrain.data.synsets.vocabulary` (synset_id, name, count).
            "path": placeholder(str),
            "min_count": 500,  # V_tau (Section 3.2, Appendix B)
            "max_size": 0,  # 0: every synset with count >= min_count (24,320 on DataComp-1.3B)
            "build_if_missing": False,  # web-scale data: build it once with the command above
            "build_processes": 1,
        }
    )
    # Appendix A: RangeAugment (Mehta et al., 2022), as in CoreNet's CLIP recipe (its target PSNR
    # annealed from 40 to 20 with CoreNet's defaults).
    config.range_augment = ConfigDict(
        {
            "enabled": True,
            "target_psnr": (40.0, 20.0),
            "curriculum": "cosine",
            "alpha": 100.0,
            "operations": ("brightness", "contrast", "noise"),
        }
    )
    config.transfer_init = ConfigDict({"alpha": 0.5})  # path-similarity threshold (Section 3.1)

    config.model = ConfigDict(
        {
            "image": {"module": "models.vit.VisionTransformer", "variant": args.variant},
            "dtype": "bfloat16",  # mixed precision (CoreNet's CatLIP recipes)
            "param_dtype": "float32",
            "remat_policy": "none",
        }
    )
    config.data = ConfigDict(
        {
            "image_size": 224,  # base resolution (Appendix A)
            # Appendix A: random resized crop with the default scale and aspect ratios.
            "random_resized_crop_scale": (0.08, 1.0),
            "random_resized_crop_ratio": (0.75, 1.33),
            "random_horizontal_flip": True,  # Appendix A
            "train": {
                "source": "webdataset",
                "shards": placeholder(str),
                "txt_captions": "single",
                "json_caption_fields": ("captions", "caption"),
                "index_cache_dir": "",
                "strict": False,
                "tfds_name": "",
                "split": "train",
                "caption_choice": "random",
            },
            "worker_count": 16,
            "worker_buffer_size": 2,
        }
    )
    # Transfer-Init classification (no training on the target): ImageNet's wnids match the
    # vocabulary's synsets exactly where present.
    config.eval = eval_config(5_000, {"imagenet": imagenet_eval_set()}, include_ema=True)
    config.checkpoint = checkpoint_config(
        every_steps=2_000, keep=3, best_metric="imagenet/transfer_init_top1"
    )
    set_run_defaults(config)

    if args.runlocal:
        apply_runlocal(config)
    return config


def apply_runlocal(config: ConfigDict) -> None:
    """A tiny CatLIP on the embedded synthetic scenes: trains on 2 CPU cores in a few minutes."""
    config.total_steps = 1_000
    config.batch_size = 64
    config.schedule.update({"peak_lr": 2e-3, "end_lr": 1e-5, "warmup_steps": 50})
    config.optimizer.weight_decay = 0.1
    config.ema_decay = 0.0  # EMA at 0.9995 would lag a 1k-step run
    # 20,000 records: the scenes' nouns (shapes, colours, grounds...) each occur far more often.
    config.vocab.update({"min_count": 50, "build_if_missing": True})
    # The embedded set's classes are colours, which RangeAugment's photometric changes alter
    # (as in configs/clip_vitb16.py:runlocal).
    config.range_augment.enabled = False
    config.model.image.update(
        {"variant": "", "patch_size": 8, "width": 96, "depth": 4, "num_heads": 4}
    )
    config.model.dtype = "float32"  # bf16 is slow on CPUs
    config.data.image_size = 64
    config.data.random_resized_crop_scale = (0.9, 1.0)  # the captioned objects must stay in view
    config.data.train = ConfigDict(
        {
            "source": "synthetic_scenes",
            "scenes_config": "base",
            "split": "train",
            "caption_choice": "random",
        }
    )
    set_runlocal_evaluation(
        config, {"scenes": scenes_eval_set()}, best_metric="scenes/transfer_init_top1"
    )
