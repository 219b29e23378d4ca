"""Benchmark: CatLIP's train step against CLIP's, same ViT-B/16 image tower and batch; and the
speed of CatLIP's label extraction.

    .venv/bin/python bench/catlip_vs_clip.py [--batch 8] [--rounds 3] [--dtype float32]

Both steps (forward, backward, AdamW, EMA, one device) are compiled first, called once to warm up,
and then timed in alternating rounds (bench/timing.py), so that machine noise hits both alike; the
printed ratio is CatLIP's time per
step divided by CLIP's, measured in this one run. CatLIP's classifier has the paper's 24,320
synsets (DataComp-1.3B at V_tau = 500); CLIP has its 12-layer text tower on 77 tokens. Then
captions/s of the caption -> synset extraction (one process, one core): cold cache (first pass)
and warm cache (second pass), on the embedded data set's captions and on web-like captions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import harness, timing  # noqa: E402
from bench.label_extraction import (  # noqa: E402
    measure_captions_per_second,
    scene_captions,
    web_like_captions,
)
from configs.catlip_vitb16 import get_config as catlip_config  # noqa: E402
from configs.clip_vitb16 import get_config as clip_config  # noqa: E402
from pretrain.data.synsets import vocabulary  # noqa: E402

DATACOMP_VOCABULARY_SIZE = 24_320
POSITIVES_PER_IMAGE = 6


def fake_vocabulary(path: Path, size: int) -> None:
    entries = [vocabulary.VocabEntry(f"n{i + 1}", f"synset{i}", 1000) for i in range(size)]
    vocabulary.write_vocabulary(path, entries)


def catlip_batch(batch: int, image_size: int, classes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.zeros((batch, classes), np.uint8)
    for row in labels:
        row[rng.choice(classes, POSITIVES_PER_IMAGE, replace=False)] = 1
    images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    return {"image": images, "labels": labels}


def compiled_step(config, local_batch: dict[str, np.ndarray]) -> harness.TrainStep:
    return harness.compiled_train_step(config, *harness.one_device_task(config), local_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--captions", type=int, default=20_000)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, batch {args.batch}")

    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.tsv"
        fake_vocabulary(vocab, DATACOMP_VOCABULARY_SIZE)
        catlip = catlip_config()
        catlip.vocab.path = str(vocab)
        clip = clip_config()
        clip.range_augment.enabled = False  # CatLIP's step has none either
        for config in (catlip, clip):
            config.model.dtype = args.dtype
            config.batch_size = args.batch
        steps = {
            "catlip": compiled_step(
                catlip, catlip_batch(args.batch, 224, DATACOMP_VOCABULARY_SIZE)
            ),
            "clip": compiled_step(clip, harness.random_clip_batch(args.batch, 224, 77)),
        }
    timings = timing.time_interleaved(steps, args.rounds)
    median = timing.medians(timings)
    for name in steps:
        print(
            f"{name} ViT-B/16 step ({args.dtype}): {median[name]:.3f} s/step "
            f"({timings[name].describe()}), {steps[name].gflop:.0f} GFLOP/step"
        )
    print(
        f"ratio CatLIP / CLIP time per step: {median['catlip'] / median['clip']:.3f} "
        f"(GFLOP ratio {steps['catlip'].gflop / steps['clip'].gflop:.3f}); "
        f"CLIP / CatLIP speed-up {median['clip'] / median['catlip']:.2f}x"
    )

    for name, captions in (
        ("embedded scenes", scene_captions(args.captions)),
        ("web-like", web_like_captions(args.captions)),
    ):
        rates = measure_captions_per_second(captions)
        listing = ", ".join(f"{key} {value:,.0f}" for key, value in rates.items())
        print(f"label extraction, {name} captions ({len(captions):,}): {listing}")


if __name__ == "__main__":
    main()
