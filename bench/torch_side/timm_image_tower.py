"""Runs in the PyTorch environment: times the forward pass of one timm image tower (CPU).

    python bench/torch_side/timm_image_tower.py --model fastvit_mci0 --image-size 256 \
        [--reparameterize] [--batch 8] [--rounds 5]

Random weights, ``num_classes`` = the CLIP embedding width (timm's ``head.fc``, which open_clip's
MobileCLIP configs use as the projection), eval mode, ``torch.inference_mode``, float32. With
``--reparameterize`` the model is first converted by ``timm.utils.reparameterize_model`` (the
inference form of FastViT / MobileOne blocks). One warm-up call (first-call allocations and kernel
selection), then the median of ``--rounds`` timed calls (bench/timing.py). Prints one JSON line.
"""

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
from timm.utils import reparameterize_model

# bench/timing.py imports only the standard library: usable here, where JAX is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import timing


def build_model(name: str, output_dim: int, reparameterize: bool) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False, num_classes=output_dim)
    model.eval()
    if reparameterize:
        model = reparameterize_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--output-dim", type=int, default=512)
    parser.add_argument("--reparameterize", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model, args.output_dim, args.reparameterize)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    with torch.inference_mode():
        seconds = timing.time_repeated(lambda: model(images), args.rounds, wait=timing.no_wait)
    print(
        json.dumps(
            {
                "seconds_per_call": seconds.median,
                "images_per_second": args.batch / seconds.median,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
